"""Comparing two versions: metric deltas judged by each metric's declared direction and tolerance, diffs, advice.

A metric is judged only in the direction it declares (`Metric.direction`); one without a declared direction (or
with conflicting declarations on the two sides) is reported as a change without a verdict. Differences within the
metric's tolerance are no change: by default 1 % of the base value (of the candidate value when the base is 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from neuroweaver_runtime.errors import Violations

from .model import MAX_METRICS, Direction, Metric, ModelVersion, VersionState

DEFAULT_RELATIVE_TOLERANCE = 0.01


@dataclass
class MetricDelta:
    name: str
    direction: Direction  # declared by both sides that have the metric; UNSPECIFIED: no verdict
    base_value: float | None
    candidate_value: float | None
    delta: float | None = None
    relative_delta: float | None = None
    changed: bool = False  # beyond the tolerance, whether or not a direction gives it a verdict
    improved: bool = False
    regressed: bool = False


@dataclass
class Comparison:
    semver_relation: str  # NEWER | OLDER | EQUAL | UNRELATED
    base_model_compatible: bool
    metric_deltas: list[MetricDelta]
    hyperparameter_diffs: list[tuple[str, str, str]]
    lineage_diffs: list[tuple[str, str, str]]
    recommendation: str  # PROMOTE | EXPERIMENT | KEEP_BASE
    reason: str


def validate_tolerances(tolerances: Mapping[str, float], v: Violations, path: str) -> None:
    if len(tolerances) > MAX_METRICS:
        v.add(path, f"at most {MAX_METRICS} entries")
    for name, tolerance in tolerances.items():
        if not name or len(name) > 128:
            v.add(f"{path}[{name[:20]!r}]", "metric names are 1-128 characters")
        elif not math.isfinite(tolerance) or tolerance < 0:
            v.add(f"{path}[{name[:20]!r}]", "a relative tolerance is a finite number ≥ 0 (0.01 = 1 %)")


def declared_direction(base: Metric | None, candidate: Metric | None) -> Direction:
    """The direction the metric declares; UNSPECIFIED when neither side declares one or the two disagree."""
    declared = {m.direction for m in (base, candidate) if m is not None and m.direction is not Direction.UNSPECIFIED}
    return declared.pop() if len(declared) == 1 else Direction.UNSPECIFIED


def metric_delta(
    name: str, base: Metric | None, candidate: Metric | None, tolerance: float = DEFAULT_RELATIVE_TOLERANCE
) -> MetricDelta:
    direction = declared_direction(base, candidate)
    d = MetricDelta(name, direction, base.value if base else None, candidate.value if candidate else None)
    if base is None or candidate is None:
        return d
    d.delta = candidate.value - base.value
    d.relative_delta = d.delta / abs(base.value) if base.value != 0 else None
    scale = abs(base.value) if base.value != 0 else abs(candidate.value)
    d.changed = abs(d.delta) > tolerance * scale
    if d.changed and direction is not Direction.UNSPECIFIED:
        up_is_good = direction is Direction.HIGHER
        d.improved = (d.delta > 0) == up_is_good
        d.regressed = not d.improved
    return d


def compare_versions(
    base: ModelVersion, candidate: ModelVersion, semver_relation: str, tolerances: Mapping[str, float] | None = None
) -> Comparison:
    """`tolerances`: relative tolerance per metric name; unlisted metrics use DEFAULT_RELATIVE_TOLERANCE."""
    tolerances = tolerances or {}
    base_metrics, cand_metrics = base.latest_metrics(), candidate.latest_metrics()
    deltas = [
        metric_delta(name, base_metrics.get(name), cand_metrics.get(name), tolerances.get(name, DEFAULT_RELATIVE_TOLERANCE))
        for name in sorted(set(base_metrics) | set(cand_metrics))
    ]
    hp_diffs = _dict_diff(base.lineage.hyperparameters, candidate.lineage.hyperparameters, "hyperparameters.")
    lineage_diffs = []
    for attr in (
        "base_model",
        "dataset_uri",
        "dataset_digest",
        "eval_dataset_uri",
        "eval_dataset_digest",
        "method",
        "judge_version",
        "parent_version",
        "training_job",
    ):
        bv, cv = getattr(base.lineage, attr), getattr(candidate.lineage, attr)
        if bv != cv:
            lineage_diffs.append((f"lineage.{attr}", bv, cv))
    compatible = bool(base.lineage.base_model) and base.lineage.base_model == candidate.lineage.base_model
    recommendation, reason = recommend(candidate, deltas, compatible)
    return Comparison(semver_relation, compatible, deltas, hp_diffs, lineage_diffs, recommendation, reason)


def _dict_diff(a: dict[str, str], b: dict[str, str], prefix: str) -> list[tuple[str, str, str]]:
    return [(prefix + k, a.get(k, ""), b.get(k, "")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def recommend(candidate: ModelVersion, deltas: list[MetricDelta], compatible: bool) -> tuple[str, str]:
    """PROMOTE only when the candidate is better on one metric and no shared metric got worse or changed without
    a direction to judge it by; KEEP_BASE when it is worse or no better; EXPERIMENT when the evidence is mixed."""
    if candidate.state is VersionState.DEPRECATED:
        return "KEEP_BASE", "the candidate is deprecated"
    shared = [d for d in deltas if d.delta is not None]
    if not shared:
        return "EXPERIMENT", "the versions share no metric; run an A/B experiment to compare them"
    improved = [d.name for d in shared if d.improved]
    regressed = [d.name for d in shared if d.regressed]
    unjudged = [d.name for d in shared if d.changed and d.direction is Direction.UNSPECIFIED]
    if regressed and improved:
        return "EXPERIMENT", f"mixed evidence: better on {', '.join(improved)} but worse on {', '.join(regressed)}"
    if regressed:
        return "KEEP_BASE", f"the candidate is worse on {', '.join(regressed)} and better on nothing"
    if unjudged:
        better = f"better on {', '.join(improved)}, but " if improved else ""
        return "EXPERIMENT", (
            f"{better}{', '.join(unjudged)} changed without a declared direction (Metric.direction) to judge it by; "
            "run an A/B experiment or record the metric with its direction"
        )
    if not improved:
        return "KEEP_BASE", "the candidate is no better on any shared metric (beyond its tolerance)"
    note = "" if compatible else " (different base model: deploy it as a separate model server)"
    return "PROMOTE", f"the candidate is better on {', '.join(improved)} and worse on none{note}"
