"""Deployer domain: deployments, revisions, conditions, validation and the state rule. No protobuf, no SQL."""

from __future__ import annotations

import enum
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from datetime import datetime

from neuroweaver_runtime.errors import FailedPrecondition, InvalidArgument, Violations
from neuroweaver_runtime.names import ResourceName

DEPLOYMENT = ResourceName("projects/{project}/deployments/{deployment}")
VERSION = ResourceName(
    "projects/{project}/models/{model}/versions/{version}", segment_patterns=(("version", r"[0-9A-Za-z.\-+]{1,128}"),)
)
ALIAS = ResourceName("projects/{project}/models/{model}/aliases/{alias}")
MODEL = ResourceName("projects/{project}/models/{model}")

MAX_LOCAL_REPLICAS = 16
MAX_ADDITIONAL_VERSIONS = 7  # versions served beside the deployment's own on one base (serving.additional_versions)
MAX_REPLICAS = 1000
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_.\-]{0,62}$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
UPDATABLE = {"model_version", "model_alias", "resources", "autoscaling", "serving", "labels", "display_name"}


class State(enum.Enum):
    PENDING = "PENDING"
    PROGRESSING = "PROGRESSING"
    AVAILABLE = "AVAILABLE"
    DEGRADED = "DEGRADED"
    FAILED = "FAILED"
    DELETING = "DELETING"


class Backend(enum.Enum):
    LOCAL = "LOCAL"
    KUBERNETES = "KUBERNETES"


@dataclass
class Autoscaling:
    min_replicas: int = 0
    max_replicas: int = 0
    target_cpu_utilization: int = 0
    target_inflight_requests: int = 0

    @property
    def enabled(self) -> bool:
        return self.max_replicas > 0


@dataclass
class Toleration:
    key: str = ""
    operator: str = ""
    value: str = ""
    effect: str = ""


@dataclass
class Resources:
    cpu: str = ""
    memory: str = ""
    gpus: int = 0
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[Toleration] = field(default_factory=list)


ENGINES = ("transformers", "llama.cpp", "vllm")  # the model server's --engine values; "" = follows the device


@dataclass
class Serving:
    load_in_4bit: bool = False
    max_queue: int = 0
    max_new_tokens_limit: int = 0
    max_batch_size: int = 0
    image: str = ""
    engine: str = ""  # one of ENGINES, or "" (the model server's auto: follows the device and the GGUF artifacts)
    # Several versions on one base (multi-LoRA): fixed versions (`projects/p/models/m/versions/v`) served beside the
    # deployment's own by the same model-server processes, the base weights loaded once, one adapter per version.
    additional_versions: list[str] = field(default_factory=list)

    def with_defaults(self) -> Serving:
        return Serving(
            self.load_in_4bit,
            self.max_queue or 64,
            self.max_new_tokens_limit or 1024,
            self.max_batch_size or 8,
            self.image,
            self.engine,
            list(self.additional_versions),
        )


@dataclass
class Condition:
    type: str  # Available, Progressing, Degraded
    status: str  # True, False, Unknown
    reason: str = ""
    message: str = ""
    last_transition_time: datetime | None = None


