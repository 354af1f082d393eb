"""The Experiment resource: fields, defaults, validation, lifecycle and etags (no protobuf, no SQL)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from neuroweaver_runtime.errors import FailedPrecondition, InvalidArgument, Violations
from neuroweaver_runtime.names import ID_PATTERN, ResourceName

from .assignment import BucketClasses, validate_coverage, validate_variants
from .judging import AnswerJudging, apply_judging_defaults, validate_judging
from .statistics import DEFAULT_ALPHA, DEFAULT_MIN_SAMPLE_SIZE, AnalysisMethod, Direction, MetricKind, MetricSpec

EXPERIMENT = ResourceName("projects/{project}/experiments/{experiment}")
MODEL_VERSION = ResourceName("projects/{project}/models/{model}/versions/{version}", (("version", r"[0-9A-Za-z.+\-]{1,160}"),))
MODEL = ResourceName("projects/{project}/models/{model}")
DEPLOYMENT = ResourceName("projects/{project}/deployments/{deployment}")

METRIC_NAME = re.compile(r"^[a-z][a-z0-9_.\-]{0,63}$")
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_\-]{0,62}$")
MAX_VARIANTS = 20
MAX_METRICS = 50

# Bucket class of first exposures counted before classes were recorded (migration 0005); see `srm_strata`.
UNRECORDED_CLASS = -1

# Fields UpdateExperiment may change. `variants` may change only the weights once the experiment has started.
UPDATABLE = {
    "display_name",
    "description",
    "labels",
    "primary_metric",
    "guardrail_metrics",
    "secondary_metrics",
    "variants",
    "auto_conclude",
    "promote_alias",
    "answer_judging",
}
# What may still change after the experiment is concluded.
UPDATABLE_WHEN_CONCLUDED = {"display_name", "description", "labels"}


class ExperimentState(StrEnum):
    DRAFT = "DRAFT"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    CONCLUDED = "CONCLUDED"


@dataclass
class Variant:
    id: str
    model_version: str
    deployment: str = ""
    weight: float = 0.0
    # Resolved through the deployer at StartExperiment: the deployment's front door, the same across its rollovers.
    endpoint: str = ""
    openai_base_url: str = ""
    # Resolved with the endpoint and followed with it: the name selecting this variant's version when its deployment
    # serves several versions on one base (see `model`); "" when it serves one.
    version_model: str = ""

    @property
    def model(self) -> str:
        """The model name callers send to the endpoint: the deployment's resource name, which its model server answers
        to on every version it rolls over to (a version-specific name stored at start stopped working at the
        deployment's next rollover). When the deployment serves several versions on one base (its
        serving.additional_versions; two variants on one shared server), `<deployment>/<version>`: the name that
        selects this variant's version there, as the deployer reports it now."""
        return self.version_model or self.deployment

    def follow(self, endpoint: str, openai_base_url: str, version_models: tuple[tuple[str, str], ...]) -> bool:
        """Takes where its deployment serves now and which versions it serves there (`version_models`: (model version,
        the name selecting it) when it serves several, else ()); True when anything changed. Serving several, the
        variant's version is selected by its name there, or `<deployment>/<version>` when the deployment no longer
        serves it (NOT_FOUND: never another version's answers)."""
        served = dict(version_models)
        model = (served.get(self.model_version) or f"{self.deployment}/{self.model_version.rsplit('/', 1)[-1]}") if served else ""
        now = (endpoint, openai_base_url, model)
        if now == (self.endpoint, self.openai_base_url, self.version_model):
            return False
        self.endpoint, self.openai_base_url, self.version_model = now
        return True


@dataclass
class Experiment:
    name: str
    display_name: str = ""
    description: str = ""
    variants: list[Variant] = field(default_factory=list)
    # Weights of each assignment epoch; the last entry is the current weights.
    weights_history: list[list[float]] = field(default_factory=list)
    hash_seed: str = ""
    coverage: float = 1.0
    primary_metric: MetricSpec | None = None
    guardrail_metrics: list[MetricSpec] = field(default_factory=list)
    secondary_metrics: list[MetricSpec] = field(default_factory=list)
    min_sample_size: int = DEFAULT_MIN_SAMPLE_SIZE
    significance_level: float = DEFAULT_ALPHA
    analysis: AnalysisMethod = AnalysisMethod.SEQUENTIAL
    auto_conclude: bool = False
    promote_alias: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    # Judge-scored live answers (RecordAnswers); None = not judged.
    answer_judging: AnswerJudging | None = None
    state: ExperimentState = ExperimentState.DRAFT
    winner: str = ""
    conclusion: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    revision: int = 1
    key: int = 0  # the store's key (set by the repositories; 0 = not stored yet)

    @property
    def variant_ids(self) -> list[str]:
        return [v.id for v in self.variants]

    @property
    def weights(self) -> list[float]:
        return [v.weight for v in self.variants]

    @property
    def metrics(self) -> list[MetricSpec]:
        primary = [self.primary_metric] if self.primary_metric else []
        return primary + list(self.guardrail_metrics) + list(self.secondary_metrics)

    @property
    def epoch(self) -> int:
        return max(0, len(self.weights_history) - 1)

    def metric(self, name: str) -> MetricSpec | None:
        for m in self.metrics:
            if m.name == name:
                return m
        return None

    def variant(self, variant_id: str) -> Variant | None:
        for v in self.variants:
            if v.id == variant_id:
                return v
        return None


