"""Local evaluation RPCs over gRPC (SQLite and PostgreSQL): WatchExperimentConfigs and IngestEvents."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import field_mask_pb2

from neuroweaver.experiments.v1 import experiment_pb2 as pb
from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as svc_grpc
from neuroweaver_runtime.assignment import PhasedPlan
from neuroweaver_runtime.grpc_errors import error_info, field_violations


async def set_weights(stub, exp, weights):
    current = await stub.GetExperiment(svc.GetExperimentRequest(name=exp.name))
    patch = pb.Experiment(
        name=exp.name,
        etag=current.etag,
        variants=[
            pb.Variant(id=v.id, model_version=v.model_version, weight=w) for v, w in zip(exp.variants, weights, strict=True)
        ],
    )
    return await stub.UpdateExperiment(
        svc.UpdateExperimentRequest(experiment=patch, update_mask=field_mask_pb2.FieldMask(paths=["variants"]))
    )


async def next_with(stream, predicate, timeout=10.0):
    async def find():
        async for resp in stream:
            if predicate(resp):
                return resp
        raise AssertionError("stream ended")

    return await asyncio.wait_for(find(), timeout)


def plan_of(config: pb.ExperimentConfig) -> PhasedPlan:
    return PhasedPlan(config.hash_seed, [list(p.weights) for p in config.phases], config.coverage)


async def ingest(stub, *batches):
    async def requests():
        for b in batches:
            yield b

    return [r async for r in stub.IngestEvents(requests())]


async def exposures_stored(backend, name):
    service = backend.service.experiments
    async with service.uow.transaction() as uow:
        exp = await uow.experiments.get(name)
        return await uow.assignments.exposures(exp.key)


async def test_watch_snapshot_then_changes(stub, make_experiment):
    exp = await make_experiment(weights=(0.5, 0.5), coverage=0.8)
    stream = stub.WatchExperimentConfigs(svc.WatchExperimentConfigsRequest(parent="projects/default"))
    first = await next_with(stream, lambda r: True)
    assert first.snapshot and first.version > 0
    config = next(c for c in first.configs if c.experiment == exp.name)
    assert config.hash_seed == exp.hash_seed and config.coverage == pytest.approx(0.8)
    assert [v.id for v in config.variants] == ["control", "treatment"]
    assert [(p.epoch, list(p.weights)) for p in config.phases] == [(0, [0.5, 0.5])]
    # a weight change is a new phase
    await set_weights(stub, exp, (0.2, 0.8))
    change = await next_with(stream, lambda r: any(c.experiment == exp.name for c in r.configs))
    assert not change.snapshot and change.version > first.version
    config2 = next(c for c in change.configs if c.experiment == exp.name)
    assert [list(p.weights) for p in config2.phases] == [[0.5, 0.5], [0.2, 0.8]] and config2.revision > config.revision
    # stop: removed
    await stub.StopExperiment(svc.StopExperimentRequest(name=exp.name))
    gone = await next_with(stream, lambda r: exp.name in r.removed)
    assert gone.version > change.version
    stream.cancel()

    # resume after a change: a snapshot; resume with nothing changed since: the next change only
    other = await make_experiment()
    again = stub.WatchExperimentConfigs(svc.WatchExperimentConfigsRequest(parent="projects/default", since_version=gone.version))
    resumed = await next_with(again, lambda r: True)
    assert resumed.snapshot and resumed.version > gone.version
    assert other.name in {c.experiment for c in resumed.configs} and exp.name not in {c.experiment for c in resumed.configs}
    again.cancel()
    quiet = stub.WatchExperimentConfigs(
        svc.WatchExperimentConfigsRequest(parent="projects/default", since_version=resumed.version)
    )
    await asyncio.sleep(0.5)  # the stream is open and has nothing to say
    await set_weights(stub, other, (0.3, 0.7))
    later = await next_with(quiet, lambda r: True)
    assert not later.snapshot and [c.experiment for c in later.configs] == [other.name]
    quiet.cancel()


async def test_watch_bad_input(stub):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.WatchExperimentConfigs(svc.WatchExperimentConfigsRequest(parent="nope")):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.WatchExperimentConfigs(
            svc.WatchExperimentConfigsRequest(parent="projects/default", since_version=-1)
        ):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(info.value).reason == "INVALID_VERSION"


async def test_ingest_exposures_idempotent_sticky_and_counted(stub, make_experiment, backend):
    exp = await make_experiment(weights=(0.5, 0.5), coverage=0.6)
    stream = stub.WatchExperimentConfigs(svc.WatchExperimentConfigsRequest(parent="projects/default"))
    config = next(c for c in (await next_with(stream, lambda r: True)).configs if c.experiment == exp.name)
    stream.cancel()
    plan = plan_of(config)
    units = [f"sdk-{i}" for i in range(400)]
    inside = []
    for u in units:
        _, v, _ = plan.evaluate(u)
        if v is not None:
            inside.append(pb.Exposure(experiment=exp.name, unit_id=u, variant=config.variants[v].id, epoch=0))
    batch = svc.IngestEventsRequest(batch_id=1, exposures=inside)
    events = [
        pb.MetricEvent(experiment=exp.name, unit_id=x.unit_id, metric="score", value=1.0, idempotency_key=f"k-{x.unit_id}")
        for x in inside
    ]
    acks = await ingest(stub, batch, svc.IngestEventsRequest(batch_id=2, events=events))
    assert [a.batch_id for a in acks] == [1, 2]
    assert acks[0].exposures_accepted == len(inside) and acks[0].exposures_duplicate == 0 and not acks[0].conflicts
    assert acks[1].events_accepted == len(inside)
    # resent after a "disconnect": nothing counted twice
    acks = await ingest(stub, batch, svc.IngestEventsRequest(batch_id=2, events=events))
    assert acks[0].exposures_accepted == 0 and acks[0].exposures_duplicate == len(inside)
    assert acks[1].events_accepted == 0 and acks[1].events_duplicate == len(inside)
    counts = await exposures_stored(backend, exp.name)
    assert sum(sum(c.values()) for c in counts.values()) == len(inside)
    assert {epoch for epoch, _ in counts} == {0}
    # AssignVariant agrees (sticky), also after the process cache is gone
    backend.service.experiments.assigner.cache._units.clear()
    got = await stub.BatchAssignVariants(
        svc.BatchAssignVariantsRequest(experiment=exp.name, unit_ids=[x.unit_id for x in inside])
    )
    assert [a.variant.id for a in got.assignments] == [x.variant for x in inside]
    assert all(a.in_experiment for a in got.assignments)

    # after a weight change, an exposure under the old phase of a unit the server assigned meanwhile is a conflict
    await set_weights(stub, exp, (0.1, 0.9))
    plan2 = PhasedPlan(config.hash_seed, [[0.5, 0.5], [0.1, 0.9]], 0.6)
    moved = next(
        u for u in (f"amb-{i}" for i in range(10_000)) if plan2.plans[0].assign(u).variant == 0 and plan2.evaluate(u)[1] == 1
    )
    served = await stub.AssignVariant(svc.AssignVariantRequest(experiment=exp.name, unit_id=moved))
    assert served.variant.id == "treatment"
    stale = pb.Exposure(experiment=exp.name, unit_id=moved, variant="control", epoch=0)
    fresh_unit = next(u for u in (f"new-{i}" for i in range(10_000)) if plan2.evaluate(u)[1] is not None)
    fresh = pb.Exposure(
        experiment=exp.name, unit_id=fresh_unit, variant=config.variants[plan2.evaluate(fresh_unit)[1]].id, epoch=1
    )
    (ack,) = await ingest(stub, svc.IngestEventsRequest(batch_id=7, exposures=[stale, fresh]))
    assert ack.exposures_accepted == 1
    assert [(c.experiment, c.unit_id, c.stored_variant) for c in ack.conflicts] == [(exp.name, moved, "treatment")]
    counts = await exposures_stored(backend, exp.name)
    assert sum(c.get(fresh.variant, 0) for (epoch, _), c in counts.items() if epoch == 1) >= 1


async def test_ingest_rejects_bad_exposures(stub, make_experiment):
    exp = await make_experiment(weights=(0.5, 0.5), coverage=0.5)
    plan = PhasedPlan(exp.hash_seed, [[0.5, 0.5]], 0.5)
    inside = next(u for u in (f"u-{i}" for i in range(1000)) if plan.evaluate(u)[1] is not None)
    outside = next(u for u in (f"u-{i}" for i in range(1000)) if plan.evaluate(u)[1] is None)
    right = ["control", "treatment"][plan.evaluate(inside)[1]]
    wrong = ["treatment", "control"][plan.evaluate(inside)[1]]
    cases = [
        (pb.Exposure(experiment=exp.name, unit_id=inside, variant=wrong, epoch=0), "VARIANT_MISMATCH", "exposures[0].variant"),
        (
            pb.Exposure(experiment=exp.name, unit_id=outside, variant="control", epoch=0),
            "NOT_IN_COVERAGE",
            "exposures[0].unit_id",
        ),
        (pb.Exposure(experiment=exp.name, unit_id=inside, variant=right, epoch=3), "UNKNOWN_EPOCH", "exposures[0].epoch"),
        (pb.Exposure(experiment=exp.name, unit_id=inside, variant="t9", epoch=0), "UNKNOWN_VARIANT", "exposures[0].variant"),
        (pb.Exposure(experiment=exp.name, unit_id="", variant=right, epoch=0), "INVALID_UNIT_ID", "exposures[0].unit_id"),
    ]
    for exposure, reason, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ingest(stub, svc.IngestEventsRequest(batch_id=5, exposures=[exposure]))
        err = info.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert error_info(err).reason == reason and error_info(err).metadata["batch_id"] == "5"
        assert [v.field for v in field_violations(err)] == [field]
    # the batches before a bad one are stored and acknowledged before the error ends the stream
    good = pb.Exposure(experiment=exp.name, unit_id=inside, variant=right, epoch=0)

    async def good_then_bad():
        yield svc.IngestEventsRequest(batch_id=4, exposures=[good])
        yield svc.IngestEventsRequest(batch_id=5, exposures=[cases[0][0]])

    acks = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for ack in stub.IngestEvents(good_then_bad()):
            acks.append(ack)
    assert [(a.batch_id, a.exposures_accepted) for a in acks] == [(4, 1)]
    assert error_info(info.value).metadata["batch_id"] == "5"
    # a stopped experiment takes no exposures
    await stub.StopExperiment(svc.StopExperimentRequest(name=exp.name))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ingest(
            stub,
            svc.IngestEventsRequest(
                batch_id=1, exposures=[pb.Exposure(experiment=exp.name, unit_id=inside, variant=right, epoch=0)]
            ),
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_watch_sees_changes_made_through_another_replica(stub, make_experiment, backend, deployer, registry):
    """Two replicas on one database: a watch on the second sees a weight change and a stop made through the first."""
    from neuroweaver_experiments.app import ExperimentsConfig, build
    from neuroweaver_runtime.testing import free_port

    replica = build(
        ExperimentsConfig(
            port=free_port(),
            metrics_port=-1,
            database_url=backend.url,
            deployer_target=deployer.target,
            registry_target=registry.target,
            migrate=False,
        )
    )
    port = await replica.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        other = svc_grpc.ExperimentsServiceStub(channel)
        exp = await make_experiment(weights=(0.5, 0.5))  # through the first replica
        stream = other.WatchExperimentConfigs(svc.WatchExperimentConfigsRequest(parent="projects/default"))
        first = await next_with(stream, lambda r: True)
        assert exp.name in {c.experiment for c in first.configs}
        await set_weights(stub, exp, (0.4, 0.6))
        change = await next_with(stream, lambda r: any(c.experiment == exp.name for c in r.configs))
        assert [list(p.weights) for p in next(c for c in change.configs if c.experiment == exp.name).phases][-1] == [0.4, 0.6]
        await stub.StopExperiment(svc.StopExperimentRequest(name=exp.name))
        await next_with(stream, lambda r: exp.name in r.removed)
        stream.cancel()
    finally:
        await channel.close()
        await replica.stop()
