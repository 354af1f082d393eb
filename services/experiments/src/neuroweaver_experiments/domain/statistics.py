"""Experiment statistics from per-variant sufficient statistics.

Every test here works from `SufficientStats` (units n, mean and M2 = Σ(x − mean)² of the per-unit values), so
an analysis costs the same at 10 events or 10 million: the store keeps three numbers per (variant, metric).
Centred moments rather than raw sums keep the variance exact to ~1e-15 relative when |mean| ≫ sd (1e8 + N(0,1)).
Metric values are accepted only when finite and |x| ≤ `MAX_ABS_VALUE` (1e12), checked at ingest.

Per-unit values: a unit's value for a MEAN metric is the average of its events; for a PROPORTION metric it
is 1 if any of its events is > 0, else 0 (`unit_value`). The randomisation unit is the analysis unit, so the
usual independent-samples tests apply.

Methods (all two-sided, level `alpha`):

* Variant interval, MEAN: Student t, ``mean ± t_{n-1} · s/√n`` (= scipy `t.interval`).
* Variant interval, PROPORTION: Wilson score interval (= statsmodels `proportion_confint(method="wilson")`);
  Wilson rather than the normal (Wald) interval because it stays inside [0, 1] and keeps its coverage for
  rare events (error rates, thumbs-down) and small n.
* Difference, MEAN: Welch's unequal-variance t-test, Welch–Satterthwaite df (= scipy
  `ttest_ind(treatment, control, equal_var=False)`), interval ``diff ± t_df · se``.
* Difference, PROPORTION: two-proportion z-test with the pooled variance under H0 (= statsmodels
  `proportions_ztest`), interval with the unpooled (Wald) standard error.
* Relative lift ``(m_t − m_c) / m_c`` with a delta-method normal interval,
  ``Var ≈ Var(m_t)/m_c² + m_t²·Var(m_c)/m_c⁴``; only where the control mean is > 0 (NaN otherwise: with a
  negative control mean the ratio's sign is the opposite of the change's, and at 0 it has no scale).
* Guardrails are judged by the difference ``m_t − m_c`` in the metric's bad direction, never by the lift's
  sign: harm = −difference for a higher-is-better metric, +difference for lower-is-better; the tolerance
  is relative to the control mean's magnitude (absolute margin ``tolerance · |m_c|``, 0 when m_c = 0).
* Several treatments: Holm–Bonferroni adjusted p-values (fixed-horizon and sequential alike).
* Sample-ratio mismatch: chi-square goodness of fit of exposed units against the expected weights
  (= scipy `chisquare`); p < 0.001 means the assignment is broken. When the expected shares differ between
  groups of units (after weight changes: first exposures per epoch and bucket class, see
  `domain.assignment`), the groups are strata of one test whose covariance follows them (`srm_test_strata`).
* Sequential: normal-mixture mSPRT (Johari, Pekelis, Walsh, "Always valid inference", 2017; Optimizely's
  stats engine). For an asymptotically normal estimate θ̂ with variance V and mixing distribution
  θ ~ N(θ0, τ²), ``Λ = √(V/(V+τ²)) · exp(τ²(θ̂−θ0)² / (2V(V+τ²)))``; the always-valid p-value is
  ``min(1, 1/Λ)`` (running minimum over looks) and the confidence sequence is the set of θ0 with
  ``Λ(θ0) < 1/α``. V is the plug-in variance of the difference, as in Optimizely. The default τ is
  ``effect_size · pooled standard deviation`` (effect_size = 0.1, a "small" standardized effect; the test
  is most powerful for effects of about that size). Lift confidence sequences apply the same mixture to
  the delta-method lift with τ scaled by 1/|m_c|.

Undefined quantities are ``math.nan`` (means of empty variants, lift with a control mean ≤ 0); p-values
that cannot be computed (fewer than 2 units in an arm, zero variance everywhere, moments that overflowed or
are NaN) are 1.0 and their intervals are (−inf, inf): such data never produces a decision.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np
from scipy import special

from neuroweaver_runtime.errors import InvalidArgument

if TYPE_CHECKING:
    from .cuped import PairedStats

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_EFFECT_SIZE",
    "DEFAULT_MIN_SAMPLE_SIZE",
    "MAX_ABS_VALUE",
    "SRM_THRESHOLD",
    "AnalysisMethod",
    "Comparison",
    "Decision",
    "DecisionConfig",
    "DecisionOutcome",
    "Direction",
    "ExperimentAnalysis",
    "GuardrailStatus",
    "Interval",
    "Lift",
    "MetricKind",
    "MetricResult",
    "MetricSpec",
    "SequentialState",
    "SrmResult",
    "SufficientStats",
    "TestResult",
    "VariantSummary",
    "analyze_experiment",
    "analyze_metric",
    "confidence_sequence",
    "decide",
    "default_tau2",
    "holm_bonferroni",
    "mean_confidence_interval",
    "msprt_p_value",
    "power",
    "proportion_confidence_interval",
    "relative_lift",
    "required_sample_size",
    "srm_test",
    "srm_test_strata",
    "summarize",
    "two_proportion_z_test",
    "unit_value",
    "welch_t_test",
    "wilson_interval",
]

DEFAULT_ALPHA = 0.05
# Largest accepted |metric value| (every metric; ingest rejects larger, NaN and inf with INVALID_ARGUMENT). Squares
# stay ≤ 1e24 and sums over a billion units far from overflow; a bug's 1e200 cannot reach the statistics.
MAX_ABS_VALUE = 1e12
DEFAULT_MIN_SAMPLE_SIZE = 100
DEFAULT_EFFECT_SIZE = 0.1
SRM_THRESHOLD = 0.001

_INF = math.inf
_NAN = math.nan


# ------------------------------------------------------------------------------------------------ enums


class MetricKind(StrEnum):
    MEAN = "mean"
    PROPORTION = "proportion"


class Direction(StrEnum):
    """Which direction of a metric is good."""

    INCREASE = "increase"
    DECREASE = "decrease"


class AnalysisMethod(StrEnum):
    FIXED_HORIZON = "fixed_horizon"
    SEQUENTIAL = "sequential"


class GuardrailStatus(StrEnum):
    """Guardrail verdict from the difference interval (CI, or confidence sequence when sequential), read in
    the metric's bad direction against the margin ``tolerance · |control mean|``.

    WITHIN_TOLERANCE: even the worst end of the interval is within the tolerated change.
    VIOLATED: even the best end of the interval is beyond the tolerance in the bad direction.
    INCONCLUSIVE: the interval straddles the tolerance.
    """

    WITHIN_TOLERANCE = "within_tolerance"
    INCONCLUSIVE = "inconclusive"
    VIOLATED = "violated"


class Decision(StrEnum):
    KEEP_RUNNING = "keep_running"
    SHIP_VARIANT = "ship_variant"
    NO_DETECTABLE_DIFFERENCE = "no_detectable_difference"
    STOP_FOR_HARM = "stop_for_harm"
    INVALID_SAMPLE_RATIO = "invalid_sample_ratio"


# ------------------------------------------------------------------------------------ basic value types


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """A tracked metric. `tolerance` (guardrails only) is the largest tolerated change in the bad direction,
    relative to the control mean's magnitude, e.g. 0.1 = 10 % of |control mean|."""

    name: str
    kind: MetricKind = MetricKind.MEAN
    direction: Direction = Direction.INCREASE
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidArgument("metric name must not be empty", field="name", reason="INVALID_METRIC")
        if not math.isfinite(self.tolerance) or self.tolerance < 0:
            raise InvalidArgument(
                f"tolerance must be a finite number >= 0, got {self.tolerance!r}",
                field="tolerance",
                reason="INVALID_TOLERANCE",
            )


