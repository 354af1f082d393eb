"""IngestEvents stores several batches of a stream at once and several streams share the group-commit writer's
transactions (SQLite and PostgreSQL): acknowledgements stay in order and exact (a unit's first exposure is accepted by
exactly one batch; the others get a duplicate or a conflict naming the stored variant), events of a batch find the
exposures of earlier batches, and the exposure counts per (epoch, class, variant) match what was accepted."""

from __future__ import annotations

import asyncio
import collections

from neuroweaver.experiments.v1 import experiment_pb2 as pb
from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver_runtime.assignment import PhasedPlan

from .test_local_eval import exposures_stored, ingest, set_weights


async def test_pipelined_batches_of_one_stream(stub, make_experiment, backend):
    exp = await make_experiment(weights=(0.5, 0.5), coverage=1.0)
    plan = PhasedPlan(exp.hash_seed, [[0.5, 0.5]], 1.0)
    ids = [v.id for v in exp.variants]

    def exposure(u: str) -> pb.Exposure:
        return pb.Exposure(experiment=exp.name, unit_id=u, variant=ids[plan.evaluate(u)[1]], epoch=0)

    # 12 batches sent back to back; each repeats half of the previous one's units and carries an event of each unit
    # the previous batch exposed (it must find that exposure stored)
    batches = []
    for b in range(12):
        units = [f"p-{i}" for i in range(b * 100, b * 100 + 200)]
        events = [
            pb.MetricEvent(experiment=exp.name, unit_id=f"p-{i}", metric="score", value=1.0, idempotency_key=f"e-{b}-{i}")
            for i in range(b * 100 - 200, b * 100)
            if i >= 0
        ]
        batches.append(svc.IngestEventsRequest(batch_id=b + 1, exposures=[exposure(u) for u in units], events=events))
    acks = await ingest(stub, *batches)
    assert [a.batch_id for a in acks] == list(range(1, 13))
    assert [(a.exposures_accepted, a.exposures_duplicate) for a in acks] == [(200, 0)] + [(100, 100)] * 11
    assert not any(a.conflicts for a in acks)
    assert [a.events_accepted for a in acks] == [0, 100] + [200] * 10
    counts = await exposures_stored(backend, exp.name)
    assert sum(sum(c.values()) for c in counts.values()) == 1300


async def test_concurrent_streams_expose_the_same_units(stub, make_experiment, backend):
    """Two SDKs expose the same units at once: one under the first phase, one under the second, where the phases
    disagree (conflicts), and units both phases assign alike (duplicates)."""
    exp = await make_experiment(weights=(0.5, 0.5), coverage=1.0)
    await set_weights(stub, exp, (0.1, 0.9))
    plan = PhasedPlan(exp.hash_seed, [[0.5, 0.5], [0.1, 0.9]], 1.0)
    ids = [v.id for v in exp.variants]
    moved, same = [], []
    for i in range(20_000):
        u = f"c-{i}"
        old, new = plan.plans[0].assign(u).variant, plan.plans[1].assign(u).variant
        (moved if old != new else same).append(u)
        if len(moved) >= 600 and len(same) >= 600:
            break
    units = moved[:600] + same[:600]

    def batches(epoch: int, order: list[str]) -> list[svc.IngestEventsRequest]:
        xs = [
            pb.Exposure(experiment=exp.name, unit_id=u, variant=ids[plan.plans[epoch].assign(u).variant], epoch=epoch)
            for u in order
        ]
        return [svc.IngestEventsRequest(batch_id=k + 1, exposures=xs[k * 100 : k * 100 + 100]) for k in range(len(xs) // 100)]

    a, b = await asyncio.gather(ingest(stub, *batches(0, units)), ingest(stub, *batches(1, units)))
    assert [x.batch_id for x in a] == [x.batch_id for x in b] == list(range(1, 13))
    accepted = sum(x.exposures_accepted for x in a) + sum(x.exposures_accepted for x in b)
    duplicates = sum(x.exposures_duplicate for x in a) + sum(x.exposures_duplicate for x in b)
    conflicts = [(c.unit_id, c.stored_variant) for x in a + b for c in x.conflicts]
    assert accepted == 1200 and duplicates == 600 and len(conflicts) == 600
    assert sorted(u for u, _ in conflicts) == sorted(moved[:600])
    # a conflict names the variant stored by the other stream, and that is what AssignVariant serves
    got = await stub.BatchAssignVariants(svc.BatchAssignVariantsRequest(experiment=exp.name, unit_ids=[u for u, _ in conflicts]))
    assert [g.variant.id for g in got.assignments] == [v for _, v in conflicts]
    # exposure counts: per (epoch, variant) exactly the first exposures each stream had accepted
    counts = await exposures_stored(backend, exp.name)
    stored = collections.Counter()
    for (epoch, _), per_variant in counts.items():
        for variant, n in per_variant.items():
            stored[(epoch, variant)] += n
    assert sum(stored.values()) == 1200
    assert sum(n for (epoch, _), n in stored.items() if epoch == 0) == sum(x.exposures_accepted for x in a)
    assert sum(n for (epoch, _), n in stored.items() if epoch == 1) == sum(x.exposures_accepted for x in b)
