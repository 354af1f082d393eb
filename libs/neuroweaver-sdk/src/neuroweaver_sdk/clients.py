"""One object holding typed stubs for every service, with endpoints from flags or environment.

async with Clients(Endpoints.from_env()) as nw:
    model = await nw.registry.GetModel(GetModelRequest(name="projects/default/models/m"))

TLS: `NW_TLS_CA` (verify the services), `NW_TLS_CERT` + `NW_TLS_KEY` (mTLS), `NW_TLS_SERVER_NAME` (override).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as deployer_grpc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as experiments_grpc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as registry_grpc
from neuroweaver.trainer.v1 import trainer_service_pb2_grpc as trainer_grpc
from neuroweaver_runtime.client import ClientTLS, ServiceClient

DEFAULT_TARGETS = {
    "registry": "127.0.0.1:50051",
    "trainer": "127.0.0.1:50052",
    "deployer": "127.0.0.1:50053",
    "experiments": "127.0.0.1:50054",
}


@dataclass
class Endpoints:
    registry: str = DEFAULT_TARGETS["registry"]
    trainer: str = DEFAULT_TARGETS["trainer"]
    deployer: str = DEFAULT_TARGETS["deployer"]
    experiments: str = DEFAULT_TARGETS["experiments"]
    token: str | None = None
    project: str = "default"
    tls: ClientTLS = field(default_factory=ClientTLS)  # one setting for every service (one CA, one client identity)

    @classmethod
    def from_env(cls, **overrides) -> Endpoints:
        values: dict[str, Any] = {
            name: os.environ.get(f"NW_{name.upper()}_TARGET", default) for name, default in DEFAULT_TARGETS.items()
        }
        values["token"] = os.environ.get("NW_TOKEN") or None
        values["project"] = os.environ.get("NW_PROJECT", "default")
        values["tls"] = ClientTLS.from_env("NW_")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class Clients:
    """A runtime `ServiceClient` per service (one token, TLS setting and default deadline for all) and its stub."""

    def __init__(self, endpoints: Endpoints, deadline: float = 30.0) -> None:
        self.endpoints = endpoints
        self._clients = {
            name: ServiceClient(getattr(endpoints, name), endpoints.token, deadline, endpoints.tls) for name in DEFAULT_TARGETS
        }
        self.registry = self._clients["registry"].stub(registry_grpc.RegistryServiceStub)
        self.trainer = self._clients["trainer"].stub(trainer_grpc.TrainerServiceStub)
        self.deployer = self._clients["deployer"].stub(deployer_grpc.DeployerServiceStub)
        self.experiments = self._clients["experiments"].stub(experiments_grpc.ExperimentsServiceStub)

    def channel(self, service: str):
        return self._clients[service].channel()

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    async def __aenter__(self) -> Clients:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
