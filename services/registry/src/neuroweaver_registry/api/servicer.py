"""RegistryService servicer: protobuf in, use case, protobuf out. No rules live here."""

from __future__ import annotations

from google.protobuf import empty_pb2

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.registry.v1 import registry_pb2 as pb
from neuroweaver.registry.v1 import registry_service_pb2 as svc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as svc_grpc
from neuroweaver_runtime.auth import Role
from neuroweaver_runtime.errors import InvalidArgument
from neuroweaver_runtime.fieldmask import validate_update_mask
from neuroweaver_runtime.idempotency import request_fingerprint

from ..domain.model import ModelState
from ..service.models import MODEL_UPDATABLE
from ..service.registry import Registry
from . import convert

V, OP, A = Role.VIEWER, Role.OPERATOR, Role.ADMIN
METHOD_ROLES = {
    "CreateModel": OP, "GetModel": V, "ListModels": V, "UpdateModel": OP, "DeleteModel": A,
    "ArchiveModel": OP, "RestoreModel": OP,
    "CreateModelVersion": OP, "GetModelVersion": V, "ListModelVersions": V, "UpdateModelVersion": OP,
    "SetModelVersionState": OP, "AppendModelVersionMetrics": OP, "CompareModelVersions": V,
    "AddModelVersionArtifact": OP,
    "SetModelAlias": OP, "GetModelAlias": V, "ListModelAliases": V, "DeleteModelAlias": OP,
    "RollbackModelAlias": OP, "ListModelAliasHistory": V,
    "ListModelEvents": V, "WatchModelEvents": V,
    "CreateJudge": OP, "GetJudge": V, "ListJudges": V, "CreateJudgeVersion": OP, "GetJudgeVersion": V,
    "ListJudgeVersions": V,
}  # fmt: skip

_BUMP = {cpb.VERSION_BUMP_MAJOR: "major", cpb.VERSION_BUMP_MINOR: "minor", cpb.VERSION_BUMP_PATCH: "patch"}
_RELATION = {
    "NEWER": svc.SEMVER_RELATION_NEWER, "OLDER": svc.SEMVER_RELATION_OLDER,
    "EQUAL": svc.SEMVER_RELATION_EQUAL, "UNRELATED": svc.SEMVER_RELATION_UNRELATED,
}  # fmt: skip
_RECOMMENDATION = {
    "PROMOTE": svc.RECOMMENDATION_PROMOTE, "EXPERIMENT": svc.RECOMMENDATION_EXPERIMENT,
    "KEEP_BASE": svc.RECOMMENDATION_KEEP_BASE,
}  # fmt: skip


def _enum_value(value: int, enum_type, field: str) -> int:
    if value not in enum_type.values():
        raise InvalidArgument(f"{field} has unknown value {value}", field=field, reason="INVALID_ENUM")
    return value


def _check_metric_directions(metrics, field: str) -> None:
    for i, metric in enumerate(metrics):
        _enum_value(metric.direction, cpb.MetricDirection, f"{field}[{i}].direction")


def _check_judge_enums(version: pb.JudgeVersion, field: str) -> None:
    """Unknown kind/mode numbers would otherwise fail deep in the conversion as an INTERNAL error."""
    _enum_value(version.kind, pb.JudgeKind, f"{field}.kind")
    _enum_value(version.mode, pb.JudgeMode, f"{field}.mode")


