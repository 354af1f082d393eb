"""LocalExperiments against a real experiments server process: in-process evaluation gives AssignVariant's answers
(many seeds, weights, coverages, across a weight change), and exposures/events survive a server crash mid-stream with
exact counts."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.experiments.v1 import experiment_pb2 as pb
from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as svc_grpc
from neuroweaver_runtime.client import open_channel
from neuroweaver_sdk.experiments import LocalExperiments

NAMES = ["control", "treatment", "t2", "t3"]


async def create(stub, weights, coverage, seed, project="default"):
    exp = pb.Experiment(
        display_name="sdk",
        hash_seed=seed,
        coverage=coverage,
        variants=[
            pb.Variant(id=NAMES[i], model_version=f"projects/{project}/models/m/versions/1.0.{i}", weight=w)
            for i, w in enumerate(weights)
        ],
        primary_metric=pb.MetricSpec(name="score", kind=pb.METRIC_KIND_MEAN, direction=cpb.METRIC_DIRECTION_HIGHER_IS_BETTER),
        analysis=pb.ANALYSIS_METHOD_FIXED_HORIZON,
    )
    created = await stub.CreateExperiment(
        svc.CreateExperimentRequest(parent=f"projects/{project}", experiment_id="e-" + uuid.uuid4().hex[:10], experiment=exp)
    )
    return await stub.StartExperiment(svc.StartExperimentRequest(name=created.name))


async def set_weights(stub, exp, weights):
    current = await stub.GetExperiment(svc.GetExperimentRequest(name=exp.name))
    patch = pb.Experiment(
        name=exp.name,
        etag=current.etag,
        variants=[
            pb.Variant(id=v.id, model_version=v.model_version, weight=w) for v, w in zip(exp.variants, weights, strict=True)
        ],
    )
    await stub.UpdateExperiment(
        svc.UpdateExperimentRequest(experiment=patch, update_mask=field_mask_pb2.FieldMask(paths=["variants"]))
    )


def stored_assignments(db, name) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        (key,) = conn.execute("SELECT id FROM experiments WHERE name = ?", (name,)).fetchone()
        return dict(conn.execute("SELECT unit_id, variant FROM assignments WHERE experiment_id = ?", (key,)))


def exposure_counts(db, name) -> dict[tuple[int, str], int]:
    with sqlite3.connect(db) as conn:
        (key,) = conn.execute("SELECT id FROM experiments WHERE name = ?", (name,)).fetchone()
        rows = conn.execute(
            "SELECT epoch, variant, SUM(units) FROM exposure_counts WHERE experiment_id = ? GROUP BY 1, 2", (key,)
        )
        return {(e, v): n for e, v, n in rows}


# (phase 0 weights, phase 1 weights): two arms, uneven moves, three arms, a reversal
WEIGHT_CHANGES = [
    ((0.5, 0.5), (0.2, 0.8)),
    ((0.9, 0.1), (0.5, 0.5)),
    ((0.34, 0.33, 0.33), (0.1, 0.1, 0.8)),
    ((0.25, 0.25, 0.25, 0.25), (0.7, 0.1, 0.1, 0.1)),
]
COVERAGES = [1.0, 0.7, 0.35]
SEEDS = ["s-alpha", "s-beta", "s-gamma"]


async def test_sdk_agrees_with_assign_variant(experiments_server):
    """Twin experiments (same seed, weights, coverage): one evaluated by the SDK, one by AssignVariant, with the same
    visits in the same order, before and after a weight change. Every answer is identical, and after a flush both
    experiments hold the same stored assignments and the same first-exposure counts per phase and variant."""
    channel = open_channel(experiments_server.target)
    stub = svc_grpc.ExperimentsServiceStub(channel)
    sdk = LocalExperiments(stub, flush_interval=0.01)
    await sdk.start()
    rng = random.Random(7)
    checked = server_asked = 0
    try:
        for seed in SEEDS:
            for before, after in WEIGHT_CHANGES:
                for coverage in COVERAGES:
                    local = await create(stub, before, coverage, seed)
                    remote = await create(stub, before, coverage, seed)
                    await sdk.wait_for_config(lambda s, name=local.name: s.config(name) is not None)
                    units = [f"{seed}-u{i}" for i in range(240)]
                    for phase in (0, 1):
                        if phase == 1:
                            for exp in (local, remote):
                                await set_weights(stub, exp, after)
                            await sdk.wait_for_config(lambda s, name=local.name: len(s.config(name).phases) == 2)
                        # returning and new units in a random order, some twice
                        visits = rng.sample(units[: 160 + 80 * phase], 120) + rng.sample(units, 40)
                        ours = [await sdk.assign(local.name, u) for u in visits]
                        theirs = (
                            await stub.BatchAssignVariants(
                                svc.BatchAssignVariantsRequest(experiment=remote.name, unit_ids=visits)
                            )
                        ).assignments
                        for u, a, b in zip(visits, ours, theirs, strict=True):
                            assert (a.variant, a.in_experiment, a.bucket) == (b.variant.id, b.in_experiment, b.bucket), (
                                seed, before, after, coverage, phase, u, a.source,
                            )  # fmt: skip
                            checked += 1
                    await sdk.flush()
                    assert stored_assignments(experiments_server.db, local.name) == stored_assignments(
                        experiments_server.db, remote.name
                    )
                    assert exposure_counts(experiments_server.db, local.name) == exposure_counts(
                        experiments_server.db, remote.name
                    )
        server_asked = sdk.stats.server_assignments
    finally:
        await sdk.close()
        await channel.close()
    assert checked == len(SEEDS) * len(WEIGHT_CHANGES) * len(COVERAGES) * 2 * 160
    assert server_asked > 0  # ambiguous buckets were met and asked of the server
    assert sdk.stats.conflicts == 0 and not sdk.stats.rejected


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_exposures_and_events_survive_a_server_crash(experiments_server, sig):
    """A producer assigns and tracks 6,000 units while the server process is SIGKILLed (or SIGTERMed: its open streams
    end UNAVAILABLE) and started again on the same port and database: after the flush every unit is stored once and
    every event counted once."""
    channel = open_channel(experiments_server.target)
    stub = svc_grpc.ExperimentsServiceStub(channel)
    exp = await create(stub, (0.5, 0.5), 1.0, "crash-seed")
    starts = experiments_server.starts
    sdk = LocalExperiments(stub, batch_size=300, flush_interval=0.01, max_queue=3_000, backoff=(0.05, 0.5))
    await sdk.start()
    await sdk.wait_for_config(lambda s: s.config(exp.name) is not None)
    total = 6_000
    crashed = asyncio.Event()

    async def produce():
        for i in range(total):
            a = await sdk.assign(exp.name, f"c-{i}")
            assert a.in_experiment
            await sdk.track(exp.name, f"c-{i}", "score", float(i % 7), idempotency_key=f"ev-{i}")
            if i == total // 3:
                crashed.set()

    async def crash():
        await crashed.wait()
        while sdk.stats.batches_acked < 5:  # mid-stream: some batches acknowledged, more in flight
            await asyncio.sleep(0.01)
        await asyncio.to_thread(experiments_server.kill, sig)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(experiments_server.start)

    try:
        await asyncio.gather(produce(), crash())
        await asyncio.wait_for(sdk.flush(), 60)
    finally:
        await sdk.close()
    assert experiments_server.starts == starts + 1
    assert sdk.stats.reconnects >= 1 and not sdk.stats.rejected and sdk.pending == 0
    stored = stored_assignments(experiments_server.db, exp.name)
    assert len(stored) == total
    assert sum(exposure_counts(experiments_server.db, exp.name).values()) == total
    with sqlite3.connect(experiments_server.db) as conn:
        (key,) = conn.execute("SELECT id FROM experiments WHERE name = ?", (exp.name,)).fetchone()
        (events,) = conn.execute("SELECT COUNT(*) FROM metric_events WHERE experiment_id = ?", (key,)).fetchone()
        (units, count) = conn.execute(
            "SELECT COUNT(*), SUM(count) FROM unit_metrics WHERE experiment_id = ? AND metric = 'score'", (key,)
        ).fetchone()
    assert events == total and units == total and count == total
    # acknowledged counts never exceed what is stored (what was resent after the crash came back as duplicates)
    assert sdk.stats.exposures_accepted + sdk.stats.exposures_duplicate >= total
    assert sdk.stats.exposures_accepted <= total and sdk.stats.events_accepted <= total
    results = await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))
    assert sum(v.units for v in results.primary.variants) == total
    await channel.close()


class DictStore:
    """A shared sticky store (what Redis would be in production)."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], str] = {}
        self.gets = 0

    async def get(self, experiment: str, unit_id: str) -> str | None:
        self.gets += 1
        return self.data.get((experiment, unit_id))

    async def put(self, experiment: str, unit_id: str, variant: str) -> None:
        self.data[(experiment, unit_id)] = variant


