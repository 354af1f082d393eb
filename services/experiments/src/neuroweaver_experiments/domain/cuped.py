"""CUPED variance reduction (Deng, Xu, Kohavi, Walker, "Improving the sensitivity of online controlled
experiments by utilizing pre-experiment data", WSDM 2013) from mergeable per-variant co-moments.

Each unit has its metric value y and a pre-experiment covariate x (e.g. the unit's value of the same metric
before the experiment). A unit without a covariate counts with x = 0: the adjustment stays unbiased for any
covariate fixed before randomisation (missingness included), and a constant keeps the moments mergeable; such
units only dilute the variance reduction. `PairedStats.covered` counts the units that had a real covariate.

Per (variant, metric) the store keeps n, mean_x, mean_y, M2_x, M2_y and C_xy = Σ(x − mean_x)(y − mean_y):
centred co-moments merged pairwise (Chan, Golub, LeVeque 1979, extended to the covariance), so they stay exact
to ~1e-15 relative when |mean| ≫ sd, as `SufficientStats` does for one variable.

Estimate (`cuped`): θ = Σ_v C_xy / Σ_v M2_x, pooled *within* variants; adjusted mean per variant
ȳ_v − θ(x̄_v − x̄) with x̄ the mean of x over all units; adjusted M2 per variant
Σ(y − θx − (ȳ − θx̄))² = M2_y − 2θ·C_xy + θ²·M2_x, i.e. Var(Y − θX) = Var(Y)(1 − ρ²) when θ is the arm's own
optimum. The adjusted (n, mean, M2) feed the usual Welch test, so the difference between two variants is
exactly the treatment coefficient of the OLS regression y ~ 1 + treatment + (x − x̄) (the within-variant θ is
that regression's slope), and its Welch standard error differs from the OLS one only by O(1/n): OLS pools the
residual variance over arms (N − k − 1 df) and adds θ's own uncertainty, (x̄_t − x̄_c)²/Σ M2_x. Reported
variance reduction: 1 − Σ adjusted M2 / Σ M2_y = ρ² within variants.

Rule (`cuped`): applied when every variant has co-moments (rows written before covariates were tracked have
none), at least 2 units with a covariate in total and Σ M2_x > 0; otherwise None and the raw analysis stands.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .statistics import SufficientStats

__all__ = ["CupedResult", "PairDelta", "PairedStats", "cuped", "fold_pair_changes", "not_applied_reason"]


@dataclass(frozen=True, slots=True)
class PairedStats:
    """Co-moments of (x, y) over `n` units of one variant; `covered` units had a real covariate."""

    n: int = 0
    mu_x: float = 0.0
    mu_y: float = 0.0
    m2_x: float = 0.0
    m2_y: float = 0.0
    c_xy: float = 0.0
    covered: int = 0

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[float | None, float]]) -> PairedStats:
        """Two-pass from (x or None, y) per unit."""
        ps = [(0.0 if x is None else float(x), float(y), x is not None) for x, y in pairs]
        if not ps:
            return cls()
        n = len(ps)
        mx = math.fsum(p[0] for p in ps) / n
        my = math.fsum(p[1] for p in ps) / n
        return cls(
            n,
            mx,
            my,
            math.fsum((p[0] - mx) ** 2 for p in ps),
            math.fsum((p[1] - my) ** 2 for p in ps),
            math.fsum((p[0] - mx) * (p[1] - my) for p in ps),
            sum(1 for p in ps if p[2]),
        )

    def __add__(self, other: PairedStats) -> PairedStats:
        if not isinstance(other, PairedStats):
            return NotImplemented
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        dx, dy = other.mu_x - self.mu_x, other.mu_y - self.mu_y
        w = self.n * other.n / n
        return PairedStats(
            n,
            self.mu_x + dx * other.n / n,
            self.mu_y + dy * other.n / n,
            self.m2_x + other.m2_x + dx * dx * w,
            self.m2_y + other.m2_y + dy * dy * w,
            self.c_xy + other.c_xy + dx * dy * w,
            self.covered + other.covered,
        )

    @property
    def y(self) -> SufficientStats:
        return SufficientStats(self.n, self.mu_y, self.m2_y)


@dataclass(frozen=True, slots=True)
class PairDelta:
    """One batch's change to a variant's co-moments, shifted by (shift_x, shift_y) so that the sums are of the
    data's spread, not its magnitude: `n` new units, `covered` change in units with a covariate, and Σ over
    entering minus Σ over leaving (x, y) pairs of (x − kx), (y − ky), (x − kx)², (y − ky)², (x − kx)(y − ky)."""

    n: int = 0
    covered: int = 0
    shift_x: float = 0.0
    shift_y: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    syy: float = 0.0
    sxy: float = 0.0

    def apply(self, s: PairedStats) -> PairedStats:
        """`s` with this batch merged in. With a = mean_x − kx, b = mean_y − ky, N = n + Δn:
        mean_x' = mean_x + (Sx − Δn·a)/N;  M2_x' = M2_x + Sxx − (Sx² + 2n·a·Sx − n·Δn·a²)/N;
        C_xy' = C_xy + Sxy − (Sx·Sy + n·a·Sy + n·b·Sx − n·Δn·a·b)/N (same for y)."""
        n0, n1 = s.n, s.n + self.n
        if n1 == 0:
            return s
        a = s.mu_x - self.shift_x if n0 else 0.0
        b = s.mu_y - self.shift_y if n0 else 0.0
        mx = (s.mu_x if n0 else self.shift_x) + (self.sx - self.n * a) / n1
        my = (s.mu_y if n0 else self.shift_y) + (self.sy - self.n * b) / n1
        m2x = s.m2_x + self.sxx - (self.sx * self.sx + 2.0 * n0 * a * self.sx - n0 * self.n * a * a) / n1
        m2y = s.m2_y + self.syy - (self.sy * self.sy + 2.0 * n0 * b * self.sy - n0 * self.n * b * b) / n1
        cxy = s.c_xy + self.sxy - (self.sx * self.sy + n0 * a * self.sy + n0 * b * self.sx - n0 * self.n * a * b) / n1
        return PairedStats(n1, mx, my, m2x, m2y, cxy, s.covered + self.covered)


