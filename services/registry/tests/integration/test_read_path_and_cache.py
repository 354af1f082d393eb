"""The fast read path: GetModelVersion equals the full re-read, reads never wait for a writer on SQLite, the
version cache is invalidated by writes through another replica (PostgreSQL LISTEN/NOTIFY), and the cache's
bookkeeping never stores a value read before an invalidation."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from sqlalchemy import text

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.registry.v1 import registry_pb2 as pb
from neuroweaver.registry.v1 import registry_service_pb2 as rs
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rs_grpc
from neuroweaver_registry.domain.model import ModelVersion
from neuroweaver_registry.service.cache import InvalidatingNotifier, VersionCache
from neuroweaver_runtime.testing import create_postgres_database

SHA = "ab" * 32
NOT_FOUND = grpc.StatusCode.NOT_FOUND


async def test_get_version_matches_list_for_every_reference(registry, expect_error):
    """Semver, alias and `latest` resolve through one statement; the result equals ListModelVersions' rows."""
    m = await registry.model()
    await registry.version(m.name, version="1.0.0")
    await registry.version(m.name, version="1.1.0-rc.1")
    v = await registry.version(m.name, version="1.0.1")
    await registry.stub.AppendModelVersionMetrics(
        rs.AppendModelVersionMetricsRequest(
            name=v.name,
            metrics=[
                pb.Metric(name="accuracy", value=0.5),
                pb.Metric(name="loss", value=1.25, direction=cpb.METRIC_DIRECTION_LOWER_IS_BETTER),
            ],
        )
    )
    await registry.stub.AppendModelVersionMetrics(
        rs.AppendModelVersionMetricsRequest(name=v.name, metrics=[pb.Metric(name="accuracy", value=0.75)])
    )
    for alias in ("prod", "a-b", "ab", "canary"):
        await registry.stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias=alias, version="1.0.1"))
    listed = await registry.stub.ListModelVersions(rs.ListModelVersionsRequest(parent=m.name))
    expected = {x.version: x for x in listed.model_versions}
    for ref in ("1.0.1", "prod", "a-b", "latest", "1.0.0", "1.1.0-rc.1"):
        got = await registry.stub.GetModelVersion(rs.GetModelVersionRequest(name=f"{m.name}/versions/{ref}"))
        assert got == expected[got.version], ref
    got = await registry.stub.GetModelVersion(rs.GetModelVersionRequest(name=f"{m.name}/versions/prod"))
    assert [x.value for x in got.metrics] == [0.5, 1.25, 0.75] and len(got.aliases) == 4
    # errors are unchanged, including the order of checks
    await expect_error(
        registry.stub.GetModelVersion(rs.GetModelVersionRequest(name=m.name + "/versions/9.9.9")), NOT_FOUND, "VERSION_NOT_FOUND"
    )
    await expect_error(
        registry.stub.GetModelVersion(rs.GetModelVersionRequest(name=m.name + "/versions/nope")), NOT_FOUND, "ALIAS_NOT_FOUND"
    )
    gone = "projects/default/models/missing-" + uuid.uuid4().hex[:6]
    for ref in ("1.0.0", "latest", "prod", "3000000000.0.0"):
        await expect_error(
            registry.stub.GetModelVersion(rs.GetModelVersionRequest(name=f"{gone}/versions/{ref}")), NOT_FOUND, "MODEL_NOT_FOUND"
        )
    await expect_error(
        registry.stub.GetModelVersion(rs.GetModelVersionRequest(name=m.name + "/versions/3000000000.0.0")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_VERSION",
    )
    empty = await registry.model()
    await expect_error(
        registry.stub.GetModelVersion(rs.GetModelVersionRequest(name=empty.name + "/versions/latest")),
        NOT_FOUND,
        "VERSION_NOT_FOUND",
    )


async def test_create_version_returns_what_a_read_returns(registry):
    m = await registry.model(base_model="base-x")
    mv = pb.ModelVersion(
        artifact=pb.Artifact(uri="file:///tmp/a", sha256=SHA, size_bytes=7),
        metrics=[pb.Metric(name="bleu", value=0.3, source="eval")],
        labels={"team": "nlp"},
        notes="n",
    )
    created = await registry.stub.CreateModelVersion(
        rs.CreateModelVersionRequest(parent=m.name, bump=cpb.VERSION_BUMP_MINOR, model_version=mv)
    )
    again = await registry.stub.GetModelVersion(rs.GetModelVersionRequest(name=created.name))
    assert created == again
    explicit = await registry.version(m.name, version="0.0.5")
    assert explicit == await registry.stub.GetModelVersion(rs.GetModelVersionRequest(name=explicit.name))


async def test_create_model_retry_after_delete_is_not_found(registry, expect_error):
    request_id = str(uuid.uuid4())
    req = rs.CreateModelRequest(
        parent="projects/default", model_id="m-" + uuid.uuid4().hex[:8], model=pb.Model(), request_id=request_id
    )
    first = await registry.stub.CreateModel(req)
    assert await registry.stub.CreateModel(req) == first  # an ordinary retry returns the same model
    await registry.stub.DeleteModel(rs.DeleteModelRequest(name=first.name))
    err = await expect_error(registry.stub.CreateModel(req), NOT_FOUND, "MODEL_NOT_FOUND")
    assert "deleted" in err.details()
    # the retry did not re-create it
    await expect_error(registry.stub.GetModel(rs.GetModelRequest(name=first.name)), NOT_FOUND, "MODEL_NOT_FOUND")


async def test_create_version_retry_after_model_recreated_is_not_found(registry, expect_error):
    m = await registry.model()
    request_id = str(uuid.uuid4())
    art = pb.Artifact(uri="file:///tmp/a", sha256=SHA, size_bytes=1)
    req = rs.CreateModelVersionRequest(
        parent=m.name, bump=cpb.VERSION_BUMP_PATCH, model_version=pb.ModelVersion(artifact=art), request_id=request_id
    )
    v = await registry.stub.CreateModelVersion(req)
    assert await registry.stub.CreateModelVersion(req) == v
    await registry.stub.DeleteModel(rs.DeleteModelRequest(name=m.name, force=True))
    await registry.stub.CreateModel(
        rs.CreateModelRequest(parent="projects/default", model_id=m.name.rsplit("/", 1)[1], model=pb.Model())
    )
    await expect_error(registry.stub.CreateModelVersion(req), NOT_FOUND, "VERSION_NOT_FOUND")


async def test_sqlite_reads_do_not_wait_for_a_writer(tmp_path):
    from neuroweaver_registry.app import RegistryConfig, build

    svc = build(RegistryConfig(port=0, metrics_port=-1, database_url=f"sqlite:///{tmp_path / 'r.db'}", data_dir=str(tmp_path)))
    svc.port = 0
    await svc.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}")
    stub = rs_grpc.RegistryServiceStub(channel)
    try:
        m = await stub.CreateModel(rs.CreateModelRequest(parent="projects/default", model_id="locked", model=pb.Model()))
        art = pb.Artifact(uri="file:///tmp/a", sha256=SHA, size_bytes=1)
        v = await stub.CreateModelVersion(
            rs.CreateModelVersionRequest(parent=m.name, version="1.0.0", model_version=pb.ModelVersion(artifact=art))
        )
        db = svc.registry.db
        holding, release = asyncio.Event(), asyncio.Event()

        async def writer():
            async with db.transaction() as s:  # BEGIN IMMEDIATE: the write lock, held until release
                await s.execute(text("UPDATE models SET description = 'x' WHERE name = :n"), {"n": m.name})
                holding.set()
                await release.wait()

        task = asyncio.create_task(writer())
        await holding.wait()
        try:
            for ref in ("1.0.0", "latest"):
                got = await stub.GetModelVersion(rs.GetModelVersionRequest(name=f"{m.name}/versions/{ref}"), timeout=3)
                assert got.name == v.name
            assert (await stub.GetModel(rs.GetModelRequest(name=m.name), timeout=3)).description == ""
            assert len((await stub.ListModelVersions(rs.ListModelVersionsRequest(parent=m.name), timeout=3)).model_versions) == 1
        finally:
            release.set()
            await task
    finally:
        await channel.close()
        await svc.stop()


