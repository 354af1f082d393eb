"""Issue 18: variant statistics stay exact when |mean| ≫ sd, on SQLite and PostgreSQL (the SQL merge of a batch
into (n, mean, M2)), and values outside the accepted range are rejected at ingest."""

from __future__ import annotations

import math
import random

import grpc
import numpy as np
import pytest
from scipy import stats as sps

from neuroweaver.experiments.v1 import experiments_service_pb2 as svc

from .test_metrics_results import assign, ev, expect_error


async def test_large_offset_values_match_scipy(stub, make_experiment):
    # 1e8 + N(0, 1) per unit: raw sums lost the variance (p = 0.257 where scipy says ~3e-4)
    exp = await make_experiment(min_sample_size=10, hash_seed="issue-18-offsets")  # the same assignment every run
    rng = random.Random(18)
    units = [f"big-{i}" for i in range(600)]
    variant_of = await assign(stub, exp.name, units)
    first = {u: 1e8 + rng.gauss(0.3 if variant_of[u] == "treatment" else 0.0, 1.0) for u in units}
    second = {u: 1e8 + rng.gauss(0.3 if variant_of[u] == "treatment" else 0.0, 1.0) for u in units[::3]}
    batches = [[ev(u, "score", first[u]) for u in units[i::3]] for i in range(3)]
    batches.append([ev(u, "score", x) for u, x in second.items()])  # a unit's value changes: the downdate path
    for batch in batches:
        await stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=batch))
    # the server's per-unit value: (x1 + x2) / 2 in doubles, the same operations in the same order
    value = {u: (first[u] + second[u]) / 2 if u in second else first[u] for u in units}
    per = {v: [value[u] for u in units if variant_of[u] == v] for v in ("control", "treatment")}

    res = await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))
    by_variant = {s.variant: s for s in res.primary.variants}
    for v, xs in per.items():
        assert by_variant[v].units == len(xs)
        assert by_variant[v].mean == pytest.approx(np.mean(xs), rel=1e-13)
        assert by_variant[v].standard_deviation == pytest.approx(np.std(xs, ddof=1), rel=1e-9)
    # scipy on the values shifted by 1e8 (exact): the well-conditioned reference. Means near 1e8 are doubles to
    # ~1.5e-8, so the difference of means (and p) agree to that: ~1e-7 relative, not better
    exact = sps.ttest_ind(np.subtract(per["treatment"], 1e8), np.subtract(per["control"], 1e8), equal_var=False)
    cmp = res.primary.comparisons[0]
    assert exact.pvalue < 0.01 and cmp.p_value == pytest.approx(exact.pvalue, rel=1e-5)
    assert cmp.difference == pytest.approx(np.mean(per["treatment"]) - np.mean(per["control"]), abs=1e-7)


async def test_values_outside_the_accepted_range_are_rejected(stub, make_experiment):
    exp = await make_experiment()
    await assign(stub, exp.name, ["a"])
    for value, reason in (
        (1e12 * (1 + 1e-15), "VALUE_OUT_OF_RANGE"),
        (-1e200, "VALUE_OUT_OF_RANGE"),
        (math.nan, "INVALID_VALUE"),
        (math.inf, "INVALID_VALUE"),
    ):
        err = await expect_error(
            stub.RecordMetricEvents(
                svc.RecordMetricEventsRequest(experiment=exp.name, events=[ev("a", "score", 1.0), ev("a", "score", value)])
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            reason,
        )
        assert "events[1].value" in err.details()
    ok = await stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=[ev("a", "score", -1e12)]))
    assert ok.accepted == 1