def apply_defaults(exp: Experiment, experiment_id: str) -> None:
    """Zero values of the API mean "default": seed = experiment id, coverage 1, 100 units, alpha 0.05."""
    exp.hash_seed = exp.hash_seed or experiment_id
    exp.coverage = exp.coverage or 1.0
    exp.min_sample_size = exp.min_sample_size or DEFAULT_MIN_SAMPLE_SIZE
    exp.significance_level = exp.significance_level or DEFAULT_ALPHA
    if exp.answer_judging is not None:
        apply_judging_defaults(exp.answer_judging)


def srm_strata(
    variant_ids: list[str], weights_history: list[list[float]], coverage: float, exposures: dict[tuple[int, int], dict[str, int]]
) -> list[tuple[list[int], list[float]]]:
    """The sample-ratio test's strata (`statistics.srm_test_strata`): first exposures per (epoch, bucket class) with
    the share of the class's buckets each variant has in that epoch (`assignment.BucketClasses`), which is what
    assignment does with the units that class receives, whatever their history.

    Counts stored before bucket classes were recorded (`UNRECORDED_CLASS`) are exact where their epoch has a
    single class (epoch 0, or coverage 1); otherwise their shares are unknown and they are left out of the test.
    """
    classes = BucketClasses(weights_history, coverage)
    strata: list[tuple[list[int], list[float]]] = []
    for (epoch, key), counts in sorted(exposures.items()):
        if not 0 <= epoch < classes.epochs:
            continue
        if key == UNRECORDED_CLASS:
            keys = classes.keys(epoch)
            if len(keys) != 1:
                continue
            key = keys[0]
        shares = classes.shares(epoch, key)
        if shares is not None:
            strata.append(([counts.get(v, 0) for v in variant_ids], list(shares)))
    return strata or [([0] * len(variant_ids), list(weights_history[-1]))]


def validate_metric(spec: MetricSpec, path: str, v: Violations, *, guardrail: bool = False) -> None:
    if not METRIC_NAME.match(spec.name or ""):
        v.add(f"{path}.name", f"metric name {spec.name!r} is invalid: 1-64 of a-z, 0-9, _ . -, starting with a letter")
    if not math.isfinite(spec.tolerance) or spec.tolerance < 0:
        v.add(f"{path}.tolerance", "tolerance must be a finite number >= 0")
    if guardrail and spec.tolerance > 10:
        v.add(f"{path}.tolerance", "tolerance is a relative change (0.1 = 10%); values above 10 are almost surely a mistake")


def validate_variant_list(variants: list[Variant], v: Violations) -> None:
    if len(variants) > MAX_VARIANTS:
        v.add("experiment.variants", f"at most {MAX_VARIANTS} variants")
    for i, var in enumerate(variants):
        if not ID_PATTERN.match(var.id or ""):
            v.add(
                f"experiment.variants[{i}].id", f"variant id {var.id!r} is invalid: 1-63 of a-z, 0-9, -, starting with a letter"
            )
        try:
            MODEL_VERSION.parse(var.model_version, f"experiment.variants[{i}].model_version")
        except InvalidArgument as exc:
            v.add(f"experiment.variants[{i}].model_version", exc.message)
        if var.deployment:
            try:
                DEPLOYMENT.parse(var.deployment, f"experiment.variants[{i}].deployment")
            except InvalidArgument as exc:
                v.add(f"experiment.variants[{i}].deployment", exc.message)


