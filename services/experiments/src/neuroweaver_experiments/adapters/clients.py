"""Other services, through their generated stubs: the deployer (variant endpoints, resolved and watched) and the
registry (promotion, judge versions).
Both are runtime `ServiceClient`s (channel opened on first use; token, TLS and deadline from the service's settings).

Remote failures become domain errors a caller can act on: an unreachable service is UNAVAILABLE
(`DEPLOYER_UNAVAILABLE` / `REGISTRY_UNAVAILABLE`), a compare-and-set conflict is ABORTED with the registry's
reason, anything the remote rejects is FAILED_PRECONDITION naming the remote reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from neuroweaver.deployer.v1 import deployer_service_pb2 as deployer_pb
from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as deployer_grpc
from neuroweaver.registry.v1 import registry_service_pb2 as registry_pb
from neuroweaver.registry.v1 import registry_service_pb2_grpc as registry_grpc
from neuroweaver_runtime.client import ServiceClient
from neuroweaver_runtime.errors import Aborted, FailedPrecondition, NotFound, Unavailable
from neuroweaver_runtime.grpc_errors import error_info

_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass(frozen=True)
class DeploymentEndpoint:
    endpoint: str
    openai_base_url: str
    # (model version, the name selecting it: `<deployment>/<version>`) of each version when it serves several on one base
    version_models: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, d) -> DeploymentEndpoint:
        """From a deployer `Deployment` message."""
        versions = []
        if len(d.served_versions) > 1:
            for v in d.served_versions:
                own = f"{d.name}/{v.model_version.rsplit('/', 1)[-1]}"  # the deployment's own version has its names too
                versions.append((v.model_version, v.model_names[0] if own not in v.model_names and v.model_names else own))
        return cls(d.endpoint, d.openai_base_url, tuple(versions))


def _remote_reason(err: grpc.aio.AioRpcError) -> str:
    info = error_info(err)
    return info.reason if info is not None else err.code().name


class DeployerClient(ServiceClient):
    async def endpoint(self, deployment: str) -> DeploymentEndpoint:
        stub = self.stub(deployer_grpc.DeployerServiceStub)
        try:
            d = await stub.GetDeployment(deployer_pb.GetDeploymentRequest(name=deployment))
        except grpc.aio.AioRpcError as err:
            raise self._error(err, deployment) from None
        return DeploymentEndpoint.of(d)

    async def watch(self, deployment: str) -> AsyncIterator[DeploymentEndpoint]:
        """WatchDeployment: the endpoint now, then at every change of the deployment; ends when it is deleted."""
        call = self.stub(deployer_grpc.DeployerServiceStub).WatchDeployment(deployer_pb.WatchDeploymentRequest(name=deployment))
        try:
            async for message in call:
                yield DeploymentEndpoint.of(message.deployment)
        except grpc.aio.AioRpcError as err:
            raise self._error(err, deployment) from None
        finally:
            call.cancel()

    def _error(self, err: grpc.aio.AioRpcError, deployment: str) -> Unavailable | FailedPrecondition:
        if err.code() in _UNREACHABLE:
            return Unavailable(
                f"deployer at {self.target} is unreachable ({err.code().name}: {err.details()}); "
                f"cannot resolve the endpoint of {deployment}. Start the deployer or fix --deployer-target, then retry",
                reason="DEPLOYER_UNAVAILABLE",
                metadata={"deployer_target": self.target, "deployment": deployment},
            )
        return FailedPrecondition(
            f"deployer rejected deployment {deployment}: {err.code().name}: {err.details()}",
            reason="DEPLOYMENT_NOT_FOUND" if err.code() == grpc.StatusCode.NOT_FOUND else "DEPLOYMENT_UNUSABLE",
            metadata={"deployment": deployment, "remote_reason": _remote_reason(err)},
        )


class RegistryClient(ServiceClient):
    async def judge_version(self, name: str):
        """GetJudgeVersion (`latest` answers the newest, under its concrete name). NOT_FOUND and refusals become
        FAILED_PRECONDITION naming the judge version, an unreachable registry UNAVAILABLE."""
        try:
            return await self.stub(registry_grpc.RegistryServiceStub).GetJudgeVersion(
                registry_pb.GetJudgeVersionRequest(name=name)
            )
        except grpc.aio.AioRpcError as err:
            meta = {"judge_version": name, "remote_reason": _remote_reason(err)}
            if err.code() in _UNREACHABLE:
                raise Unavailable(
                    f"registry at {self.target} is unreachable ({err.code().name}); cannot read judge version {name}",
                    reason="REGISTRY_UNAVAILABLE",
                    metadata={**meta, "registry_target": self.target},
                ) from None
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(
                    f"judge version {name} does not exist in the registry", reason="JUDGE_VERSION_NOT_FOUND", metadata=meta
                ) from None
            raise FailedPrecondition(
                f"judge version {name} is not usable: the registry answered {err.code().name}: {err.details()}",
                reason="JUDGE_VERSION_UNUSABLE",
                metadata=meta,
            ) from None

    async def set_alias(self, model: str, alias: str, version: str, expected_version: str, reason: str) -> None:
        stub = self.stub(registry_grpc.RegistryServiceStub)
        request = registry_pb.SetModelAliasRequest(
            model=model, alias=alias, version=version, expected_version=expected_version, reason=reason
        )
        try:
            await stub.SetModelAlias(request)
        except grpc.aio.AioRpcError as err:
            remote = _remote_reason(err)
            meta = {"model": model, "alias": alias, "version": version, "remote_reason": remote}
            if err.code() == grpc.StatusCode.ABORTED:
                raise Aborted(
                    f"promotion aborted, the experiment stays un-concluded: {err.details()}",
                    reason=remote or "ALIAS_VERSION_MISMATCH",
                    metadata=meta,
                ) from None
            if err.code() in _UNREACHABLE:
                raise Unavailable(
                    f"registry at {self.target} is unreachable ({err.code().name}); the experiment stays un-concluded",
                    reason="REGISTRY_UNAVAILABLE",
                    metadata={**meta, "registry_target": self.target},
                ) from None
            raise FailedPrecondition(
                f"registry refused to move alias {alias} of {model} to {version}: {err.code().name}: {err.details()}",
                reason="PROMOTION_REJECTED",
                metadata=meta,
            ) from None
