"""Hot paths: the in-memory AssignVariant reply cache is dropped when the experiment changes, and concurrent
streams into the same units keep the sufficient statistics exact."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import grpc
import numpy as np
import pytest
from google.protobuf import field_mask_pb2

from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver_experiments.app import ExperimentsConfig, build

from .test_metrics_results import assign, ev


async def test_cached_reply_follows_weight_change_and_stop(stub, make_experiment, backend):
    exp = await make_experiment()
    first = await stub.AssignVariant(svc.AssignVariantRequest(experiment=exp.name, unit_id="hot-1"))
    again = await stub.AssignVariant(svc.AssignVariantRequest(experiment=exp.name, unit_id="hot-1"))
    assert again == first  # sticky, answered from the reply cache
    snap = backend.service.experiments.assigner.fresh(exp.name)
    assert snap is not None and "hot-1" in snap.replies

    # weights change (new epoch): the unit keeps its variant, and the reply shows the new weights
    patch = type(exp)()
    patch.CopyFrom(exp)
    for v, w in zip(patch.variants, (0.2, 0.8), strict=True):
        v.weight = w
    updated = await stub.UpdateExperiment(
        svc.UpdateExperimentRequest(experiment=patch, update_mask=field_mask_pb2.FieldMask(paths=["variants"]))
    )
    after = await stub.AssignVariant(svc.AssignVariantRequest(experiment=exp.name, unit_id="hot-1"))
    assert after.variant.id == first.variant.id and after.bucket == first.bucket
    assert after.variant.weight == {v.id: v.weight for v in updated.variants}[first.variant.id] != first.variant.weight

    # stopped: no more assignments, even for a cached unit
    await stub.StopExperiment(svc.StopExperimentRequest(name=exp.name, reason="done"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.AssignVariant(svc.AssignVariantRequest(experiment=exp.name, unit_id="hot-1"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_other_replica_stop_is_seen_within_the_ttl(stub, make_experiment, backend):
    """A second service on the same store (another replica) with a short TTL: its reply cache must not outlive
    a stop committed elsewhere by more than the TTL."""
    exp = await make_experiment()
    other = build(ExperimentsConfig(database_url=backend.url, metrics_port=-1, migrate=False, snapshot_ttl_seconds=0.2))
    replica = other.experiments
    try:
        from neuroweaver_experiments.api.servicer import ExperimentsServicer

        servicer = ExperimentsServicer(replica)
        req = svc.AssignVariantRequest(experiment=exp.name, unit_id="rep-1")
        first = await servicer.AssignVariant(req, None)
        assert await servicer.AssignVariant(req, None) is first  # memoized
        await stub.StopExperiment(svc.StopExperimentRequest(name=exp.name, reason="stop on the other replica"))
        await asyncio.sleep(0.3)
        from neuroweaver_runtime.errors import FailedPrecondition

        with pytest.raises(FailedPrecondition):
            await servicer.AssignVariant(req, None)
    finally:
        await other.db.dispose()


async def test_expired_snapshot_is_revalidated_once_for_all_callers(make_experiment, backend):
    """When the TTL runs out under load, the requests in flight share one revalidation query instead of each
    opening a transaction (which made the pool open overflow connections under load)."""
    exp = await make_experiment()
    assigner = backend.service.experiments.assigner
    snap = await assigner.snapshot(exp.name)
    snap.checked -= assigner.ttl + 1  # expired
    transactions = 0
    real = assigner.uow.transaction

    def counting():
        nonlocal transactions
        transactions += 1
        return real()

    assigner.uow.transaction = counting
    try:
        results = await asyncio.gather(*(assigner.snapshot(exp.name) for _ in range(32)))
    finally:
        del assigner.uow.transaction
    assert transactions == 1
    assert all(r is snap for r in results) and assigner.fresh(exp.name) is snap  # same revision: revalidated in place

    # a change made here while a load is in flight: the load's result is not installed, later callers read anew
    snap.checked -= assigner.ttl + 1
    pending = asyncio.ensure_future(assigner.snapshot(exp.name))
    await asyncio.sleep(0)
    assigner.invalidate(exp.name)
    await pending
    assert assigner.fresh(exp.name) is None


async def test_concurrent_streams_into_the_same_units_stay_exact(stub, make_experiment):
    exp = await make_experiment()
    units = [f"cc-{i}" for i in range(60)]
    variant_of = await assign(stub, exp.name, units)
    rng = random.Random(11)
    streams = [[], []]
    raw = defaultdict(list)
    for s in range(2):
        for m in range(4):
            batch = []
            for _ in range(150):
                u = rng.choice(units)
                x = round(rng.gauss(2.0, 1.0), 3)
                batch.append(ev(u, "score", x, key=f"s{s}-m{m}-{len(batch)}"))
                raw[u].append(x)
            streams[s].append(svc.StreamMetricEventsRequest(experiment=exp.name, events=batch))

    async def run(messages):
        async def gen():
            for msg in messages:
                yield msg
                await asyncio.sleep(0)

        return await stub.StreamMetricEvents(gen())

    r = await asyncio.gather(run(streams[0]), run(streams[1]), run(streams[0]))  # the third resends stream 0
    assert r[0].accepted + r[2].accepted == 600 and r[0].duplicates + r[2].duplicates == 600 and r[1].accepted == 600
    res = await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))
    by_variant = {s.variant: s for s in res.primary.variants}
    for v in ("control", "treatment"):
        xs = [float(np.mean(raw[u])) for u in units if raw[u] and variant_of[u] == v]
        assert by_variant[v].units == len(xs)
        assert by_variant[v].mean == pytest.approx(np.mean(xs), rel=1e-9)
        assert by_variant[v].standard_deviation == pytest.approx(np.std(xs, ddof=1), rel=1e-9)


async def test_odd_unit_ids_metrics_and_keys_round_trip(stub, make_experiment):
    exp = await make_experiment()
    units = ['q"uote', "back\\slash", "com,ma", "{brace}", "NULL", "new\nline", " spaced ", 'x","y', "ünï"]
    variant_of = await assign(stub, exp.name, units)
    events = [ev(u, "score", float(i + 1), key=f'k-{u}"\\') for i, u in enumerate(units)] + [ev(units[0], "score", 5.0)]
    r = await stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=events))
    assert (r.accepted, r.duplicates) == (len(events), 0)
    again = await stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=events[:-1]))
    assert (again.accepted, again.duplicates) == (0, len(units))
    res = await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))
    by_variant = {s.variant: s for s in res.primary.variants}
    value = {u: float(i + 1) for i, u in enumerate(units)}
    value[units[0]] = (1.0 + 5.0) / 2
    for v in ("control", "treatment"):
        xs = [value[u] for u in units if variant_of[u] == v]
        assert by_variant[v].units == len(xs)
        if xs:
            assert by_variant[v].mean == pytest.approx(np.mean(xs), rel=1e-12)