@dataclass(frozen=True, slots=True)
class SufficientStats:
    """Units `n`, mean `mu` and ``m2 = Σ(x − mean)²`` of the per-unit values of one variant on one metric.

    Centred moments, not raw sums: ``Σx² − (Σx)²/n`` cancels every digit once |mean| ≫ sd (1e8 + N(0,1) lost
    the variance; 1e200 overflowed to a variance of 0). Two are merged with ``+`` (Chan, Golub, LeVeque 1979);
    `aggregation.StatsDelta` folds a batch of changed unit values in. Build from many values with `from_values`
    (two-pass) or merge batches: each merge rounds the mean to a double, so value-by-value updates (`add`) lose
    ~√n·ulp(mean)/sd of relative accuracy in the variance.
    `mu` is 0 when n = 0 (`mean` is NaN then)."""

    n: int = 0
    mu: float = 0.0
    m2: float = 0.0

    @classmethod
    def from_values(cls, values: Iterable[float]) -> SufficientStats:
        """Two-pass: the exactly rounded mean (fsum), then the sum of squared deviations from it."""
        xs = [float(v) for v in values]
        if not xs:
            return cls()
        mu = math.fsum(xs) / len(xs)
        return cls(len(xs), mu, math.fsum((x - mu) * (x - mu) for x in xs))

    def add(self, value: float) -> SufficientStats:
        return self + SufficientStats(1, float(value), 0.0)

    def __add__(self, other: SufficientStats) -> SufficientStats:
        if not isinstance(other, SufficientStats):
            return NotImplemented
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mu - self.mu
        return SufficientStats(n, self.mu + delta * other.n / n, self.m2 + other.m2 + delta * delta * self.n * other.n / n)

    @property
    def mean(self) -> float:
        return self.mu if self.n > 0 else _NAN

    @property
    def sum(self) -> float:
        """Σx (for a 0/1 metric: the number of successes)."""
        return self.n * self.mu

    @property
    def variance(self) -> float:
        """Sample variance (ddof=1); NaN below 2 units. NaN and inf stay what they are (no decision is taken on
        them); a slightly negative m2 left by rounding in a downdate is 0."""
        if self.n < 2:
            return _NAN
        v = self.m2 / (self.n - 1)
        return 0.0 if v < 0 else v

    @property
    def std(self) -> float:
        return math.sqrt(self.variance) if self.n >= 2 else _NAN

    @property
    def proportion_variance(self) -> float:
        """Bernoulli variance p(1−p) of a 0/1 metric (ddof=0)."""
        if self.n == 0:
            return _NAN
        v = self.mu * (1.0 - self.mu)
        return 0.0 if v < 0 else v


def unit_value(values: Iterable[float], kind: MetricKind) -> float:
    """Aggregate one unit's events into its per-unit value: MEAN → their average; PROPORTION → 1.0 if any
    value is > 0 else 0.0. Raises InvalidArgument when there are no values."""
    vals = [float(v) for v in values]
    if not vals:
        raise InvalidArgument("a unit needs at least one value", field="values", reason="NO_VALUES")
    if kind is MetricKind.PROPORTION:
        return 1.0 if any(v > 0 for v in vals) else 0.0
    return math.fsum(vals) / len(vals)


@dataclass(frozen=True, slots=True)
class Interval:
    lower: float
    upper: float

    def contains(self, x: float) -> bool:
        return self.lower <= x <= self.upper

    @property
    def width(self) -> float:
        return self.upper - self.lower


_UNBOUNDED = Interval(-_INF, _INF)


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise InvalidArgument(
            f"significance level must be in (0, 1), got {alpha!r}", field="significance_level", reason="INVALID_ALPHA"
        )


def _z(alpha: float) -> float:
    return float(special.ndtri(1.0 - alpha / 2.0))


def _t(alpha: float, df: float) -> float:
    return float(special.stdtrit(df, 1.0 - alpha / 2.0))


def _two_sided_normal_p(z: float) -> float:
    return float(2.0 * special.ndtr(-abs(z)))


# --------------------------------------------------------------------------------- per-variant intervals


def mean_confidence_interval(stats: SufficientStats, alpha: float = DEFAULT_ALPHA) -> Interval:
    """Student t interval for the mean; unbounded below 2 units."""
    if stats.n < 2:
        return _UNBOUNDED
    half = _t(alpha, stats.n - 1) * math.sqrt(stats.variance / stats.n)
    return Interval(stats.mean - half, stats.mean + half)


