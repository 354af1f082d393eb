"""Training one job with neuroweaver_ml: `Training` (SFT) and the methods built on it, each giving an `Outcome`.

Training runs on a thread (the ML code is synchronous); its events are mapped (events.py) and committed
before it goes on, and `stop` (SIGTERM, a cancel, a lost lease) ends it after the current step. Every stage
writes under the job's directory, so a later attempt resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from neuroweaver_ml.control import StopSignal, is_main_process

from ..domain.job import EventType, JobEvent, Method, TrainingJob, quantized_base
from .config import WorkerConfig
from .events import EventMapper
from .journal import Journal


class JobFailed(Exception):
    """A failure with a reason a person can act on."""


T = TypeVar("T")


def effective(value: T | None) -> T:
    """A setting of a stored job: create's apply_defaults gave every optional setting its value."""
    if value is None:
        raise JobFailed("the stored job has an unset setting; it was not created through the service")
    return value


@dataclass
class Outcome:
    """What a method's training produced, in the form registration needs."""

    status: str  # completed | cancelled
    message: str  # summary (notes / cancel message)
    adapter_dir: str = ""
    adapter_sha256: str = ""
    report_path: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    extra_artifacts: list[tuple[str, str]] = field(default_factory=list)  # (local path, name in the store)
    parent_version: str = ""
    judge_version: str = ""
    dataset_uri: str = ""
    dataset_digest: str = ""


def sft_cancel_message(result) -> str:
    return f"cancelled at step {result.global_step}; last checkpoint kept: {result.last_checkpoint or 'none'}"


def sft_metrics(result) -> dict[str, float]:
    values = {
        "train_loss": result.train_loss if result.train_loss is not None else result.final_step_loss,
        "eval_loss": result.eval_loss,
    }
    return {k: v for k, v in values.items() if v is not None}


