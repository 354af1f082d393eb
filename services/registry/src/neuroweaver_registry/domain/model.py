"""Registry domain: resources as dataclasses and their validation rules (comparison: compare.py; rules: rules.py).

Nothing here knows protobuf or SQL.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import datetime

from neuroweaver_runtime.errors import Violations
from neuroweaver_runtime.names import ResourceName

MODEL = ResourceName("projects/{project}/models/{model}")
# `{version}` in requests may be a semver string or an alias id; both are checked further by the use cases.
VERSION = ResourceName(
    "projects/{project}/models/{model}/versions/{version}",
    segment_patterns=(("version", r"[0-9A-Za-z.\-]{1,128}"),),
)
ALIAS = ResourceName("projects/{project}/models/{model}/aliases/{alias}")
JUDGE = ResourceName("projects/{project}/judges/{judge}")
JUDGE_VERSION = ResourceName(
    "projects/{project}/judges/{judge}/versions/{version}", segment_patterns=(("version", r"[1-9][0-9]{0,17}|latest"),)
)

RESERVED_ALIASES = {"latest"}  # `versions/latest` always means the highest version
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_.\-]{0,62}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ModelState(enum.Enum):
    ACTIVE = "ACTIVE"
    ARCHIVED = "ARCHIVED"


class VersionState(enum.Enum):
    REGISTERED = "REGISTERED"
    VALIDATED = "VALIDATED"
    DEPRECATED = "DEPRECATED"


class ArtifactFormat(enum.Enum):
    LORA_ADAPTER = "LORA_ADAPTER"
    MERGED = "MERGED"
    GGUF = "GGUF"
    GGUF_LORA = "GGUF_LORA"


EXPORT_FORMATS = frozenset({ArtifactFormat.MERGED, ArtifactFormat.GGUF, ArtifactFormat.GGUF_LORA})
QUANTIZATION = re.compile(r"^[a-z0-9_]{1,32}$")


class Direction(enum.Enum):
    UNSPECIFIED = "UNSPECIFIED"
    HIGHER = "HIGHER"
    LOWER = "LOWER"


class AliasAction(enum.Enum):
    SET = "SET"
    DELETE = "DELETE"
    ROLLBACK = "ROLLBACK"


@dataclass
class Model:
    name: str
    display_name: str = ""
    description: str = ""
    specialization: str = ""
    base_model: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    state: ModelState = ModelState.ACTIVE
    latest_version: str = ""
    version_count: int = 0
    aliases: dict[str, str] = field(default_factory=dict)
    creator: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None
    revision: int = 1
    # Storage identity, set by the repository that loaded or stored it; opaque here and never part of equality.
    key: int | None = field(default=None, compare=False, repr=False)

    @property
    def project(self) -> str:
        return MODEL.parse(self.name)["project"]


@dataclass
class Artifact:
    uri: str = ""
    sha256: str = ""
    size_bytes: int = 0
    format: ArtifactFormat = ArtifactFormat.LORA_ADAPTER
    # exports only (ModelVersion.artifacts): weights type, what made it, when it was added
    quantization: str = ""
    produced_by: str = ""
    create_time: datetime | None = None


@dataclass
class Lineage:
    base_model: str = ""
    training_job: str = ""
    dataset_uri: str = ""
    dataset_digest: str = ""
    eval_dataset_uri: str = ""
    eval_dataset_digest: str = ""
    hyperparameters: dict[str, str] = field(default_factory=dict)
    parent_version: str = ""
    judge_version: str = ""
    method: str = ""


@dataclass
class Metric:
    name: str
    value: float
    direction: Direction = Direction.UNSPECIFIED
    source: str = ""
    record_time: datetime | None = None


@dataclass
class ModelVersion:
    name: str
    version: str
    state: VersionState = VersionState.REGISTERED
    artifact: Artifact = field(default_factory=Artifact)
    lineage: Lineage = field(default_factory=Lineage)
    metrics: list[Metric] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    notes: str = ""
    aliases: list[str] = field(default_factory=list)
    creator: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None
    revision: int = 1
    # exports of `artifact` (merged, GGUF, GGUF LoRA), one per (format, quantization), oldest first
    artifacts: list[Artifact] = field(default_factory=list)
    # Storage identity, set by the repository that loaded or stored it; opaque here and never part of equality.
    key: int | None = field(default=None, compare=False, repr=False)

    def latest_metrics(self) -> dict[str, Metric]:
        """Newest value of each metric name (metrics are appended, never overwritten)."""
        latest: dict[str, Metric] = {}
        for metric in self.metrics:
            latest[metric.name] = metric
        return latest


@dataclass
class ModelAlias:
    name: str
    version: str
    actor: str = ""
    reason: str = ""
    update_time: datetime | None = None


@dataclass
class AliasHistoryEntry:
    alias: str
    action: AliasAction
    from_version: str
    to_version: str
    actor: str
    reason: str
    sequence: int = 0
    create_time: datetime | None = None


# What an audit event can say happened (the contract's ModelEvent.Type names without their TYPE_ prefix).
EVENT_TYPES = frozenset(
    {
        "MODEL_CREATED", "MODEL_UPDATED", "MODEL_ARCHIVED", "MODEL_RESTORED", "MODEL_DELETED",
        "VERSION_CREATED", "VERSION_UPDATED", "VERSION_STATE_CHANGED", "VERSION_METRICS_APPENDED",
        "VERSION_ARTIFACT_ADDED", "ALIAS_SET", "ALIAS_DELETED", "ALIAS_ROLLED_BACK",
        "JUDGE_CREATED", "JUDGE_VERSION_CREATED",
    }
)  # fmt: skip


@dataclass
class ModelEvent:
    type: str  # one of EVENT_TYPES, e.g. VERSION_CREATED
    resource: str
    model: str = ""
    actor: str = ""
    details: dict[str, str] = field(default_factory=dict)
    sequence: int = 0
    create_time: datetime | None = None


@dataclass
class Judge:
    name: str
    display_name: str = ""
    description: str = ""
    latest_version: int = 0
    creator: str = ""
    create_time: datetime | None = None
    # Storage identity, set by the repository that loaded or stored it; opaque here and never part of equality.
    key: int | None = field(default=None, compare=False, repr=False)

    @property
    def project(self) -> str:
        return JUDGE.parse(self.name)["project"]


@dataclass
class JudgeVersion:
    """An immutable judge configuration; `config` holds kind, mode, connection, rubric, template and scale."""

    name: str
    version: int
    config: dict = field(default_factory=dict)
    creator: str = ""
    create_time: datetime | None = None


# -- validation ----------------------------------------------------------------------------------

MAX_TEXT = 4000
MAX_DISPLAY = 200
MAX_LABELS = 64
MAX_METRICS = 1000
MAX_HYPERPARAMETERS = 200


def check_labels(labels: dict[str, str], path: str, v: Violations) -> None:
    if len(labels) > MAX_LABELS:
        v.add(path, f"at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if not LABEL_KEY.match(key):
            v.add(f"{path}[{key!r}]", "label keys are 1-63 of [a-z0-9_.-] starting with a letter")
        if len(value) > 63:
            v.add(f"{path}[{key!r}]", "label values are at most 63 characters")


def check_length(value: str, limit: int, path: str, v: Violations) -> None:
    if len(value) > limit:
        v.add(path, f"at most {limit} characters (got {len(value)})")


def validate_model_fields(model: Model, v: Violations, prefix: str = "model") -> None:
    check_length(model.display_name, MAX_DISPLAY, f"{prefix}.display_name", v)
    check_length(model.description, MAX_TEXT, f"{prefix}.description", v)
    check_length(model.specialization, 63, f"{prefix}.specialization", v)
    check_length(model.base_model, 2048, f"{prefix}.base_model", v)
    check_labels(model.labels, f"{prefix}.labels", v)


def validate_new_version(mv: ModelVersion, v: Violations, prefix: str = "model_version") -> None:
    art = mv.artifact
    if not art.uri:
        v.add(f"{prefix}.artifact.uri", "required: where the version's weights are stored")
    check_length(art.uri, 2048, f"{prefix}.artifact.uri", v)
    if not SHA256.match(art.sha256 or ""):
        v.add(f"{prefix}.artifact.sha256", "required: 64 lowercase hex characters")
    if art.size_bytes < 0:
        v.add(f"{prefix}.artifact.size_bytes", "must not be negative")
    if art.format not in (ArtifactFormat.LORA_ADAPTER, ArtifactFormat.MERGED):
        v.add(
            f"{prefix}.artifact.format",
            "a version's own artifact is LORA_ADAPTER or MERGED; add GGUF exports with AddModelVersionArtifact",
        )
    lin = mv.lineage
    for attr in ("base_model", "training_job", "dataset_uri", "eval_dataset_uri", "parent_version", "judge_version"):
        check_length(getattr(lin, attr), 2048, f"{prefix}.lineage.{attr}", v)
    for attr in ("dataset_digest", "eval_dataset_digest"):
        value = getattr(lin, attr)
        if value and not SHA256.match(value):
            v.add(f"{prefix}.lineage.{attr}", "must be 64 lowercase hex characters")
    check_length(lin.method, 63, f"{prefix}.lineage.method", v)
    if len(lin.hyperparameters) > MAX_HYPERPARAMETERS:
        v.add(f"{prefix}.lineage.hyperparameters", f"at most {MAX_HYPERPARAMETERS} entries")
    for key, value in lin.hyperparameters.items():
        if not key or len(key) > 128 or len(value) > 1024:
            v.add(f"{prefix}.lineage.hyperparameters[{key[:20]!r}]", "keys 1-128 characters, values at most 1024")
    validate_metrics(mv.metrics, v, f"{prefix}.metrics")
    check_labels(mv.labels, f"{prefix}.labels", v)
    check_length(mv.notes, MAX_TEXT, f"{prefix}.notes", v)


def validate_export_artifact(art: Artifact, v: Violations, prefix: str = "artifact") -> None:
    """An export added to a version: where, digest, size, an export format and a quantization name."""
    if not art.uri:
        v.add(f"{prefix}.uri", "required: where the export is stored")
    check_length(art.uri, 2048, f"{prefix}.uri", v)
    if not SHA256.match(art.sha256 or ""):
        v.add(f"{prefix}.sha256", "required: 64 lowercase hex characters")
    if art.size_bytes < 0:
        v.add(f"{prefix}.size_bytes", "must not be negative")
    if art.format not in EXPORT_FORMATS:
        v.add(f"{prefix}.format", "an export is MERGED, GGUF or GGUF_LORA (the trained adapter is the version's artifact)")
    if not QUANTIZATION.match(art.quantization or ""):
        v.add(f"{prefix}.quantization", "required: 1-32 of [a-z0-9_], for example f16, q8_0, q4_k_m")
    check_length(art.produced_by, 512, f"{prefix}.produced_by", v)


def add_export(version: ModelVersion, art: Artifact) -> bool:
    """Add an export to the version; False when the same export is already there (a retry). Artifacts are immutable:
    the same (format, quantization) with other bytes → ``ValueError``."""
    for existing in version.artifacts:
        if (existing.format, existing.quantization) == (art.format, art.quantization):
            if (existing.uri, existing.sha256) == (art.uri, art.sha256):
                return False
            raise ValueError(
                f"{version.name} already has a {art.format.value} {art.quantization} artifact with sha256 {existing.sha256}"
            )
    version.artifacts.append(art)
    return True


def validate_metrics(metrics: list[Metric], v: Violations, path: str) -> None:
    if len(metrics) > MAX_METRICS:
        v.add(path, f"at most {MAX_METRICS} metrics per call")
    for i, metric in enumerate(metrics):
        if not metric.name or len(metric.name) > 128:
            v.add(f"{path}[{i}].name", "required, at most 128 characters")
        if metric.value != metric.value or metric.value in (float("inf"), float("-inf")):
            v.add(f"{path}[{i}].value", "must be a finite number")
