"""Other services, through their generated stubs: the deployer (variant endpoints) and the registry (promotion).

Remote failures become domain errors a caller can act on: an unreachable service is UNAVAILABLE
(`DEPLOYER_UNAVAILABLE` / `REGISTRY_UNAVAILABLE`), a compare-and-set conflict is ABORTED with the registry's
reason, anything the remote rejects is FAILED_PRECONDITION naming the remote reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from neuroweaver.deployer.v1 import deployer_service_pb2 as deployer_pb
from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as deployer_grpc
from neuroweaver.registry.v1 import registry_service_pb2 as registry_pb
from neuroweaver.registry.v1 import registry_service_pb2_grpc as registry_grpc
from neuroweaver_runtime.client import ClientTLS, open_channel
from neuroweaver_runtime.errors import Aborted, FailedPrecondition, Unavailable
from neuroweaver_runtime.grpc_errors import error_info

_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass(frozen=True)
class DeploymentEndpoint:
    endpoint: str
    openai_base_url: str
    served_model_name: str


def _remote_reason(err: grpc.aio.AioRpcError) -> str:
    info = error_info(err)
    return info.reason if info is not None else err.code().name


class _Remote:
    def __init__(self, target: str, token: str, deadline: float, tls: ClientTLS | None = None) -> None:
        self.target = target
        self._token = token or None
        self._deadline = deadline
        self._tls = tls
        self._channel: grpc.aio.Channel | None = None

    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = open_channel(self.target, token=self._token, deadline=self._deadline, tls=self._tls)
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class DeployerClient(_Remote):
    async def endpoint(self, deployment: str) -> DeploymentEndpoint:
        stub = deployer_grpc.DeployerServiceStub(self.channel())
        try:
            d = await stub.GetDeployment(deployer_pb.GetDeploymentRequest(name=deployment))
        except grpc.aio.AioRpcError as err:
            if err.code() in _UNREACHABLE:
                raise Unavailable(
                    f"deployer at {self.target} is unreachable ({err.code().name}: {err.details()}); "
                    f"cannot resolve the endpoint of {deployment}. Start the deployer or fix --deployer-target, then retry",
                    reason="DEPLOYER_UNAVAILABLE",
                    metadata={"deployer_target": self.target, "deployment": deployment},
                ) from None
            raise FailedPrecondition(
                f"deployer rejected deployment {deployment}: {err.code().name}: {err.details()}",
                reason="DEPLOYMENT_NOT_FOUND" if err.code() == grpc.StatusCode.NOT_FOUND else "DEPLOYMENT_UNUSABLE",
                metadata={"deployment": deployment, "remote_reason": _remote_reason(err)},
            ) from None
        return DeploymentEndpoint(d.endpoint, d.openai_base_url, d.served_model_name)


class RegistryClient(_Remote):
    async def set_alias(self, model: str, alias: str, version: str, expected_version: str, reason: str) -> None:
        stub = registry_grpc.RegistryServiceStub(self.channel())
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
