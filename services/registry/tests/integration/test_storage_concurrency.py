"""Migrations on both databases, concurrent writers, and live events across two replicas (PostgreSQL)."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
import semver
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.registry.v1 import registry_pb2 as pb
from neuroweaver.registry.v1 import registry_service_pb2 as rs
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rs_grpc
from neuroweaver_registry.adapters.tables import metadata
from neuroweaver_registry.app import MIGRATIONS
from neuroweaver_runtime import migrations
from neuroweaver_runtime.grpc_errors import error_info
from neuroweaver_runtime.testing import create_postgres_database

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


async def _tables(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names())) - {"alembic_version"}
    finally:
        await engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_migrations_up_down_up_from_empty(backend, tmp_path):
    if backend == "sqlite":
        url, drop = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", None
    else:
        url, drop = await create_postgres_database("nwmig")
    try:
        assert await _tables(url) == set()
        await asyncio.to_thread(migrations.upgrade, url, MIGRATIONS)
        assert await _tables(url) == set(metadata.tables)
        await asyncio.to_thread(migrations.downgrade, url, MIGRATIONS)
        assert await _tables(url) == set()
        await asyncio.to_thread(migrations.upgrade, url, MIGRATIONS)
        await asyncio.to_thread(migrations.upgrade, url, MIGRATIONS)  # idempotent at head
        assert await _tables(url) == set(metadata.tables)
    finally:
        if drop:
            await drop()


async def test_concurrent_patch_bumps_give_consecutive_versions(registry):
    m = await registry.model()
    await registry.version(m.name, version="1.0.0")
    # one channel per few callers so the calls really overlap on the server
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{registry.service.port}") for _ in range(5)]
    try:
        stubs = [rs_grpc.RegistryServiceStub(c) for c in channels]
        art = pb.Artifact(uri="file:///a", sha256="ef" * 32)
        calls = [
            stubs[i % 5].CreateModelVersion(
                rs.CreateModelVersionRequest(
                    parent=m.name, bump=cpb.VERSION_BUMP_PATCH, model_version=pb.ModelVersion(artifact=art)
                ),
                timeout=60,
            )
            for i in range(50)
        ]
        results = await asyncio.gather(*calls)
    finally:
        for c in channels:
            await c.close()
    got = sorted(semver.Version.parse(r.version) for r in results)
    assert [str(v) for v in got] == [f"1.0.{i}" for i in range(1, 51)]  # 50 distinct, consecutive: no duplicate, no gap
    model = await registry.stub.GetModel(rs.GetModelRequest(name=m.name))
    assert model.version_count == 51 and model.latest_version == "1.0.50"


async def test_concurrent_alias_compare_and_set_has_one_winner(registry):
    m = await registry.model()
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        await registry.version(m.name, version=v)
    await registry.stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.0.0"))
    targets = ["2.0.0", "3.0.0"] * 6
    calls = [
        registry.stub.SetModelAlias(
            rs.SetModelAliasRequest(model=m.name, alias="prod", version=t, expected_version="1.0.0", reason=str(i)), timeout=60
        )
        for i, t in enumerate(targets)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1, results
    assert all(isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.ABORTED for e in losers)
    assert {error_info(e).reason for e in losers} == {"ALIAS_VERSION_MISMATCH"}
    current = await registry.stub.GetModelAlias(rs.GetModelAliasRequest(name=m.name + "/aliases/prod"))
    assert current.version == winners[0].version
    history = await registry.stub.ListModelAliasHistory(rs.ListModelAliasHistoryRequest(parent=m.name + "/aliases/prod"))
    assert len(history.entries) == 2


@pytest.mark.postgres
async def test_watch_on_one_replica_sees_writes_through_another(tmp_path):
    from neuroweaver_runtime.testing import postgres_available

    assert await asyncio.to_thread(postgres_available), "PostgreSQL is required for this test"
    from neuroweaver_registry.app import RegistryConfig, build

    url, drop = await create_postgres_database("nwrepl")
    replicas, channels = [], []
    try:
        for _ in range(2):
            svc = build(RegistryConfig(port=0, metrics_port=-1, database_url=url, data_dir=str(tmp_path)))
            svc.port = 0
            await svc.start()
            replicas.append(svc)
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}"))
        a, b = (rs_grpc.RegistryServiceStub(c) for c in channels)
        call = a.WatchModelEvents(rs.WatchModelEventsRequest(parent="projects/default"))
        stream = call.__aiter__()
        # prime the stream: a write through A proves the watcher is live before B writes
        await a.CreateModel(rs.CreateModelRequest(parent="projects/default", model_id="from-a", model=pb.Model()))
        first = await asyncio.wait_for(stream.__anext__(), 10)
        assert first.event.resource == "projects/default/models/from-a"
        loop = asyncio.get_running_loop()
        started = loop.time()
        model_id = "from-b-" + uuid.uuid4().hex[:6]
        await b.CreateModel(rs.CreateModelRequest(parent="projects/default", model_id=model_id, model=pb.Model()))
        seen = await asyncio.wait_for(stream.__anext__(), 10)
        assert seen.event.resource == f"projects/default/models/{model_id}"
        assert seen.event.type == pb.ModelEvent.TYPE_MODEL_CREATED
        # NOTIFY wakes the watcher: well before the 2 s fallback poll
        assert loop.time() - started < 1.5
        call.cancel()
    finally:
        for c in channels:
            await c.close()
        for svc in replicas:
            await svc.stop()
        await drop()