def wilson_interval(successes: float, n: int, alpha: float = DEFAULT_ALPHA) -> Interval:
    """Wilson score interval for a proportion (statsmodels `proportion_confint(..., method="wilson")`)."""
    if n <= 0:
        return Interval(0.0, 1.0)
    z = _z(alpha)
    z2 = z * z
    p = successes / n
    denom = 1.0 + z2 / n
    center = (p + z2 / (2.0 * n)) / denom
    half = z / denom * math.sqrt(max(0.0, p * (1.0 - p) / n + z2 / (4.0 * n * n)))
    return Interval(center - half, center + half)


def proportion_confidence_interval(stats: SufficientStats, alpha: float = DEFAULT_ALPHA) -> Interval:
    return wilson_interval(stats.sum, stats.n, alpha)


@dataclass(frozen=True, slots=True)
class VariantSummary:
    variant: str
    units: int
    mean: float
    std: float
    ci: Interval


def summarize(variant: str, stats: SufficientStats, kind: MetricKind, alpha: float = DEFAULT_ALPHA) -> VariantSummary:
    """Units, mean, standard deviation and interval of one variant (t for MEAN, Wilson for PROPORTION).
    For PROPORTION the standard deviation is the Bernoulli √(p(1−p))."""
    if kind is MetricKind.PROPORTION:
        std = math.sqrt(stats.proportion_variance) if stats.n else _NAN
        return VariantSummary(variant, stats.n, stats.mean, std, proportion_confidence_interval(stats, alpha))
    return VariantSummary(variant, stats.n, stats.mean, stats.std, mean_confidence_interval(stats, alpha))


# ------------------------------------------------------------------------------------------ two-sample


@dataclass(frozen=True, slots=True)
class TestResult:
    """Treatment − control. `df` is the Welch df (inf for the z-test); `ci` the fixed-horizon interval."""

    __test__ = False  # not a pytest test class

    difference: float
    standard_error: float
    statistic: float
    p_value: float
    df: float
    ci: Interval


def _mean_var(stats: SufficientStats, kind: MetricKind) -> float:
    """Variance of the variant's mean estimate."""
    if kind is MetricKind.PROPORTION:
        return stats.proportion_variance / stats.n if stats.n else _NAN
    return stats.variance / stats.n if stats.n >= 2 else _NAN


def welch_t_test(control: SufficientStats, treatment: SufficientStats, alpha: float = DEFAULT_ALPHA) -> TestResult:
    """Welch's two-sided t-test of treatment vs control means (scipy `ttest_ind(t, c, equal_var=False)`)."""
    diff = treatment.mean - control.mean if control.n and treatment.n else _NAN
    if control.n < 2 or treatment.n < 2:
        return TestResult(diff, _NAN, _NAN, 1.0, _NAN, _UNBOUNDED)
    vc = control.variance / control.n
    vt = treatment.variance / treatment.n
    var = vc + vt
    if not (math.isfinite(var) and math.isfinite(diff)):
        # overflowed or undefined moments carry no evidence: never a certain p-value from them
        return TestResult(diff, _NAN, _NAN, 1.0, _NAN, _UNBOUNDED)
    if var <= 0.0:
        # Both arms constant: identical → no evidence; different → certain (scipy returns t=±inf, p=0).
        p = 1.0 if diff == 0 else 0.0
        return TestResult(diff, 0.0, _NAN if diff == 0 else math.copysign(_INF, diff), p, _NAN, Interval(diff, diff))
    se = math.sqrt(var)
    df = var * var / (vc * vc / (control.n - 1) + vt * vt / (treatment.n - 1))
    t = diff / se
    p = float(2.0 * special.stdtr(df, -abs(t)))
    half = _t(alpha, df) * se
    return TestResult(diff, se, t, min(1.0, p), df, Interval(diff - half, diff + half))


def two_proportion_z_test(control: SufficientStats, treatment: SufficientStats, alpha: float = DEFAULT_ALPHA) -> TestResult:
    """Two-sided two-proportion z-test, pooled variance under H0 (statsmodels `proportions_ztest`); the
    interval for the difference uses the unpooled standard error."""
    if control.n == 0 or treatment.n == 0:
        return TestResult(_NAN, _NAN, _NAN, 1.0, _INF, _UNBOUNDED)
    pc, pt = control.mean, treatment.mean
    diff = pt - pc
    pooled = (control.sum + treatment.sum) / (control.n + treatment.n)
    se0 = math.sqrt(max(0.0, pooled * (1.0 - pooled)) * (1.0 / control.n + 1.0 / treatment.n))
    se = math.sqrt(_mean_var(control, MetricKind.PROPORTION) + _mean_var(treatment, MetricKind.PROPORTION))
    if se0 == 0.0:
        return TestResult(diff, se, _NAN, 1.0, _INF, Interval(diff, diff))
    z = diff / se0
    half = _z(alpha) * se
    return TestResult(diff, se, z, _two_sided_normal_p(z), _INF, Interval(diff - half, diff + half))


def two_sample_test(
    control: SufficientStats, treatment: SufficientStats, kind: MetricKind, alpha: float = DEFAULT_ALPHA
) -> TestResult:
    if kind is MetricKind.PROPORTION:
        return two_proportion_z_test(control, treatment, alpha)
    return welch_t_test(control, treatment, alpha)


@dataclass(frozen=True, slots=True)
class Lift:
    """Relative lift (m_t − m_c)/m_c, its delta-method standard error and normal interval."""

    estimate: float
    standard_error: float
    ci: Interval


def relative_lift(control: SufficientStats, treatment: SufficientStats, kind: MetricKind, alpha: float = DEFAULT_ALPHA) -> Lift:
    """(m_t − m_c)/m_c, defined only for a control mean > 0: below 0 its sign is the opposite of the change's
    (−5 → −6 would read as +20 %), at 0 it has no scale. Undefined → NaN estimate, unbounded interval."""
    mc, mt = control.mean, treatment.mean
    if not (control.n and treatment.n) or not mc > 0:
        return Lift(_NAN, _NAN, _UNBOUNDED)
    est = mt / mc - 1.0
    vc, vt = _mean_var(control, kind), _mean_var(treatment, kind)
    if math.isnan(vc) or math.isnan(vt):
        return Lift(est, _NAN, _UNBOUNDED)
    se = math.sqrt(vt / (mc * mc) + (mt * mt) * vc / (mc**4))
    half = _z(alpha) * se
    return Lift(est, se, Interval(est - half, est + half))


