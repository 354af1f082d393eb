"""Registry test fixtures: an in-process registry (built through `app.build`) on SQLite and on PostgreSQL.

Helpers live here as fixtures (the suite runs with --import-mode=importlib, so test modules do not import
each other). Every test creates its own uniquely named models, so one server per module and backend is shared.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio

from neuroweaver.registry.v1 import registry_pb2 as pb
from neuroweaver.registry.v1 import registry_service_pb2 as rs
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rs_grpc
from neuroweaver_registry.app import RegistryConfig, build
from neuroweaver_runtime.grpc_errors import error_info
from neuroweaver_runtime.testing import create_postgres_database, postgres_available

PG_AVAILABLE = postgres_available()
BACKENDS = [
    "sqlite",
    pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.skipif(not PG_AVAILABLE, reason="no PostgreSQL")]),
]
SHA = "ab" * 32


async def database_url(backend: str, tmp_dir) -> tuple[str, object]:
    """(url, async drop or None) of a fresh, empty database."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_dir / ('registry-' + uuid.uuid4().hex[:8] + '.db')}", None
    return await create_postgres_database("nwreg")


async def start_registry(url: str, tmp_dir, **overrides):
    """A started registry on an ephemeral port (port 0 is bound after build, since config port 0 means the default)."""
    service = build(RegistryConfig(port=0, metrics_port=-1, database_url=url, data_dir=str(tmp_dir), **overrides))
    service.port = 0
    await service.start()
    return service


@dataclass
class Registry:
    backend: str
    service: object
    channel: grpc.aio.Channel
    stub: rs_grpc.RegistryServiceStub
    url: str

    async def model(self, **fields) -> pb.Model:
        model_id = fields.pop("model_id", None) or "m-" + uuid.uuid4().hex[:10]
        fields.setdefault("base_model", "smollm2-135m")
        return await self.stub.CreateModel(
            rs.CreateModelRequest(parent="projects/default", model_id=model_id, model=pb.Model(**fields))
        )

    async def version(self, parent: str, version: str = "", bump: int = 0, **fields) -> pb.ModelVersion:
        mv = pb.ModelVersion(artifact=pb.Artifact(uri="file:///tmp/adapter", sha256=SHA, size_bytes=10), **fields)
        return await self.stub.CreateModelVersion(
            rs.CreateModelVersionRequest(parent=parent, version=version, bump=bump, model_version=mv)
        )


@contextlib.asynccontextmanager
async def running_registry(backend: str, tmp_dir, **overrides):
    """A Registry on a fresh database of `backend`, stopped (and its PostgreSQL database dropped) on exit."""
    url, drop = await database_url(backend, tmp_dir)
    service = await start_registry(url, tmp_dir, **overrides)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        yield Registry(backend, service, channel, rs_grpc.RegistryServiceStub(channel), url)
    finally:
        await channel.close()
        await service.stop()
        if drop is not None:
            await drop()


@pytest_asyncio.fixture(scope="module", params=BACKENDS)
async def registry(request, tmp_path_factory):
    async with running_registry(request.param, tmp_path_factory.mktemp("registry")) as started:
        yield started


@pytest.fixture
def own_registry(tmp_path):
    """`async with own_registry(backend, **config) as r:` a registry of the test's own, e.g. with auth on."""
    return lambda backend, **overrides: running_registry(backend, tmp_path, **overrides)


@pytest.fixture
def expect_error():
    """`await expect_error(coro, CODE, REASON)` → the AioRpcError, after checking code and ErrorInfo.reason."""

    async def check(awaitable, code: grpc.StatusCode, reason: str):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await awaitable
        err = caught.value
        info = error_info(err)
        assert err.code() == code, (err.code(), err.details())
        assert info is not None, err.details()
        assert info.reason == reason, (info.reason, err.details())
        assert info.domain == "registry.neuroweaver.v1"
        return err

    return check