class RegistryServicer(svc_grpc.RegistryServiceServicer):
    def __init__(self, registry: Registry) -> None:
        self.models = registry.models
        self.versions = registry.versions
        self.aliases = registry.aliases
        self.events = registry.events
        self.judges = registry.judges

    # models
    async def CreateModel(self, request, context):
        m = await self.models.create(
            request.parent,
            request.model_id,
            convert.model_from_pb(request.model),
            request.request_id,
            request_fingerprint(request),
        )
        return convert.model_to_pb(m)

    async def GetModel(self, request, context):
        return convert.model_to_pb(await self.models.get(request.name))

    async def ListModels(self, request, context):
        page = await self.models.list(request.parent, request.page_size, request.page_token, request.filter, request.order_by)
        return svc.ListModelsResponse(models=[convert.model_to_pb(m) for m in page.items], next_page_token=page.next_page_token)

    async def UpdateModel(self, request, context):
        paths = validate_update_mask(request.update_mask.paths, MODEL_UPDATABLE)
        m = await self.models.update(convert.model_from_pb(request.model), paths, request.model.etag)
        return convert.model_to_pb(m)

    async def DeleteModel(self, request, context):
        await self.models.delete(request.name, request.force, request.etag)
        return empty_pb2.Empty()

    async def ArchiveModel(self, request, context):
        return convert.model_to_pb(await self.models.set_state(request.name, ModelState.ARCHIVED, request.etag))

    async def RestoreModel(self, request, context):
        return convert.model_to_pb(await self.models.set_state(request.name, ModelState.ACTIVE, request.etag))

    # versions
    async def CreateModelVersion(self, request, context):
        _enum_value(request.bump, cpb.VersionBump, "bump")
        _enum_value(request.model_version.artifact.format, pb.ArtifactFormat, "model_version.artifact.format")
        _check_metric_directions(request.model_version.metrics, "model_version.metrics")
        mv = await self.versions.create(
            request.parent,
            request.version,
            _BUMP.get(request.bump, ""),
            convert.version_from_pb(request.model_version),
            request.request_id,
            request_fingerprint(request),
        )
        return convert.version_to_pb(mv)

    async def GetModelVersion(self, request, context):
        return convert.version_to_pb(await self.versions.get(request.name))

    async def ListModelVersions(self, request, context):
        page = await self.versions.list(request.parent, request.page_size, request.page_token, request.filter, request.order_by)
        return svc.ListModelVersionsResponse(
            model_versions=[convert.version_to_pb(v) for v in page.items], next_page_token=page.next_page_token
        )

    async def UpdateModelVersion(self, request, context):
        validate_update_mask(request.update_mask.paths, {"labels"})
        mv = request.model_version
        return convert.version_to_pb(await self.versions.update_labels(mv.name, dict(mv.labels), mv.etag))

    async def SetModelVersionState(self, request, context):
        state = convert.VERSION_STATE_FROM_PB.get(request.state)
        if state is None:
            raise InvalidArgument("state must be REGISTERED, VALIDATED or DEPRECATED", field="state", reason="INVALID_STATE")
        return convert.version_to_pb(await self.versions.set_state(request.name, state, request.reason, request.etag))

    async def AddModelVersionArtifact(self, request, context):
        _enum_value(request.artifact.format, pb.ArtifactFormat, "artifact.format")
        return convert.version_to_pb(await self.versions.add_artifact(request.name, convert.export_from_pb(request.artifact)))

    async def AppendModelVersionMetrics(self, request, context):
        _check_metric_directions(request.metrics, "metrics")
        metrics = [convert.metric_from_pb(m) for m in request.metrics]
        return convert.version_to_pb(await self.versions.append_metrics(request.name, metrics))

    async def CompareModelVersions(self, request, context):
        base, cand, cmp = await self.versions.compare(
            request.base_version, request.candidate_version, dict(request.metric_tolerances)
        )
        return svc.CompareModelVersionsResponse(
            base_version=convert.version_to_pb(base),
            candidate_version=convert.version_to_pb(cand),
            semver_relation=_RELATION[cmp.semver_relation],
            base_model_compatible=cmp.base_model_compatible,
            metric_deltas=[
                svc.MetricDelta(
                    name=m.name,
                    direction=convert._DIRECTION[m.direction],
                    base_value=m.base_value,
                    candidate_value=m.candidate_value,
                    delta=m.delta,
                    relative_delta=m.relative_delta,
                    improved=m.improved,
                    regressed=m.regressed,
                )
                for m in cmp.metric_deltas
            ],
            hyperparameter_diffs=[
                svc.FieldDiff(field=f, base_value=b, candidate_value=c) for f, b, c in cmp.hyperparameter_diffs
            ],
            lineage_diffs=[svc.FieldDiff(field=f, base_value=b, candidate_value=c) for f, b, c in cmp.lineage_diffs],
            recommendation=_RECOMMENDATION[cmp.recommendation],
            reason=cmp.reason,
        )

    # aliases
    async def SetModelAlias(self, request, context):
        alias = await self.aliases.set(request.model, request.alias, request.version, request.expected_version, request.reason)
        return convert.alias_to_pb(alias)

    async def GetModelAlias(self, request, context):
        return convert.alias_to_pb(await self.aliases.get(request.name))

    async def ListModelAliases(self, request, context):
        page = await self.aliases.list(request.parent, request.page_size, request.page_token)
        return svc.ListModelAliasesResponse(
            aliases=[convert.alias_to_pb(a) for a in page.items], next_page_token=page.next_page_token
        )

    async def DeleteModelAlias(self, request, context):
        await self.aliases.delete(request.name, request.expected_version, request.reason)
        return empty_pb2.Empty()

    async def RollbackModelAlias(self, request, context):
        alias = await self.aliases.rollback(request.name, request.to_version, request.reason, request.expected_version)
        return convert.alias_to_pb(alias)

    async def ListModelAliasHistory(self, request, context):
        page = await self.aliases.history(request.parent, request.page_size, request.page_token)
        return svc.ListModelAliasHistoryResponse(
            entries=[convert.history_to_pb(e) for e in page.items], next_page_token=page.next_page_token
        )

    # events
    async def ListModelEvents(self, request, context):
        page = await self.events.list(
            request.parent,
            request.model,
            request.after_sequence,
            request.page_size,
            request.page_token,
            request.filter,
            request.order_by,
        )
        return svc.ListModelEventsResponse(
            events=[convert.event_to_pb(e) for e in page.items], next_page_token=page.next_page_token
        )

    async def WatchModelEvents(self, request, context):
        async for event in self.events.watch(request.parent, request.model, request.after_sequence, request.filter):
            yield svc.WatchModelEventsResponse(event=convert.event_to_pb(event))

    # judges
    async def CreateJudge(self, request, context):
        _check_judge_enums(request.judge_version, "judge_version")
        judge = await self.judges.create(
            request.parent,
            request.judge_id,
            convert.judge_from_pb(request.judge),
            convert.judge_config_from_pb(request.judge_version),
            request.judge_version.notes,
            request.request_id,
            request_fingerprint(request),
        )
        return convert.judge_to_pb(judge)

    async def GetJudge(self, request, context):
        return convert.judge_to_pb(await self.judges.get(request.name))

    async def ListJudges(self, request, context):
        page = await self.judges.list(request.parent, request.page_size, request.page_token)
        return svc.ListJudgesResponse(judges=[convert.judge_to_pb(j) for j in page.items], next_page_token=page.next_page_token)

    async def CreateJudgeVersion(self, request, context):
        _check_judge_enums(request.judge_version, "judge_version")
        version = await self.judges.create_version(
            request.parent,
            convert.judge_config_from_pb(request.judge_version),
            request.judge_version.notes,
            request.request_id,
            request_fingerprint(request),
        )
        return convert.judge_version_to_pb(version)

    async def GetJudgeVersion(self, request, context):
        return convert.judge_version_to_pb(await self.judges.get_version(request.name))

    async def ListJudgeVersions(self, request, context):
        page = await self.judges.list_versions(request.parent, request.page_size, request.page_token)
        return svc.ListJudgeVersionsResponse(
            judge_versions=[convert.judge_version_to_pb(v) for v in page.items], next_page_token=page.next_page_token
        )