def _lift_variance(control: SufficientStats, treatment: SufficientStats, kind: MetricKind) -> float:
    mc, mt = control.mean, treatment.mean
    vc, vt = _mean_var(control, kind), _mean_var(treatment, kind)
    return vt / (mc * mc) + (mt * mt) * vc / (mc**4)


def holm_bonferroni(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni step-down adjusted p-values, in the input order (statsmodels
    `multipletests(method="holm")`); compare them with α like raw p-values."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# ------------------------------------------------------------------------------------------------- SRM


@dataclass(frozen=True, slots=True)
class SrmResult:
    statistic: float
    df: int
    p_value: float
    detected: bool
    observed: tuple[int, ...]
    expected: tuple[float, ...]


def srm_test(counts: Sequence[int], weights: Sequence[float], threshold: float = SRM_THRESHOLD) -> SrmResult:
    """Chi-square goodness of fit of exposed units per variant against the expected weights
    (scipy `chisquare(counts, total·weights)`); `detected` when p < threshold (default 0.001).

    Variants with weight 0 are left out of the test, unless they have units (then p = 0: units landed where
    none may). With no units at all p = 1.
    """
    return srm_test_strata([(counts, weights)], threshold)


def srm_test_strata(strata: Sequence[tuple[Sequence[int], Sequence[float]]], threshold: float = SRM_THRESHOLD) -> SrmResult:
    """Sample-ratio test over independent strata, each ``(units per variant, expected share of each variant)``.

    Within a stratum the number of units N_s is taken as given and its units split over the variants as a
    multinomial with the stratum's shares p_s. The test pools the deviations, ``D = Σ_s (O_s − N_s·p_s)``, whose
    covariance under the null is ``C = Σ_s N_s·(diag p_s − p_s p_sᵀ)``, and refers ``Dᵀ C⁺ D`` to χ² with rank(C)
    degrees of freedom. With one stratum this is Pearson's statistic with k − 1 df (= scipy `chisquare`, computed
    that way); a stratum whose units can only go to one variant adds nothing to D or C. Pooling (rather than a
    sum of per-stratum statistics) keeps the degrees of freedom at k − 1, so a variant that loses a fraction of
    its units in every stratum is found with the power of a single test. Units in a variant its stratum gives
    share 0 make p = 0 (they landed where none may); with no units at all p = 1. `observed` and `expected` are
    the pooled counts (Σ_s O_s and Σ_s N_s·p_s).
    """
    k = len(strata[0][0]) if strata else 0
    observed = [0] * k
    expected = [0.0] * k
    live: list[tuple[list[int], list[float], int]] = []
    impossible = False
    for counts, weights in strata:
        if len(counts) != k or len(weights) != k:
            raise InvalidArgument(
                f"{len(counts)} counts for {len(weights)} weights (expected {k} each)",
                field="counts",
                reason="SRM_SHAPE_MISMATCH",
            )
        obs = [int(c) for c in counts]
        if any(c < 0 for c in obs):
            raise InvalidArgument("unit counts must be >= 0", field="counts", reason="INVALID_COUNT")
        n = sum(obs)
        wsum = math.fsum(weights)
        shares = [w / wsum for w in weights] if wsum > 0 else [0.0] * k
        for i in range(k):
            observed[i] += obs[i]
            expected[i] += n * shares[i]
        if n:
            impossible = impossible or any(o > 0 and p == 0 for o, p in zip(obs, shares, strict=True))
            live.append((obs, shares, n))
    result = functools.partial(SrmResult, observed=tuple(observed), expected=tuple(expected))
    if not live:
        return result(0.0, max(0, k - 1), 1.0, False)
    if impossible:
        return result(_INF, k - 1, 0.0, True)
    if len(live) == 1:
        cells = [(o, e) for o, e in zip(observed, expected, strict=True) if e > 0]
        df = len(cells) - 1
        stat = math.fsum((o - e) ** 2 / e for o, e in cells)
    else:
        d = np.zeros(k)
        cov = np.zeros((k, k))
        for obs, shares, n in live:
            p = np.asarray(shares)
            d += np.asarray(obs, dtype=float) - n * p
            cov += n * (np.diag(p) - np.outer(p, p))
        eigenvalues, vectors = np.linalg.eigh(cov)
        keep = eigenvalues > eigenvalues.max(initial=0.0) * 1e-9
        df = int(keep.sum())
        stat = float(np.sum((vectors[:, keep].T @ d) ** 2 / eigenvalues[keep])) if df else 0.0
    if df < 1:
        return result(0.0, 0, 1.0, False)
    p_value = float(special.chdtrc(df, stat))
    return result(stat, df, p_value, p_value < threshold)


# ------------------------------------------------------------------------------------------- sequential


def msprt_p_value(estimate: float, variance: float, tau2: float, null: float = 0.0) -> float:
    """Always-valid p-value ``min(1, 1/Λ)`` of the normal-mixture SPRT at one look.

    `variance` is the variance of `estimate` (V), `tau2` the mixing variance τ² on the effect scale.
    Take the running minimum over looks (see `SequentialState`). 1.0 when V or τ² is not positive.
    """
    if not (0 < variance < _INF and 0 < tau2 < _INF) or not math.isfinite(estimate):
        return 1.0
    d = estimate - null
    log_lambda = 0.5 * math.log(variance / (variance + tau2)) + tau2 * d * d / (2.0 * variance * (variance + tau2))
    if log_lambda <= 0:
        return 1.0
    return math.exp(-log_lambda)


def confidence_sequence(estimate: float, variance: float, tau2: float, alpha: float = DEFAULT_ALPHA) -> Interval:
    """Always-valid (1−α) confidence sequence of the normal mixture: {θ0 : Λ(θ0) < 1/α}, i.e.
    ``estimate ± √(V(V+τ²)/τ² · (ln((V+τ²)/V) − 2 ln α))``. Intersect over looks for a running interval."""
    if not (0 < variance < _INF and 0 < tau2 < _INF) or not math.isfinite(estimate):
        return _UNBOUNDED
    half = math.sqrt(variance * (variance + tau2) / tau2 * (math.log((variance + tau2) / variance) - 2 * math.log(alpha)))
    return Interval(estimate - half, estimate + half)


def default_tau2(
    control: SufficientStats,
    treatment: SufficientStats,
    kind: MetricKind,
    effect_size: float = DEFAULT_EFFECT_SIZE,
) -> float:
    """Mixing variance τ² = (effect_size · pooled standard deviation)²: the mixture is tuned to detect a
    standardized effect (Cohen's d) of about `effect_size`. 0 when no spread can be estimated yet."""
    if kind is MetricKind.PROPORTION:
        n = control.n + treatment.n
        if n == 0:
            return 0.0
        p = (control.sum + treatment.sum) / n
        var = p * (1.0 - p)
    else:
        if control.n < 2 or treatment.n < 2:
            return 0.0
        var = ((control.n - 1) * control.variance + (treatment.n - 1) * treatment.variance) / (control.n + treatment.n - 2)
    return (effect_size * effect_size) * max(0.0, var)


@dataclass(frozen=True, slots=True)
class SequentialState:
    """What a later look needs from earlier looks of one comparison: the running minimum of the raw
    always-valid p-value and the running intersections of the confidence sequences."""

    p_value: float = 1.0
    difference: Interval = _UNBOUNDED
    lift: Interval = _UNBOUNDED


def _intersect(a: Interval, b: Interval) -> Interval:
    lo, hi = max(a.lower, b.lower), min(a.upper, b.upper)
    return Interval(lo, hi) if lo <= hi else b


# ----------------------------------------------------------------------------------------------- power


def power(effect: float, standard_error: float, alpha: float = DEFAULT_ALPHA) -> float:
    """Power of a two-sided z-test at level α to detect a true difference `effect` with this standard error:
    ``Φ(|δ|/se − z) + Φ(−|δ|/se − z)``. NaN when undefined."""
    if math.isnan(effect) or math.isnan(standard_error):
        return _NAN
    zc = _z(alpha)
    if standard_error <= 0:
        return 1.0 if effect != 0 else alpha
    z = abs(effect) / standard_error
    return float(special.ndtr(z - zc) + special.ndtr(-z - zc))


def required_sample_size(
    standard_deviation: float, minimum_detectable_effect: float, alpha: float = DEFAULT_ALPHA, target_power: float = 0.8
) -> int:
    """Units per variant for a two-sided two-sample test with equal arms:
    ``n = 2σ²(z_{1−α/2} + z_{power})² / δ²`` (δ absolute)."""
    _check_alpha(alpha)
    if not (standard_deviation > 0 and minimum_detectable_effect != 0 and 0 < target_power < 1):
        raise InvalidArgument(
            "need standard_deviation > 0, minimum_detectable_effect != 0 and 0 < power < 1",
            field="minimum_detectable_effect",
            reason="INVALID_POWER_INPUT",
        )
    zsum = _z(alpha) + float(special.ndtri(target_power))
    return math.ceil(2.0 * standard_deviation**2 * zsum * zsum / minimum_detectable_effect**2)


# ------------------------------------------------------------------------------------------ comparisons


@dataclass(frozen=True, slots=True)
class Comparison:
    """Treatment vs control on one metric.

    `p_value` / `sequential_p_value` are Holm-adjusted over the experiment's treatments (equal to the raw
    ones with a single treatment). `significant` uses the method's p-value (sequential when SEQUENTIAL).
    `decision_interval` / `decision_lift_interval` are the intervals decisions are judged by: the fixed CI
    for FIXED_HORIZON, the confidence sequence for SEQUENTIAL. `improvement` is True when the point
    estimate moves in the metric's good direction. `guardrail` is set only for guardrail analyses.
    `state` is what the next look needs (store it and pass it back as `previous`).
    """

    variant: str
    difference: float
    standard_error: float
    difference_ci: Interval
    relative_lift: float
    lift_ci: Interval
    p_value_raw: float
    p_value: float
    sequential_p_value_raw: float
    sequential_p_value: float
    difference_sequence: Interval
    lift_sequence: Interval
    significant: bool
    improvement: bool
    power: float
    method: AnalysisMethod
    guardrail: GuardrailStatus | None = None
    state: SequentialState = field(default_factory=SequentialState)
    # fixed-horizon CI of the difference without CUPED (equal to `difference_ci` when CUPED was not applied)
    unadjusted_ci: Interval = _UNBOUNDED

    @property
    def decision_interval(self) -> Interval:
        return self.difference_sequence if self.method is AnalysisMethod.SEQUENTIAL else self.difference_ci

    @property
    def decision_lift_interval(self) -> Interval:
        return self.lift_sequence if self.method is AnalysisMethod.SEQUENTIAL else self.lift_ci

    @property
    def decision_p_value(self) -> float:
        return self.sequential_p_value if self.method is AnalysisMethod.SEQUENTIAL else self.p_value


@dataclass(frozen=True, slots=True)
class MetricResult:
    metric: MetricSpec
    variants: tuple[VariantSummary, ...]
    comparisons: tuple[Comparison, ...]
    alpha: float
    method: AnalysisMethod
    guardrail_violated: bool = False
    # CUPED (domain.cuped): whether the comparisons use covariate-adjusted means, the within-variant variance
    # reduction 1 − Var(Y − θX)/Var(Y) and the share of units with a covariate (NaN when not applied)
    cuped_applied: bool = False
    variance_reduction: float = _NAN
    covariate_coverage: float = _NAN
    cuped_note: str = ""  # why CUPED was not applied ("" when it was, or when no covariates were given)


def _guardrail_status(spec: MetricSpec, diff: Interval, control_mean: float) -> GuardrailStatus:
    """Judged by the difference in the metric's bad direction (harm = −diff when higher is better, +diff when
    lower is better) against ``tolerance · |control mean|``: the sign of a relative lift flips with the
    control mean's sign, the difference's does not."""
    sign = 1.0 if spec.direction is Direction.DECREASE else -1.0
    margin = spec.tolerance * abs(control_mean)
    if math.isnan(margin):
        return GuardrailStatus.INCONCLUSIVE
    harm_lo = min(sign * diff.lower, sign * diff.upper)
    harm_hi = max(sign * diff.lower, sign * diff.upper)
    if harm_lo > margin:
        return GuardrailStatus.VIOLATED
    if harm_hi <= margin:
        return GuardrailStatus.WITHIN_TOLERANCE
    return GuardrailStatus.INCONCLUSIVE


def analyze_metric(
    spec: MetricSpec,
    stats: Sequence[tuple[str, SufficientStats]],
    *,
    alpha: float = DEFAULT_ALPHA,
    method: AnalysisMethod = AnalysisMethod.SEQUENTIAL,
    guardrail: bool = False,
    effect_size: float = DEFAULT_EFFECT_SIZE,
    tau2: float | None = None,
    previous: Mapping[str, SequentialState] | None = None,
    covariates: Sequence[PairedStats | None] | None = None,
) -> MetricResult:
    """Analyse one metric: `stats` is ``[(variant_id, stats), ...]`` with the control first.

    `covariates` (same order, None for a variant without co-moments) turns on CUPED (`domain.cuped`): when its
    rule applies, the tests, lifts and sequences use the covariate-adjusted (n, mean, M2) with Welch's test for
    both kinds (an adjusted 0/1 metric is no longer a proportion); variant summaries stay the raw ones.

    `tau2` fixes the mSPRT mixing variance (absolute units of the metric); by default it is
    `default_tau2(..., effect_size)` per comparison. `previous` maps variant id → the `Comparison.state`
    of the last look, for running minima/intersections; without it every look stands alone (still valid
    at that look). With `guardrail=True` each comparison gets a `GuardrailStatus`.
    """
    _check_alpha(alpha)
    if len(stats) < 2:
        raise InvalidArgument("need a control and at least one treatment", field="variants", reason="TOO_FEW_VARIANTS")
    kind = spec.kind
    summaries = tuple(summarize(vid, s, kind, alpha) for vid, s in stats)
    raw_control = stats[0][1]
    unadjusted = {vid: two_sample_test(raw_control, s, kind, alpha).ci for vid, s in stats[1:]}
    adjustment = None
    note = ""
    if covariates is not None:
        from .cuped import cuped, not_applied_reason  # cuped builds on this module's SufficientStats

        adjustment = cuped(covariates)
        note = not_applied_reason(covariates) if adjustment is None else ""
    if adjustment is not None:
        stats = [(vid, a) for (vid, _), a in zip(stats, adjustment.adjusted, strict=True)]
        kind = MetricKind.MEAN
    control = stats[0][1]

    raw: list[dict] = []
    for vid, s in stats[1:]:
        test = two_sample_test(control, s, kind, alpha)
        lift = relative_lift(control, s, kind, alpha)
        t2 = tau2 if tau2 is not None else default_tau2(control, s, kind, effect_size)
        var = test.standard_error**2 if not math.isnan(test.standard_error) else _NAN
        seq_p = msprt_p_value(test.difference, var, t2)
        diff_cs = confidence_sequence(test.difference, var, t2, alpha)
        if not math.isnan(lift.estimate) and not math.isnan(lift.standard_error):
            mc = control.mean
            lift_cs = confidence_sequence(lift.estimate, _lift_variance(control, s, kind), t2 / (mc * mc), alpha)
        else:
            lift_cs = _UNBOUNDED
        prev = (previous or {}).get(vid)
        if prev is not None:
            seq_p = min(seq_p, prev.p_value)
            diff_cs = _intersect(prev.difference, diff_cs)
            lift_cs = _intersect(prev.lift, lift_cs)
        raw.append(dict(variant=vid, test=test, lift=lift, seq_p=seq_p, diff_cs=diff_cs, lift_cs=lift_cs))

    adj_p = holm_bonferroni([r["test"].p_value for r in raw])
    adj_seq = holm_bonferroni([r["seq_p"] for r in raw])

    comparisons: list[Comparison] = []
    for r, p, sp in zip(raw, adj_p, adj_seq, strict=True):
        test = r["test"]
        lift = r["lift"]
        decision_p = sp if method is AnalysisMethod.SEQUENTIAL else p
        good = test.difference > 0 if spec.direction is Direction.INCREASE else test.difference < 0
        cmp = Comparison(
            variant=r["variant"],
            difference=test.difference,
            standard_error=test.standard_error,
            difference_ci=test.ci,
            relative_lift=lift.estimate,
            lift_ci=lift.ci,
            p_value_raw=test.p_value,
            p_value=p,
            sequential_p_value_raw=r["seq_p"],
            sequential_p_value=sp,
            difference_sequence=r["diff_cs"],
            lift_sequence=r["lift_cs"],
            significant=decision_p < alpha,
            improvement=bool(good) and not math.isnan(test.difference),
            power=power(test.difference, test.standard_error, alpha),
            method=method,
            state=SequentialState(r["seq_p"], r["diff_cs"], r["lift_cs"]),
            unadjusted_ci=unadjusted[r["variant"]],
        )
        if guardrail:
            status = _guardrail_status(spec, cmp.decision_interval, raw_control.mean)
            cmp = replace(cmp, guardrail=status)
        comparisons.append(cmp)

    violated = guardrail and any(c.guardrail is GuardrailStatus.VIOLATED for c in comparisons)
    if adjustment is None:
        return MetricResult(spec, summaries, tuple(comparisons), alpha, method, violated, cuped_note=note)
    return MetricResult(
        spec,
        summaries,
        tuple(comparisons),
        alpha,
        method,
        violated,
        True,
        adjustment.variance_reduction,
        adjustment.coverage,
    )


# ---------------------------------------------------------------------------------------------- decision


@dataclass(frozen=True, slots=True)
class DecisionConfig:
    """Decision rules.

    min_sample_size: units per variant (on the primary metric) before anything but SRM is decided.
    equivalence_margin: SEQUENTIAL only — NO_DETECTABLE_DIFFERENCE once every treatment's lift confidence
        sequence lies inside ±margin (a difference larger than the margin is ruled out).
    max_sample_size: optional; once every variant has it and nothing is significant, stop with
        NO_DETECTABLE_DIFFERENCE (for FIXED_HORIZON the horizon is min_sample_size itself).
    require_guardrails_within_tolerance: SHIP_VARIANT only when the winner's guardrails are shown within
        tolerance (not merely "not violated"); otherwise keep running.
    """

    min_sample_size: int = DEFAULT_MIN_SAMPLE_SIZE
    equivalence_margin: float = 0.02
    max_sample_size: int | None = None
    require_guardrails_within_tolerance: bool = True

    def __post_init__(self) -> None:
        if self.min_sample_size < 1:
            raise InvalidArgument("min_sample_size must be >= 1", field="min_sample_size", reason="INVALID_SAMPLE_SIZE")
        if self.max_sample_size is not None and self.max_sample_size < self.min_sample_size:
            raise InvalidArgument(
                "max_sample_size must be >= min_sample_size", field="max_sample_size", reason="INVALID_SAMPLE_SIZE"
            )
        if not self.equivalence_margin > 0:
            raise InvalidArgument(
                "equivalence_margin must be > 0", field="equivalence_margin", reason="INVALID_EQUIVALENCE_MARGIN"
            )


@dataclass(frozen=True, slots=True)
class DecisionOutcome:
    """`recommended_variant` is the variant to ship (SHIP_VARIANT) or the variant that caused the stop
    (STOP_FOR_HARM); None otherwise. `progress` is min(1, smallest variant's units / min_sample_size);
    `power` is the power to detect the observed primary effect of the winner (else of the treatment with
    the smallest p-value) at the current sample size (NaN when undefined). `at_horizon` marks the one
    decision of a FIXED_HORIZON test, taken at the first look with the planned sample size: keep it and pass
    it back to `decide` as `decided` at every later look."""

    decision: Decision
    recommended_variant: str | None
    reason: str
    progress: float
    power: float
    at_horizon: bool = False


def _fmt_pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x * 100:+.2f}%"


