"""`python -m neuroweaver_trainer.worker --job projects/p/trainingJobs/j ...`: runs ONE training job.

Started by the trainer's scheduler as a subprocess (local executor) or as the container command of a
Kubernetes Job. It reads the job from the database, trains with neuroweaver_ml (checkpoints every N steps,
resuming from the newest complete checkpoint of an earlier attempt), writes every step/eval/checkpoint/stage
as a durable event (gap-free sequence, NOTIFY on PostgreSQL), stores the adapter, tokenizer, report and model
card in the artifact store, registers exactly one registry version (deterministic request_id) and writes the
final state. Every write is fenced by the attempt number, so a worker that lost its lease cannot write.

The job runs under a span whose parent is the traceparent stored at CreateTrainingJob, so training and the
registry's CreateModelVersion belong to the trace of the call that created the job (spans are exported only
with --trace-file; without one the trace id still propagates and appears in the JSON logs).

SIGTERM stops training after the current step: the job becomes CANCELLED when a cancel was requested,
otherwise (trainer shutdown) the worker exits with code 75 and the job is resumed later.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from neuroweaver_runtime import telemetry
from neuroweaver_runtime.auth import ANONYMOUS_ADMIN, Principal, Role, acting_as
from neuroweaver_runtime.client import ClientTLS
from neuroweaver_runtime.config import default_data_dir, load_config
from neuroweaver_runtime.db import Database
from neuroweaver_runtime.logs import configure_logging, trace_id_var
from neuroweaver_runtime.process import die_with_parent
from neuroweaver_runtime.timestamps import utcnow

from ..adapters.executors import EXIT_INTERRUPTED
from ..adapters.repository import JobRepository, job_from_row, notify_key
from ..domain.job import (
    EventType,
    JobEvent,
    JobState,
    Method,
    StepMetrics,
    TrainingJob,
    hyperparameters_as_strings,
    lineage_method,
    registration_request_id,
)

log = logging.getLogger("neuroweaver.trainer.worker")

_tracer = trace.get_tracer("neuroweaver.trainer.worker")


def _as_creator(job: TrainingJob):
    """The registry authorizes the job's creator, not the trainer: a job can only register where its creator may
    (with auth off the creator is anonymous and the trainer's own token is used as it is)."""
    if not job.creator or job.creator == ANONYMOUS_ADMIN.subject:
        return contextlib.nullcontext()
    return acting_as(Principal(job.creator, job.name.split("/")[1], Role.OPERATOR))


_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass
class WorkerConfig:
    job: str = field(default="", metadata={"help": "training job name, projects/{project}/trainingJobs/{job}"})
    attempt: int = field(default=0, metadata={"help": "attempt number (fencing token); 0 = the job's current attempt"})
    database_url: str = field(default="", metadata={"help": "the trainer's database"})
    data_dir: str = field(default_factory=default_data_dir, metadata={"help": "data directory (work dirs, artifacts)"})
    artifacts_dir: str = field(default="", metadata={"help": "artifact store directory; default <data dir>/artifacts"})
    checkpoint_dir: str = field(default="", metadata={"help": "where checkpoints live (a PVC on Kubernetes)"})
    registry_target: str = field(default="127.0.0.1:50051", metadata={"help": "registry gRPC address"})
    registry_token: str = field(default="", metadata={"help": "bearer token for the registry"})
    registry_retry_seconds: float = field(default=120.0, metadata={"help": "keep retrying an unreachable registry this long"})
    client_tls_ca: str = field(default="", metadata={"help": "CA bundle (PEM) that verifies the registry; set = TLS"})
    client_tls_cert: str = field(default="", metadata={"help": "client certificate (PEM) for mTLS"})
    client_tls_key: str = field(default="", metadata={"help": "private key (PEM) of --client-tls-cert"})
    model_cache_dir: str = field(default="", metadata={"help": "converted builtin models cache"})
    die_with_parent: bool = field(default=False, metadata={"help": "exit when the trainer process dies (local executor)"})
    notify_fd: int = field(
        default=-1, metadata={"help": "pipe to the local trainer: each committed event's `<job key>:<sequence>` is written to it"}
    )
    rlaif_judge_chunk_size: int = field(
        default=16, metadata={"help": "RLAIF: verdicts per JUDGE progress event (and per cancel check)"}
    )
    stop_poll_seconds: float = field(default=1.0, metadata={"help": "how often the job's state is checked for a cancel"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING, ERROR"})
    trace_file: str = field(default="", metadata={"help": "write OpenTelemetry spans as JSON lines to this file"})


# Registry metric directions of what the trainer reports (unlisted names: the registry infers them).
HIGHER = (
    "reward_model_accuracy",
    "reward_model_mean_margin",
    "judge_win_rate_vs_parent",
    "judge_win_rate_vs_base",
    "dpo_reward_accuracy",
    "dpo_reward_margin",
    "policy_final_reward",
    "preference_pairs",
)
LOWER = ("train_loss", "eval_loss", "judge_cost_usd", "malformed", "policy_final_loss", "judge_errors")
# the pipeline's stage names → the contract's (TrainingJobEvent.stage)
_STAGE_NAMES = {"preferences": "pairs"}


def metric_direction(name: str) -> str:
    base = name.removesuffix("_ci_low").removesuffix("_ci_high")
    return "higher" if base in HIGHER else "lower" if base in LOWER else ""


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


def _numeric(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


class JobFailed(Exception):
    """A failure with a reason a person can act on."""


class Fenced(Exception):
    """This attempt no longer owns the job."""


class Worker:
    def __init__(self, cfg: WorkerConfig, stop: threading.Event) -> None:
        self.cfg = cfg
        self.stop = stop
        # checked before any training: unreadable certificates would otherwise fail only at registration
        self.registry_tls = ClientTLS.from_config(cfg)
        self.db = Database(cfg.database_url)
        self.pk = 0
        self.attempt = 0
        self.job: TrainingJob | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fenced = False
        self._stage_name = "sft"  # the running stage (checkpoint/resumed events carry no stage)

    # -- database writes (fenced by attempt) -----------------------------------------------------

    async def _event(self, event: JobEvent, **job_values) -> None:
        event.create_time = event.create_time or utcnow()
        async with self.db.transaction() as s:
            repo = JobRepository(s)
            sequence = await repo.append_event(self.pk, event, fence_attempt=self.attempt)
            if sequence is None:
                raise Fenced()
            if job_values:
                await repo.update_job(self.pk, fence_attempt=self.attempt, **job_values)
        if self.cfg.notify_fd >= 0:  # after the commit: a woken watcher must find the event
            try:
                os.write(self.cfg.notify_fd, f"{notify_key(self.pk)}:{sequence}\n".encode())
            except OSError:  # the trainer is gone (we die with it) or closed the pipe: watchers still poll
                pass

    def _event_from_thread(self, event: JobEvent, **job_values) -> None:
        assert self.loop is not None
        try:
            asyncio.run_coroutine_threadsafe(self._event(event, **job_values), self.loop).result()
        except Fenced:
            self.fenced = True
            self.stop.set()

    async def _finish(self, state: JobState, message: str, **values) -> None:
        now = utcnow()
        values.update(state=state.value, end_time=now, lease_owner="", lease_expires_at=0.0)
        if state is JobState.FAILED:
            values["error"] = message
        await self._event(
            JobEvent(
                EventType.STATE_CHANGED, stage=self.job.stage if self.job else "", state=state, message=message, create_time=now
            ),
            **values,
        )

    async def _state(self) -> tuple[str, int] | None:
        async with self.db.transaction() as s:
            row = await JobRepository(s).job_row_by_id(self.pk)
        return (row.state, row.attempts) if row else None

    async def _watch_cancel(self) -> None:
        """Kubernetes workers get no signal on cancel: poll the job's state (cheap) and stop on CANCELLING."""
        while not self.stop.is_set():
            await asyncio.sleep(self.cfg.stop_poll_seconds)
            try:
                current = await self._state()
            except Exception:  # noqa: BLE001
                continue
            if current is None or current[1] != self.attempt:
                self.fenced = True
                self.stop.set()
            elif current[0] == JobState.CANCELLING.value:
                self.stop.set()

    # -- the job ---------------------------------------------------------------------------------

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        try:
            async with self.db.transaction() as s:
                row = await JobRepository(s).job_row(self.cfg.job)
            if row is None:
                log.error("training job %s does not exist", self.cfg.job)
                return 2
            self.pk, self.job = row.id, job_from_row(row)
            self.attempt = self.cfg.attempt or row.attempts
            if row.attempts != self.attempt or row.state not in (JobState.RUNNING.value, JobState.CANCELLING.value):
                log.warning(
                    "job %s is %s at attempt %s; this is attempt %s: nothing to do",
                    row.name,
                    row.state,
                    row.attempts,
                    self.attempt,
                )
                return 0
            parent = TraceContextTextMapPropagator().extract({"traceparent": row.trace_parent}) if row.trace_parent else None
            with _tracer.start_as_current_span(
                "TrainingJob/run", context=parent, kind=SpanKind.INTERNAL,
                attributes={"neuroweaver.training_job": row.name, "neuroweaver.attempt": self.attempt},
            ) as span:  # fmt: skip
                trace_id_var.set(format(span.get_span_context().trace_id, "032x"))
                watcher = asyncio.create_task(self._watch_cancel())
                try:
                    return await self._run_job()
                finally:
                    watcher.cancel()
        except Fenced:
            log.warning("attempt %s of %s lost its lease; stopping without writing", self.attempt, self.cfg.job)
            return 0
        finally:
            await self.db.dispose()

    async def _run_job(self) -> int:
        job = self.job
        assert job is not None
        try:
            outcome = await self._train(job)
        except JobFailed as exc:
            await self._finish(JobState.FAILED, str(exc))
            return 0
        except Fenced:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure ends as FAILED with its reason
            log.exception("training %s failed", job.name)
            await self._finish(JobState.FAILED, f"training failed: {type(exc).__name__}: {exc}")
            return 0
        if self.fenced:
            raise Fenced()
        if outcome.status == "cancelled":
            current = await self._state()
            if current and current[0] == JobState.CANCELLING.value:
                await self._finish(JobState.CANCELLED, outcome.message)
                return 0
            log.info("interrupted (%s, shutdown); the job will resume from its last checkpoint", outcome.message)
            return EXIT_INTERRUPTED
        metrics = outcome.metrics
        job.stage = "register"
        await self._event(
            JobEvent(EventType.STAGE_STARTED, stage="register", message="storing artifacts and registering the version"),
            stage="register",
            metrics=metrics,
        )
        try:
            output_uri, adapter_uri, sha, size = await asyncio.to_thread(self._store, job, outcome)
            version = await self._register(job, outcome, adapter_uri, sha, size)
        except JobFailed as exc:
            await self._finish(JobState.FAILED, str(exc), output_uri=locals().get("output_uri", ""))
            return 0
        await self._event(
            JobEvent(EventType.REGISTERED, stage="register", message=version, metrics=metrics),
            model_version=version,
            output_uri=output_uri,
        )
        await self._finish(JobState.SUCCEEDED, f"registered {version}")
        return 0

    def _job_dir(self, job: TrainingJob) -> Path:
        return Path(self.cfg.checkpoint_dir) if self.cfg.checkpoint_dir else Path(self.cfg.data_dir) / "jobs" / job.job_id

    def _work_dir(self, job: TrainingJob) -> Path:
        return self._job_dir(job) / "run"

    async def _base_dir(self, job: TrainingJob) -> str:
        from neuroweaver_ml import ModelNotFound, PathError, resolve_base_model

        try:
            return str(await asyncio.to_thread(resolve_base_model, job.base_model, self.cfg.model_cache_dir or None))
        except (ModelNotFound, PathError) as exc:
            raise JobFailed(f"base model is no longer available: {exc}") from None

    async def _input_file(self, uri: str, digest: str, what: str) -> str:
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

    async def _train_rlaif(self, job: TrainingJob) -> Outcome:
        """Stage `sft` (unless start_from_version), then run_rlaif: generate, judge, pairs, reward_model, policy,
        evaluate, all under the job's directory so that a re-claimed job resumes where the last attempt stopped."""
        from neuroweaver_ml import DatasetInvalid, DigestMismatch, ResumeMismatch, uri_to_path, verify_digest
        from neuroweaver_ml.rlaif import JudgeConfig, JudgeConfigError, RlaifConfig, run_rlaif

        r, h, lo = job.rlaif, job.hyperparameters, job.lora
        metrics: dict[str, float] = {}
        if r.start_from_version:
            parent_dir = uri_to_path(r.parent_artifact_uri)
            try:
                await asyncio.to_thread(verify_digest, parent_dir, r.parent_artifact_sha256)
            except DigestMismatch as exc:
                raise JobFailed(
                    f"the adapter of {r.start_from_version} at {r.parent_artifact_uri} does not match its registered sha256: {exc}"
                ) from None
            except OSError as exc:
                raise JobFailed(
                    f"the adapter of {r.start_from_version} cannot be read at {r.parent_artifact_uri}: {exc}"
                ) from None
            await self._event(
                JobEvent(
                    EventType.LOG,
                    stage="sft",
                    message=f"attempt {self.attempt}: SFT skipped; starting from {r.start_from_version} ({r.parent_artifact_uri})",
                )
            )
        else:
            sft = await self._run_sft_stage(job)
            if sft.status == "cancelled":
                return Outcome("cancelled", "sft: " + self._sft_cancel_message(sft))
            parent_dir, metrics = Path(sft.adapter_dir), self._sft_metrics(sft)
        base_dir = await self._base_dir(job)
        prompts = await self._input_file(r.prompts_uri, r.prompts_digest, "prompt file")
        eval_prompts = (
            await self._input_file(r.eval_prompts_uri, r.eval_prompts_digest, "eval prompt file") if r.eval_prompts_uri else None
        )
        try:
            judge = JudgeConfig(**r.judge)
        except (JudgeConfigError, TypeError) as exc:
            raise JobFailed(f"judge version {r.judge_version} is not usable: {exc}") from None
        cfg = RlaifConfig(
            base_model_dir=base_dir, prompts_file=prompts, output_dir=str(self._job_dir(job) / "rlaif"), judge=judge,
            eval_prompts_file=eval_prompts, parent_adapter_dir=str(parent_dir), candidates_per_prompt=r.candidates_per_prompt,
            algorithm=r.algorithm, reward_source=r.reward_source, reward_model_backbone=r.reward_model_backbone,  # type: ignore[arg-type]
            # the reward model is trained when the policy uses it, and for DPO (its held-out pairwise accuracy on
            # the judge's pairs is reported); GRPO/RLOO rewarded by the judge alone skip the stage
            train_reward_model=r.algorithm == "dpo" or r.reward_source != "judge",
            kl_coefficient=r.kl_coefficient, policy_steps=r.policy_steps, min_margin=r.min_margin, max_new_tokens=r.max_new_tokens,
            judge_chunk_size=max(1, self.cfg.rlaif_judge_chunk_size), max_length=h.max_seq_length, lora_r=lo.r,
            lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=list(lo.target_modules) or None,
            checkpoint_every_steps=h.checkpoint_every_steps, seed=h.seed, base_model_ref=job.base_model, adapter_name=job.name,
        )  # fmt: skip
        self._stage_name = "generate"
        try:
            result = await asyncio.to_thread(run_rlaif, cfg, self._on_event, self.stop.is_set)
        except (DatasetInvalid, ResumeMismatch, JudgeConfigError) as exc:
            raise JobFailed(str(exc)) from None
        except ValueError as exc:
            raise JobFailed(f"RLAIF cannot continue: {exc}") from None
        except MemoryError:
            raise JobFailed("out of memory: lower max_new_tokens, candidates_per_prompt or max_seq_length") from None
        if result.status == "cancelled":
            return Outcome("cancelled", f"cancelled in stage {self._stage_name}; completed stages and checkpoints kept")
        metrics.update(_numeric(result.metrics))
        metrics["judge_errors"] = float(result.judge_errors)
        return Outcome(
            "completed", f"{result.policy.global_step if result.policy else 0} policy steps ({result.algorithm}), "
            f"{result.judged} verdicts by {result.judge_version}", adapter_dir=str(result.adapter_dir),
            adapter_sha256=str(result.adapter_sha256), report_path=result.report_path, metrics=metrics,
            extra_artifacts=[(str(Path(result.output_dir) / n), n) for n in ("preferences.jsonl", "evaluation.json") if (Path(result.output_dir) / n).is_file()],
            parent_version=r.start_from_version, judge_version=result.judge_version,
            dataset_uri=job.dataset_uri or r.prompts_uri, dataset_digest=job.dataset_digest or r.prompts_digest,
        )  # fmt: skip

    async def _train_preferences(self, job: TrainingJob) -> Outcome:
        """DPO: a LoRA adapter trained on prompt/chosen/rejected rows (stage `dpo`). REWARD_MODEL: a reward model
        (LoRA + score head on the job's base model, stage `reward_model`). Both resume from their checkpoints."""
        from neuroweaver_ml import DatasetInvalid, ResumeMismatch
        from neuroweaver_ml.rlaif import DPOJobConfig, RewardModelConfig, run_dpo, run_reward_model

        h, lo = job.hyperparameters, job.lora
        stage = "dpo" if job.method is Method.DPO else "reward_model"
        job.stage = self._stage_name = stage
        await self._event(
            JobEvent(
                EventType.STAGE_STARTED, stage=stage, message=f"attempt {self.attempt}: {job.method.value} on {job.base_model}"
            ),
            stage=stage,
        )
        base_dir = await self._base_dir(job)
        prefs = await self._input_file(job.dataset_uri, job.dataset_digest, "preference dataset")
        out = self._job_dir(job) / stage
        common = dict(
            learning_rate=h.learning_rate, num_epochs=h.num_epochs, max_steps=h.max_steps if h.max_steps > 0 else -1,
            batch_size=h.batch_size, grad_accumulation=h.gradient_accumulation_steps, max_length=h.max_seq_length,
            lora_r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, seed=h.seed, checkpoint_every_steps=h.checkpoint_every_steps,
        )  # fmt: skip
        try:
            if job.method is Method.DPO:
                cfg = DPOJobConfig(base_model_dir=base_dir, preference_file=prefs, output_dir=str(out), target_modules=list(lo.target_modules) or None,
                                   base_model_ref=job.base_model, adapter_name=job.name, **common)  # fmt: skip
                res = await asyncio.to_thread(run_dpo, cfg, self._on_event, self.stop.is_set)
            else:
                eval_file = (
                    await self._input_file(job.eval_dataset_uri, job.eval_dataset_digest, "eval preference dataset")
                    if job.eval_dataset_uri
                    else None
                )
                cfg = RewardModelConfig(preference_file=prefs, output_dir=str(out), backbone="policy", base_model_dir=base_dir,
                                        eval_file=eval_file, eval_fraction=0.0 if eval_file else max(h.eval_split, 0.2), **common)  # fmt: skip
                res = await asyncio.to_thread(run_reward_model, cfg, self._on_event, self.stop.is_set)
        except (DatasetInvalid, ResumeMismatch) as exc:
            raise JobFailed(str(exc)) from None
        except ValueError as exc:
            raise JobFailed(f"invalid training configuration: {exc}") from None
        except MemoryError:
            raise JobFailed("out of memory: lower batch_size or max_seq_length") from None
        if res.status != "completed":
            return Outcome("cancelled", f"cancelled at step {res.global_step} of stage {stage}; last checkpoint kept")
        if job.method is Method.DPO:
            fm = res.final_metrics
            metrics = _numeric(
                {
                    "train_loss": res.train_loss,
                    "dpo_reward_accuracy": fm.get("rewards/accuracies"),
                    "dpo_reward_margin": fm.get("rewards/margins"),
                }
            )
            adapter, sha = res.adapter_dir, res.adapter_sha256
        else:
            metrics = _numeric({"train_loss": res.train_loss, "reward_model_accuracy": res.accuracy, "reward_model_mean_margin": res.mean_margin,
                                "reward_model_eval_pairs": res.eval_pairs})  # fmt: skip
            adapter, sha = res.model_dir, res.model_sha256
        await self._event(
            JobEvent(EventType.STAGE_COMPLETED, stage=stage, metrics=metrics, message=f"trained {res.global_step} steps"),
            current_step=res.global_step,
            metrics=metrics,
        )
        return Outcome("completed", f"{res.global_step} steps", adapter_dir=str(adapter), adapter_sha256=str(sha), report_path=res.report_path,
                       metrics=metrics, dataset_uri=job.dataset_uri, dataset_digest=job.dataset_digest)  # fmt: skip

    async def _train(self, job: TrainingJob) -> Outcome:
        if job.method is Method.RLAIF:
            return await self._train_rlaif(job)
        if job.method in (Method.DPO, Method.REWARD_MODEL):
            return await self._train_preferences(job)
        result = await self._run_sft_stage(job)
        if result.status == "cancelled":
            return Outcome("cancelled", self._sft_cancel_message(result))
        return Outcome(
            "completed", f"{result.global_step} steps", adapter_dir=result.adapter_dir, adapter_sha256=result.adapter_sha256,
            report_path=result.report_path, metrics=self._sft_metrics(result), dataset_uri=job.dataset_uri, dataset_digest=job.dataset_digest,
        )  # fmt: skip

    @staticmethod
    def _sft_cancel_message(result) -> str:
        return f"cancelled at step {result.global_step}; last checkpoint kept: {result.last_checkpoint or 'none'}"

    @staticmethod
    def _sft_metrics(result) -> dict[str, float]:
        values = {
            "train_loss": result.train_loss if result.train_loss is not None else result.final_step_loss,
            "eval_loss": result.eval_loss,
        }
        return {k: v for k, v in values.items() if v is not None}

    async def _run_sft_stage(self, job: TrainingJob):
        """The `sft` stage (SFT methods, and RLAIF's first stage); resumes from its newest checkpoint."""
        from neuroweaver_ml import (
            DatasetInvalid,
            ModelNotFound,
            PathError,
            ResumeMismatch,
            SFTConfig,
            digest_path,
            resolve_base_model,
            run_sft,
            uri_to_path,
        )

        job.stage = "sft"
        await self._event(
            JobEvent(
                EventType.STAGE_STARTED, stage="sft", message=f"attempt {self.attempt}: {job.method.value} on {job.base_model}"
            ),
            stage="sft",
        )
        try:
            base_dir = await asyncio.to_thread(resolve_base_model, job.base_model, self.cfg.model_cache_dir or None)
        except (ModelNotFound, PathError) as exc:
            raise JobFailed(f"base model is no longer available: {exc}") from None
        train_file = uri_to_path(job.dataset_uri)
        eval_file = uri_to_path(job.eval_dataset_uri) if job.eval_dataset_uri else None
        try:
            digest = (await asyncio.to_thread(digest_path, train_file))[0]
        except OSError as exc:
            raise JobFailed(f"dataset {job.dataset_uri} cannot be read any more: {exc}") from None
        if job.dataset_digest and digest != job.dataset_digest:
            raise JobFailed(
                f"dataset {job.dataset_uri} changed since the job was submitted (sha256 {digest[:12]}…, submitted {job.dataset_digest[:12]}…); submit a new job"
            )
        h, lo = job.hyperparameters, job.lora
        sft = SFTConfig(
            base_model_dir=str(base_dir), train_file=str(train_file), output_dir=str(self._work_dir(job)),
            eval_file=str(eval_file) if eval_file else None, eval_fraction=0.0 if eval_file else h.eval_split,
            method="qlora" if job.method is Method.SFT_QLORA else "lora", lora_r=lo.r, lora_alpha=lo.alpha,
            lora_dropout=lo.dropout, target_modules=list(lo.target_modules) or None, learning_rate=h.learning_rate,
            num_epochs=h.num_epochs, max_steps=h.max_steps if h.max_steps > 0 else -1, batch_size=h.batch_size,
            grad_accumulation=h.gradient_accumulation_steps, max_seq_length=h.max_seq_length, warmup_ratio=h.warmup_ratio,
            lr_scheduler=h.lr_scheduler, weight_decay=h.weight_decay, max_grad_norm=h.max_grad_norm, seed=h.seed,
            checkpoint_every_steps=h.checkpoint_every_steps, eval_every_steps=h.eval_every_steps,
            gradient_checkpointing=h.gradient_checkpointing, base_model_ref=job.base_model, adapter_name=job.name,
        )  # fmt: skip
        self._stage_name = "sft"
        try:
            result = await asyncio.to_thread(run_sft, sft, self._on_event, self.stop.is_set)
        except (DatasetInvalid, ResumeMismatch) as exc:
            raise JobFailed(str(exc)) from None
        except ValueError as exc:
            raise JobFailed(f"invalid training configuration: {exc}") from None
        except MemoryError:
            raise JobFailed("out of memory: lower batch_size or max_seq_length, or use SFT_QLORA") from None
        if result.status != "cancelled":
            metrics = self._sft_metrics(result)
            await self._event(
                JobEvent(
                    EventType.STAGE_COMPLETED,
                    stage="sft",
                    metrics=metrics,
                    message=f"trained {result.global_step} steps, {result.tokens_seen} tokens",
                ),
                current_step=result.global_step,
                total_steps=result.total_steps,
                metrics=metrics,
            )
        return result

    def _on_event(self, ev) -> None:
        """Called by run_sft / run_rlaif / run_dpo / run_reward_model on the training thread; blocks until the event
        row is committed. Stage-less events (checkpoint, resumed) belong to the stage that is running."""
        kind = ev.kind
        stage = self._stage_name
        if kind == "stage":
            name = _STAGE_NAMES.get(ev.stage, ev.stage)
            detail = _numeric(ev.detail or {})
            if ev.status == "started":
                self._stage_name = name
                assert self.job is not None
                self.job.stage = name
                self._event_from_thread(
                    JobEvent(EventType.STAGE_STARTED, stage=name, message=f"attempt {self.attempt}: {name}"), stage=name
                )
            elif ev.status == "completed":
                self._event_from_thread(
                    JobEvent(
                        EventType.STAGE_COMPLETED,
                        stage=name,
                        metrics=detail,
                        message=f"{name} completed in {ev.seconds or 0:.1f}s",
                    )
                )
            elif ev.status == "skipped":
                self._event_from_thread(
                    JobEvent(
                        EventType.LOG,
                        stage=name,
                        metrics=detail,
                        message=f"{name}: already completed by an earlier attempt; skipped",
                    )
                )
            else:
                self._event_from_thread(JobEvent(EventType.LOG, stage=name, message=f"{name}: {ev.status}"))
        elif kind == "judge_progress":
            m = {
                "done": ev.done, "total": ev.total, "cache_hits": ev.cache_hits, "malformed": ev.malformed, "errors": ev.errors,
                "requests": ev.requests, "retries": ev.retries, "prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                "tokens": ev.prompt_tokens + ev.completion_tokens, "cost_usd": ev.cost_usd,
            }  # fmt: skip
            self._event_from_thread(
                JobEvent(
                    EventType.JUDGE,
                    stage=_STAGE_NAMES.get(ev.stage, ev.stage),
                    metrics=_numeric(m),
                    message=f"judged {ev.done}/{ev.total}",
                )
            )
        elif kind == "rl_step":
            name = _STAGE_NAMES.get(ev.stage, ev.stage) if self._stage_name not in ("dpo",) else self._stage_name
            step = StepMetrics(
                step=ev.step, total_steps=ev.total_steps, loss=ev.loss or 0.0, learning_rate=ev.learning_rate or 0.0
            )
            m = _numeric(
                {
                    **{k.replace("/", "_"): v for k, v in (ev.metrics or {}).items()},
                    "loss": ev.loss,
                    "reward": ev.reward,
                    "kl": ev.kl,
                }
            )
            self._event_from_thread(
                JobEvent(EventType.STEP, stage=name, step=step, metrics=m), current_step=ev.step, total_steps=ev.total_steps
            )
        elif kind == "metrics":
            name = "evaluate" if ev.stage == "final" else _STAGE_NAMES.get(ev.stage, ev.stage)
            self._event_from_thread(
                JobEvent(
                    EventType.EVAL,
                    stage=name,
                    metrics=_numeric(ev.metrics),
                    message="final metrics" if ev.stage == "final" else "",
                )
            )
        elif kind == "step":
            step = StepMetrics(
                step=ev.step, total_steps=ev.total_steps, epoch=ev.epoch, loss=ev.loss or 0.0, learning_rate=ev.learning_rate or 0.0,
                grad_norm=ev.grad_norm or 0.0, tokens_per_second=ev.tokens_per_second, eta_seconds=ev.eta_seconds or 0.0,
                rss_bytes=ev.rss_bytes, gpu_memory_bytes=ev.gpu_memory_bytes or 0,
            )  # fmt: skip
            self._event_from_thread(
                JobEvent(EventType.STEP, stage="sft", step=step), current_step=ev.step, total_steps=ev.total_steps
            )
        elif kind == "eval":
            self._event_from_thread(
                JobEvent(EventType.EVAL, stage="sft", metrics={"eval_loss": ev.eval_loss, "step": float(ev.step)})
            )
        elif kind == "checkpoint":
            self._event_from_thread(
                JobEvent(EventType.CHECKPOINT, stage=stage, metrics={"step": float(ev.step)}, message=ev.path)
            )
        elif kind == "resumed":
            self._event_from_thread(
                JobEvent(
                    EventType.RESUMED,
                    stage=stage,
                    metrics={"step": float(ev.step)},
                    message=f"resumed from checkpoint {ev.path} at step {ev.step}",
                ),
                resumed_from_step=ev.step,
                current_step=ev.step,
            )

    # -- results ---------------------------------------------------------------------------------

    def _store(self, job: TrainingJob, result: Outcome) -> tuple[str, str, str, int]:
        """Adapter (+ tokenizer + model card), training report and RLAIF outputs (preference pairs, evaluation)
        into the artifact store; idempotent."""
        from neuroweaver_ml import path_to_uri, store_artifact

        store = Path(self.cfg.artifacts_dir or Path(self.cfg.data_dir) / "artifacts")
        project = job.name.split("/")[1]
        uid = hashlib.sha256(f"{job.name}@{job.create_time.isoformat() if job.create_time else ''}".encode()).hexdigest()[:8]
        prefix = f"training-jobs/{project}/{job.job_id}-{uid}"
        try:
            uri, sha, size = store_artifact(result.adapter_dir, store, f"{prefix}/adapter")
            if result.report_path:
                store_artifact(result.report_path, store, f"{prefix}/training_report.json")
            for path, name in result.extra_artifacts:
                store_artifact(path, store, f"{prefix}/{name}")
        except (OSError, FileExistsError) as exc:
            raise JobFailed(f"could not store the artifacts in {store}: {exc}") from None
        if sha != result.adapter_sha256:
            raise JobFailed(f"stored adapter digest {sha} differs from the trained one {result.adapter_sha256}")
        return path_to_uri(store / prefix), uri, sha, size

    async def _register(self, job: TrainingJob, result: Outcome, uri: str, sha: str, size: int) -> str:
        from neuroweaver.registry.v1 import registry_pb2 as rpb
        from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
        from neuroweaver_runtime.client import open_channel

        directions = {
            "higher": rpb.METRIC_DIRECTION_HIGHER_IS_BETTER,
            "lower": rpb.METRIC_DIRECTION_LOWER_IS_BETTER,
            "": rpb.METRIC_DIRECTION_UNSPECIFIED,
        }
        bump = {"major": rsvc.VERSION_BUMP_MAJOR, "minor": rsvc.VERSION_BUMP_MINOR, "patch": rsvc.VERSION_BUMP_PATCH}[
            job.version_bump or "minor"
        ]
        request = rsvc.CreateModelVersionRequest(
            parent=job.target_model,
            bump=bump,
            request_id=registration_request_id(job.name),
            model_version=rpb.ModelVersion(
                artifact=rpb.Artifact(uri=uri, sha256=sha, size_bytes=size, format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
                lineage=rpb.Lineage(
                    base_model=job.base_model, training_job=job.name, dataset_uri=result.dataset_uri, dataset_digest=result.dataset_digest,
                    eval_dataset_uri=job.eval_dataset_uri or job.rlaif.eval_prompts_uri,
                    eval_dataset_digest=job.eval_dataset_digest or job.rlaif.eval_prompts_digest,
                    hyperparameters=hyperparameters_as_strings(job), method=lineage_method(job),
                    parent_version=result.parent_version, judge_version=result.judge_version,
                ),
                metrics=[rpb.Metric(name=k, value=v, direction=directions[metric_direction(k)], source="trainer") for k, v in sorted(result.metrics.items())],
                labels={k: v for k, v in job.labels.items()},
                notes=f"{lineage_method(job)} of {job.base_model} by {job.name}: {result.message}",
            ),
        )  # fmt: skip
        channel = open_channel(
            self.cfg.registry_target,
            token=self.cfg.registry_token or None,
            deadline=10.0,
            tls=self.registry_tls,
        )
        # a client span around the registration (all retries): open_channel injects it as the traceparent
        span = _tracer.start_span(
            "RegistryService/CreateModelVersion", kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": "neuroweaver.registry.v1.RegistryService", "rpc.method": "CreateModelVersion"},
        )  # fmt: skip
        try:
            with trace.use_span(span, record_exception=False, set_status_on_exception=False), _as_creator(job):
                return await self._register_with_retries(job, request, uri, sha, channel)
        except JobFailed as exc:
            span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
            raise
        finally:
            span.end()
            await channel.close()

    async def _register_with_retries(self, job: TrainingJob, request, uri: str, sha: str, channel) -> str:
        from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc

        deadline = time.monotonic() + self.cfg.registry_retry_seconds
        delay, tries = 0.5, 0
        stub = rgrpc.RegistryServiceStub(channel)
        while True:
            tries += 1
            try:
                version = await stub.CreateModelVersion(request, timeout=10.0)
                return version.name
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRYABLE:
                    raise JobFailed(
                        f"the registry refused the new version of {job.target_model}: {exc.code().name}: {exc.details()}; "
                        f"the adapter is stored at {uri}"
                    ) from None
                if time.monotonic() + delay > deadline:
                    raise JobFailed(
                        f"the registry at {self.cfg.registry_target} was unreachable for {self.cfg.registry_retry_seconds:.0f}s "
                        f"({tries} tries, last: {exc.code().name}); nothing was registered. The adapter is stored at {uri} "
                        f"(sha256 {sha}); re-run the job once the registry is back"
                    ) from None
                await self._event(
                    JobEvent(
                        EventType.LOG,
                        stage="register",
                        message=f"registry unreachable ({exc.code().name}), try {tries}; retrying in {delay:.1f}s",
                    )
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(WorkerConfig, "trainer", argv)
    configure_logging("trainer-worker", cfg.log_level)
    telemetry.configure_tracing("trainer-worker", cfg.trace_file)
    if cfg.die_with_parent:
        die_with_parent(signal.SIGKILL)
    if not cfg.job or not cfg.database_url:
        raise SystemExit("--job and --database-url are required (or NW_TRAINER_JOB / NW_TRAINER_DATABASE_URL)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sys.exit(asyncio.run(Worker(cfg, stop).run()))


if __name__ == "__main__":
    main()
