import math

import pytest
from growthbook import Experiment, GrowthBook
from growthbook import core as gbcore
from scipy import stats as sps

from neuroweaver_experiments.domain.assignment import (
    BUCKETS,
    Assignment,
    AssignmentPlan,
    assign,
    bucket_ranges,
    choose_variant,
    fnv1a32,
    hash_bucket,
    hash_value,
    resolve_sticky,
    validate_coverage,
    validate_variants,
    validate_weights,
)
from neuroweaver_runtime.errors import InvalidArgument

STRINGS = ["", "a", "user-1", "exp-42user-42", "é", "日本語", "emoji😀x", "mixed-ü-😀-z", "x" * 300]


@pytest.mark.parametrize("s", STRINGS)
def test_fnv1a32_matches_sdk(s):
    assert fnv1a32(s) == gbcore.fnv1a32(s)


def test_fnv1a32_known_vectors():
    # Published FNV-1a 32-bit test vectors.
    assert fnv1a32("") == 0x811C9DC5
    assert fnv1a32("a") == 0xE40C292C
    assert fnv1a32("foobar") == 0xBF9CF968


def test_hash_matches_sdk_gbhash_v2():
    for seed in ["exp", "checkout-v2", "ünïcode-seed"]:
        for i in range(2000):
            uid = f"user-{i}" if i % 7 else f"usér-😀-{i}"
            assert hash_value(seed, uid) == gbcore.gbhash(seed, uid, 2)
            assert 0 <= hash_bucket(seed, uid) < BUCKETS


@pytest.mark.parametrize(
    "weights,coverage",
    [
        ([0.5, 0.5], 1.0),
        ([0.1, 0.2, 0.7], 1.0),
        ([1 / 3, 1 / 3, 1 / 3], 0.37),
        ([0.25, 0.25, 0.25, 0.25], 0.05),
        ([0.9, 0.1], 0.5),
        ([0.3, 0.3, 0.4], 1.0),
    ],
)
def test_bucket_ranges_match_sdk(weights, coverage):
    assert bucket_ranges(weights, coverage) == gbcore.getBucketRanges(len(weights), coverage, weights)


@pytest.mark.parametrize(
    "weights,coverage,seed",
    [
        ([0.5, 0.5], 1.0, "exp-a"),
        ([0.1, 0.2, 0.7], 1.0, "exp-b"),
        ([1 / 3, 1 / 3, 1 / 3], 0.37, "exp-c"),
        ([0.3, 0.3, 0.4], 0.8, "exp-ü"),
        ([0.0, 1.0], 1.0, "exp-zero"),
    ],
)
def test_agrees_with_growthbook_sdk_run(weights, coverage, seed):
    plan = AssignmentPlan(seed, weights, coverage)
    exp = Experiment(
        key="some-key",
        variations=list(range(len(weights))),
        weights=weights,
        coverage=coverage,
        hashVersion=2,
        seed=seed,
    )
    gb = GrowthBook(attributes={"id": "x"})
    n_in = 0
    for i in range(3000):
        uid = f"unit-{i}" if i % 11 else f"ünit-😀-{i}"
        gb.set_attributes({"id": uid})
        res = gb.run(exp)
        ours = plan.assign(uid)
        assert ours == assign(seed, uid, weights, coverage)
        assert ours.in_experiment == res.inExperiment, uid
        assert ours.served_variant == res.variationId, uid
        if res.inExperiment:
            n_in += 1
            assert ours.bucket / BUCKETS == res.bucket
    assert n_in > 0


def test_same_unit_same_variant_and_seed_matters():
    plan = AssignmentPlan("exp-1", [0.5, 0.5])
    first = [plan.assign(f"u{i}").variant for i in range(1000)]
    rebuilt, other_seed = AssignmentPlan("exp-1", [0.5, 0.5]), AssignmentPlan("exp-2", [0.5, 0.5])
    again = [rebuilt.assign(f"u{i}").variant for i in range(1000)]
    one_shot = [assign("exp-1", f"u{i}", [0.5, 0.5]).variant for i in range(1000)]
    other = [other_seed.assign(f"u{i}").variant for i in range(1000)]
    assert first == one_shot
    assert first == again
    assert first != other


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.1, 0.3, 0.6], [0.2, 0.2, 0.2, 0.4]])
def test_split_of_100k_units_within_3_sigma(weights):
    n = 100_000
    plan = AssignmentPlan("split-test", weights)
    counts = [0] * len(weights)
    for i in range(n):
        counts[plan.assign(f"user-{i}").variant] += 1
    for c, w in zip(counts, weights, strict=True):
        sigma = math.sqrt(n * w * (1 - w))
        assert abs(c - n * w) <= 3 * sigma, (counts, weights)


def test_two_experiments_are_independent():
    n = 50_000
    a = AssignmentPlan("experiment-A", [0.5, 0.5])
    b = AssignmentPlan("experiment-B", [0.5, 0.5])
    table = [[0, 0], [0, 0]]
    for i in range(n):
        uid = f"user-{i}"
        table[a.assign(uid).variant][b.assign(uid).variant] += 1
    chi2, p, _, _ = sps.chi2_contingency(table, correction=False)
    assert p > 0.001, (table, chi2)
    # and the test has teeth: the same seed is perfectly dependent
    same = [[0, 0], [0, 0]]
    for i in range(2000):
        v = a.assign(f"user-{i}").variant
        same[v][v] += 1
    assert sps.chi2_contingency(same, correction=False)[1] < 1e-100