def _fmt_interval_pct(iv: Interval) -> str:
    return f"[{_fmt_pct(iv.lower)}, {_fmt_pct(iv.upper)}]"


def _fmt_change(c: Comparison) -> str:
    """The change of a comparison as a difference with its decision interval, and as a relative lift only
    where that is defined (control mean > 0)."""
    iv = c.decision_interval
    diff = f"difference {c.difference:+.4g} (interval [{iv.lower:+.4g}, {iv.upper:+.4g}])"
    if math.isnan(c.relative_lift):
        return f"{diff}; relative lift undefined (control mean ≤ 0)"
    return f"{diff}, lift {_fmt_pct(c.relative_lift)} (interval {_fmt_interval_pct(c.decision_lift_interval)})"


def decide(
    primary: MetricResult,
    guardrails: Sequence[MetricResult] = (),
    srm: SrmResult | None = None,
    config: DecisionConfig | None = None,
    decided: DecisionOutcome | None = None,
) -> DecisionOutcome:
    """What to do next (see `_decide` for the rules).

    A FIXED_HORIZON test decides once: at the first look where the smallest variant has the planned sample size
    (`min_sample_size`); that outcome has `at_horizon` set, and passed back as `decided` it is the answer at every
    later look (only a sample ratio mismatch still overrides it). Re-deciding at every look past the horizon is
    peeking: in simulation it took the false-positive rate of A/A tests from 5 % to ~30 %. Before the horizon
    the answer is KEEP_RUNNING, "waiting for planned sample size N". SEQUENTIAL tests decide at every look.
    """
    cfg = config or DecisionConfig()
    out = _decide(primary, guardrails, srm, cfg)
    if primary.method is not AnalysisMethod.FIXED_HORIZON or out.decision is Decision.INVALID_SAMPLE_RATIO:
        return out
    n = cfg.min_sample_size
    if decided is not None:
        return replace(
            decided,
            reason=f"{decided.reason} [fixed horizon: decided at the first look with the planned {n} units per variant; "
            "later data does not change it]",
            at_horizon=False,
        )
    if out.progress < 1.0:
        return out
    return replace(out, at_horizon=True)


