"""DeployerService servicer: protobuf in, use case, protobuf out. No rules live here."""

from __future__ import annotations

from google.protobuf import empty_pb2

from neuroweaver.deployer.v1 import deployer_service_pb2 as svc
from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as svc_grpc
from neuroweaver_runtime import idempotency
from neuroweaver_runtime.auth import Role
from neuroweaver_runtime.fieldmask import validate_update_mask

from ..domain.model import UPDATABLE
from ..service.deployer import DeployerService
from ..service.metrics import DeploymentMetrics
from . import convert, convert_metrics

V, OP, A = Role.VIEWER, Role.OPERATOR, Role.ADMIN
METHOD_ROLES = {
    "CreateDeployment": OP, "GetDeployment": V, "ListDeployments": V, "UpdateDeployment": OP, "DeleteDeployment": OP,
    "ScaleDeployment": OP, "RollbackDeployment": OP, "ListDeploymentRevisions": V, "WatchDeployment": V,
    "RenderManifests": V, "GetDeploymentMetrics": V,
}  # fmt: skip


class DeployerServicer(svc_grpc.DeployerServiceServicer):
    def __init__(self, service: DeployerService, metrics: DeploymentMetrics) -> None:
        self.svc = service
        self.metrics = metrics

    async def CreateDeployment(self, request, context):
        d = await self.svc.create(
            request.parent,
            request.deployment_id,
            convert.deployment_from_pb(request.deployment),
            request.request_id,
            idempotency.request_fingerprint(request),
        )
        return convert.deployment_to_pb(d)

    async def GetDeployment(self, request, context):
        return convert.deployment_to_pb(await self.svc.get(request.name))

    async def ListDeployments(self, request, context):
        page = await self.svc.list(request.parent, request.page_size, request.page_token, request.filter, request.order_by)
        return svc.ListDeploymentsResponse(
            deployments=[convert.deployment_to_pb(d) for d in page.items], next_page_token=page.next_page_token
        )

    async def UpdateDeployment(self, request, context):
        paths = validate_update_mask(request.update_mask.paths, UPDATABLE)
        d = await self.svc.update(convert.deployment_from_pb(request.deployment), paths, request.deployment.etag)
        return convert.deployment_to_pb(d)

    async def DeleteDeployment(self, request, context):
        await self.svc.delete(request.name, request.etag)
        return empty_pb2.Empty()

    async def ScaleDeployment(self, request, context):
        return convert.deployment_to_pb(await self.svc.scale(request.name, request.replicas))

    async def RollbackDeployment(self, request, context):
        return convert.deployment_to_pb(await self.svc.rollback(request.name, request.to_revision))

    async def ListDeploymentRevisions(self, request, context):
        page = await self.svc.list_revisions(request.parent, request.page_size, request.page_token)
        return svc.ListDeploymentRevisionsResponse(
            revisions=[convert.revision_to_pb(r) for r in page.items], next_page_token=page.next_page_token
        )

    async def WatchDeployment(self, request, context):
        async for d in self.svc.watch(request.name):
            yield svc.WatchDeploymentResponse(deployment=convert.deployment_to_pb(d))

    async def RenderManifests(self, request, context):
        spec = convert.deployment_from_pb(request.deployment) if request.HasField("deployment") else None
        if spec is not None:
            spec.name = request.deployment.name
        yaml_text, objects = await self.svc.render(request.name, spec)
        return svc.RenderManifestsResponse(yaml=yaml_text, objects=objects)

    async def GetDeploymentMetrics(self, request, context):
        performance = await self.metrics.get(request.name, convert_metrics.window_from_pb(request))
        return convert_metrics.performance_to_pb(performance)
