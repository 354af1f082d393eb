"""Metric ingestion (unary and streaming), idempotency, atomic rejection, results vs scipy, SRM."""

from __future__ import annotations

import random
from collections import defaultdict

import grpc
import numpy as np
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2, timestamp_pb2
from scipy import stats as sps

from neuroweaver.experiments.v1 import experiment_pb2 as pb
from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver_experiments.domain.assignment import AssignmentPlan
from neuroweaver_runtime.grpc_errors import error_info, field_violations


async def expect_error(call, code, reason):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert error_info(info.value).reason == reason, info.value.details()
    return info.value


async def assign(stub, name, units):
    got = await stub.BatchAssignVariants(svc.BatchAssignVariantsRequest(experiment=name, unit_ids=units))
    return {u: a.variant.id for u, a in zip(units, got.assignments, strict=True)}


def ev(unit, metric, value, key=""):
    return pb.MetricEvent(unit_id=unit, metric=metric, value=value, idempotency_key=key)


async def test_results_equal_scipy_on_raw_unit_values(stub, make_experiment):
    exp = await make_experiment(min_sample_size=10)
    rng = random.Random(7)
    units = [f"r-{i}" for i in range(400)]
    variant_of = await assign(stub, exp.name, units)
    events, raw = [], defaultdict(list)
    thumbs = defaultdict(list)
    for u in units:
        lift = 0.3 if variant_of[u] == "treatment" else 0.0
        for _ in range(rng.randint(1, 4)):
            x = rng.gauss(1.0 + lift, 1.0)
            events.append(ev(u, "score", x, key=f"{u}-{len(raw[u])}"))
            raw[u].append(x)
        if rng.random() < 0.7:
            y = 1.0 if rng.random() < (0.5 + lift / 2) else 0.0
            events.append(ev(u, "thumbs_up", y))
            thumbs[u].append(y)
    rng.shuffle(events)
    # unary in two batches, then the same first batch again through the stream: all duplicates
    half = len(events) // 2
    r1 = await stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=events[:half]))

    async def messages():
        yield svc.StreamMetricEventsRequest(experiment=exp.name, events=events[half:])
        yield svc.StreamMetricEventsRequest(experiment=exp.name, events=[e for e in events[:half] if e.idempotency_key])

    r2 = await stub.StreamMetricEvents(messages())
    keyed_first_half = sum(1 for e in events[:half] if e.idempotency_key)
    assert r1.accepted == half and r1.duplicates == 0
    assert r2.accepted == len(events) - half and r2.duplicates == keyed_first_half

    res = await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))
    per_unit = {v: [float(np.mean(raw[u])) for u in units if variant_of[u] == v] for v in ("control", "treatment")}
    by_variant = {s.variant: s for s in res.primary.variants}
    for v, xs in per_unit.items():
        assert by_variant[v].units == len(xs)
        assert by_variant[v].mean == pytest.approx(np.mean(xs), rel=1e-9)
        assert by_variant[v].standard_deviation == pytest.approx(np.std(xs, ddof=1), rel=1e-9)
        lo, hi = sps.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=sps.sem(xs))
        assert (by_variant[v].ci_lower, by_variant[v].ci_upper) == (pytest.approx(lo, rel=1e-9), pytest.approx(hi, rel=1e-9))
    welch = sps.ttest_ind(per_unit["treatment"], per_unit["control"], equal_var=False)
    cmp = res.primary.comparisons[0]
    assert cmp.variant == "treatment"
    assert cmp.p_value == pytest.approx(welch.pvalue, rel=1e-7)
    assert cmp.difference == pytest.approx(np.mean(per_unit["treatment"]) - np.mean(per_unit["control"]), rel=1e-9)
    assert cmp.relative_lift == pytest.approx(np.mean(per_unit["treatment"]) / np.mean(per_unit["control"]) - 1, rel=1e-9)
    # proportion metric: a unit is 1 if any value > 0
    sec = {s.variant: s for s in res.secondary[0].variants}
    for v in ("control", "treatment"):
        ys = [1.0 if any(y > 0 for y in thumbs[u]) else 0.0 for u in units if variant_of[u] == v and thumbs[u]]
        assert sec[v].units == len(ys) and sec[v].mean == pytest.approx(np.mean(ys), rel=1e-12)
    assert not res.srm_detected and res.srm_p_value > 0.001
    assert res.decision in (pb.DECISION_SHIP_VARIANT, pb.DECISION_NO_DETECTABLE_DIFFERENCE, pb.DECISION_KEEP_RUNNING)
    assert res.reason


