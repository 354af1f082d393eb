"""Training jobs: dataclasses, defaults, validation rules and the state machine (no protobuf, no SQL)."""

from __future__ import annotations

import enum
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from neuroweaver_runtime.errors import Violations
from neuroweaver_runtime.names import ResourceName

from .tracking import TrackingSettings

JOB = ResourceName("projects/{project}/trainingJobs/{job}")
TARGET_MODEL = ResourceName("projects/{project}/models/{model}")

# Namespace of the deterministic registration request ids (uuid5 of the job name): a registration retried
# after a crash or a lost response carries the same request_id, so the registry creates exactly one version.
REGISTRATION_NAMESPACE = uuid.UUID("6f1b3c2e-5d4a-4e8b-9a0c-7e2f1d3b4a5c")


class JobState(enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"
    PAUSING = "PAUSING"  # the worker saves a checkpoint and stops
    PAUSED = "PAUSED"  # held out of the queue until resumed

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def active(self) -> bool:
        """A worker holds (or held, until its lease expires) the job."""
        return self in ACTIVE_STATES

    @property
    def waiting(self) -> bool:
        """Queued or paused: no worker holds the job (an attempt that handed it back is over)."""
        return self in (JobState.QUEUED, JobState.PAUSED)


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE_STATES = frozenset({JobState.RUNNING, JobState.CANCELLING, JobState.PAUSING})
PRIORITY_RANGE = (-1000, 1000)


class Interrupt(enum.Enum):
    """Why a running worker is asked to save a checkpoint and hand its job back (kept on the job row)."""

    NONE = ""
    PREEMPT = "preempt"  # a higher-priority job needs the room: back to the queue, resumed later


class Method(enum.Enum):
    SFT_LORA = "SFT_LORA"
    SFT_QLORA = "SFT_QLORA"
    RLAIF = "RLAIF"
    DPO = "DPO"
    REWARD_MODEL = "REWARD_MODEL"
    EXPORT = "EXPORT"

    @property
    def lineage_name(self) -> str:
        return {"SFT_LORA": "sft-lora", "SFT_QLORA": "sft-qlora"}.get(self.value, self.value.lower().replace("_", "-"))


SUPPORTED_METHODS = frozenset(Method)
PREFERENCE_METHODS = frozenset({Method.DPO, Method.REWARD_MODEL})
RLAIF_ALGORITHMS = ("grpo", "rloo", "dpo")
REWARD_SOURCES = ("reward_model", "judge", "both")
_JUDGE_VERSION = re.compile(r"^projects/[^/]+/judges/[^/]+/versions/[^/]+$")
_MODEL_VERSION = re.compile(r"^projects/[^/]+/models/[^/]+/versions/[^/]+$")


class Executor(enum.Enum):
    LOCAL = "LOCAL"
    KUBERNETES = "KUBERNETES"


class EventType(enum.Enum):
    STATE_CHANGED = "STATE_CHANGED"
    STAGE_STARTED = "STAGE_STARTED"
    STAGE_COMPLETED = "STAGE_COMPLETED"
    STEP = "STEP"
    EVAL = "EVAL"
    CHECKPOINT = "CHECKPOINT"
    LOG = "LOG"
    RESUMED = "RESUMED"
    JUDGE = "JUDGE"
    REGISTERED = "REGISTERED"


LR_SCHEDULERS = frozenset({"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"})
VERSION_BUMPS = ("major", "minor", "patch")
_LABEL_KEY = re.compile(r"^[a-z]([a-z0-9_-]{0,62})$")


# Settings typed `X | None` are the ones where 0 (or false) means something: None is "unset" until apply_defaults
# fills in the documented default, so an explicit 0 survives to the worker. Stored jobs carry effective values.


@dataclass
class LoraSettings:
    r: int = 0
    alpha: int = 0
    dropout: float | None = None
    target_modules: list[str] = field(default_factory=list)


@dataclass
class Hyperparameters:
    learning_rate: float = 0.0
    num_epochs: float = 0.0
    max_steps: int = 0
    batch_size: int = 0
    gradient_accumulation_steps: int = 0
    max_seq_length: int = 0
    warmup_ratio: float | None = None
    weight_decay: float = 0.0
    seed: int | None = None
    checkpoint_every_steps: int = 0
    eval_every_steps: int | None = None
    gradient_checkpointing: bool | None = None
    eval_split: float | None = None
    lr_scheduler: str = ""
    max_grad_norm: float | None = None
    # SFT-stage settings (jobs stored before they existed read back as the defaults)
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    optimizer: str = ""  # "" = adamw_torch without a GPU, paged_adamw_8bit on one
    precision: str = ""  # "" (auto: bf16 on a GPU, fp32 without) | fp32 | bf16 | fp16
    sequence_packing: bool | None = None
    train_on_inputs: bool = False
    dpo_beta: float | None = None  # method DPO
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 = off
    chat_template: str = ""  # "" = the base tokenizer's
    liger_kernels: bool = False  # CUDA only
    offload_activations: bool = False  # CUDA only


@dataclass
class RlaifSettings:
    """`RlaifConfig` of an RLAIF job (effective values after defaults), plus what create resolved."""

    prompts_uri: str = ""
    eval_prompts_uri: str = ""
    judge_version: str = ""
    candidates_per_prompt: int = 0
    algorithm: str = ""  # grpo | rloo | dpo ("" until defaults)
    reward_source: str = ""  # reward_model | judge | both
    reward_model_backbone: str = ""
    kl_coefficient: float | None = None
    policy_steps: int = 0
    policy_learning_rate: float = 0.0
    min_margin: float | None = None
    start_from_version: str = ""
    max_new_tokens: int = 0
    qlora: bool = False  # both trained stages on the 4-bit NF4 base
    # resolved at create (internal; judge versions and model versions are immutable)
    prompts_digest: str = ""
    eval_prompts_digest: str = ""
    judge: dict[str, Any] = field(default_factory=dict)  # JudgeConfig fields of the resolved judge version
    parent_artifact_uri: str = ""  # start_from_version's adapter
    parent_artifact_sha256: str = ""

    @property
    def configured(self) -> bool:
        return any(
            (
                self.prompts_uri,
                self.eval_prompts_uri,
                self.judge_version,
                self.start_from_version,
                self.candidates_per_prompt,
                self.algorithm,
                self.reward_source,
                self.policy_steps,
                self.qlora,
                self.policy_learning_rate,
            )
        )


# Export formats and their weights types (the first is the default); the same table as neuroweaver_ml.export.QUANTIZATIONS.
EXPORT_QUANTIZATIONS: dict[str, tuple[str, ...]] = {
    "merged": ("f16", "bf16", "f32"),
    "gguf": ("f16", "q8_0", "q4_k_m", "f32", "bf16"),
    "gguf-lora": ("f16", "q8_0", "f32", "bf16"),
}


@dataclass
class ExportSettings:
    """`ExportConfig` of an EXPORT job, plus what create resolved from the registry (versions are immutable)."""

    model_version: str = ""  # the full name; create replaces an alias by the concrete version
    format: str = ""  # merged | gguf | gguf-lora
    quantization: str = ""
    # resolved at create: the version's adapter
    artifact_uri: str = ""
    artifact_sha256: str = ""

    @property
    def configured(self) -> bool:
        return bool(self.model_version or self.format or self.quantization)


@dataclass
class Resources:
    gpus: int = 0
    cpu: str = ""
    memory: str = ""
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)
    image: str = ""
    processes: int = 0  # data-parallel processes (0: one per GPU, else 1)

    @property
    def world_size(self) -> int:
        """How many training processes the job runs."""
        return self.processes or max(1, self.gpus)