Pair = tuple[float | None, float]  # (covariate or None, unit value)


def fold_pair_changes(changes: Sequence[tuple[Pair | None, Pair]]) -> PairDelta:
    """The `PairDelta` of one variant's unit changes (old pair or None for a new unit, new pair), shifted by
    the median new x and y. A unit's covariate may arrive after its first value (x: None → value)."""
    if not changes:
        return PairDelta()
    kx = statistics.median(0.0 if x is None else x for _, (x, _) in changes)
    ky = statistics.median(y for _, (_, y) in changes)
    n = covered = 0
    sx: list[float] = []
    sy: list[float] = []
    sxx: list[float] = []
    syy: list[float] = []
    sxy: list[float] = []
    for old, (x1o, y1) in changes:
        x1 = (0.0 if x1o is None else x1o) - kx
        y1 -= ky
        if old is None:
            n += 1
            covered += x1o is not None
            sx.append(x1)
            sy.append(y1)
            sxx.append(x1 * x1)
            syy.append(y1 * y1)
            sxy.append(x1 * y1)
            continue
        x0o, y0 = old
        x0 = (0.0 if x0o is None else x0o) - kx
        y0 -= ky
        covered += (x1o is not None) - (x0o is not None)
        sx.append(x1 - x0)
        sy.append(y1 - y0)
        sxx.append((x1 - x0) * (x1 + x0))
        syy.append((y1 - y0) * (y1 + y0))
        sxy.append(x1 * y1 - x0 * y0)
    f = math.fsum
    return PairDelta(n, covered, kx, ky, f(sx), f(sy), f(sxx), f(syy), f(sxy))


@dataclass(frozen=True, slots=True)
class CupedResult:
    """θ, the adjusted (n, mean, M2) per variant (same order as the input), the within-variant variance
    reduction 1 − Σ adjusted M2 / Σ M2_y, and the share of units with a covariate."""

    theta: float
    adjusted: tuple[SufficientStats, ...]
    variance_reduction: float
    coverage: float


def cuped(stats: Sequence[PairedStats | None]) -> CupedResult | None:
    """The CUPED adjustment of one metric's variants, or None where the rule (module docstring) says raw."""
    if not stats or any(s is None for s in stats):
        return None
    ps = [s for s in stats if s is not None]
    sxx = math.fsum(s.m2_x for s in ps)
    sxy = math.fsum(s.c_xy for s in ps)
    syy = math.fsum(s.m2_y for s in ps)
    n = sum(s.n for s in ps)
    covered = sum(s.covered for s in ps)
    if covered < 2 or not (sxx > 0 and math.isfinite(sxx) and math.isfinite(sxy)):
        return None
    theta = sxy / sxx
    x_bar = math.fsum(s.n * s.mu_x for s in ps) / n
    adjusted = tuple(
        SufficientStats(
            s.n,
            s.mu_y - theta * (s.mu_x - x_bar) if s.n else 0.0,
            max(0.0, s.m2_y - 2.0 * theta * s.c_xy + theta * theta * s.m2_x),
        )
        for s in ps
    )
    reduction = 1.0 - math.fsum(a.m2 for a in adjusted) / syy if syy > 0 else 0.0
    return CupedResult(theta, adjusted, reduction, covered / n)


def not_applied_reason(stats: Sequence[PairedStats | None]) -> str:
    """Why `cuped` returns None for these co-moments ("" when it does not)."""
    if not stats or any(s is None for s in stats):
        return "some variants' statistics were recorded before covariates were tracked (schema 0006)"
    ps = [s for s in stats if s is not None]
    if sum(s.covered for s in ps) < 2:
        return "fewer than 2 units have a covariate"
    sxx = math.fsum(s.m2_x for s in ps)
    if not (sxx > 0 and math.isfinite(sxx) and math.isfinite(math.fsum(s.c_xy for s in ps))):
        return "the covariate does not vary within variants"
    return ""