async def test_bad_batches_are_rejected_atomically(stub, make_experiment):
    draft = await make_experiment(start=False)
    await expect_error(
        stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=draft.name, events=[ev("u", "score", 1)])),
        grpc.StatusCode.FAILED_PRECONDITION,
        "EXPERIMENT_NOT_RUNNING",
    )
    exp = await make_experiment()
    variant_of = await assign(stub, exp.name, ["a", "b", "c"])
    good = [ev("a", "score", 1.0, "k1"), ev("b", "score", 2.0, "k2")]
    # unknown metric at index 2: nothing of the batch is applied
    err = await expect_error(
        stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=[*good, ev("c", "latency", 3.0)])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_METRIC",
    )
    assert field_violations(err)[0].field == "events[2].metric"
    assert error_info(err).metadata["first_bad_event_index"] == "2"
    # unexposed unit
    err = await expect_error(
        stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=[*good, ev("stranger", "score", 3.0)])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNIT_NOT_EXPOSED",
    )
    assert field_violations(err)[0].field == "events[2].unit_id"
    # event before the start
    early = ev("a", "score", 1.0)
    early.event_time.CopyFrom(timestamp_pb2.Timestamp(seconds=exp.start_time.seconds - 3600))
    await expect_error(
        stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=[early])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "EVENT_BEFORE_START",
    )
    # huge batch
    huge = [ev("a", "score", 1.0)] * 10_001
    await expect_error(
        stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=huge)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BATCH_TOO_LARGE",
    )
    # NaN value
    await expect_error(
        stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=[ev("a", "score", float("nan"))])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_VALUE",
    )
    # the rejected batches left no trace: the good events (and their keys) are accepted now, once
    ok = await stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=good))
    assert (ok.accepted, ok.duplicates) == (2, 0)
    again = await stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=good))
    assert (again.accepted, again.duplicates) == (0, 2)
    res = await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))
    assert sum(v.units for v in res.primary.variants) == 2
    assert {v.variant: v.mean for v in res.primary.variants if v.units} == {
        variant_of["a"]: 1.0,
        variant_of["b"]: 2.0,
    } or variant_of["a"] == variant_of["b"]

    # a bad message in a stream: earlier messages are committed, the error says how many
    async def messages():
        yield svc.StreamMetricEventsRequest(experiment=exp.name, events=[ev("c", "score", 5.0)])
        yield svc.StreamMetricEventsRequest(experiment=exp.name, events=[ev("zzz", "score", 5.0)])

    err = await expect_error(stub.StreamMetricEvents(messages()), grpc.StatusCode.INVALID_ARGUMENT, "UNIT_NOT_EXPOSED")
    assert error_info(err).metadata["committed_messages"] == "1"
    # after stop
    await stub.StopExperiment(svc.StopExperimentRequest(name=exp.name))
    await expect_error(
        stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=good)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "EXPERIMENT_NOT_RUNNING",
    )
    await expect_error(
        stub.AssignVariant(svc.AssignVariantRequest(experiment=exp.name, unit_id="a")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "EXPERIMENT_NOT_RUNNING",
    )


async def test_sample_ratio_mismatch_blocks_a_winner(stub, make_experiment):
    exp = await make_experiment(min_sample_size=10)
    plan = AssignmentPlan(exp.hash_seed, [0.5, 0.5])
    # broken logging: only 2/3 of treatment units ever reach AssignVariant
    control = [u for u in (f"s-{i}" for i in range(4000)) if plan.assign(u).variant == 0][:600]
    treatment = [u for u in (f"s-{i}" for i in range(4000)) if plan.assign(u).variant == 1][:400]
    await assign(stub, exp.name, control + treatment)
    events = [ev(u, "score", 1.0) for u in control] + [ev(u, "score", 5.0 + (i % 3)) for i, u in enumerate(treatment)]
    await stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=events))
    res = await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))
    assert res.srm_detected and res.srm_p_value == pytest.approx(sps.chisquare([600, 400], [500, 500]).pvalue, rel=1e-6)
    assert res.decision == pb.DECISION_INVALID_SAMPLE_RATIO and res.recommended_variant == ""
    assert res.primary.comparisons[0].significant  # the metric alone would have shipped it
    assert "sample ratio mismatch" in res.reason