@pytest.mark.postgres
async def test_cache_is_invalidated_by_writes_through_another_replica(tmp_path):
    from neuroweaver_registry.app import RegistryConfig, build
    from neuroweaver_runtime.testing import postgres_available

    assert await asyncio.to_thread(postgres_available), "PostgreSQL is required for this test"
    url, drop = await create_postgres_database("nwcache")
    replicas, channels = [], []
    try:
        for _ in range(2):
            svc = build(RegistryConfig(port=0, metrics_port=-1, database_url=url, data_dir=str(tmp_path)))
            svc.port = 0
            await svc.start()
            replicas.append(svc)
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}"))
        a, b = (rs_grpc.RegistryServiceStub(c) for c in channels)
        cache_a = replicas[0].registry.cache
        assert cache_a is not None
        # An hour-long TTL: whatever A serves fresh within the waits below came from a NOTIFY, not from expiry
        # (and no wall-clock bound makes the test depend on the machine's load).
        cache_a.ttl = 3600.0
        m = await b.CreateModel(rs.CreateModelRequest(parent="projects/default", model_id="cached", model=pb.Model()))
        art = pb.Artifact(uri="file:///tmp/a", sha256=SHA, size_bytes=1)
        for version in ("1.0.0", "1.1.0"):
            await b.CreateModelVersion(
                rs.CreateModelVersionRequest(parent=m.name, version=version, model_version=pb.ModelVersion(artifact=art))
            )
        await b.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.0.0"))
        loop = asyncio.get_running_loop()

        async def read(ref: str) -> pb.ModelVersion:
            return await a.GetModelVersion(rs.GetModelVersionRequest(name=f"{m.name}/versions/{ref}"))

        async def visible_on_a(ref: str, check) -> None:
            """Waits until A serves the write B just acknowledged (polling A's cached read path)."""
            started = loop.time()
            while not check(await read(ref)):
                assert loop.time() - started < 30.0, f"replica A still serves a stale {ref}"
                await asyncio.sleep(0.001)

        # fill A's cache and prove it is used
        for ref in ("prod", "latest", "1.0.0"):
            await read(ref)
        hits = cache_a.hits
        assert (await read("prod")).version == "1.0.0" and cache_a.hits == hits + 1
        await b.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.1.0"))
        await visible_on_a("prod", lambda v: v.version == "1.1.0")
        await b.CreateModelVersion(
            rs.CreateModelVersionRequest(parent=m.name, version="2.0.0", model_version=pb.ModelVersion(artifact=art))
        )
        await visible_on_a("latest", lambda v: v.version == "2.0.0")
        await b.AppendModelVersionMetrics(
            rs.AppendModelVersionMetricsRequest(name=f"{m.name}/versions/1.0.0", metrics=[pb.Metric(name="acc", value=1.0)])
        )
        await visible_on_a("1.0.0", lambda v: len(v.metrics) == 1)
        await b.DeleteModel(rs.DeleteModelRequest(name=m.name, force=True))
        started = loop.time()
        while True:
            try:
                await read("1.0.0")
            except grpc.aio.AioRpcError as err:
                assert err.code() == NOT_FOUND
                break
            assert loop.time() - started < 30.0, "replica A still serves a deleted model"
            await asyncio.sleep(0.001)
        # with the LISTEN connection gone, the cache is bypassed (notifications could be lost)
        cache_a.enabled = lambda: False
        assert cache_a.token("default") is None and len(cache_a) == 0
    finally:
        for c in channels:
            await c.close()
        for svc in replicas:
            await svc.stop()
        await drop()