@dataclass
class TrainingJob:
    name: str = ""
    display_name: str = ""
    base_model: str = ""
    dataset_uri: str = ""
    eval_dataset_uri: str = ""
    method: Method | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    rlaif: RlaifSettings = field(default_factory=RlaifSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)  # MLflow / TensorBoard (domain/tracking.py)
    executor: Executor = Executor.LOCAL
    resources: Resources = field(default_factory=Resources)
    target_model: str = ""
    version_bump: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    priority: int = 0  # higher runs first; may preempt lower-priority running jobs
    # output only
    state: JobState = JobState.QUEUED
    stage: str = ""
    error: str = ""
    model_version: str = ""
    output_uri: str = ""
    dataset_digest: str = ""
    eval_dataset_digest: str = ""
    current_step: int = 0
    total_steps: int = 0
    resumed_from_step: int = 0
    attempts: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    create_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    creator: str = ""
    last_sequence: int = 0
    queue_position: int = 0  # 1-based among all queued jobs, 0 when not queued (filled on read)
    wait_reason: str = ""  # why a queued job is not running yet (filled on read)
    # internal: W3C traceparent of the call that created the job; the worker runs the job under it
    trace_parent: str = ""
    # internal: the worker's controls (polled by the worker) and the attempts that ended by handing the job back
    interrupt: Interrupt = Interrupt.NONE
    checkpoint_requests: int = 0  # bumped by each CheckpointTrainingJob; the worker saves when it grows
    yielded_attempts: int = 0  # attempts that ended paused, preempted or interrupted: not counted against max_attempts
    attempt_owners: dict[int, str] = field(default_factory=dict)  # attempt → the trainer replica (lease owner) that ran it
    key: int = 0  # the store's key (set by the repositories; 0 = not stored yet)

    @property
    def job_id(self) -> str:
        return self.name.rsplit("/", 1)[-1]


