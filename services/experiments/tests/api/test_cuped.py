"""CUPED through the API on SQLite and PostgreSQL: covariates recorded with events (first one per unit kept, late
ones counted) give the same adjusted results as the domain computes from the raw per-unit (x, y) pairs, a variance
reduction near the simulated ρ² and a narrower interval than the unadjusted one; without covariates, or on
statistics from before covariates were tracked, CUPED is not applied and the results say why."""

from __future__ import annotations

import math
import random

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from neuroweaver.experiments.v1 import experiment_pb2 as pb
from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver_experiments.domain.cuped import PairedStats
from neuroweaver_experiments.domain.statistics import AnalysisMethod, Direction, MetricKind, MetricSpec, analyze_metric
from neuroweaver_runtime.db import normalize_url
from neuroweaver_runtime.grpc_errors import error_info, field_violations

RHO = 0.8


def ev(unit: str, value: float, covariate: float | None = None) -> pb.MetricEvent:
    e = pb.MetricEvent(unit_id=unit, metric="score", value=value)
    if covariate is not None:
        e.covariate = covariate
    return e


async def assign(stub, name, units):
    got = await stub.BatchAssignVariants(svc.BatchAssignVariantsRequest(experiment=name, unit_ids=units))
    return {u: a.variant.id for u, a in zip(units, got.assignments, strict=True)}


async def record(stub, name, events):
    await stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=name, events=events))


async def results(stub, name):
    return await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=name))


async def test_covariates_reduce_variance_as_the_domain_computes(stub, make_experiment):
    exp = await make_experiment(analysis=pb.ANALYSIS_METHOD_FIXED_HORIZON)
    rng = random.Random(11)
    units = [f"c-{i}" for i in range(1000)]
    variant_of = await assign(stub, exp.name, units)
    x = {u: 10.0 + 2.0 * rng.gauss(0, 1) for u in units}
    # corr(x, y) = 0.8 within a variant: 0.8·(x − 10) has sd 1.6, the noise 1.2, y's sd 2
    y = {u: 10.0 + (0.3 if variant_of[u] == "treatment" else 0.0) + RHO * (x[u] - 10.0) + 1.2 * rng.gauss(0, 1) for u in units}
    d = {u: rng.uniform(0.5, 2.0) for u in units}
    # even units send their covariate with the first value (and another one later, ignored: the first stays),
    # odd units only with the second value (a late covariate on a unit already counted without one)
    first = [ev(u, y[u] + d[u], x[u] if i % 2 == 0 else None) for i, u in enumerate(units)]
    second = [ev(u, y[u] - d[u], x[u] if i % 2 else x[u] + 5.0) for i, u in enumerate(units)]
    await record(stub, exp.name, first[:500])
    await record(stub, exp.name, first[500:] + second[:300])
    await record(stub, exp.name, second[300:])

    res = (await results(stub, exp.name)).primary
    ids = ["control", "treatment"]
    pairs = [PairedStats.from_pairs((x[u], y[u]) for u in units if variant_of[u] == v) for v in ids]
    spec = MetricSpec("score", MetricKind.MEAN, Direction.INCREASE)
    want = analyze_metric(
        spec, [(v, p.y) for v, p in zip(ids, pairs, strict=True)], method=AnalysisMethod.FIXED_HORIZON, covariates=pairs
    )
    assert want.cuped_applied
    assert res.cuped_applied and res.cuped_note == ""
    assert res.covariate_coverage == 1.0
    assert res.variance_reduction == pytest.approx(want.variance_reduction, rel=1e-9)
    assert res.variance_reduction == pytest.approx(RHO**2, abs=0.06)
    cmp, w = res.comparisons[0], want.comparisons[0]
    assert cmp.difference == pytest.approx(w.difference, rel=1e-9)
    assert (cmp.difference_ci_lower, cmp.difference_ci_upper) == (
        pytest.approx(w.difference_ci.lower, rel=1e-9),
        pytest.approx(w.difference_ci.upper, rel=1e-9),
    )
    assert (cmp.unadjusted_difference_ci_lower, cmp.unadjusted_difference_ci_upper) == (
        pytest.approx(w.unadjusted_ci.lower, rel=1e-9),
        pytest.approx(w.unadjusted_ci.upper, rel=1e-9),
    )
    adjusted = cmp.difference_ci_upper - cmp.difference_ci_lower
    unadjusted = cmp.unadjusted_difference_ci_upper - cmp.unadjusted_difference_ci_lower
    # the interval's width scales with sqrt(1 − ρ²)
    assert adjusted == pytest.approx(unadjusted * math.sqrt(1 - res.variance_reduction), rel=0.05)
    assert adjusted < 0.7 * unadjusted


async def test_without_covariates_cuped_is_not_applied_and_says_why(stub, make_experiment, backend):
    exp = await make_experiment()
    units = [f"n-{i}" for i in range(40)]
    await assign(stub, exp.name, units)
    await record(stub, exp.name, [ev(u, float(i % 7)) for i, u in enumerate(units)])
    res = (await results(stub, exp.name)).primary
    assert not res.cuped_applied and res.cuped_note == "fewer than 2 units have a covariate"
    assert (res.variance_reduction, res.covariate_coverage) == (0.0, 0.0)
    cmp = res.comparisons[0]
    assert cmp.difference_ci_lower < cmp.difference_ci_upper
    assert (cmp.difference_ci_lower, cmp.difference_ci_upper) == (
        cmp.unadjusted_difference_ci_lower,
        cmp.unadjusted_difference_ci_upper,
    )

    # rows written before covariates were tracked (migration 0006 leaves them NULL) stay untracked
    engine = create_async_engine(normalize_url(backend.url))
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "UPDATE variant_stats SET covariate_units = NULL, covariate_mean = NULL, covariate_m2 = NULL,"
                    " comoment = NULL WHERE experiment_id = (SELECT id FROM experiments WHERE name = :name)"
                ),
                {"name": exp.name},
            )
    finally:
        await engine.dispose()
    await record(stub, exp.name, [ev(u, 1.0 + i % 3, covariate=float(i)) for i, u in enumerate(units)])
    res = (await results(stub, exp.name)).primary
    assert not res.cuped_applied
    assert "before covariates were tracked" in res.cuped_note


@pytest.mark.parametrize(
    ("covariate", "reason"), [(math.nan, "INVALID_VALUE"), (math.inf, "INVALID_VALUE"), (2e12, "VALUE_OUT_OF_RANGE")]
)
async def test_a_bad_covariate_rejects_the_batch(stub, make_experiment, covariate, reason):
    exp = await make_experiment()
    await assign(stub, exp.name, ["v-1"])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await record(stub, exp.name, [ev("v-1", 1.0, 3.0), ev("v-1", 1.0, covariate)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(info.value).reason == reason
    assert [v.field for v in field_violations(info.value)] == ["events[1].covariate"]
    assert (await results(stub, exp.name)).primary.variants[0].units == 0  # nothing recorded
