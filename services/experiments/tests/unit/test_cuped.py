"""CUPED: mergeable co-moments and the adjusted estimate, checked against statsmodels OLS on the same data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import statsmodels.api as sm

from neuroweaver_experiments.domain.cuped import PairedStats, cuped, fold_pair_changes
from neuroweaver_experiments.domain.statistics import MetricKind, MetricSpec, analyze_metric, welch_t_test


def _close(a: PairedStats, b: PairedStats, rel: float) -> None:
    assert a.n == b.n and a.covered == b.covered
    for f in ("mu_x", "mu_y", "m2_x", "m2_y", "c_xy"):
        assert getattr(a, f) == pytest.approx(getattr(b, f), rel=rel, abs=1e-300), f


def _simulate(rng: np.random.Generator, n: int, effect: float, offset: float = 0.0):
    """Pre-period x and in-experiment y = x + noise (ρ ≈ 0.8), control and treatment arms."""
    arms = []
    for lift in (0.0, effect):
        x = rng.normal(10.0, 2.0, n) + offset
        y = 0.8 * x + rng.normal(0.0, 1.2, n) + lift
        arms.append((x, y))
    return arms


def test_merge_of_batches_equals_one_pass_with_large_offsets():
    rng = np.random.default_rng(1)
    x = 1e8 + rng.normal(0, 1, 3000)
    y = -5e7 + 0.5 * (x - 1e8) + rng.normal(0, 1, 3000)
    pairs = list(zip(x.tolist(), y.tolist(), strict=True))
    one = PairedStats.from_pairs(pairs)
    merged = PairedStats()
    for i in range(0, 3000, 7):  # uneven batches
        merged = merged + PairedStats.from_pairs(pairs[i : i + 7])
    # each merge rounds the means to a double (ulp(1e8) ≈ 1.5e-8 against sd 1): ~1e-9 relative after 429 merges;
    # raw sums Σx², Σxy would be ~3e19 and leave no digit of the 3e3 spread
    _close(merged, one, 1e-7)
    # the deviation sums are of the spread, not of 1e8: Cov/Var recovers the slope 0.5
    assert one.c_xy / one.m2_x == pytest.approx(np.cov(x - 1e8, y + 5e7)[0, 1] / np.var(x - 1e8, ddof=1), rel=1e-9)


@pytest.mark.parametrize(("offset", "late"), [(1e6, False), (10.0, True)])
def test_delta_folds_new_units_changed_values_and_late_covariates(offset, late):
    """Exact at large offsets while y changes; a covariate arriving late moves x from its imputed 0 to its
    value, a downdate that keeps ~1e-15·(offset/sd)² relative: fine near 0, not at 1e6 (documented)."""
    rng = np.random.default_rng(2)
    units = {f"u{i}": (offset + float(rng.normal()), 3 * offset + float(rng.normal())) for i in range(400)}
    current: dict[str, tuple[float | None, float]] = {}
    stats = PairedStats()
    for step in range(6):
        changes = []
        for i, (u, (x, y)) in enumerate(units.items()):
            if (i + step) % 3:
                continue
            # the covariate arrives with the unit's second batch for odd units; y moves every batch
            x_now = x if (u not in current or i % 2 == 0 or current[u][0] is not None or step > 2) else None
            if late and u not in current and i % 2:
                x_now = None
            new = (x_now, y + step * 0.25 * float(rng.normal()))
            changes.append((current.get(u), new))
            current[u] = new
        stats = fold_pair_changes(changes).apply(stats)
    _close(stats, PairedStats.from_pairs(current.values()), 1e-7)
    assert stats.covered == sum(1 for x, _ in current.values() if x is not None)


@pytest.mark.parametrize("seed", [3, 4])
def test_cuped_matches_statsmodels_ols(seed):
    """Difference of adjusted means = OLS treatment coefficient of y ~ 1 + t + (x − x̄) to 1e-9 relative;
    Welch SE on the adjusted values = OLS SE within 1 % at 4,000 units per arm (OLS pools the residual
    variance with N − 3 df and adds θ's uncertainty (x̄_t − x̄_c)²/ΣM2_x: both O(1/n))."""
    rng = np.random.default_rng(seed)
    (xc, yc), (xt, yt) = _simulate(rng, 4000, 0.05)
    stats = [PairedStats.from_pairs(zip(xc, yc, strict=True)), PairedStats.from_pairs(zip(xt, yt, strict=True))]
    res = cuped(stats)
    assert res is not None
    test = welch_t_test(*res.adjusted)

    x = np.concatenate([xc, xt])
    y = np.concatenate([yc, yt])
    t = np.r_[np.zeros(len(xc)), np.ones(len(xt))]
    fit = sm.OLS(y, np.column_stack([np.ones_like(y), t, x - x.mean()])).fit()
    assert test.difference == pytest.approx(fit.params[1], rel=1e-9)
    assert res.theta == pytest.approx(fit.params[2], rel=1e-9)
    assert test.standard_error == pytest.approx(fit.bse[1], rel=1e-2)

    raw = welch_t_test(stats[0].y, stats[1].y)
    # ρ ≈ 0.8 → variance reduction ≈ ρ² ≈ 0.64; SE shrinks by √(1 − ρ²)
    rho2 = np.corrcoef(np.r_[xc - xc.mean(), xt - xt.mean()], np.r_[yc - yc.mean(), yt - yt.mean()])[0, 1] ** 2
    assert res.variance_reduction == pytest.approx(rho2, rel=1e-9)
    assert res.variance_reduction > 0.5
    assert test.standard_error == pytest.approx(raw.standard_error * math.sqrt(1 - res.variance_reduction), rel=1e-2)


def test_rule_and_analysis_use_the_adjusted_estimate():
    rng = np.random.default_rng(5)
    arms = _simulate(rng, 1500, 0.15)
    stats = [PairedStats.from_pairs(zip(x, y, strict=True)) for x, y in arms]
    rows = [("control", stats[0].y), ("treatment", stats[1].y)]
    spec = MetricSpec("m")
    plain = analyze_metric(spec, rows)
    adj = analyze_metric(spec, rows, covariates=stats)
    assert not plain.cuped_applied and math.isnan(plain.variance_reduction)
    assert adj.cuped_applied and adj.variance_reduction > 0.5 and adj.covariate_coverage == 1.0
    c, p = adj.comparisons[0], plain.comparisons[0]
    assert c.difference_ci.width < 0.75 * p.difference_ci.width
    assert c.unadjusted_ci == p.difference_ci
    assert adj.variants == plain.variants  # summaries stay raw
    # a variant without co-moments (rows from before covariates were tracked) → raw analysis
    assert not analyze_metric(spec, rows, covariates=[stats[0], None]).cuped_applied
    # no unit with a covariate → raw analysis
    bare = [PairedStats.from_pairs((None, v) for v in arm[1]) for arm in arms]
    assert cuped(bare) is None
    # a proportion metric is tested with Welch on the adjusted values
    yb = (
        [(x, float(y > 8.0)) for x, y in zip(*arms[0], strict=True)],
        [(x, float(y > 8.0)) for x, y in zip(*arms[1], strict=True)],
    )
    pb = [PairedStats.from_pairs(a) for a in yb]
    res = analyze_metric(MetricSpec("p", MetricKind.PROPORTION), [("c", pb[0].y), ("t", pb[1].y)], covariates=pb)
    assert res.cuped_applied and res.comparisons[0].standard_error < res.comparisons[0].unadjusted_ci.width