@dataclass
class StepMetrics:
    step: int
    total_steps: int
    epoch: float = 0.0
    loss: float = 0.0
    learning_rate: float = 0.0
    grad_norm: float = 0.0
    tokens_per_second: float = 0.0
    eta_seconds: float = 0.0
    rss_bytes: int = 0
    gpu_memory_bytes: int = 0


@dataclass
class JobEvent:
    type: EventType
    stage: str = ""
    state: JobState | None = None
    step: StepMetrics | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""
    job: str = ""
    sequence: int = 0
    create_time: datetime | None = None

    @property
    def is_terminal(self) -> bool:
        return self.type is EventType.STATE_CHANGED and self.state is not None and self.state.terminal


# -- defaults and validation ---------------------------------------------------------------------


def quantized_base(job: TrainingJob) -> bool:
    """Whether the job trains on the base quantized to 4-bit NF4 (QLoRA): SFT_QLORA, and RLAIF with rlaif.qlora."""
    return job.method is Method.SFT_QLORA or (job.method is Method.RLAIF and job.rlaif.qlora)


def apply_defaults(job: TrainingJob) -> None:
    """Zero values take the documented defaults (proto comments), so stored jobs carry effective values."""
    if job.method is Method.EXPORT:  # trains nothing: no hyperparameters, LoRA settings or bump to fill in
        job.export.quantization = job.export.quantization or EXPORT_QUANTIZATIONS.get(job.export.format, ("",))[0]
        job.display_name = job.display_name or job.job_id
        return
    h, lo = job.hyperparameters, job.lora
    h.learning_rate = h.learning_rate or 2e-4
    h.num_epochs = h.num_epochs or 1.0
    h.batch_size = h.batch_size or 4
    h.gradient_accumulation_steps = h.gradient_accumulation_steps or 1
    h.max_seq_length = h.max_seq_length or 512
    h.warmup_ratio = 0.03 if h.warmup_ratio is None else h.warmup_ratio
    h.seed = 42 if h.seed is None else h.seed
    h.checkpoint_every_steps = h.checkpoint_every_steps or 50
    h.eval_every_steps = 50 if h.eval_every_steps is None else h.eval_every_steps
    if h.eval_split is None:  # the reward model reports held-out pairwise accuracy: it holds out more by default
        h.eval_split = 0.2 if job.method is Method.REWARD_MODEL else 0.05
    h.lr_scheduler = h.lr_scheduler or "cosine"
    h.max_grad_norm = 1.0 if h.max_grad_norm is None else h.max_grad_norm
    if h.gradient_checkpointing is None:  # documented default: on when the base is 4-bit quantized
        h.gradient_checkpointing = quantized_base(job)
    h.sequence_packing = True if h.sequence_packing is None else h.sequence_packing
    if job.method is Method.DPO:
        h.dpo_beta = 0.1 if h.dpo_beta is None else h.dpo_beta
    lo.r = lo.r or 8
    lo.alpha = lo.alpha or 16
    lo.dropout = 0.05 if lo.dropout is None else lo.dropout
    if job.method is Method.RLAIF:
        r = job.rlaif
        r.candidates_per_prompt = r.candidates_per_prompt or 4
        r.algorithm = r.algorithm or "grpo"
        r.reward_source = r.reward_source or "reward_model"
        r.kl_coefficient = 0.04 if r.kl_coefficient is None else r.kl_coefficient
        r.policy_steps = r.policy_steps or 20
        r.min_margin = 1.0 if r.min_margin is None else r.min_margin
        r.max_new_tokens = r.max_new_tokens or 96
        r.policy_learning_rate = r.policy_learning_rate or 1e-5
    job.version_bump = job.version_bump or "minor"
    job.display_name = job.display_name or job.job_id


OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd")
PRECISIONS = ("fp32", "bf16", "fp16")
_SFT_METHODS = frozenset({Method.SFT_LORA, Method.SFT_QLORA, Method.RLAIF})


def chat_template_problem(template: str) -> str:
    """Why a chat template cannot be used ("" when it can): size, and Jinja syntax (parsed, never rendered here)."""
    if len(template.encode()) > 64 * 1024:
        return "chat_template is longer than 64 KiB"
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(template)
    except TemplateSyntaxError as exc:
        return f"chat_template is not a valid Jinja template: {exc.message} (line {exc.lineno})"
    if "messages" not in template:
        return "chat_template never reads `messages`: it would render every conversation the same"
    return ""


def _validate_sft_settings(job: TrainingJob, v: Violations) -> None:
    """Settings only the SFT stage honours are refused elsewhere rather than silently ignored."""
    h, hp = job.hyperparameters, "training_job.hyperparameters."
    if not 0 <= h.warmup_steps <= 1_000_000:
        v.add(hp + "warmup_steps", "warmup_steps must be in [0, 1000000] (0 = use warmup_fraction)")
    if h.optimizer and h.optimizer not in OPTIMIZERS:
        v.add(hp + "optimizer", f"optimizer must be one of {', '.join(OPTIMIZERS)} (empty = the device's default)")
    if h.precision and h.precision not in PRECISIONS:
        v.add(hp + "precision", "precision must be PRECISION_FP32, _BF16 or _FP16")
    if not 0 <= h.early_stopping_patience <= 1000:
        v.add(hp + "early_stopping_patience", "early_stopping_patience must be in [0, 1000] (0 = off)")
    elif h.early_stopping_patience and (h.eval_every_steps == 0 or (h.eval_split == 0 and not job.eval_dataset_uri)):
        v.add(
            hp + "early_stopping_patience",
            "early stopping needs evaluation: eval_interval_steps > 0 and an eval dataset or eval_fraction > 0",
        )
    if h.chat_template:
        problem = chat_template_problem(h.chat_template)
        if problem:
            v.add(hp + "chat_template", problem)
    for name in ("liger_kernels", "offload_activations"):
        if getattr(h, name) and job.resources.gpus == 0:
            v.add(hp + name, f"{name} runs on CUDA GPUs only: ask for resources.gpus > 0")
    if job.method is not None and job.method not in _SFT_METHODS:
        for name, set_ in (
            ("warmup_steps", h.warmup_steps), ("optimizer", h.optimizer), ("precision", h.precision),
            ("sequence_packing", h.sequence_packing is not None), ("train_on_inputs", h.train_on_inputs),
            ("early_stopping_patience", h.early_stopping_patience), ("chat_template", h.chat_template),
            ("liger_kernels", h.liger_kernels), ("offload_activations", h.offload_activations),
        ):  # fmt: skip
            if set_:
                v.add(hp + name, f"{name} applies to the SFT stage (SFT_LORA, SFT_QLORA, RLAIF), not {job.method.value}")
    if h.dpo_beta is not None:
        if job.method is not Method.DPO:
            what = "; RLAIF's DPO policy step takes rlaif.kl_beta" if job.method is Method.RLAIF else ""
            v.add(hp + "dpo_beta", f"dpo_beta applies to method DPO only{what}")
        elif not 0 < h.dpo_beta <= 100:
            v.add(hp + "dpo_beta", "dpo_beta must be in (0, 100]")
    rl = job.rlaif
    if not 0 <= rl.policy_learning_rate <= 1:
        v.add("training_job.rlaif.policy_learning_rate", "policy_learning_rate must be in [0, 1] (0 = 1e-5)")