async def test_shared_sticky_store_answers_ambiguous_buckets(experiments_server):
    """SDK A exposes units and writes them to a shared store; after a weight change a fresh SDK B (empty cache) answers
    the units in ambiguous buckets from the store, without asking the server, with A's variants."""
    channel = open_channel(experiments_server.target)
    stub = svc_grpc.ExperimentsServiceStub(channel)
    exp = await create(stub, (0.5, 0.5), 0.8, "store-seed")
    store = DictStore()
    units = [f"s-{i}" for i in range(300)]
    async with LocalExperiments(stub, sticky_store=store) as a:
        await a.wait_for_config(lambda s: s.config(exp.name) is not None)
        first = {u: await a.assign(exp.name, u) for u in units}
    await set_weights(stub, exp, (0.1, 0.9))
    async with LocalExperiments(stub, sticky_store=store) as b:
        await b.wait_for_config(lambda s: s.config(exp.name) is not None and len(s.config(exp.name).phases) == 2)
        again = {u: await b.assign(exp.name, u) for u in units}
        asked = b.stats.server_assignments
    moved = [u for u in units if first[u].in_experiment and again[u].source == "sticky"]
    assert moved and all(again[u].variant == first[u].variant for u in units if first[u].in_experiment)
    assert asked == 0 and store.gets >= len(moved)  # every ambiguous bucket was answered by the store
    await channel.close()


