"""Promotion through the real registry (in-process): the alias moves, its history names the experiment,
a stale expected version aborts and leaves the experiment un-concluded. Auto-conclusion: the background monitor
concludes and promotes without anyone reading results, GetExperimentResults concludes nothing, two replicas on
PostgreSQL conclude once, and a registry outage is retried at a later tick."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import uuid

import grpc
import pytest
from prometheus_client import REGISTRY

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.experiments.v1 import experiment_pb2 as pb
from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as svc_grpc
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as registry_grpc
from neuroweaver_experiments.app import ExperimentsConfig, build
from neuroweaver_registry.app import RegistryConfig
from neuroweaver_registry.app import build as build_registry
from neuroweaver_runtime.grpc_errors import error_info
from neuroweaver_runtime.testing import create_postgres_database, free_port


async def make_model(registry, metadata=()) -> str:
    model_id = "m-" + uuid.uuid4().hex[:8]
    model = await registry.CreateModel(
        rsvc.CreateModelRequest(parent="projects/default", model_id=model_id, model=rpb.Model(display_name="m")),
        metadata=metadata,
    )
    for i in range(2):
        await registry.CreateModelVersion(
            rsvc.CreateModelVersionRequest(
                parent=model.name,
                version=f"1.0.{i}",
                model_version=rpb.ModelVersion(artifact=rpb.Artifact(uri=f"file:///a/{i}", sha256="a" * 64)),
            ),
            metadata=metadata,
        )
    await registry.SetModelAlias(
        rsvc.SetModelAliasRequest(model=model.name, alias="production", version="1.0.0", reason="initial"), metadata=metadata
    )
    return model.name


async def alias_version(registry, model: str, metadata=()) -> str:
    request = rsvc.GetModelAliasRequest(name=f"{model}/aliases/production")
    return (await registry.GetModelAlias(request, metadata=metadata)).version


async def test_conclude_with_promote_moves_the_alias(stub, registry, make_experiment):
    model = await make_model(registry)
    exp = await make_experiment(model=model, promote_alias="production")
    # stale compare-and-set: ABORTED, the alias and the experiment stay as they were
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ConcludeExperiment(
            svc.ConcludeExperimentRequest(name=exp.name, winner="treatment", promote=True, expected_current_version="0.9.0")
        )
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert error_info(info.value).reason == "ALIAS_VERSION_MISMATCH"
    assert (await stub.GetExperiment(svc.GetExperimentRequest(name=exp.name))).state == pb.Experiment.STATE_RUNNING
    assert await alias_version(registry, model) == "1.0.0"
    # unknown winner
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ConcludeExperiment(svc.ConcludeExperimentRequest(name=exp.name, winner="nobody", promote=True))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(info.value).reason == "UNKNOWN_VARIANT"
    # the real thing
    done = await stub.ConcludeExperiment(
        svc.ConcludeExperimentRequest(
            name=exp.name, winner="treatment", promote=True, expected_current_version="1.0.0", reason="judge score +12%"
        )
    )
    assert done.state == pb.Experiment.STATE_CONCLUDED and done.winner == "treatment"
    assert await alias_version(registry, model) == "1.0.1"
    history = await registry.ListModelAliasHistory(rsvc.ListModelAliasHistoryRequest(parent=f"{model}/aliases/production"))
    latest = max(history.entries, key=lambda e: e.sequence)
    assert latest.from_version == "1.0.0" and latest.to_version == "1.0.1"
    assert exp.name in latest.reason and "judge score +12%" in latest.reason


# -- auto-conclusion -----------------------------------------------------------------------------------------


async def decided_experiment(stub, model: str) -> pb.Experiment:
    """A RUNNING sequential auto_conclude experiment whose data already decide: ship `treatment` (model version 1.0.1)."""
    variants = [
        pb.Variant(id=v, model_version=f"{model}/versions/1.0.{i}", weight=0.5) for i, v in enumerate(("control", "treatment"))
    ]
    exp = await stub.CreateExperiment(
        svc.CreateExperimentRequest(
            parent="projects/default",
            experiment_id="ac-" + uuid.uuid4().hex[:10],
            experiment=pb.Experiment(
                variants=variants,
                primary_metric=pb.MetricSpec(
                    name="score", kind=pb.METRIC_KIND_MEAN, direction=cpb.METRIC_DIRECTION_HIGHER_IS_BETTER
                ),
                analysis=pb.ANALYSIS_METHOD_SEQUENTIAL,
                min_sample_size=50,
                auto_conclude=True,
                promote_alias="production",
            ),
        )
    )
    exp = await stub.StartExperiment(svc.StartExperimentRequest(name=exp.name))
    units = [f"auto-{i}" for i in range(400)]
    got = await stub.BatchAssignVariants(svc.BatchAssignVariantsRequest(experiment=exp.name, unit_ids=units))
    events = [
        pb.MetricEvent(unit_id=u, metric="score", value=(3.0 if a.variant.id == "treatment" else 1.0) + (i % 7) * 0.1)
        for i, (u, a) in enumerate(zip(units, got.assignments, strict=True))
    ]
    await stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=events))
    return exp


@contextlib.asynccontextmanager
async def replica(url: str, registry_target: str, deployer_target: str, interval: float, **settings):
    """Another experiments process on the same database, with the auto-conclude monitor ticking every `interval` s."""
    service = build(
        ExperimentsConfig(
            port=free_port(),
            metrics_port=-1,
            database_url=url,
            deployer_target=deployer_target,
            registry_target=registry_target,
            remote_deadline_seconds=5.0,
            shutdown_drain_seconds=0,
            auto_conclude_interval_seconds=interval,
            **settings,
        )
    )
    port = await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield service, svc_grpc.ExperimentsServiceStub(channel)
    finally:
        await channel.close()
        await service.stop()


async def wait_until(check, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)  # polling interval
    return result


async def concluded(stub, name: str):
    exp = await stub.GetExperiment(svc.GetExperimentRequest(name=name))
    return exp if exp.state == pb.Experiment.STATE_CONCLUDED else None


def counted(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


async def promotions(registry, model: str, name: str, metadata=()) -> list:
    """The alias history entries of `production` made by concluding experiment `name`."""
    request = rsvc.ListModelAliasHistoryRequest(parent=f"{model}/aliases/production")
    history = await registry.ListModelAliasHistory(request, metadata=metadata)
    return [e for e in history.entries if name in e.reason]


async def test_auto_conclude_promotes_when_the_sequential_test_decides(backend, stub, registry, deployer):
    """Nobody reads the results: the monitor alone concludes the experiment and moves the alias."""
    shipped = counted("nw_experiments_auto_conclusions_total", decision="ship_variant")
    model = await make_model(registry)
    async with replica(backend.url, registry.target, deployer.target, 0.2):
        exp = await decided_experiment(stub, model)
        after = await wait_until(lambda: concluded(stub, exp.name), "the monitor concluded the experiment")
    assert after.winner == "treatment" and "auto-concluded by the sequential test" in after.conclusion
    assert "promoted" in after.conclusion
    assert await alias_version(registry, model) == "1.0.1"
    (entry,) = await promotions(registry, model, exp.name)
    assert (entry.from_version, entry.to_version) == ("1.0.0", "1.0.1")
    assert counted("nw_experiments_auto_conclusions_total", decision="ship_variant") == shipped + 1


async def test_get_experiment_results_concludes_nothing(backend, stub, registry):
    """A reader's GetExperimentResults sees the decision and leaves the experiment and the alias alone; the
    monitor's next tick concludes it."""
    model = await make_model(registry)
    exp = await decided_experiment(stub, model)
    for _ in range(2):
        res = await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))
        assert res.decision == pb.DECISION_SHIP_VARIANT and res.recommended_variant == "treatment", res.reason
    still = await stub.GetExperiment(svc.GetExperimentRequest(name=exp.name))
    assert still.state == pb.Experiment.STATE_RUNNING and still.etag == exp.etag and not still.conclusion
    assert await alias_version(registry, model) == "1.0.0" and not await promotions(registry, model, exp.name)
    await backend.service.auto_conclude.tick()  # the monitor (off in this fixture) takes its look
    after = await stub.GetExperiment(svc.GetExperimentRequest(name=exp.name))
    assert after.state == pb.Experiment.STATE_CONCLUDED and after.winner == "treatment"
    assert await alias_version(registry, model) == "1.0.1"