def validate_job(job: TrainingJob, v: Violations) -> None:
    """Field rules that need no I/O. Paths, datasets and base models are checked by the use case."""
    p = "training_job."
    if job.method is None:
        v.add(p + "method", "method is required: TRAINING_METHOD_SFT_LORA, _SFT_QLORA, _RLAIF, _DPO, _REWARD_MODEL or _EXPORT")
    elif job.method not in SUPPORTED_METHODS:
        v.add(p + "method", f"method {job.method.value} is not available in this trainer")
    if job.method is Method.EXPORT:
        _validate_export(job, v)
        return
    if job.export.configured:
        v.add(p + "export", "export settings apply only to method EXPORT")
    rl = job.rlaif
    starts_from_version = job.method is Method.RLAIF and bool(rl.start_from_version)
    if not job.base_model.strip() and not starts_from_version:
        v.add(p + "base_model", "base_model is required (a directory, file:// URI or builtin:smollm2-135m-instruct)")
    if not job.dataset_uri.strip() and not starts_from_version:
        what = {
            Method.RLAIF: "the SFT dataset (or set rlaif.start_from_version to skip SFT)",
            Method.DPO: "a preference dataset (prompt/chosen/rejected)",
            Method.REWARD_MODEL: "a preference dataset (prompt/chosen/rejected)",
        }.get(job.method, "")  # type: ignore[arg-type]
        v.add(
            p + "dataset_uri",
            "dataset_uri is required (a JSONL file under one of the trainer's dataset roots)" + (f": {what}" if what else ""),
        )
    if job.method is Method.RLAIF:
        rp = p + "rlaif."
        if not rl.prompts_uri.strip():
            v.add(rp + "prompts_uri", "prompts_uri is required for RLAIF (JSONL of {prompt, reference?} under a dataset root)")
        if not rl.judge_version.strip():
            v.add(
                rp + "judge_version", "judge_version is required for RLAIF: projects/{project}/judges/{judge}/versions/{version}"
            )
        elif not _JUDGE_VERSION.match(rl.judge_version):
            v.add(
                rp + "judge_version",
                "judge_version must be projects/{project}/judges/{judge}/versions/{version} ({version} may be `latest`)",
            )
        if rl.start_from_version and not _MODEL_VERSION.match(rl.start_from_version):
            v.add(
                rp + "start_from_version",
                "start_from_version must be projects/{project}/models/{model}/versions/{version or alias}",
            )
        if rl.algorithm and rl.algorithm not in RLAIF_ALGORITHMS:
            v.add(rp + "algorithm", f"algorithm must be one of {', '.join(RLAIF_ALGORITHMS)}")
        if rl.reward_source and rl.reward_source not in REWARD_SOURCES:
            v.add(rp + "reward_source", f"reward_source must be one of {', '.join(REWARD_SOURCES)}")
        if not 0 <= rl.candidates_per_prompt <= 64:
            v.add(rp + "candidates_per_prompt", "candidates_per_prompt must be in [0, 64] (0 = 4); RLAIF needs at least 2")
        elif rl.candidates_per_prompt == 1:
            v.add(rp + "candidates_per_prompt", "candidates_per_prompt must be at least 2: preferences compare candidates")
        if not 0 <= rl.policy_steps <= 100000:
            v.add(rp + "policy_steps", "policy_steps must be in [0, 100000]")
        if rl.kl_coefficient is not None and rl.kl_coefficient < 0:
            v.add(rp + "kl_beta", "kl_beta (or the deprecated kl_coefficient) must not be negative")
        elif rl.kl_coefficient == 0 and rl.algorithm == "dpo":
            v.add(rp + "kl_beta", "kl_beta must be > 0 for DPO (it scales the preference loss); 0 is for GRPO/RLOO")
        if rl.min_margin is not None and rl.min_margin < 0:
            v.add(rp + "min_score_margin", "min_score_margin (or the deprecated min_margin) must not be negative")
        if not 0 <= rl.max_new_tokens <= 4096:
            v.add(rp + "max_new_tokens", "max_new_tokens must be in [0, 4096]")
        if rl.reward_model_backbone and len(rl.reward_model_backbone) > 2048:
            v.add(rp + "reward_model_backbone", "reward_model_backbone is too long")
    elif job.method is not None and rl.configured:
        v.add(p + "rlaif", f"rlaif settings apply only to method RLAIF, not {job.method.value}")
    if job.method is Method.DPO and job.eval_dataset_uri:
        v.add(p + "eval_dataset_uri", "DPO does not use an evaluation dataset; leave eval_dataset_uri empty")
    if not job.target_model:
        v.add(p + "target_model", "target_model is required: the registry model, projects/{project}/models/{model}")
    else:
        try:
            TARGET_MODEL.parse(job.target_model, p + "target_model")
        except Exception as exc:  # noqa: BLE001 - re-reported as a violation
            v.add(p + "target_model", str(exc))
    if job.version_bump and job.version_bump not in VERSION_BUMPS:
        v.add(p + "version_bump", f"version_bump must be one of {', '.join(VERSION_BUMPS)}")
    if len(job.display_name) > 200:
        v.add(p + "display_name", "display_name is longer than 200 characters")
    h = job.hyperparameters
    hp = p + "hyperparameters."
    if not 0 <= h.learning_rate <= 1:
        v.add(hp + "learning_rate", "learning_rate must be in [0, 1]")
    if h.num_epochs < 0 or h.num_epochs > 1000:
        v.add(hp + "num_epochs", "num_epochs must be in [0, 1000]")
    for name in (
        "max_steps",
        "batch_size",
        "gradient_accumulation_steps",
        "max_seq_length",
        "checkpoint_every_steps",
    ):
        if getattr(h, name) < 0:
            v.add(hp + name, f"{name} must not be negative")
    if h.eval_every_steps is not None and h.eval_every_steps < 0:
        v.add(
            hp + "eval_interval_steps",
            "eval_interval_steps (or the deprecated eval_every_steps) must not be negative (0 = evaluate only at the end)",
        )
    if h.seed is not None and h.seed < 0:
        v.add(hp + "random_seed", "random_seed (or the deprecated seed) must not be negative")
    if h.batch_size > 1024:
        v.add(hp + "batch_size", "batch_size must be at most 1024")
    if h.max_seq_length > 131072:
        v.add(hp + "max_seq_length", "max_seq_length must be at most 131072")
    if h.warmup_ratio is not None and not 0 <= h.warmup_ratio < 1:
        v.add(hp + "warmup_fraction", "warmup_fraction (or the deprecated warmup_ratio) must be in [0, 1)")
    if h.weight_decay < 0:
        v.add(hp + "weight_decay", "weight_decay must not be negative")
    if h.eval_split is not None and not 0 <= h.eval_split < 1:
        v.add(hp + "eval_fraction", "eval_fraction (or the deprecated eval_split) must be in [0, 1)")
    if h.max_grad_norm is not None and h.max_grad_norm < 0:
        v.add(
            hp + "gradient_clip_norm",
            "gradient_clip_norm (or the deprecated max_grad_norm) must not be negative (0 = no clipping)",
        )
    if h.lr_scheduler and h.lr_scheduler not in LR_SCHEDULERS:
        v.add(hp + "lr_scheduler", f"lr_scheduler must be one of {', '.join(sorted(LR_SCHEDULERS))}")
    _validate_sft_settings(job, v)
    lo = job.lora
    if not 0 <= lo.r <= 1024:
        v.add(p + "lora.r", "r must be in [0, 1024]")
    if lo.alpha < 0:
        v.add(p + "lora.alpha", "alpha must not be negative")
    if lo.dropout is not None and not 0 <= lo.dropout < 1:
        v.add(p + "lora.lora_dropout", "lora_dropout (or the deprecated dropout) must be in [0, 1)")
    for i, module in enumerate(lo.target_modules):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]{0,127}", module):
            v.add(f"{p}lora.target_modules[{i}]", f"{module!r} is not a module name")
    _validate_placement(job, v)