def validate_experiment(exp: Experiment) -> None:
    """Every field rule at once; raises one INVALID_ARGUMENT listing the violations (weights last, with their
    own reason, so `WEIGHTS_DO_NOT_SUM_TO_ONE` is what a client sees for bad weights)."""
    v = Violations()
    if len(exp.display_name) > 200:
        v.add("experiment.display_name", "at most 200 characters")
    if len(exp.description) > 10_000:
        v.add("experiment.description", "at most 10,000 characters")
    validate_variant_list(exp.variants, v)
    if not exp.hash_seed or len(exp.hash_seed) > 256:
        v.add("experiment.hash_seed", "hash seed must be 1-256 characters")
    if exp.primary_metric is None:
        v.add("experiment.primary_metric", "a primary metric is required")
    else:
        validate_metric(exp.primary_metric, "experiment.primary_metric", v)
    for i, g in enumerate(exp.guardrail_metrics):
        validate_metric(g, f"experiment.guardrail_metrics[{i}]", v, guardrail=True)
    for i, s in enumerate(exp.secondary_metrics):
        validate_metric(s, f"experiment.secondary_metrics[{i}]", v)
    names = [m.name for m in exp.metrics]
    if len(names) > MAX_METRICS:
        v.add("experiment.secondary_metrics", f"at most {MAX_METRICS} metrics in all")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        v.add("experiment", f"metric names must be unique across primary, guardrail and secondary metrics: {dupes}")
    if exp.min_sample_size < 1 or exp.min_sample_size > 1_000_000_000:
        v.add("experiment.min_sample_size", "min_sample_size must be between 1 and 1e9")
    if not (0 < exp.significance_level <= 0.5):
        v.add("experiment.significance_level", "significance_level must be in (0, 0.5]")
    if exp.promote_alias and not ID_PATTERN.match(exp.promote_alias):
        v.add("experiment.promote_alias", f"alias {exp.promote_alias!r} is invalid")
    for key, value in exp.labels.items():
        if not LABEL_KEY.match(key) or len(value) > 63:
            v.add(f"experiment.labels[{key!r}]", "label keys: lowercase letters, digits, _ and -; values at most 63 characters")
    if exp.answer_judging is not None:
        validate_judging(exp.answer_judging, exp.metrics, v)
    v.raise_if_any()
    try:
        validate_coverage(exp.coverage, field="experiment.coverage")
        validate_variants(exp.variant_ids, exp.weights, field="experiment.variants")
    except InvalidArgument as exc:
        raise InvalidArgument(exc.message, field=exc.field, reason=exc.reason) from None


def check_metric_kinds_kept(old: Experiment, new_metrics: list[MetricSpec]) -> None:
    """Once an experiment has started, a metric keeps its kind: its statistics were aggregated that way."""
    if old.start_time is None:
        return
    for m in new_metrics:
        before = old.metric(m.name)
        if before is not None and before.kind is not m.kind:
            raise FailedPrecondition(
                f"metric {m.name!r} was collected as {before.kind.value}; its kind cannot change after start "
                "(add a metric with a new name instead)",
                reason="METRIC_KIND_CHANGED",
                metadata={"metric": m.name},
            )


def check_weights_only(old: Experiment, new_variants: list[Variant]) -> None:
    """After start only weights may change: ids, order, model versions and deployments are fixed (units are
    assigned to them)."""
    if old.state is ExperimentState.DRAFT and old.start_time is None:
        return
    same = len(old.variants) == len(new_variants) and all(
        a.id == b.id and a.model_version == b.model_version and (not b.deployment or a.deployment == b.deployment)
        for a, b in zip(old.variants, new_variants, strict=False)
    )
    if not same:
        raise InvalidArgument(
            "after start only variant weights can change: send the same variants (ids, model versions, deployments) "
            "in the same order with new weights",
            field="experiment.variants",
            reason="VARIANTS_IMMUTABLE",
        )


# -------------------------------------------------------------------------------------------- lifecycle

_ALLOWED = {
    "start": ({ExperimentState.DRAFT, ExperimentState.STOPPED}, ExperimentState.RUNNING),
    "stop": ({ExperimentState.RUNNING}, ExperimentState.STOPPED),
    "conclude": ({ExperimentState.RUNNING, ExperimentState.STOPPED}, ExperimentState.CONCLUDED),
}


def transition(state: ExperimentState, action: str, name: str) -> ExperimentState:
    allowed, target = _ALLOWED[action]
    if state not in allowed:
        raise FailedPrecondition(
            f"cannot {action} experiment {name}: it is {state.value} (allowed from {', '.join(sorted(s.value for s in allowed))})",
            reason=f"EXPERIMENT_{state.value}",
            metadata={"experiment": name, "state": state.value},
        )
    return target


def require_running(exp: Experiment, what: str) -> None:
    if exp.state is not ExperimentState.RUNNING:
        raise FailedPrecondition(
            f"experiment {exp.name} is {exp.state.value}: {what} only while it is RUNNING",
            reason="EXPERIMENT_NOT_RUNNING",
            metadata={"experiment": exp.name, "state": exp.state.value},
        )


__all__ = [
    "DEPLOYMENT",
    "EXPERIMENT",
    "MODEL",
    "MODEL_VERSION",
    "UPDATABLE",
    "AnalysisMethod",
    "Direction",
    "Experiment",
    "ExperimentState",
    "MetricKind",
    "MetricSpec",
    "Variant",
]