def test_coverage_fraction_and_monotonic_growth():
    n = 40_000
    low = AssignmentPlan("cov", [0.5, 0.5], coverage=0.2)
    full = AssignmentPlan("cov", [0.5, 0.5], coverage=1.0)
    inside = 0
    for i in range(n):
        uid = f"u{i}"
        a = low.assign(uid)
        if a.in_experiment:
            inside += 1
            # raising coverage never moves a unit that was already in
            assert full.assign(uid).variant == a.variant
        else:
            assert a.served_variant == 0 and a.variant is None
    assert abs(inside / n - 0.2) < 3 * math.sqrt(0.2 * 0.8 / n)


@pytest.mark.parametrize(
    "weights,coverage",
    [([0.5, 0.5], 1.0), ([0.1, 0.2, 0.7], 0.999), ([1 / 3, 1 / 3, 1 / 3], 0.37), ([0.0, 0.5, 0.5], 1.0)],
)
def test_plan_table_equals_sdk_choose_variation_for_every_bucket(weights, coverage):
    plan = AssignmentPlan("t", weights, coverage)
    ranges = gbcore.getBucketRanges(len(weights), coverage, weights)
    for b in range(BUCKETS):
        idx = gbcore.chooseVariation(b / BUCKETS, ranges)
        assert plan.variant_for_bucket(b) == (None if idx < 0 else idx)


def test_choose_variant_edges():
    ranges = bucket_ranges([0.5, 0.5], 0.5)
    assert choose_variant(0.0, ranges) == 0
    assert choose_variant(0.25, ranges) == -1  # end is exclusive
    assert choose_variant(0.5, ranges) == 1
    assert choose_variant(0.9999, ranges) == -1


@pytest.mark.parametrize(
    "weights,field,reason",
    [
        ([1.0], "variants", "TOO_FEW_VARIANTS"),
        ([0.5, -0.1, 0.6], "variants[1].weight", "INVALID_WEIGHT"),
        ([0.5, float("nan")], "variants[1].weight", "INVALID_WEIGHT"),
        ([0.5, 0.4], "variants", "WEIGHTS_DO_NOT_SUM_TO_ONE"),
        ([0.5, 0.5 + 1e-5], "variants", "WEIGHTS_DO_NOT_SUM_TO_ONE"),
        ([True, 0.0], "variants[0].weight", "INVALID_WEIGHT"),
    ],
)
def test_invalid_weights(weights, field, reason):
    with pytest.raises(InvalidArgument) as ei:
        validate_weights(weights)
    assert ei.value.field == field
    assert ei.value.reason == reason


def test_weights_within_tolerance_accepted():
    assert validate_weights([1 / 3, 1 / 3, 1 / 3]) == (1 / 3, 1 / 3, 1 / 3)
    assert validate_weights([0.5, 0.5 + 5e-7])


def test_invalid_ids_and_coverage():
    with pytest.raises(InvalidArgument) as ei:
        validate_variants(["control", "control"], [0.5, 0.5])
    assert (ei.value.field, ei.value.reason) == ("variants[1].id", "DUPLICATE_VARIANT_ID")
    with pytest.raises(InvalidArgument) as ei:
        validate_variants(["control", ""], [0.5, 0.5])
    assert ei.value.field == "variants[1].id"
    with pytest.raises(InvalidArgument) as ei:
        validate_variants(["a", "b", "c"], [0.5, 0.5])
    assert ei.value.reason == "VARIANT_WEIGHT_MISMATCH"
    for bad in (0.0, -0.1, 1.5, float("inf")):
        with pytest.raises(InvalidArgument) as ei:
            validate_coverage(bad)
        assert ei.value.field == "coverage"
    with pytest.raises(InvalidArgument) as ei:
        AssignmentPlan("s", [0.5, 0.5]).assign("")
    assert ei.value.field == "unit_id"
    with pytest.raises(InvalidArgument) as ei:
        AssignmentPlan("", [0.5, 0.5])
    assert ei.value.field == "hash_seed"


def test_sticky_assignment_wins_over_new_weights():
    ids = ["control", "treatment"]
    uid = next(f"u{i}" for i in range(1000) if assign("s", f"u{i}", [0.5, 0.5]).variant == 1)
    stored = ids[assign("s", uid, [0.5, 0.5]).variant]
    # weights change so that the hash alone would now give the control
    fresh = assign("s", uid, [1.0, 0.0])
    assert fresh.variant == 0
    resolved = resolve_sticky(stored, ids, fresh)
    assert resolved == Assignment(1, fresh.bucket, sticky=True)
    # even outside the (new) coverage the stored assignment holds
    fresh_out = assign("s", uid, [0.5, 0.5], coverage=0.0001)
    assert resolve_sticky(stored, ids, fresh_out).variant == 1
    # nothing stored → the hash; an unknown stored id → the hash
    assert resolve_sticky(None, ids, fresh) is fresh
    assert resolve_sticky("removed-variant", ids, fresh) is fresh