def _validate_placement(job: TrainingJob, v: Violations) -> None:
    """Resources, priority and labels: the same rules for every method."""
    p = "training_job."
    r = job.resources
    if not 0 <= r.gpus <= 64:
        v.add(p + "resources.gpus", "gpus must be in [0, 64] (0 = CPU only)")
    if not 0 <= r.processes <= 64:
        v.add(p + "resources.processes", "processes must be in [0, 64] (0 = one per GPU, or 1)")
    elif r.gpus and r.processes and r.processes != r.gpus:
        v.add(p + "resources.processes", f"with GPUs, processes must equal gpus ({r.gpus}): one process per GPU")
    elif r.world_size > 1 and job.method not in (Method.SFT_LORA, Method.SFT_QLORA, None):
        v.add(p + "resources.processes", f"{job.method.value} trains in one process: leave processes 0 and gpus at most 1")
    low, high = PRIORITY_RANGE
    if not low <= job.priority <= high:
        v.add(p + "priority", f"priority must be in [{low}, {high}] (higher runs first; default 0)")
    if len(job.labels) > 64:
        v.add(p + "labels", "at most 64 labels")
    for key, value in job.labels.items():
        if not _LABEL_KEY.match(key):
            v.add(f"{p}labels.{key}", "label keys are 1-63 lowercase letters, digits, _ or -, starting with a letter")
        if len(value) > 256:
            v.add(f"{p}labels.{key}", "label values are at most 256 characters")