@dataclass
class Deployment:
    name: str
    display_name: str = ""
    model_version: str = ""
    model_alias: str = ""
    backend: Backend = Backend.LOCAL
    replicas: int = 1
    autoscaling: Autoscaling = field(default_factory=Autoscaling)
    resources: Resources = field(default_factory=Resources)
    serving: Serving = field(default_factory=Serving)
    namespace: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    # output only
    state: State = State.PENDING
    served_version: str = ""
    served_model_name: str = ""
    endpoint: str = ""
    openai_base_url: str = ""
    ready_replicas: int = 0
    revision: int = 0
    conditions: list[Condition] = field(default_factory=list)
    create_time: datetime | None = None
    update_time: datetime | None = None
    generation: int = 1  # bumped on every change; the etag derives from it
    # stored only
    target: ResolvedVersion | None = None  # the resolved version being served (None only before it is stored)
    key: int = 0  # the store's key (set by the repositories; 0 = not stored yet)

    @property
    def project(self) -> str:
        return DEPLOYMENT.parse(self.name)["project"]

    @property
    def deployment_id(self) -> str:
        return DEPLOYMENT.parse(self.name)["deployment"]

    @property
    def model_names(self) -> tuple[str, ...]:
        names = stable_model_names(self.name, self.model_alias)
        if self.serving.additional_versions:  # `<deployment>/<version>` beside the other versions' names
            if self.model_version:
                names += version_model_names(self.name, VERSION.parse(self.model_version)["version"])
            elif self.target is not None:  # following an alias: the version it serves now
                names += version_model_names(self.name, self.target.version)
        return names

    @property
    def served_versions(self) -> list[ServedVersion]:
        """Every version its model servers serve: its own first (the default), then serving.additional_versions."""
        if self.target is None:
            return []
        own = ServedVersion(self.target.name, self.served_model_name or served_model_name(self.target), self.model_names)
        return [own, *co_served_versions(self.name, self.target)]


@dataclass(frozen=True)
class ServedVersion:
    """One version a deployment's model servers serve and the names that route a request to it."""

    model_version: str
    served_model_name: str
    model_names: tuple[str, ...]


@dataclass
class Revision:
    deployment: str
    revision: int
    model_version: str
    cause: str
    actor: str = ""
    create_time: datetime | None = None

    @property
    def name(self) -> str:
        return f"{self.deployment}/revisions/{self.revision}"


@dataclass(frozen=True)
class ResolvedVersion:
    """A registry version with what the model server needs to load it."""

    name: str  # projects/p/models/m/versions/1.2.0
    version: str  # 1.2.0
    artifact_uri: str
    artifact_sha256: str
    base_model: str
    # Exports of the version (registry `artifacts`) the llama.cpp engine can load: a merged GGUF (format GGUF) and
    # the adapter as a GGUF LoRA (format GGUF_LORA); "" when the version has none.
    gguf_uri: str = ""
    gguf_sha256: str = ""
    gguf_lora_uri: str = ""
    gguf_lora_sha256: str = ""
    # The deployment's additional versions (serving.additional_versions), resolved with it: served beside this one on
    # the same base by the same processes. Stored with the target; empty for a version served alone.
    co_served: tuple[ResolvedVersion, ...] = ()

    @property
    def model_id(self) -> str:
        return VERSION.parse(self.name)["model"]


@dataclass(frozen=True)
class Target:
    """What a backend must run for one deployment: the version plus how to serve it."""

    deployment: str
    version: ResolvedVersion
    served_model_name: str
    replicas: int
    serving: Serving
    resources: Resources
    autoscaling: Autoscaling
    namespace: str
    labels: dict[str, str]
    model_names: tuple[str, ...] = ()  # stable names (see stable_model_names); replicas answer to them too

    def fingerprint(self) -> str:
        """Changes whenever replicas would have to be replaced (version, serving settings or the names they answer to)."""
        s = self.serving
        raw = f"{self.version.name}|{self.version.artifact_sha256}|{s.load_in_4bit}|{s.max_queue}|{s.max_new_tokens_limit}|{s.max_batch_size}|{s.image}"
        load = server_load(self)
        # appended only when an engine is named or a GGUF export is served: other replicas keep their fingerprint
        if load.engine:
            raw += f"|engine={load.engine}|{load.base_model}|{load.adapter_sha256}"
        if load.engine == "llama.cpp" and load.co_served:  # the GGUF LoRAs picked (served names carry the PEFT digests)
            raw += "|" + ",".join(sha for _, sha in load.co_served)
        if self.model_names:
            raw += "|" + ",".join(self.model_names)
        for other in self.co_served:  # appended only with additional versions: other replicas keep their fingerprint
            raw += f"|+{other.model_version}|{other.served_model_name}|{','.join(other.model_names)}"
        return hashlib.sha256(raw.encode()).hexdigest()[:12]

    def rollout_key(self) -> str:
        """What must run for this target to be rolled out: replicas of its fingerprint, as many as it asks for.
        Labels, the display name and autoscaling bounds change nothing that serves, so they are not part of it."""
        return f"{self.fingerprint()}x{self.replicas}"

    @property
    def co_served(self) -> list[ServedVersion]:
        """The additional versions its replicas serve beside `version` (same base, one adapter each)."""
        return co_served_versions(self.deployment, self.version)


