"""Sample-ratio test after weight changes with coverage < 1 (issue 18): the expected split follows what assignment
does with the units first exposed in each epoch (bucket classes), so correct assignments never raise a false SRM
and lost exposures are still caught.

The old expectation (each epoch's first exposures split by that epoch's weights) is kept here as `_old_p` to show
what the regression was: on the repro it gave p ~ 1e-16 although every assignment was right.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from scipy import stats as sps

from neuroweaver_experiments.domain.assignment import BUCKETS, AssignmentPlan, BucketClasses
from neuroweaver_experiments.domain.experiment import UNRECORDED_CLASS, Experiment, Variant, srm_strata
from neuroweaver_experiments.domain.statistics import (
    SRM_THRESHOLD,
    AnalysisMethod,
    MetricSpec,
    srm_test,
    srm_test_strata,
)

P = "projects/default"
IDS = ["control", "treatment", "t2", "t3"]

Exposures = dict[tuple[int, int], dict[str, int]]


def _simulate(
    seed: str,
    history: list[list[float]],
    coverage: float,
    visits: list[list[str]],
    *,
    lost: set[str] = frozenset(),  # type: ignore[assignment]
    lost_variant: int = 1,
) -> Exposures:
    """What the assigner records: each epoch's visitors in order, sticky once stored, counted at their first
    exposure under (epoch, bucket class). A unit in `lost` is never logged when it would be exposed in `lost_variant`
    (a broken logging path: it stays unstored and may be exposed elsewhere after a later weight change)."""
    plans = [AssignmentPlan(seed, w, coverage) for w in history]
    classes = BucketClasses(history, coverage)
    stored: set[str] = set()
    counts: Counter[tuple[int, int, str]] = Counter()
    for epoch, plan in enumerate(plans):
        for unit in visits[epoch]:
            if unit in stored:
                continue
            a = plan.assign(unit)
            if a.variant is None or (a.variant == lost_variant and unit in lost):
                continue
            stored.add(unit)
            key = classes.key(epoch, a.bucket)
            assert key is not None
            counts[(epoch, key, IDS[a.variant])] += 1
    out: Exposures = {}
    for (epoch, key, variant), n in counts.items():
        out.setdefault((epoch, key), {})[variant] = n
    return out


def _p(history: list[list[float]], coverage: float, exposures: Exposures) -> float:
    ids = IDS[: len(history[0])]
    return srm_test_strata(srm_strata(ids, history, coverage, exposures)).p_value


def _old_p(history: list[list[float]], exposures: Exposures) -> float:
    """The expectation before the fix: Σ_e N_e·w_e against the pooled counts."""
    ids = IDS[: len(history[0])]
    per_epoch = Counter[int]()
    pooled = Counter[str]()
    for (epoch, _), counts in exposures.items():
        per_epoch[epoch] += sum(counts.values())
        pooled.update(counts)
    n = sum(per_epoch.values())
    weights = [sum(per_epoch[e] * history[e][i] for e in per_epoch) / n for i in range(len(ids))]
    return srm_test([pooled[v] for v in ids], weights).p_value


# ------------------------------------------------------------------------------------------ bucket classes


@pytest.mark.parametrize(
    ("history", "coverage"),
    [
        ([[0.5, 0.5], [0.2, 0.8]], 0.5),
        ([[0.5, 0.5], [0.8, 0.2], [0.5, 0.5], [0.1, 0.9]], 0.3),
        ([[1 / 3, 1 / 3, 1 / 3], [0.1, 0.3, 0.6], [0.6, 0.2, 0.2]], 0.7),
        ([[0.0, 0.5, 0.5], [0.4, 0.0, 0.6]], 0.45),
        ([[0.5, 0.5], [0.2, 0.8]], 1.0),
    ],
)
def test_bucket_classes_match_the_plans_bucket_by_bucket(history, coverage):
    """Brute force over all 10,000 buckets with the real plans: a class is the set of covered buckets with the same
    earlier-epoch coverage, named by its smallest bucket; its shares are the plan's split of those buckets."""
    plans = [AssignmentPlan("classes", w, coverage) for w in history]
    classes = BucketClasses(history, coverage)
    for epoch, plan in enumerate(plans):
        table = classes.table(epoch)
        groups: dict[tuple[bool, ...], list[int]] = {}
        for b in range(BUCKETS):
            assert (table[b] is None) == (plan.variant_for_bucket(b) is None)
            assert table[b] == classes.key(epoch, b)
            if table[b] is not None:
                signature = tuple(plans[e].variant_for_bucket(b) is not None for e in range(epoch))
                groups.setdefault(signature, []).append(b)
        assert sorted(classes.keys(epoch)) == sorted(g[0] for g in groups.values())
        for members in groups.values():
            assert {table[b] for b in members} == {members[0]}
            split = Counter(plan.variant_for_bucket(b) for b in members)
            assert classes.shares(epoch, members[0]) == tuple(split[i] / len(members) for i in range(len(history[epoch])))
    if coverage == 1.0:  # every unit is stored at its first visit: one class per epoch, the plan's own split
        assert all(classes.keys(e) == [0] for e in range(len(history)))