def _decide(
    primary: MetricResult, guardrails: Sequence[MetricResult], srm: SrmResult | None, cfg: DecisionConfig
) -> DecisionOutcome:
    """What to do next, in this order:

    1. SRM detected → INVALID_SAMPLE_RATIO (no winner can be called, whatever the metrics say).
    2. Smallest variant below min_sample_size → KEEP_RUNNING.
    3. Any treatment with a VIOLATED guardrail, or significantly worse on the primary metric →
       STOP_FOR_HARM (naming the worst such variant).
    4. Significant improvements on the primary → the one with the largest improvement; SHIP_VARIANT when its
       guardrails allow (see `DecisionConfig.require_guardrails_within_tolerance`), else KEEP_RUNNING.
    5. Nothing significant → NO_DETECTABLE_DIFFERENCE when the horizon is reached (FIXED_HORIZON at
       min_sample_size; SEQUENTIAL at max_sample_size or when equivalence within ±equivalence_margin is
       shown), else KEEP_RUNNING.
    """
    units = [v.units for v in primary.variants]
    smallest = min(units)
    progress = min(1.0, smallest / cfg.min_sample_size)
    comps = primary.comparisons
    by_p = min(comps, key=lambda c: (c.decision_p_value, c.variant))
    pw = by_p.power
    name = primary.metric.name
    method_word = "always-valid p" if primary.method is AnalysisMethod.SEQUENTIAL else "p"

    if srm is not None and srm.detected:
        return DecisionOutcome(
            Decision.INVALID_SAMPLE_RATIO,
            None,
            f"sample ratio mismatch: exposed units {list(srm.observed)} vs expected "
            f"{[round(e, 1) for e in srm.expected]} (chi-square p = {srm.p_value:.2g} < {SRM_THRESHOLD}); "
            "assignment or logging is broken, results cannot be trusted",
            progress,
            pw,
        )
    if smallest < cfg.min_sample_size:
        what = (
            f"waiting for planned sample size {cfg.min_sample_size}"
            if primary.method is AnalysisMethod.FIXED_HORIZON
            else "collecting data"
        )
        return DecisionOutcome(
            Decision.KEEP_RUNNING,
            None,
            f"{what}: smallest variant has {smallest} of {cfg.min_sample_size} units on {name!r}",
            progress,
            pw,
        )

    # 3. harm
    harms: list[tuple[float, str, str]] = []
    for g in guardrails:
        for c in g.comparisons:
            if c.guardrail is GuardrailStatus.VIOLATED:
                harms.append(
                    (
                        c.decision_p_value,
                        c.variant,
                        f"guardrail {g.metric.name!r} of {c.variant!r} changed: {_fmt_change(c)}; beyond the "
                        f"tolerated {g.metric.tolerance * 100:.1f}% of |control mean| in the bad direction",
                    )
                )
    for c in comps:
        if c.significant and not c.improvement:
            harms.append(
                (
                    c.decision_p_value,
                    c.variant,
                    f"{c.variant!r} is significantly worse than control on {name!r}: {_fmt_change(c)}, "
                    f"{method_word} = {c.decision_p_value:.3g}",
                )
            )
    if harms:
        harms.sort()
        _, variant, why = harms[0]
        more = f" (and {len(harms) - 1} more finding(s))" if len(harms) > 1 else ""
        return DecisionOutcome(Decision.STOP_FOR_HARM, variant, f"stop: {why}{more}", progress, pw)

    # 4. winners
    winners = [c for c in comps if c.significant and c.improvement]
    if winners:
        sign = 1.0 if primary.metric.direction is Direction.INCREASE else -1.0
        best = max(winners, key=lambda c: sign * c.difference)
        pending = [
            g.metric.name
            for g in guardrails
            for c in g.comparisons
            if c.variant == best.variant and c.guardrail is not GuardrailStatus.WITHIN_TOLERANCE
        ]
        what = f"{best.variant!r} improves {name!r}: {_fmt_change(best)}, {method_word} = {best.decision_p_value:.3g}"
        if pending and cfg.require_guardrails_within_tolerance:
            return DecisionOutcome(
                Decision.KEEP_RUNNING,
                None,
                f"{what}, but guardrail(s) {pending} are not yet shown within tolerance",
                progress,
                best.power,
            )
        others = f"; {len(winners) - 1} other treatment(s) also significant" if len(winners) > 1 else ""
        return DecisionOutcome(Decision.SHIP_VARIANT, best.variant, f"ship: {what}{others}", progress, best.power)

    # 5. nothing significant
    if primary.method is AnalysisMethod.FIXED_HORIZON:
        return DecisionOutcome(
            Decision.NO_DETECTABLE_DIFFERENCE,
            None,
            f"no significant difference on {name!r} at the planned {cfg.min_sample_size} units per variant "
            f"(smallest p = {by_p.p_value:.3g}, power against the observed effect {pw:.2f})",
            progress,
            pw,
        )
    if cfg.max_sample_size is not None and smallest >= cfg.max_sample_size:
        return DecisionOutcome(
            Decision.NO_DETECTABLE_DIFFERENCE,
            None,
            f"no significant difference on {name!r} after the maximum {cfg.max_sample_size} units per variant "
            f"(smallest always-valid p = {by_p.sequential_p_value:.3g})",
            progress,
            pw,
        )
    m = cfg.equivalence_margin
    if all(-m < c.lift_sequence.lower and c.lift_sequence.upper < m for c in comps):
        return DecisionOutcome(
            Decision.NO_DETECTABLE_DIFFERENCE,
            None,
            f"no detectable difference on {name!r}: every treatment's lift confidence sequence lies within ±{m * 100:.1f}%",
            progress,
            pw,
        )
    return DecisionOutcome(
        Decision.KEEP_RUNNING,
        None,
        f"no significant difference on {name!r} yet (smallest always-valid p = {by_p.sequential_p_value:.3g}); keep collecting",
        progress,
        pw,
    )