@dataclass(frozen=True)
class BackendStatus:
    """What a backend observes: ready replicas of the target, whether a rollout is under way, failures."""

    desired: int
    ready: int
    # Target.rollout_key() of the target the backend counted replicas of (the one it runs, or rolls out first);
    # "" when it runs none. A stored spec it does not match is not rolled out yet (derive_state).
    observed: str = ""
    rolling_out: bool = False
    failed: bool = False
    restarting: int = 0
    message: str = ""
    endpoint: str = ""
    openai_base_url: str = ""


def stable_model_names(deployment: str, model_alias: str = "") -> tuple[str, ...]:
    """The names a deployment's model server answers to besides the version-specific one: derived from the deployment
    (never from the version), so every replica of every version it rolls over to has the same ones and a caller
    naming one never gets NOT_FOUND because of a rollover. The resource name first (the default, unique in the
    platform), then the id, then, while following an alias, `<model>@<alias>` and `projects/<p>/models/<model>@<alias>`."""
    names = [deployment, DEPLOYMENT.parse(deployment)["deployment"]]
    if model_alias:
        parts = ALIAS.parse(model_alias, "model_alias")
        names += [
            f"{parts['model']}@{parts['alias']}",
            f"{MODEL.format(project=parts['project'], model=parts['model'])}@{parts['alias']}",
        ]
    return tuple(names)


def version_model_names(deployment: str, version: str) -> tuple[str, ...]:
    """The names of one version among a deployment's several (multi-LoRA): `<deployment name>/<version>` and
    `<deployment id>/<version>`, e.g. `projects/p/deployments/advisor-ab/1.1.0` and `advisor-ab/1.1.0`."""
    return (f"{deployment}/{version}", f"{DEPLOYMENT.parse(deployment)['deployment']}/{version}")


def extra_versions_json(target: Target) -> str:
    """The model server's `--extra-versions`: the additional versions with their names and adapters (the adapter the
    engine loads: a GGUF LoRA on llama.cpp, the PEFT adapter otherwise; none for a version that is the base)."""
    names = {v.model_version: v for v in target.co_served}
    adapters = server_load(target).co_served
    return json.dumps(
        [
            {
                "served_model_name": names[v.name].served_model_name,
                "model_version": v.name,
                "model_names": list(names[v.name].model_names),
                "adapter_uri": uri,
                "adapter_sha256": sha,
            }
            for v, (uri, sha) in zip(target.version.co_served, adapters, strict=True)
        ],
        separators=(",", ":"),
    )


def co_served_versions(deployment: str, target: ResolvedVersion) -> list[ServedVersion]:
    return [ServedVersion(v.name, served_model_name(v), version_model_names(deployment, v.version)) for v in target.co_served]


def served_model_name(v: ResolvedVersion) -> str:
    """Unique per model version and weights: `<model>-<version with dashes>-<sha256[:8]>`. Replicas accept it too, for
    callers that pin a version; callers that want what the deployment serves send a stable name."""
    version = re.sub(r"[^a-z0-9]+", "-", v.version.lower()).strip("-")
    return f"{v.model_id}-{version}-{v.artifact_sha256[:8]}"


