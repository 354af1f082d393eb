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
import ctypes
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
from neuroweaver_runtime.config import default_data_dir, load_config
from neuroweaver_runtime.db import Database
from neuroweaver_runtime.logs import configure_logging, trace_id_var
from neuroweaver_runtime.timestamps import utcnow

from .adapters.executors import EXIT_INTERRUPTED
from .adapters.repository import JobRepository, job_from_row
from .domain.job import (
    EventType,
    JobEvent,
    JobState,
    Method,
    StepMetrics,
    TrainingJob,
    hyperparameters_as_strings,
    registration_request_id,
)

log = logging.getLogger("neuroweaver.trainer.worker")

_tracer = trace.get_tracer("neuroweaver.trainer.worker")

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
    model_cache_dir: str = field(default="", metadata={"help": "converted builtin models cache"})
    die_with_parent: bool = field(default=False, metadata={"help": "exit when the trainer process dies (local executor)"})
    stop_poll_seconds: float = field(default=1.0, metadata={"help": "how often the job's state is checked for a cancel"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING, ERROR"})
    trace_file: str = field(default="", metadata={"help": "write OpenTelemetry spans as JSON lines to this file"})


class JobFailed(Exception):
    """A failure with a reason a person can act on."""


class Fenced(Exception):
    """This attempt no longer owns the job."""


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


class Worker:
    def __init__(self, cfg: WorkerConfig, stop: threading.Event) -> None:
        self.cfg = cfg
        self.stop = stop
        self.db = Database(cfg.database_url)
        self.pk = 0
        self.attempt = 0
        self.job: TrainingJob | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fenced = False

    # -- database writes (fenced by attempt) -----------------------------------------------------

    async def _event(self, event: JobEvent, **job_values) -> None:
        event.create_time = event.create_time or utcnow()
        async with self.db.transaction() as s:
            repo = JobRepository(s)
            if await repo.append_event(self.pk, event, fence_attempt=self.attempt) is None:
                raise Fenced()
            if job_values:
                await repo.update_job(self.pk, fence_attempt=self.attempt, **job_values)

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
        await self._event(JobEvent(EventType.STATE_CHANGED, stage=self.job.stage if self.job else "", state=state, message=message, create_time=now), **values)

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
                log.warning("job %s is %s at attempt %s; this is attempt %s: nothing to do", row.name, row.state, row.attempts, self.attempt)
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
            result = await self._train(job)
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
        if result.status == "cancelled":
            current = await self._state()
            if current and current[0] == JobState.CANCELLING.value:
                await self._finish(JobState.CANCELLED, f"cancelled at step {result.global_step}; last checkpoint kept: {result.last_checkpoint or 'none'}")
                return 0
            log.info("interrupted at step %s (shutdown); the job will resume from its last checkpoint", result.global_step)
            return EXIT_INTERRUPTED
        metrics = {k: v for k, v in {"train_loss": result.train_loss if result.train_loss is not None else result.final_step_loss, "eval_loss": result.eval_loss}.items() if v is not None}
        await self._event(JobEvent(EventType.STAGE_COMPLETED, stage="sft", metrics=metrics, message=f"trained {result.global_step} steps, {result.tokens_seen} tokens"), current_step=result.global_step, total_steps=result.total_steps, metrics=metrics)
        job.stage = "register"
        await self._event(JobEvent(EventType.STAGE_STARTED, stage="register", message="storing artifacts and registering the version"), stage="register")
        try:
            output_uri, adapter_uri, sha, size = await asyncio.to_thread(self._store, job, result)
            version = await self._register(job, result, metrics, adapter_uri, sha, size)
        except JobFailed as exc:
            await self._finish(JobState.FAILED, str(exc), output_uri=locals().get("output_uri", ""))
            return 0
        await self._event(JobEvent(EventType.REGISTERED, stage="register", message=version, metrics=metrics), model_version=version, output_uri=output_uri)
        await self._finish(JobState.SUCCEEDED, f"registered {version}")
        return 0

    def _work_dir(self, job: TrainingJob) -> Path:
        base = Path(self.cfg.checkpoint_dir) if self.cfg.checkpoint_dir else Path(self.cfg.data_dir) / "jobs" / job.job_id
        return base / "run"

    async def _train(self, job: TrainingJob):
        from neuroweaver_ml import (
            DatasetInvalid,
            ModelNotFound,
            ResumeMismatch,
            SFTConfig,
            digest_path,
            resolve_base_model,
            run_sft,
            uri_to_path,
        )

        job.stage = "sft"
        await self._event(JobEvent(EventType.STAGE_STARTED, stage="sft", message=f"attempt {self.attempt}: {job.method.value} on {job.base_model}"), stage="sft")
        try:
            base_dir = await asyncio.to_thread(resolve_base_model, job.base_model, self.cfg.model_cache_dir or None)
        except ModelNotFound as exc:
            raise JobFailed(f"base model is no longer available: {exc}") from None
        train_file = uri_to_path(job.dataset_uri)
        eval_file = uri_to_path(job.eval_dataset_uri) if job.eval_dataset_uri else None
        try:
            digest = (await asyncio.to_thread(digest_path, train_file))[0]
        except OSError as exc:
            raise JobFailed(f"dataset {job.dataset_uri} cannot be read any more: {exc}") from None
        if job.dataset_digest and digest != job.dataset_digest:
            raise JobFailed(f"dataset {job.dataset_uri} changed since the job was submitted (sha256 {digest[:12]}…, submitted {job.dataset_digest[:12]}…); submit a new job")
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
        try:
            return await asyncio.to_thread(run_sft, sft, self._on_event, self.stop.is_set)
        except (DatasetInvalid, ResumeMismatch) as exc:
            raise JobFailed(str(exc)) from None
        except ValueError as exc:
            raise JobFailed(f"invalid training configuration: {exc}") from None
        except MemoryError:
            raise JobFailed("out of memory: lower batch_size or max_seq_length, or use SFT_QLORA") from None

    def _on_event(self, ev) -> None:
        """Called by run_sft on the training thread; blocks until the event row is committed."""
        kind = ev.kind
        if kind == "step":
            step = StepMetrics(
                step=ev.step, total_steps=ev.total_steps, epoch=ev.epoch, loss=ev.loss or 0.0, learning_rate=ev.learning_rate or 0.0,
                grad_norm=ev.grad_norm or 0.0, tokens_per_second=ev.tokens_per_second, eta_seconds=ev.eta_seconds or 0.0,
                rss_bytes=ev.rss_bytes, gpu_memory_bytes=ev.gpu_memory_bytes or 0,
            )  # fmt: skip
            self._event_from_thread(JobEvent(EventType.STEP, stage="sft", step=step), current_step=ev.step, total_steps=ev.total_steps)
        elif kind == "eval":
            self._event_from_thread(JobEvent(EventType.EVAL, stage="sft", metrics={"eval_loss": ev.eval_loss, "step": float(ev.step)}))
        elif kind == "checkpoint":
            self._event_from_thread(JobEvent(EventType.CHECKPOINT, stage="sft", metrics={"step": float(ev.step)}, message=ev.path))
        elif kind == "resumed":
            self._event_from_thread(
                JobEvent(EventType.RESUMED, stage="sft", metrics={"step": float(ev.step)}, message=f"resumed from checkpoint {ev.path} at step {ev.step}"),
                resumed_from_step=ev.step, current_step=ev.step,
            )

    # -- results ---------------------------------------------------------------------------------

    def _store(self, job: TrainingJob, result) -> tuple[str, str, str, int]:
        """Adapter (+ tokenizer + model card) and training report into the artifact store; idempotent."""
        from neuroweaver_ml import path_to_uri, store_artifact

        store = Path(self.cfg.artifacts_dir or Path(self.cfg.data_dir) / "artifacts")
        project = job.name.split("/")[1]
        uid = hashlib.sha256(f"{job.name}@{job.create_time.isoformat() if job.create_time else ''}".encode()).hexdigest()[:8]
        prefix = f"training-jobs/{project}/{job.job_id}-{uid}"
        try:
            uri, sha, size = store_artifact(result.adapter_dir, store, f"{prefix}/adapter")
            if result.report_path:
                store_artifact(result.report_path, store, f"{prefix}/training_report.json")
        except (OSError, FileExistsError) as exc:
            raise JobFailed(f"could not store the artifacts in {store}: {exc}") from None
        if sha != result.adapter_sha256:
            raise JobFailed(f"stored adapter digest {sha} differs from the trained one {result.adapter_sha256}")
        return path_to_uri(store / prefix), uri, sha, size

    async def _register(self, job: TrainingJob, result, metrics: dict[str, float], uri: str, sha: str, size: int) -> str:
        from neuroweaver.registry.v1 import registry_pb2 as rpb
        from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
        from neuroweaver_runtime.client import open_channel

        bump = {"major": rsvc.VERSION_BUMP_MAJOR, "minor": rsvc.VERSION_BUMP_MINOR, "patch": rsvc.VERSION_BUMP_PATCH}[job.version_bump or "minor"]
        request = rsvc.CreateModelVersionRequest(
            parent=job.target_model,
            bump=bump,
            request_id=registration_request_id(job.name),
            model_version=rpb.ModelVersion(
                artifact=rpb.Artifact(uri=uri, sha256=sha, size_bytes=size, format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
                lineage=rpb.Lineage(
                    base_model=job.base_model, training_job=job.name, dataset_uri=job.dataset_uri, dataset_digest=job.dataset_digest,
                    eval_dataset_uri=job.eval_dataset_uri, eval_dataset_digest=job.eval_dataset_digest,
                    hyperparameters=hyperparameters_as_strings(job), method=job.method.lineage_name,
                ),
                metrics=[rpb.Metric(name=k, value=v, direction=rpb.METRIC_DIRECTION_LOWER_IS_BETTER, source="trainer") for k, v in sorted(metrics.items())],
                labels={k: v for k, v in job.labels.items()},
                notes=f"{job.method.lineage_name} of {job.base_model} by {job.name}: {result.global_step} steps",
            ),
        )  # fmt: skip
        channel = open_channel(self.cfg.registry_target, token=self.cfg.registry_token or None, deadline=10.0)
        # a client span around the registration (all retries): open_channel injects it as the traceparent
        span = _tracer.start_span(
            "RegistryService/CreateModelVersion", kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": "neuroweaver.registry.v1.RegistryService", "rpc.method": "CreateModelVersion"},
        )  # fmt: skip
        try:
            with trace.use_span(span, record_exception=False, set_status_on_exception=False):
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
                await self._event(JobEvent(EventType.LOG, stage="register", message=f"registry unreachable ({exc.code().name}), try {tries}; retrying in {delay:.1f}s"))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(WorkerConfig, "trainer", argv)
    configure_logging("trainer-worker", cfg.log_level)
    telemetry.configure_tracing("trainer-worker", cfg.trace_file)
    if cfg.die_with_parent:
        _die_with_parent()
    if not cfg.job or not cfg.database_url:
        raise SystemExit("--job and --database-url are required (or NW_TRAINER_JOB / NW_TRAINER_DATABASE_URL)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sys.exit(asyncio.run(Worker(cfg, stop).run()))


if __name__ == "__main__":
    main()