# ------------------------------------------------------------------------------------- whole experiment


@dataclass(frozen=True, slots=True)
class ExperimentAnalysis:
    """Everything `GetExperimentResults` reports."""

    primary: MetricResult
    guardrails: tuple[MetricResult, ...]
    secondary: tuple[MetricResult, ...]
    srm: SrmResult
    outcome: DecisionOutcome


def analyze_experiment(
    variant_ids: Sequence[str],
    weights: Sequence[float],
    exposures: Mapping[str, int],
    primary: tuple[MetricSpec, Mapping[str, SufficientStats]],
    guardrails: Sequence[tuple[MetricSpec, Mapping[str, SufficientStats]]] = (),
    secondary: Sequence[tuple[MetricSpec, Mapping[str, SufficientStats]]] = (),
    *,
    alpha: float = DEFAULT_ALPHA,
    method: AnalysisMethod = AnalysisMethod.SEQUENTIAL,
    config: DecisionConfig | None = None,
    effect_size: float = DEFAULT_EFFECT_SIZE,
    previous: Mapping[str, Mapping[str, SequentialState]] | None = None,
    decided: DecisionOutcome | None = None,
    srm_strata: Sequence[tuple[Sequence[int], Sequence[float]]] | None = None,
    covariates: Mapping[str, Mapping[str, PairedStats | None]] | None = None,
) -> ExperimentAnalysis:
    """Analyse a whole experiment. Variants are ordered as `variant_ids` (control first); a variant missing
    from a stats mapping or from `exposures` counts as empty. `previous` maps metric name → variant id →
    `SequentialState` from the last look; `decided` is a FIXED_HORIZON test's stored decision (see `decide`).
    `srm_strata` are the exposures as strata with their own expected shares (`srm_test_strata`); without them
    the sample-ratio test is `exposures` against `weights`. `covariates` maps metric name → variant id → its
    CUPED co-moments (None: not tracked for that variant; a variant missing is empty)."""
    from .cuped import PairedStats

    prev = previous or {}

    def run(spec: MetricSpec, by_variant: Mapping[str, SufficientStats], is_guardrail: bool) -> MetricResult:
        rows = [(v, by_variant.get(v, SufficientStats())) for v in variant_ids]
        cov = (covariates or {}).get(spec.name)
        return analyze_metric(
            spec,
            rows,
            alpha=alpha,
            method=method,
            guardrail=is_guardrail,
            effect_size=effect_size,
            previous=prev.get(spec.name),
            covariates=None if cov is None else [cov.get(v, PairedStats()) for v in variant_ids],
        )

    p = run(*primary, False)
    gs = tuple(run(s, d, True) for s, d in guardrails)
    ss = tuple(run(s, d, False) for s, d in secondary)
    if srm_strata is None:
        srm = srm_test([exposures.get(v, 0) for v in variant_ids], weights)
    else:
        srm = srm_test_strata(srm_strata)
    return ExperimentAnalysis(p, gs, ss, srm, decide(p, gs, srm, config, decided))