def derive_state(status: BackendStatus, deleting: bool = False, target: Target | None = None) -> tuple[State, list[Condition]]:
    """The deployment state and its Kubernetes-style conditions from what the backend observes. `target`: the stored
    spec. A status whose replicas belong to another target (the spec changed mid-rollout, or before the backend
    applied it: its report was computed for the previous one) says nothing about the stored spec, whose rollout is
    then still to come: PROGRESSING, or FAILED/DEGRADED when the status reports a failure, never AVAILABLE."""
    if deleting:
        return State.DELETING, [Condition("Available", "False", "Deleting", "the deployment is being removed")]
    if target is not None and status.observed != target.rollout_key() and not status.failed:
        waiting = f"rolling out {target.replicas} replica(s) of {target.version.name}"
        status = replace(status, rolling_out=True, message=status.message or waiting)
    enough = status.ready >= status.desired
    available = Condition(
        "Available",
        "True" if status.ready > 0 or (status.desired == 0 and enough) else "False",
        "MinimumReplicasAvailable" if enough else "ReplicasUnavailable",
        f"{status.ready}/{status.desired} replicas ready",
    )
    progressing = Condition(
        "Progressing",
        "True" if status.rolling_out else "False",
        "RolloutInProgress" if status.rolling_out else ("RolloutFailed" if status.failed else "RolloutComplete"),
        status.message if status.rolling_out or status.failed else "",
    )
    degraded_now = (not enough and status.ready > 0) or status.restarting > 0
    degraded = Condition(
        "Degraded",
        "True" if degraded_now else "False",
        "ReplicaRestarting" if status.restarting else ("ReplicasUnavailable" if degraded_now else "AsExpected"),
        status.message if degraded_now else "",
    )
    conditions = [available, progressing, degraded]
    if status.failed and status.ready == 0:
        return State.FAILED, conditions
    if status.rolling_out:
        return State.PROGRESSING, conditions
    if degraded_now or (status.failed and status.ready > 0):
        return State.DEGRADED, conditions
    if enough:
        return State.AVAILABLE, conditions
    return State.PENDING if status.ready == 0 and not status.restarting else State.DEGRADED, conditions


def merge_conditions(old: list[Condition], new: list[Condition], now: datetime) -> list[Condition]:
    """Keeps each condition's last_transition_time unless its status changed."""
    before = {c.type: c for c in old}
    out = []
    for c in new:
        prev = before.get(c.type)
        c.last_transition_time = prev.last_transition_time if prev and prev.status == c.status else now
        out.append(c)
    return out


def check_labels(labels: dict[str, str], v: Violations, path: str = "deployment.labels") -> None:
    if len(labels) > 64:
        v.add(path, "at most 64 labels")
    for k, val in labels.items():
        if not LABEL_KEY.match(k):
            v.add(f"{path}.{k}", "keys are 1-63 of [a-z0-9_.-] starting with a letter")
        if len(val) > 63:
            v.add(f"{path}.{k}", "values are at most 63 characters")