def _validate_export(job: TrainingJob, v: Violations) -> None:
    """An EXPORT job names a version, a format and a quantization; base and target model come from the version."""
    p = "training_job."
    e = job.export
    if not e.model_version:
        v.add(p + "export.model_version", "model_version is required: projects/{project}/models/{model}/versions/{version}")
    elif not _MODEL_VERSION.match(e.model_version):
        v.add(p + "export.model_version", "model_version must be projects/{project}/models/{model}/versions/{version or alias}")
    if e.format not in EXPORT_QUANTIZATIONS:
        v.add(p + "export.format", "format is required: EXPORT_FORMAT_MERGED, _GGUF or _GGUF_LORA")
    elif e.quantization and e.quantization not in EXPORT_QUANTIZATIONS[e.format]:
        v.add(p + "export.quantization", f"{e.format} quantization is one of {', '.join(EXPORT_QUANTIZATIONS[e.format])}")
    for attr in ("base_model", "dataset_uri", "eval_dataset_uri", "target_model"):
        if getattr(job, attr):
            v.add(p + attr, f"an EXPORT job takes {attr} from nothing but the version: leave it empty")
    if job.rlaif.configured:
        v.add(p + "rlaif", "rlaif settings apply only to method RLAIF, not EXPORT")
    if len(job.display_name) > 200:
        v.add(p + "display_name", "display_name is longer than 200 characters")
    _validate_placement(job, v)


# -- state machine -------------------------------------------------------------------------------


def cancel_transition(state: JobState) -> JobState | None:
    """Next state when a cancel is requested; None means "nothing to do" (already cancelled/cancelling).

    Raises ValueError for finished jobs (the use case maps it to FAILED_PRECONDITION).
    """
    if state in (JobState.QUEUED, JobState.PAUSED):
        return JobState.CANCELLED
    if state in (JobState.RUNNING, JobState.PAUSING):
        return JobState.CANCELLING
    if state in (JobState.CANCELLING, JobState.CANCELLED):
        return None
    raise ValueError(f"the job already {state.value.lower()}; only queued, running or paused jobs can be cancelled")


def pause_transition(state: JobState) -> JobState | None:
    """Next state when a pause is requested (None: already pausing or paused). A queued job is simply held;
    a running one saves a checkpoint first. Raises ValueError when there is nothing to pause."""
    if state is JobState.QUEUED:
        return JobState.PAUSED
    if state is JobState.RUNNING:
        return JobState.PAUSING
    if state in (JobState.PAUSING, JobState.PAUSED):
        return None
    raise ValueError(f"the job is {state.value.lower()}; only queued or running jobs can be paused")