async def test_weight_change_with_partial_coverage_is_no_sample_ratio_mismatch(stub, make_experiment, backend):
    """Issue 18's repro through the gRPC API: coverage 0.5, weights 0.5/0.5 → 0.2/0.8, the same 4,000 units before and
    after. The units first exposed after the change were outside the old coverage and all land in the treatment; the
    test expects that (first exposures counted per epoch and bucket class) instead of 0.2/0.8 (p = 1e-16 before)."""
    exp = await make_experiment(coverage=0.5, hash_seed="exp-srm", min_sample_size=10)
    units = [f"u-{i}" for i in range(4000)]
    await assign(stub, exp.name, units)
    patch = pb.Experiment(
        name=exp.name,
        variants=[
            pb.Variant(id=v.id, model_version=v.model_version, weight=w) for v, w in zip(exp.variants, (0.2, 0.8), strict=True)
        ],
    )
    await stub.UpdateExperiment(
        svc.UpdateExperimentRequest(experiment=patch, update_mask=field_mask_pb2.FieldMask(paths=["variants"]))
    )
    variant_of = await assign(stub, exp.name, units)
    exposed = [
        u for u in units if variant_of[u] != "control" or AssignmentPlan("exp-srm", [0.5, 0.5], 0.5).assign(u).variant == 0
    ]
    await stub.RecordMetricEvents(
        svc.RecordMetricEventsRequest(experiment=exp.name, events=[ev(u, "score", 1.0) for u in exposed])
    )
    async with backend.service.db.transaction() as session:
        rows = (await session.execute(sa.text("SELECT epoch, bucket_class, variant, units FROM exposure_counts ec "
                                              "JOIN experiments e ON e.id = ec.experiment_id WHERE e.name = :n "
                                              "ORDER BY epoch, bucket_class, variant"), {"n": exp.name})).all()  # fmt: skip
    assert [tuple(r) for r in rows] == [(0, 0, "control", 961), (0, 0, "treatment", 974), (1, 2500, "treatment", 1077)]
    res = await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))
    assert not res.srm_detected and res.srm_p_value > 0.05, res.srm_p_value
    assert res.decision != pb.DECISION_INVALID_SAMPLE_RATIO


async def test_sequential_p_value_is_a_running_minimum(stub, make_experiment):
    exp = await make_experiment(analysis=pb.ANALYSIS_METHOD_SEQUENTIAL, min_sample_size=10)
    units = [f"q-{i}" for i in range(200)]
    variant_of = await assign(stub, exp.name, units)
    rng = random.Random(3)
    await stub.RecordMetricEvents(
        svc.RecordMetricEventsRequest(
            experiment=exp.name,
            events=[ev(u, "score", rng.gauss(3.0 if variant_of[u] == "treatment" else 1.0, 1.0)) for u in units[:100]],
        )
    )
    first = await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))
    # later data with no effect at all: the always-valid p-value must not go back up
    await stub.RecordMetricEvents(
        svc.RecordMetricEventsRequest(experiment=exp.name, events=[ev(u, "score", rng.gauss(1.0, 3.0)) for u in units[100:]])
    )
    second = await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))
    assert second.primary.comparisons[0].sequential_p_value <= first.primary.comparisons[0].sequential_p_value
    assert first.primary.comparisons[0].sequential_p_value < 0.05