def validate_spec(d: Deployment, v: Violations, *, creating: bool, path: str = "deployment") -> None:
    """Checks the user-settable fields of a deployment; every problem is reported as a field violation."""
    if bool(d.model_version) == bool(d.model_alias):
        v.add(f"{path}.model_version", "set exactly one of model_version (fixed) and model_alias (followed)")
    if d.model_version:
        try:
            VERSION.parse(d.model_version, f"{path}.model_version")
        except InvalidArgument as exc:
            v.add(f"{path}.model_version", exc.message)
    if d.model_alias:
        try:
            ALIAS.parse(d.model_alias, f"{path}.model_alias")
        except InvalidArgument as exc:
            v.add(f"{path}.model_alias", exc.message)
    limit = MAX_LOCAL_REPLICAS if d.backend is Backend.LOCAL else MAX_REPLICAS
    if creating and not 0 <= d.replicas <= limit:
        v.add(f"{path}.replicas", f"must be in 0..{limit} for the {d.backend.value.lower()} backend")
    a = d.autoscaling
    if a.enabled or a.min_replicas:
        if a.min_replicas < 1 or a.max_replicas < a.min_replicas or a.max_replicas > limit:
            v.add(f"{path}.autoscaling", f"need 1 <= min_replicas <= max_replicas <= {limit}")
    if a.target_cpu_utilization and not 1 <= a.target_cpu_utilization <= 100:
        v.add(f"{path}.autoscaling.target_cpu_utilization", "must be in 1..100")
    if a.target_inflight_requests < 0:
        v.add(f"{path}.autoscaling.target_inflight_requests", "must not be negative")
    r = d.resources
    for name, value in (("cpu", r.cpu), ("memory", r.memory)):
        if value and not QUANTITY.match(value):
            v.add(f"{path}.resources.{name}", f"{value!r} is not a Kubernetes quantity (e.g. 2, 500m, 4Gi)")
    if not 0 <= r.gpus <= 16:
        v.add(f"{path}.resources.gpus", "must be in 0..16")
    if r.gpus and d.backend is Backend.LOCAL:
        v.add(f"{path}.resources.gpus", "the local backend does not schedule GPUs; use the kubernetes backend")
    for i, t in enumerate(r.tolerations):
        if t.operator not in ("", "Exists", "Equal"):
            v.add(f"{path}.resources.tolerations[{i}].operator", "must be Exists or Equal")
        if t.effect not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
            v.add(f"{path}.resources.tolerations[{i}].effect", "must be NoSchedule, PreferNoSchedule or NoExecute")
    s = d.serving
    for setting, number, hi in (
        ("max_queue", s.max_queue, 100_000),
        ("max_new_tokens_limit", s.max_new_tokens_limit, 131_072),
        ("max_batch_size", s.max_batch_size, 256),
    ):
        if not 0 <= number <= hi:
            v.add(f"{path}.serving.{setting}", f"must be in 0..{hi} (0 = default)")
    check_additional_versions(d, v, path)
    if s.engine and s.engine not in ENGINES:
        v.add(f"{path}.serving.engine", f"must be one of {', '.join(ENGINES)} (or unset: follows the device)")
    if s.engine == "llama.cpp" and s.load_in_4bit:
        v.add(f"{path}.serving.load_in_4bit", "4-bit NF4 is the transformers engine's; llama.cpp serves the GGUF's quantization")
    if s.engine == "llama.cpp" and r.gpus:
        v.add(f"{path}.serving.engine", "the llama.cpp engine runs on the CPU; ask for no GPUs or choose vllm")
    if s.engine == "vllm" and d.backend is Backend.KUBERNETES and not r.gpus:
        v.add(f"{path}.serving.engine", "the vllm engine needs a CUDA GPU: set resources.gpus")
    if s.engine == "vllm" and s.load_in_4bit:
        v.add(f"{path}.serving.load_in_4bit", "4-bit NF4 is the transformers engine's; vLLM loads the checkpoint as it is")
    if d.namespace and not DNS_LABEL.match(d.namespace):
        v.add(f"{path}.namespace", "must be a DNS-1123 label")
    if len(d.display_name) > 200:
        v.add(f"{path}.display_name", "at most 200 characters")
    check_labels(d.labels, v, f"{path}.labels")


def check_additional_versions(d: Deployment, v: Violations, path: str = "deployment") -> None:
    """serving.additional_versions: fixed version names, none twice nor the deployment's own, at most
    MAX_ADDITIONAL_VERSIONS. (Whether the engine can load them is checked once they are resolved: check_co_served.)"""
    extra = d.serving.additional_versions
    if not extra:
        return
    field_path = f"{path}.serving.additional_versions"
    if len(extra) > MAX_ADDITIONAL_VERSIONS:
        v.add(field_path, f"at most {MAX_ADDITIONAL_VERSIONS} versions beside the deployment's own")
    seen = {d.model_version} if d.model_version else set()
    for i, name in enumerate(extra):
        try:
            VERSION.parse(name, f"{field_path}[{i}]")
        except InvalidArgument as exc:
            v.add(f"{field_path}[{i}]", f"{exc.message} (a fixed version: projects/p/models/m/versions/v)")
            continue
        if name in seen:
            v.add(f"{field_path}[{i}]", f"{name} is listed twice (or is the deployment's own version)")
        seen.add(name)


