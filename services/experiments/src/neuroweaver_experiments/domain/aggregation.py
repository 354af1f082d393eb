"""Incremental per-variant sufficient statistics from per-unit aggregates.

The store keeps, per (experiment, metric, unit), the unit's event count, sum and number of positive values,
and per (experiment, metric, variant) the sufficient statistics (n, Σx, Σx²) of the unit values x:
MEAN → the unit's average (sum / count), PROPORTION → 1 if any value > 0 else 0 (`statistics.unit_value`).

When a batch adds events to a unit, its old value leaves the variant's sums and its new value enters them;
a unit seen for the first time also adds 1 to n. So results cost the same at ten events or ten million, and
equal the statistics computed from the raw per-unit values (up to float rounding of the running sums).
"""

from __future__ import annotations

from dataclasses import dataclass

from .statistics import MetricKind


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
    n: int = 0
    sum: float = 0.0
    sum_sq: float = 0.0

    def __add__(self, other: StatsDelta) -> StatsDelta:
        return StatsDelta(self.n + other.n, self.sum + other.sum, self.sum_sq + other.sum_sq)


def batch_aggregate(values: list[float]) -> UnitAggregate:
    """Aggregate of one unit's new values in a batch."""
    return UnitAggregate(len(values), sum(values), sum(1 for x in values if x > 0))


def contribution_delta(kind: MetricKind, new: UnitAggregate, added: UnitAggregate) -> StatsDelta:
    """Change of the variant's (n, Σx, Σx²) when `added` events turn a unit's aggregate into `new`
    (the old aggregate is `new - added`, as the store returns the updated row)."""
    old_count = new.count - added.count
    x_new = new.value(kind)
    if old_count <= 0:
        return StatsDelta(1, x_new, x_new * x_new)
    old = UnitAggregate(old_count, new.total - added.total, new.positives - added.positives)
    x_old = old.value(kind)
    if x_old == x_new:
        return StatsDelta()
    return StatsDelta(0, x_new - x_old, x_new * x_new - x_old * x_old)
