"""Incremental per-variant sufficient statistics from per-unit aggregates.

The store keeps, per (experiment, metric, unit), the unit's event count, sum and number of positive values,
and per (experiment, metric, variant) the sufficient statistics (n, mean, M2) of the unit values x:
MEAN → the unit's average (sum / count), PROPORTION → 1 if any value > 0 else 0 (`statistics.unit_value`).

When a batch adds events to a unit, its old value leaves the variant's statistics and its new value enters
them; a unit seen for the first time also adds 1 to n. A batch's changes to one variant are a `StatsDelta`:
sums shifted by a value of the batch (its median new value), so their squares are of the data's spread, not
of its magnitude, and `StatsDelta.apply` merges them into the stored (n, mean, M2) around the stored mean.
Results cost the same at ten events or ten million, and equal the statistics of the raw per-unit values to
~1e-15 relative even when |mean| ≫ sd. The PostgreSQL ingest statement (adapters/repository.py) does the same
arithmetic in SQL.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from .statistics import MetricKind, SufficientStats


@dataclass(frozen=True, slots=True)
class UnitAggregate:
    count: int = 0
    total: float = 0.0
    positives: int = 0

    def value(self, kind: MetricKind) -> float:
        if kind is MetricKind.PROPORTION:
            return 1.0 if self.positives > 0 else 0.0
        return self.total / self.count


@dataclass(frozen=True, slots=True)
class StatsDelta:
    """One batch's change to a variant's statistics: `n` new units; `sum` = Σ(x − shift) over the new units'
    values plus Σ(x_new − x_old) over units whose value changed; `sum_sq` = Σ(x − shift)² over new units plus
    Σ((x_new − shift)² − (x_old − shift)²) over changed units. Any shift gives the same result; one near the
    data keeps the squares small."""

    n: int = 0
    shift: float = 0.0
    sum: float = 0.0
    sum_sq: float = 0.0

    def apply(self, stats: SufficientStats) -> SufficientStats:
        """`stats` with this batch merged in. With a = mean − shift, n' = n + Δn:
        mean' = mean + (Σ − Δn·a)/n';  M2' = M2 + Σ² − (Σ² + 2·n·a·Σ − n·Δn·a²)/n'  (Σ = sum, Σ² = sum_sq);
        for Δn = 0 this is the usual replace-one-value downdate, for a pure set of new units Chan's merge."""
        n0, n1 = stats.n, stats.n + self.n
        if n1 == 0:
            return stats
        a = stats.mu - self.shift if n0 else 0.0
        mu = (stats.mu if n0 else self.shift) + (self.sum - self.n * a) / n1
        m2 = stats.m2 + self.sum_sq - (self.sum * self.sum + 2.0 * n0 * a * self.sum - n0 * self.n * a * a) / n1
        return SufficientStats(n1, mu, m2)


def batch_aggregate(values: list[float]) -> UnitAggregate:
    """Aggregate of one unit's new values in a batch."""
    return UnitAggregate(len(values), sum(values), sum(1 for x in values if x > 0))


def unit_change(kind: MetricKind, new: UnitAggregate, added: UnitAggregate) -> tuple[float | None, float]:
    """(old value or None for a unit seen for the first time, new value) of a unit whose aggregate became `new`
    after `added` events (the old aggregate is `new - added`, as the store returns the updated row)."""
    old_count = new.count - added.count
    x_new = new.value(kind)
    if old_count <= 0:
        return None, x_new
    old = UnitAggregate(old_count, new.total - added.total, new.positives - added.positives)
    return old.value(kind), x_new


def fold_changes(changes: Sequence[tuple[float | None, float]]) -> StatsDelta:
    """The `StatsDelta` of one variant's unit changes (x_old or None, x_new), shifted by their median new value."""
    if not changes:
        return StatsDelta()
    k = statistics.median(x for _, x in changes)
    n, ds, dq = 0, [], []
    for x_old, x_new in changes:
        if x_old is None:
            n += 1
            ds.append(x_new - k)
            dq.append((x_new - k) * (x_new - k))
        elif x_old != x_new:
            ds.append(x_new - x_old)
            dq.append((x_new - x_old) * ((x_new - k) + (x_old - k)))
    return StatsDelta(n, k, math.fsum(ds), math.fsum(dq))