def check_co_served(primary: ResolvedVersion, others: list[ResolvedVersion], serving: Serving, gpus: int = 0) -> None:
    """Versions served together share the base model; each brings its own adapter (the only weights that differ) or
    is the base itself (no adapter: a merged artifact that is the shared base). On llama.cpp (named, or chosen for a
    CPU deployment whose versions all have GGUF LoRAs) the base is a GGUF and every adapter a GGUF LoRA; on the other
    engines every adapter is a PEFT directory."""
    for other in others:
        if other.base_model != primary.base_model:
            raise FailedPrecondition(
                f"{other.name} is trained on {other.base_model}, not on {primary.base_model} like {primary.name}: "
                "only versions of one base model share a model server",
                reason="SHARED_BASE_MISMATCH",
                metadata={"model_version": other.name, "base_model": other.base_model, "expected": primary.base_model},
            )
    versions = (primary, *others)
    bases = [v.name for v in versions if not v.artifact_uri]
    if len(bases) > 1:
        raise FailedPrecondition(
            f"{bases[1]} has no adapter, like {bases[0]}: both are the base itself; only one version served on a base "
            "may be the base (the others differ from it by their adapters)",
            reason="ADAPTER_REQUIRED",
            metadata={"model_version": bases[1]},
        )
    if co_served_engine(serving, gpus, versions) == "llama.cpp":
        if not _gguf_base(primary):
            raise FailedPrecondition(
                f"{primary.base_model} is no GGUF base model: the llama.cpp engine serves versions on one base as GGUF "
                "LoRA adapters on a GGUF base (a builtin model or a .gguf file); choose the transformers engine",
                reason="GGUF_ARTIFACT_MISSING",
                metadata={"model_version": primary.name, "missing": "base_model"},
            )
        for v in versions:
            if v.artifact_uri and not gguf_lora(v)[0]:
                raise FailedPrecondition(
                    f"{v.name} has no GGUF LoRA export: the llama.cpp engine serves versions on one base as GGUF LoRA "
                    "adapters on the shared GGUF base, never a merged GGUF (export the adapter: nw versions export "
                    "<model> <version> --format gguf-lora; or choose the transformers engine)",
                    reason="GGUF_ARTIFACT_MISSING",
                    metadata={"model_version": v.name, "missing": "adapter"},
                )
        return
    for v in versions:
        if _is_gguf(v.artifact_uri):
            raise FailedPrecondition(
                f"{v.name} has no PEFT adapter to load beside the others on the shared base (its adapter is a GGUF "
                "LoRA: serve them on the llama.cpp engine)",
                reason="ADAPTER_REQUIRED",
                metadata={"model_version": v.name},
            )


def co_served_engine(serving: Serving, gpus: int, versions: tuple[ResolvedVersion, ...]) -> str:
    """The engine flag for versions served together: the one the deployment names; unset, llama.cpp on a CPU when the
    base is a GGUF and every version has a GGUF LoRA or is the base (as for one version with a GGUF export), else
    "" (the model server's auto: transformers, or vllm on CUDA, with the PEFT adapters)."""
    if serving.engine:
        return serving.engine
    if gpus or serving.load_in_4bit or not _gguf_base(versions[0]):
        return ""
    return "llama.cpp" if all(not v.artifact_uri or gguf_lora(v)[0] for v in versions) else ""


def gguf_lora(v: ResolvedVersion) -> tuple[str, str]:
    """The version's adapter as a GGUF LoRA (uri, sha256): its GGUF_LORA export, else its own artifact when that is a
    .gguf; ("", "") when it has none."""
    if v.gguf_lora_uri:
        return v.gguf_lora_uri, v.gguf_lora_sha256
    if _is_gguf(v.artifact_uri):
        return v.artifact_uri, v.artifact_sha256
    return "", ""


def _is_gguf(reference: str) -> bool:
    return reference.lower().split("?", 1)[0].endswith(".gguf")


def _gguf_base(version: ResolvedVersion) -> bool:
    """A base model llama.cpp loads: a builtin model (shipped as a GGUF) or a .gguf file."""
    return version.base_model.startswith("builtin:") or _is_gguf(version.base_model)


@dataclass(frozen=True)
class ServerLoad:
    """What a replica of a target loads: the engine flag ("" = the model server's auto), base model and adapter."""

    engine: str
    base_model: str
    adapter_uri: str
    adapter_sha256: str
    # Several versions on one base: each co-served version's adapter (uri, sha256), in order; ("", "") = the base.
    co_served: tuple[tuple[str, str], ...] = ()