async def test_raw_events_keep_their_time_key_and_value(backend, make_experiment):
    """The audit rows: an event's own time when it has one, the time it was recorded when not; NULL key when none."""
    import sqlalchemy as sa

    stub = backend.stub
    exp = await make_experiment()
    await assign(stub, exp.name, ["a", "b", "c"])
    timed = ev("a", "score", 2.5, key="k-timed")
    timed.event_time.CopyFrom(timestamp_pb2.Timestamp(seconds=exp.start_time.seconds + 90, nanos=123_456_000))
    r = await stub.RecordMetricEvents(
        svc.RecordMetricEventsRequest(experiment=exp.name, events=[timed, ev("b", "score", -1e-300)])
    )
    assert (r.accepted, r.duplicates) == (2, 0)
    # values whose mean or square leave the double range at the bottom are still recorded (PostgreSQL would
    # raise "underflow" on the division or the square; IEEE arithmetic gives 0 or a subnormal)
    tiny = [ev("c", "score", 5e-324), ev("c", "score", 0.0), ev("a", "score", 1e-160)]
    r = await stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=tiny))
    assert (r.accepted, r.duplicates) == (3, 0)
    async with backend.service.db.transaction() as s:
        rows = (await s.execute(sa.text(
            "SELECT unit_id, value, event_time, idempotency_key FROM metric_events m JOIN experiments e ON e.id = m.experiment_id "
            "WHERE e.name = :name ORDER BY unit_id, m.id"), {"name": exp.name})).all()  # fmt: skip
    by_unit = {unit: [r for r in rows if r[0] == unit] for unit in ("a", "b", "c")}
    (a_unit, a_value, a_time, a_key), (b_unit, b_value, b_time, b_key) = by_unit["a"][0], by_unit["b"][0]
    assert (a_unit, a_value, a_key) == ("a", 2.5, "k-timed")
    assert (b_unit, b_value, b_key) == ("b", -1e-300, None)
    if isinstance(a_time, str):  # SQLite returns the stored text
        from datetime import datetime

        a_time, b_time = datetime.fromisoformat(a_time), datetime.fromisoformat(b_time)
    assert a_time.replace(tzinfo=None) == timed.event_time.ToDatetime()
    assert b_time.replace(tzinfo=None) >= exp.start_time.ToDatetime()
    await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))  # and the statistics take them


async def test_fixed_horizon_decision_is_stored_once(stub, make_experiment):
    """Issue 18: a fixed-horizon experiment decides at its planned sample size; later looks report that decision."""
    exp = await make_experiment(min_sample_size=15)
    units = [f"fh-{i}" for i in range(120)]
    variant_of = await assign(stub, exp.name, units)
    arms = {v: [u for u in units if variant_of[u] == v] for v in ("control", "treatment")}
    res = await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))
    assert res.decision == pb.DECISION_KEEP_RUNNING and "waiting for planned sample size 15" in res.reason
    same = [ev(u, "score", float(i % 5)) for v in arms for i, u in enumerate(arms[v][:15])]
    await stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=same))
    first = await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))
    assert first.decision == pb.DECISION_NO_DETECTABLE_DIFFERENCE
    effect = [ev(u, "score", 50.0 + i % 3) for i, u in enumerate(arms["treatment"][15:45])]
    effect += [ev(u, "score", float(i % 3)) for i, u in enumerate(arms["control"][15:45])]
    await stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=effect))
    later = await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))
    assert later.primary.comparisons[0].p_value < 1e-6
    assert later.decision == pb.DECISION_NO_DETECTABLE_DIFFERENCE and later.reason.startswith(first.reason)
    assert "fixed horizon: decided at the first look with the planned 15 units" in later.reason