def resume_transition(state: JobState) -> JobState | None:
    """Next state when a resume is requested (None: not paused, nothing to do for a queued or running job)."""
    if state is JobState.PAUSED:
        return JobState.QUEUED
    if state in (JobState.QUEUED, JobState.RUNNING):
        return None
    if state is JobState.PAUSING:
        raise ValueError("the job is still saving its checkpoint; resume it once it is paused")
    raise ValueError(f"the job is {state.value.lower()}; only paused jobs can be resumed")


def registration_request_id(job_name: str) -> str:
    """Deterministic UUID for CreateModelVersion: the same for every attempt of the same job."""
    return str(uuid.uuid5(REGISTRATION_NAMESPACE, job_name))


def hyperparameters_as_strings(job: TrainingJob) -> dict[str, str]:
    """Lineage form of the effective hyperparameters and LoRA settings (compared key by key by the registry)."""
    h, lo = job.hyperparameters, job.lora
    out: dict[str, Any] = {
        "learning_rate": h.learning_rate, "num_epochs": h.num_epochs, "max_steps": h.max_steps,
        "batch_size": h.batch_size, "gradient_accumulation_steps": h.gradient_accumulation_steps,
        "max_seq_length": h.max_seq_length, "warmup_ratio": h.warmup_ratio, "weight_decay": h.weight_decay,
        "seed": h.seed, "lr_scheduler": h.lr_scheduler, "max_grad_norm": h.max_grad_norm,
        "gradient_checkpointing": str(h.gradient_checkpointing).lower(), "eval_split": h.eval_split,
        "lora_r": lo.r, "lora_alpha": lo.alpha, "lora_dropout": lo.dropout,
        "lora_target_modules": ",".join(lo.target_modules) or "auto",
    }  # fmt: skip
    if job.method in (Method.SFT_LORA, Method.SFT_QLORA, Method.RLAIF):
        out.update({
            "warmup_steps": h.warmup_steps, "optimizer": h.optimizer or "auto", "precision": h.precision or "auto",
            "sequence_packing": str(h.sequence_packing is not False).lower(), "train_on_inputs": str(h.train_on_inputs).lower(),
            "early_stopping_patience": h.early_stopping_patience,
            "chat_template": "custom" if h.chat_template else "base",
            "liger_kernels": str(h.liger_kernels).lower(), "offload_activations": str(h.offload_activations).lower(),
        })  # fmt: skip
    if job.method is Method.DPO:
        out["dpo_beta"] = h.dpo_beta
    if job.method is Method.RLAIF:
        r = job.rlaif
        out.update({
            "rlaif_algorithm": r.algorithm, "rlaif_reward_source": r.reward_source,
            "rlaif_candidates_per_prompt": r.candidates_per_prompt, "rlaif_kl_coefficient": r.kl_coefficient,
            "rlaif_policy_steps": r.policy_steps, "rlaif_min_margin": r.min_margin,
            "rlaif_max_new_tokens": r.max_new_tokens, "rlaif_reward_model_backbone": r.reward_model_backbone or "all-minilm-l6-v2",
            "rlaif_prompts_uri": r.prompts_uri, "rlaif_prompts_digest": r.prompts_digest,
            "rlaif_qlora": str(r.qlora).lower(), "rlaif_policy_learning_rate": r.policy_learning_rate,
        })  # fmt: skip
    return {k: str(v) for k, v in out.items()}


def lineage_method(job: TrainingJob) -> str:
    """`sft-lora`, `sft-qlora`, `rlaif-grpo` / `rlaif-rloo` / `rlaif-dpo`, `dpo`, `reward-model`."""
    if job.method is Method.RLAIF:
        return f"rlaif-{job.rlaif.algorithm or 'grpo'}"
    return job.method.lineage_name if job.method else ""


def dataset_problem_violations(field_path: str, problems: list[Any], limit: int = 10) -> Violations:
    """Line-numbered dataset problems as field violations (first `limit`)."""
    v = Violations()
    for problem in problems[:limit]:
        v.add(field_path, str(problem))
    return v