async def test_two_replicas_on_postgres_conclude_once(registry, deployer):
    url, drop = await create_postgres_database("nwexpac")
    shipped = counted("nw_experiments_auto_conclusions_total", decision="ship_variant")
    try:
        model = await make_model(registry)
        async with (
            replica(url, registry.target, deployer.target, 0.2) as (one, stub),
            replica(url, registry.target, deployer.target, 0.2) as (two, _),
        ):
            exp = await decided_experiment(stub, model)
            # both replicas look at the same moment (and their monitors keep ticking meanwhile)
            await asyncio.gather(one.auto_conclude.tick(), two.auto_conclude.tick())
            await wait_until(lambda: concluded(stub, exp.name), "a replica concluded the experiment")
            await asyncio.gather(one.auto_conclude.tick(), two.auto_conclude.tick())
        assert await alias_version(registry, model) == "1.0.1"
        assert len(await promotions(registry, model, exp.name)) == 1
        assert counted("nw_experiments_auto_conclusions_total", decision="ship_variant") == shipped + 1
    finally:
        await drop()


async def test_a_registry_outage_is_retried_at_a_later_tick(backend, stub, deployer):
    """The registry (auth on: the monitor promotes as an operator of the experiment's project) is down at the tick:
    the experiment stays RUNNING, the failure is counted, and it concludes once the registry is back."""
    db = f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='nw-exp-registry-')}/registry.db"
    config = RegistryConfig(
        port=free_port(),
        metrics_port=-1,
        database_url=db,
        auth_tokens="svc-token=*:service:experiments,op-token=default:operator:alice",
        page_token_secret="registry-page-token-secret",
        shutdown_drain_seconds=0,
    )
    operator = (("authorization", "Bearer op-token"),)
    target = f"127.0.0.1:{config.port}"
    registry = build_registry(config)
    await registry.start()
    async with grpc.aio.insecure_channel(target) as channel:
        registry_stub = registry_grpc.RegistryServiceStub(channel)
        model = await make_model(registry_stub, operator)
        await registry.stop()
        failed = counted("nw_experiments_auto_conclude_failures_total", reason="REGISTRY_UNAVAILABLE")
        async with replica(backend.url, target, deployer.target, 0.2, service_token="svc-token"):
            exp = await decided_experiment(stub, model)

            async def a_tick_failed():
                return counted("nw_experiments_auto_conclude_failures_total", reason="REGISTRY_UNAVAILABLE") > failed

            await wait_until(a_tick_failed, "a tick found the registry unreachable")
            still = await stub.GetExperiment(svc.GetExperimentRequest(name=exp.name))
            assert still.state == pb.Experiment.STATE_RUNNING and not still.conclusion
            registry = build_registry(config)  # back, on the same address and database
            await registry.start()
            try:
                after = await wait_until(lambda: concluded(stub, exp.name), "a later tick concluded the experiment")
                assert after.winner == "treatment"
                assert await alias_version(registry_stub, model, operator) == "1.0.1"
                (entry,) = await promotions(registry_stub, model, exp.name, operator)
                assert entry.to_version == "1.0.1" and entry.actor == "auto-conclude"
            finally:
                await registry.stop()