# ---------------------------------------------------------------------------------------------- the repro


def test_issue_18_repro_is_not_a_sample_ratio_mismatch():
    """Coverage 0.5, weights 0.5/0.5 → 0.2/0.8, the same 4,000 units before and after the change."""
    history, units = [[0.5, 0.5], [0.2, 0.8]], [f"u-{i}" for i in range(4000)]
    exposures = _simulate("exp-srm", history, 0.5, [units, units])
    # the units that come back after the change were outside epoch 0's coverage: all of them land in the treatment
    assert set(exposures) == {(0, 0), (1, 2500)} and set(exposures[(1, 2500)]) == {"treatment"}
    assert _old_p(history, exposures) < 1e-12  # the false alarm of the issue
    p = _p(history, 0.5, exposures)
    assert p > 0.05, p


# ------------------------------------------------------------------------------------- seeded simulation

SCENARIOS = [
    (0.5, [[0.5, 0.5], [0.2, 0.8]]),
    (0.3, [[0.5, 0.5], [0.8, 0.2], [0.5, 0.5]]),
    (0.8, [[0.1, 0.9], [0.5, 0.5]]),
    (1.0, [[0.5, 0.5], [0.2, 0.8]]),
    (0.5, [[1 / 3, 1 / 3, 1 / 3], [0.1, 0.3, 0.6], [0.6, 0.2, 0.2]]),
    (0.25, [[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]),
]


def _visits(rng: random.Random, population: int, epochs: int, tag: str) -> list[list[str]]:
    """Returning users (each visits an epoch with probability 0.6, whatever their hash) and a few new ones per epoch."""
    units = [f"{tag}-{i}" for i in range(population)]
    out = []
    for e in range(epochs):
        units += [f"{tag}-new{e}-{i}" for i in range(population // 10)]
        out.append([u for u in units if rng.random() < 0.6])
    return out


def test_seeded_simulation_raises_no_false_sample_ratio_alarms():
    """240 simulated experiments (6 coverage/weight-change scenarios x 40) with correct assignment: no p below the
    SRM threshold (0.001), and about 5 % below 0.05 (8 here, 12 expected). The old expectation alarms on 49 of them.
    Fixed seed: the counts are exact."""
    rng = random.Random(18)
    new_p, old_p = [], []
    for s, (coverage, history) in enumerate(SCENARIOS):
        for run in range(40):
            visits = _visits(rng, 2000, len(history), f"s{s}r{run}")
            exposures = _simulate(f"sim-{s}-{run}", history, coverage, visits)
            new_p.append(_p(history, coverage, exposures))
            old_p.append(_old_p(history, exposures))
    assert sum(p < SRM_THRESHOLD for p in new_p) == 0
    assert sum(p < 0.05 for p in new_p) == 8
    assert sum(p < SRM_THRESHOLD for p in old_p) == 49


def test_lost_exposures_in_one_variant_are_still_caught():
    """10 % of the units the treatment would get are never logged: flagged in every scenario; the same visits with
    nothing lost are not. (60,000 users per scenario: at coverage 0.25 the treatment gets about 1,500 of them.)"""
    rng = random.Random(1018)
    for s, (coverage, history) in enumerate(SCENARIOS):
        visits = _visits(rng, 60_000, len(history), f"d{s}")
        lost = {u for u in {u for v in visits for u in v} if rng.random() < 0.1}
        assert _p(history, coverage, _simulate(f"drop-{s}", history, coverage, visits, lost=lost)) < SRM_THRESHOLD, s
        assert _p(history, coverage, _simulate(f"drop-{s}", history, coverage, visits)) > 0.05, s


# ------------------------------------------------------------------------------------- the statistical test


def test_strata_test_is_pearson_for_one_stratum_and_ignores_single_variant_strata():
    counts, weights = [961, 1053, 2100], [0.25, 0.25, 0.5]
    one = srm_test_strata([(counts, weights)])
    assert one.p_value == pytest.approx(sps.chisquare(counts, [sum(counts) * w for w in weights]).pvalue, rel=1e-12)
    assert srm_test(counts, weights) == one
    with_sure = srm_test_strata([(counts, weights), ([0, 0, 700], [0.0, 0.0, 1.0])])  # units that can only go one way
    assert with_sure.statistic == pytest.approx(one.statistic, rel=1e-9) and with_sure.df == one.df == 2
    assert with_sure.observed == (961, 1053, 2800)
    # a unit where its stratum allows none: impossible under correct assignment
    assert srm_test_strata([(counts, weights), ([1, 0, 700], [0.0, 0.0, 1.0])]).p_value == 0.0
    assert not srm_test_strata([([0, 0], [0.5, 0.5])]).detected


def test_strata_test_is_calibrated_on_multinomial_strata():
    """Strata with different shares (and one that excludes a variant): the p-values of 3,000 multinomial draws are
    uniform (KS), and the false-alarm count at 0.001 is what it should be."""
    gen = np.random.default_rng(7)
    strata = [(400, [0.5, 0.3, 0.2]), (250, [0.1, 0.1, 0.8]), (120, [0.0, 0.5, 0.5])]
    ps = []
    for _ in range(3000):
        drawn = [(list(gen.multinomial(n, p)), p) for n, p in strata]
        result = srm_test_strata(drawn)
        assert result.df == 2
        ps.append(result.p_value)
    assert sps.kstest(ps, "uniform").pvalue > 0.01
    assert sum(p < 0.001 for p in ps) <= 9


# ---------------------------------------------------------------------------------------------- legacy rows


def test_counts_without_a_recorded_class_are_used_only_where_their_epoch_has_one_class():
    history = [[0.5, 0.5], [0.2, 0.8]]
    old_rows = {(0, UNRECORDED_CLASS): {"control": 500, "treatment": 510}, (1, UNRECORDED_CLASS): {"treatment": 600}}
    # coverage 0.5: epoch 1 has two classes, its unrecorded counts cannot be split and stay out of the test
    assert srm_strata(IDS[:2], history, 0.5, old_rows) == [([500, 510], [0.5, 0.5])]
    # coverage 1: one class per epoch, the counts are exact
    strata = srm_strata(IDS[:2], history, 1.0, old_rows)
    assert strata[0] == ([500, 510], [0.5, 0.5]) and strata[1][0] == [0, 600]
    assert strata[1][1] == pytest.approx([0.2, 0.8], abs=1e-4)


# ------------------------------------------------------------------------------------ through the use cases


async def test_repro_through_the_service_records_the_strata_and_reports_no_srm(fakes):
    """The repro through ExperimentsService (create, start, BatchAssign, UpdateExperiment weights, BatchAssign the
    same units, results) on the in-memory store: it records exactly the simulated strata and finds no SRM."""
    svc = fakes.service
    exp = Experiment(
        name="",
        variants=[
            Variant("control", f"{P}/models/m/versions/1.0.0", weight=0.5),
            Variant("treatment", f"{P}/models/m/versions/1.1.0", weight=0.5),
        ],
        hash_seed="exp-srm",
        coverage=0.5,
        primary_metric=MetricSpec("score"),
        analysis=AnalysisMethod.FIXED_HORIZON,
    )
    await svc.create(P, "srm", exp, "", "fp")
    name = f"{P}/experiments/srm"
    await svc.start(name)
    units = [f"u-{i}" for i in range(4000)]
    await svc.assign_snapshot(name, units, batch=True)
    patch = Experiment(
        name=name, variants=[Variant(v.id, v.model_version, weight=w) for v, w in zip(exp.variants, (0.2, 0.8), strict=True)]
    )
    await svc.update(patch, {"variants"}, "")
    _, again = await svc.assign_snapshot(name, units, batch=True)
    assert sum(a.in_experiment for a in again) == 3012  # 1,935 sticky from epoch 0 + 1,077 first exposed now
    stored = await svc.get(name)
    async with fakes.uow.transaction() as uow:
        recorded = await uow.assignments.exposures(stored.key)
    assert recorded == _simulate("exp-srm", [[0.5, 0.5], [0.2, 0.8]], 0.5, [units, units])
    results = await svc.results(name)
    assert not results.analysis.srm.detected and results.analysis.srm.p_value > 0.05
