"""Pure domain core of the experiments service: assignment, statistics, decisions.

Errors are the shared `neuroweaver_runtime.errors` (re-exported here for convenience).

No gRPC, protobuf or SQL here; the API layer maps these dataclasses and errors onto the
`neuroweaver.experiments.v1` messages and canonical status codes.
"""

from neuroweaver_runtime.errors import Aborted, DomainError, FailedPrecondition, InvalidArgument, NotFound

from .assignment import (
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
from .statistics import (
    AnalysisMethod,
    Comparison,
    Decision,
    DecisionConfig,
    DecisionOutcome,
    Direction,
    ExperimentAnalysis,
    GuardrailStatus,
    Interval,
    MetricKind,
    MetricResult,
    MetricSpec,
    SequentialState,
    SrmResult,
    SufficientStats,
    analyze_experiment,
    analyze_metric,
    decide,
    srm_test,
    unit_value,
)

__all__ = [
    "BUCKETS",
    "Aborted",
    "AnalysisMethod",
    "Assignment",
    "AssignmentPlan",
    "Comparison",
    "Decision",
    "DecisionConfig",
    "DecisionOutcome",
    "Direction",
    "DomainError",
    "ExperimentAnalysis",
    "FailedPrecondition",
    "GuardrailStatus",
    "Interval",
    "InvalidArgument",
    "MetricKind",
    "MetricResult",
    "MetricSpec",
    "NotFound",
    "SequentialState",
    "SrmResult",
    "SufficientStats",
    "analyze_experiment",
    "analyze_metric",
    "assign",
    "bucket_ranges",
    "choose_variant",
    "decide",
    "fnv1a32",
    "hash_bucket",
    "hash_value",
    "resolve_sticky",
    "srm_test",
    "unit_value",
    "validate_coverage",
    "validate_variants",
    "validate_weights",
]