def server_load(target: Target) -> ServerLoad:
    """The engine and weights a replica gets. A deployment that names no engine and asks for no GPU is served by
    llama.cpp when the version has a GGUF export (a merged GGUF, or a GGUF LoRA on a GGUF base); llama.cpp loads the
    merged GGUF when there is one (no adapter matmuls), else the GGUF LoRA on the base; other engines load the
    version's own artifact. Several versions on one base (co_served_engine): llama.cpp loads every version's GGUF
    LoRA on the GGUF base, the other engines every version's PEFT adapter; a version that is the base loads none."""
    v, engine = target.version, target.serving.engine
    has_gguf = bool(v.gguf_uri) or (bool(v.gguf_lora_uri) and _gguf_base(v))
    if v.co_served:
        versions = (v, *v.co_served)
        engine = co_served_engine(target.serving, target.resources.gpus, versions)
        pick = gguf_lora if engine == "llama.cpp" else (lambda x: (x.artifact_uri, x.artifact_sha256))
        (own_uri, own_sha), *others = [pick(x) if x.artifact_uri else ("", "") for x in versions]
        return ServerLoad(engine, v.base_model, own_uri, own_sha, tuple(others))
    if not engine and not target.resources.gpus and not target.serving.load_in_4bit and has_gguf:
        engine = "llama.cpp"
    if engine == "llama.cpp" and v.gguf_uri:
        return ServerLoad(engine, v.gguf_uri, "", "")
    if engine == "llama.cpp" and v.gguf_lora_uri:
        return ServerLoad(engine, v.base_model, v.gguf_lora_uri, v.gguf_lora_sha256)
    return ServerLoad(engine, v.base_model, v.artifact_uri, v.artifact_sha256)


def check_engine_fits(serving: Serving, version: ResolvedVersion) -> None:
    """The engine a deployment names can load the version: llama.cpp needs a merged GGUF export, or a GGUF base model
    (a builtin model ships one, or a .gguf file) with the adapter as a GGUF LoRA (an export, or the version's own
    .gguf artifact); transformers and vllm cannot load a GGUF LoRA."""
    adapter_gguf = _is_gguf(version.artifact_uri)
    if serving.engine == "llama.cpp" and not version.gguf_uri:
        base_ok = _gguf_base(version)
        if not base_ok or (version.artifact_uri and not adapter_gguf and not version.gguf_lora_uri):
            missing = "base model" if not base_ok else "adapter"
            raise FailedPrecondition(
                f"{version.name} has no GGUF {missing}: the llama.cpp engine serves a GGUF base and a GGUF LoRA adapter "
                "(export the version to GGUF, or choose the transformers engine)",
                reason="GGUF_ARTIFACT_MISSING",
                metadata={"model_version": version.name, "missing": missing.replace(" ", "_")},
            )
    elif serving.engine and adapter_gguf:
        raise FailedPrecondition(
            f"{version.name}'s adapter is a GGUF LoRA, which only the llama.cpp engine loads",
            reason="ENGINE_CANNOT_LOAD_ARTIFACT",
            metadata={"model_version": version.name, "engine": serving.engine},
        )


def validate_replicas(replicas: int, backend: Backend) -> None:
    limit = MAX_LOCAL_REPLICAS if backend is Backend.LOCAL else MAX_REPLICAS
    if not 0 <= replicas <= limit:
        raise InvalidArgument(
            f"replicas must be in 0..{limit} for the {backend.value.lower()} backend", field="replicas", reason="INVALID_REPLICAS"
        )


def alias_version_name(alias_name: str) -> str:
    """`projects/p/models/m/aliases/a` → `projects/p/models/m/versions/a` (the registry resolves it)."""
    parts = ALIAS.parse(alias_name, "model_alias")
    return VERSION.format(project=parts["project"], model=parts["model"], version=parts["alias"])


def alias_model(alias_name: str) -> tuple[str, str]:
    """(model name, alias id) of an alias name."""
    parts = ALIAS.parse(alias_name, "model_alias")
    return MODEL.format(project=parts["project"], model=parts["model"]), parts["alias"]