async def test_a_stopped_experiment_drops_only_its_own_items(experiments_server):
    """Exposures and events of two experiments wait in one batch; one experiment stops before the batch leaves: the
    server refuses the batch naming it, the SDK drops only its items and the other experiment's are stored."""
    channel = open_channel(experiments_server.target)
    stub = svc_grpc.ExperimentsServiceStub(channel)
    stays, stops = await create(stub, (0.5, 0.5), 1.0, "keep-seed"), await create(stub, (0.5, 0.5), 1.0, "stop-seed")
    sdk = LocalExperiments(stub, flush_interval=3600, batch_size=10_000)  # nothing leaves before flush()
    await sdk.start()
    await sdk.wait_for_config(lambda s: s.config(stays.name) is not None and s.config(stops.name) is not None)
    for i in range(50):
        for exp in (stops, stays):
            await sdk.assign(exp.name, f"m-{i}")
            await sdk.track(exp.name, f"m-{i}", "score", 1.0, idempotency_key=f"{exp.name}-{i}")
    await stub.StopExperiment(svc.StopExperimentRequest(name=stops.name))
    await asyncio.wait_for(sdk.flush(), 30)
    await sdk.close()
    await channel.close()
    assert len(stored_assignments(experiments_server.db, stays.name)) == 50
    assert stored_assignments(experiments_server.db, stops.name) == {}
    assert sdk.stats.exposures_accepted == 50 and sdk.stats.events_accepted == 50
    assert [n for n, _ in sdk.stats.rejected] == [100] and "EXPERIMENT" in sdk.stats.rejected[0][1].upper()


async def test_a_bad_event_drops_only_itself(experiments_server):
    """An event of a unit never exposed (outside the coverage), between good items of two experiments in one batch: the
    server names it (in the batch's numbering), the SDK drops it alone and the rest is stored."""
    channel = open_channel(experiments_server.target)
    stub = svc_grpc.ExperimentsServiceStub(channel)
    a, b = await create(stub, (0.5, 0.5), 0.5, "bad-a"), await create(stub, (0.5, 0.5), 1.0, "bad-b")
    sdk = LocalExperiments(stub, flush_interval=3600, batch_size=10_000)
    await sdk.start()
    await sdk.wait_for_config(lambda s: s.config(a.name) is not None and s.config(b.name) is not None)
    outside, inside = None, []
    for i in range(400):
        got = await sdk.assign(a.name, f"u-{i}")
        if not got.in_experiment:
            outside = outside or got.unit_id
        elif len(inside) < 20:
            inside.append(got.unit_id)
    assert outside is not None and len(inside) == 20
    for i, u in enumerate(inside):
        await sdk.assign(b.name, u)
        await sdk.track(b.name, u, "score", 2.0, idempotency_key=f"b-{i}")
        await sdk.track(a.name, u, "score", 1.0, idempotency_key=f"a-{i}")
        if i == 10:
            await sdk.track(a.name, outside, "score", 5.0, idempotency_key="never-exposed")
    await asyncio.wait_for(sdk.flush(), 30)
    await sdk.close()
    await channel.close()
    # the refused attempt had stored what came before the bad event: the resend counts those as duplicates
    assert sdk.stats.events_accepted + sdk.stats.events_duplicate >= 2 * len(inside)
    with sqlite3.connect(experiments_server.db) as conn:
        stored = dict(
            conn.execute(
                "SELECT e.name, COUNT(*) FROM metric_events m JOIN experiments e ON e.id = m.experiment_id "
                "WHERE e.name IN (?, ?) GROUP BY e.name",
                (a.name, b.name),
            )
        )
    assert stored == {a.name: len(inside), b.name: len(inside)}
    assert len(stored_assignments(experiments_server.db, b.name)) == len(inside)
    assert len(sdk.stats.rejected) == 1 and sdk.stats.rejected[0][0] == 1 and "never exposed" in sdk.stats.rejected[0][1]


async def test_a_refused_watch_fails_start(experiments_server):
    channel = open_channel(experiments_server.target)
    sdk = LocalExperiments(svc_grpc.ExperimentsServiceStub(channel), project="no/such")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await sdk.start(timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await channel.close()


@pytest.fixture(autouse=True)
def _server_up(experiments_server):
    if experiments_server.popen is None or experiments_server.popen.poll() is not None:
        experiments_server.start()