def _version(name: str) -> ModelVersion:
    return ModelVersion(name=name, version=name.rsplit("/", 1)[1])


def test_cache_never_stores_a_read_that_overlapped_an_invalidation():
    cache = VersionCache(max_entries=10)
    notifier = InvalidatingNotifier(cache)
    name = "projects/p/models/m/versions/prod"
    token = cache.token("p")  # a reader misses and starts reading the database ...
    notifier.wake("p")  # ... a write to the project commits meanwhile
    cache.put(name, "p", token, _version(name + "-old"))
    assert cache.get(name) is None  # the possibly stale read was not stored
    token = cache.token("p")
    cache.put(name, "p", token, _version(name))
    assert cache.get(name) is not None
    notifier.wake("other")  # other projects' writes leave it alone
    assert cache.get(name) is not None
    notifier.wake("p")
    assert cache.get(name) is None
    token = cache.token("p")
    notifier.wake("*")  # listener reconnected: everything may have changed
    cache.put(name, "p", token, _version(name))
    assert cache.get(name) is None


def test_cache_ttl_size_and_disabled_channel(monkeypatch):
    live = {"on": True}
    cache = VersionCache(max_entries=2, ttl_seconds=5.0, enabled=lambda: live["on"])
    for i in range(3):
        cache.put(f"projects/p/models/m/versions/{i}", "p", cache.token("p"), _version(f"x/{i}"))
    assert len(cache) == 2 and cache.get("projects/p/models/m/versions/0") is None
    import neuroweaver_registry.service.cache as module

    now = module.time.monotonic()
    monkeypatch.setattr(module.time, "monotonic", lambda: now + 6)
    assert cache.get("projects/p/models/m/versions/2") is None  # expired
    monkeypatch.undo()
    cache.put("projects/p/models/m/versions/2", "p", cache.token("p"), _version("x/2"))
    live["on"] = False
    assert cache.get("projects/p/models/m/versions/2") is None and cache.token("p") is None