class Training:
    """SFT_LORA / SFT_QLORA: the `sft` stage. Subclasses train the other methods (`for_job` picks)."""

    def __init__(self, cfg: WorkerConfig, job: TrainingJob, journal: Journal, stop: StopSignal) -> None:
        self.cfg = cfg
        self.job = job
        self.journal = journal
        self.stop = stop
        self.events = EventMapper(journal.attempt)

    @staticmethod
    def for_job(cfg: WorkerConfig, job: TrainingJob, journal: Journal, stop: StopSignal) -> Training:
        from .preferences import PreferenceTraining
        from .rlaif import RlaifTraining
        from .tracking import Tracked

        kind: dict[Method | None, type[Training]] = {
            Method.RLAIF: RlaifTraining,
            Method.DPO: PreferenceTraining,
            Method.REWARD_MODEL: PreferenceTraining,
        }
        training = kind.get(job.method, Training)(cfg, job, journal, stop)
        tracked = job.tracking.configured and is_main_process()  # one run per job: rank 0 of several logs it
        return Tracked(training) if tracked else training  # MLflow / TensorBoard: worker/tracking.py

    async def train(self) -> Outcome:
        job = self.job
        result = await self.sft_stage()
        if result.status == "cancelled":
            return Outcome("cancelled", sft_cancel_message(result))
        return Outcome(
            "completed", f"{result.global_step} steps", adapter_dir=result.adapter_dir, adapter_sha256=result.adapter_sha256,
            report_path=result.report_path, metrics=sft_metrics(result), dataset_uri=job.dataset_uri, dataset_digest=job.dataset_digest,
        )  # fmt: skip

    # -- shared by the methods -------------------------------------------------------------------

    def on_event(self, ev) -> None:
        """Called by run_sft / run_rlaif / run_dpo / run_reward_model on the training thread; blocks until the event
        row is committed."""
        mapped = self.events.map(ev)
        if mapped is None:
            return
        if mapped.event.type is EventType.STAGE_STARTED:
            self.job.stage = mapped.event.stage
        self.journal.write_from_thread(mapped.event, **mapped.job_values)

    async def start_stage(self, stage: str, message: str) -> None:
        self.job.stage = self.events.stage = stage
        await self.journal.write(
            JobEvent(EventType.STAGE_STARTED, stage=stage, message=f"attempt {self.journal.attempt}: {message}"), stage=stage
        )

    def job_dir(self) -> Path:
        cfg = self.cfg
        return Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else Path(cfg.data_dir) / "jobs" / self.job.job_id

    async def base_dir(self) -> str:
        from neuroweaver_ml import ModelNotFound, PathError, resolve_base_model

        try:
            return str(await asyncio.to_thread(resolve_base_model, self.job.base_model, self.cfg.model_cache_dir or None))
        except (ModelNotFound, PathError) as exc:
            raise JobFailed(f"base model is no longer available: {exc}") from None

    async def input_file(self, uri: str, digest: str, what: str) -> str:
        """Local path of a dataset/prompt file, refusing one that changed since the job was submitted."""
        from neuroweaver_ml import digest_path, uri_to_path

        path = uri_to_path(uri)
        try:
            actual = (await asyncio.to_thread(digest_path, path))[0]
        except OSError as exc:
            raise JobFailed(f"{what} {uri} cannot be read any more: {exc}") from None
        if digest and actual != digest:
            raise JobFailed(
                f"{what} {uri} changed since the job was submitted (sha256 {actual[:12]}…, submitted {digest[:12]}…); submit a new job"
            )
        return str(path)

    def sft_config(self, base_dir: str, train_file: str, eval_file: str | None):
        """The SFTConfig of the job's `sft` stage: its stored (effective) settings, zeros included, as written."""
        from neuroweaver_ml import SFTConfig

        job = self.job
        h, lo = job.hyperparameters, job.lora
        return SFTConfig(
            base_model_dir=base_dir, train_file=train_file, output_dir=str(self.job_dir() / "run"), eval_file=eval_file,
            eval_fraction=0.0 if eval_file else effective(h.eval_split), method="qlora" if quantized_base(job) else "lora",
            lora_r=lo.r, lora_alpha=lo.alpha, lora_dropout=effective(lo.dropout), target_modules=list(lo.target_modules) or None,
            learning_rate=h.learning_rate, num_epochs=h.num_epochs, max_steps=h.max_steps if h.max_steps > 0 else -1,
            batch_size=h.batch_size, grad_accumulation=h.gradient_accumulation_steps, max_seq_length=h.max_seq_length,
            warmup_ratio=effective(h.warmup_ratio), lr_scheduler=h.lr_scheduler, weight_decay=h.weight_decay,
            max_grad_norm=effective(h.max_grad_norm), seed=effective(h.seed), checkpoint_every_steps=h.checkpoint_every_steps,
            eval_every_steps=effective(h.eval_every_steps), gradient_checkpointing=effective(h.gradient_checkpointing),
            # settings added later read back as their defaults from jobs stored before them
            warmup_steps=h.warmup_steps, optim=h.optimizer, precision=h.precision or "auto",
            padding_free=h.sequence_packing is not False, completion_only_loss=not h.train_on_inputs,
            early_stopping_patience=h.early_stopping_patience, chat_template=h.chat_template or None,
            liger_kernels=h.liger_kernels, offload_activations=h.offload_activations,
            base_model_ref=job.base_model, adapter_name=job.name,
        )  # fmt: skip

    async def sft_stage(self):
        """The `sft` stage (SFT methods, and RLAIF's first stage); resumes from its newest checkpoint."""
        from neuroweaver_ml import DatasetInvalid, ResumeMismatch, run_sft, uri_to_path

        job = self.job
        qlora = " (QLoRA: 4-bit NF4 base)" if quantized_base(job) else ""
        await self.start_stage("sft", f"{job.method.value}{qlora} on {job.base_model}")
        base_dir = await self.base_dir()
        train_file = await self.input_file(job.dataset_uri, job.dataset_digest, "dataset")
        eval_file = uri_to_path(job.eval_dataset_uri) if job.eval_dataset_uri else None
        sft = self.sft_config(base_dir, train_file, str(eval_file) if eval_file else None)
        try:
            result = await asyncio.to_thread(run_sft, sft, self.on_event, self.stop)
        except (DatasetInvalid, ResumeMismatch) as exc:
            raise JobFailed(str(exc)) from None
        except ValueError as exc:
            raise JobFailed(f"invalid training configuration: {exc}") from None
        except MemoryError:
            raise JobFailed("out of memory: lower batch_size or max_seq_length, or use SFT_QLORA") from None
        if result.status != "cancelled":
            metrics = sft_metrics(result)
            await self.journal.write(
                JobEvent(
                    EventType.STAGE_COMPLETED,
                    stage="sft",
                    metrics=metrics,
                    message=f"trained {result.global_step} steps, {result.tokens_seen} tokens"
                    + (f"; early stopping kept step {result.best_step}'s weights" if result.best_step else ""),
                ),
                current_step=result.global_step,
                total_steps=result.total_steps,
                metrics=metrics,
            )
        return result
