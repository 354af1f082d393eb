"""Trainer use cases: create (validate + queue), read (with queue positions), list, cancel, pause, resume,
checkpoint on request, delete, events and watch, previewing a dataset and reading a worker's log."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from neuroweaver_ml import PathRoots
from neuroweaver_runtime import idempotency
from neuroweaver_runtime.auth import current_actor
from neuroweaver_runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Violations
from neuroweaver_runtime.filtering import parse_filter, parse_order_by
from neuroweaver_runtime.names import PROJECT, validate_id
from neuroweaver_runtime.pagination import Page, PageTokens, page_size
from neuroweaver_runtime.timestamps import utcnow

from ..domain.job import (
    JOB,
    EventType,
    Executor,
    JobEvent,
    JobState,
    Method,
    TrainingJob,
    apply_defaults,
    cancel_transition,
    chat_template_problem,
    pause_transition,
    resume_transition,
    validate_job,
)
from ..domain.judge_endpoints import JudgeEndpoints
from ..domain.scheduling import Capacity, Quotas, wait_reasons
from ..domain.tracking import TrackingServers, TrackingSettings, apply_tracking_defaults, validate_tracking
from .feeds import GONE, LAGGED, FeedHub
from .ports import (
    ClusterWorkers,
    DatasetPreview,
    DatasetPreviewer,
    InputCheck,
    JobRepository,
    LocalWorkers,
    LogChunk,
    LogQuery,
    LogUnavailable,
    RegistryLookups,
    UnitOfWorkFactory,
)

EVENT_PAGE = 500
MAX_PREVIEW_ROWS = 20
DEFAULT_LOG_LINES = 200  # a tail read's lines when tail_lines is 0
MAX_LOG_LINES = 5000  # per read, and a read from an offset's lines when tail_lines is 0


@dataclass
class JobPolicy:
    """What the deployment allows: where datasets and base models may come from, which executors exist."""

    dataset_roots: PathRoots
    check_inputs: InputCheck  # reads and digests the datasets, checks the base model (adapters/inputs.py)
    preview_dataset: DatasetPreviewer  # the same reading, and a dataset's first rows (adapters/inputs.py)
    model_roots: PathRoots = field(default_factory=lambda: PathRoots([]))
    model_cache_dir: str | None = None
    executors: set[Executor] = field(default_factory=lambda: {Executor.LOCAL})
    tracking: TrackingSettings = field(default_factory=TrackingSettings)  # trainer-wide tracker defaults
    tracking_servers: TrackingServers = field(default_factory=TrackingServers)  # where a job's own MLflow URI may point
    # RLAIF jobs resolve their judge version (and start_from_version) in the registry at create time (None: none set)
    registry: RegistryLookups | None = None
    judge_endpoints: JudgeEndpoints = field(default_factory=JudgeEndpoints)
    # what a replica offers and what each project may hold (the scheduler's settings, for errors and wait reasons)
    quotas: Quotas = field(default_factory=Quotas)
    replica_slots: int = 1
    replica_gpus: int = 0


def current_traceparent() -> str:
    """W3C traceparent of the current span (the CreateTrainingJob server span), "" when there is none.

    Stored on the job so that its worker, a separate process started later (maybe on another node),
    continues this trace and the registry's CreateModelVersion joins it."""
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent", "")


class TrainerService:
    def __init__(
        self,
        uow: UnitOfWorkFactory,
        page_tokens: PageTokens,
        policy: JobPolicy,
        hub: FeedHub,
        on_queued: Callable[[], None] = lambda: None,
        on_cancel: Callable[[int], Awaitable[None]] | None = None,
        *,
        local: LocalWorkers | None = None,
        cluster: ClusterWorkers | None = None,
        replica: str = "",
    ) -> None:
        """`local`, `cluster`: where workers' logs are read; `replica`: this replica's lease owner id (a local worker's
        log lies on the replica that ran it: `TrainingJob.attempt_owners`)."""
        self.uow, self.tokens, self.policy, self.hub = uow, page_tokens, policy, hub
        self.on_queued = on_queued
        self.on_cancel = on_cancel
        self.local, self.cluster, self.replica = local, cluster, replica

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    async def _get(jobs: JobRepository, name: str, *, lock: bool = False, field: str = "name") -> TrainingJob:
        JOB.parse(name, field)
        job = await jobs.get(name, lock=lock)
        if job is None:
            raise NotFound(
                f"training job {name} does not exist", reason="TRAINING_JOB_NOT_FOUND", metadata={"training_job": name}
            )
        return job

    # -- create ----------------------------------------------------------------------------------

    async def create_job(
        self, parent: str, job_id: str, job: TrainingJob, request_id: str, fingerprint: str, validate_only: bool
    ) -> TrainingJob:
        project = PROJECT.parse(parent, "parent")["project"]
        if job_id:
            validate_id(job_id, "training_job_id", "training job id")
        else:
            job_id = "tj-" + uuid.uuid4().hex[:12]
        request_id = idempotency.validate_request_id(request_id)
        if request_id and not validate_only:  # a retry answers before the (slow) input checks run again
            async with self.uow.transaction() as uow:
                earlier = await uow.find_request(request_id, "CreateTrainingJob", fingerprint)
                if earlier is not None:
                    return await self._get(uow.jobs, earlier)
        v = Violations()
        validate_job(job, v)
        validate_tracking(job.tracking, v, export=job.method is Method.EXPORT)
        v.raise_if_any()
        self.policy.tracking_servers.check(job.tracking.mlflow_tracking_uri)
        if job.executor not in self.policy.executors:
            raise FailedPrecondition(
                f"executor {job.executor.value} is not configured on this trainer (configured: "
                f"{', '.join(sorted(e.value for e in self.policy.executors))})",
                reason="EXECUTOR_NOT_CONFIGURED",
                metadata={"executor": job.executor.value},
            )
        ceiling = self.policy.quotas.of(project).max_priority
        if ceiling is not None and job.priority > ceiling:
            raise FailedPrecondition(
                f"priority {job.priority} is above project {project}'s ceiling of {ceiling} (the trainer's project quotas)",
                reason="PRIORITY_ABOVE_QUOTA",
                metadata={"priority": str(job.priority), "max_priority": str(ceiling)},
            )
        if job.executor is Executor.LOCAL and job.resources.gpus > self.policy.replica_gpus:
            raise FailedPrecondition(
                f"the job asks for {job.resources.gpus} GPUs; a replica of this trainer gives local jobs "
                f"{self.policy.replica_gpus} (its gpu_devices)",
                reason="NOT_ENOUGH_GPUS",
                metadata={"gpus": str(job.resources.gpus), "replica_gpus": str(self.policy.replica_gpus)},
            )
        job.name = JOB.format(project=project, job=job_id)
        apply_defaults(job)
        if job.method is Method.RLAIF:
            await self._resolve_rlaif(job)
        elif job.method is Method.EXPORT:
            await self._resolve_export(job)
        assert job.method is not None  # validate_job refused a job without a method
        checked = await asyncio.to_thread(
            self.policy.check_inputs, job.base_model, job.dataset_uri, job.eval_dataset_uri, self.policy.dataset_roots,
            job.hyperparameters.max_seq_length, self.policy.model_cache_dir, model_roots=self.policy.model_roots, method=job.method.value,
            prompts_uri=job.rlaif.prompts_uri, eval_prompts_uri=job.rlaif.eval_prompts_uri,
            chat_template=job.hyperparameters.chat_template,
        )  # fmt: skip
        job.dataset_digest, job.eval_dataset_digest = checked.dataset_digest, checked.eval_dataset_digest
        job.rlaif.prompts_digest, job.rlaif.eval_prompts_digest = checked.prompts_digest, checked.eval_prompts_digest
        if job.method is not Method.EXPORT:
            apply_tracking_defaults(job.tracking, self.policy.tracking, job.target_model)
        queued = (
            f"queued (export {job.export.model_version} as {job.export.format} {job.export.quantization})"
            if job.method is Method.EXPORT
            else f"queued (dataset sha256 {job.dataset_digest[:12]}…, {checked.dataset_rows} rows)"
            if job.dataset_uri
            else f"queued (prompts sha256 {job.rlaif.prompts_digest[:12]}…, {checked.prompts_rows} prompts; starts from {job.rlaif.start_from_version})"
        )
        job.state, job.creator, job.create_time = JobState.QUEUED, current_actor(), utcnow()
        job.trace_parent = current_traceparent()
        if validate_only:
            return job
        async with self.uow.transaction() as uow:
            earlier = await uow.find_request(request_id, "CreateTrainingJob", fingerprint)
            if earlier is not None:
                return await self._get(uow.jobs, earlier)
            exists = AlreadyExists(f"training job {job.name} already exists", reason="TRAINING_JOB_ALREADY_EXISTS")
            if await uow.jobs.get(job.name) is not None:
                raise exists
            with uow.duplicate(exists):
                await uow.jobs.add(job, project)
            await uow.jobs.append_event(
                job.key,
                JobEvent(EventType.STATE_CHANGED, state=JobState.QUEUED, message=queued, create_time=job.create_time),
            )
            await uow.remember_request(request_id, "CreateTrainingJob", fingerprint, job.name)
            result = await self._get(uow.jobs, job.name)
            uow.wake(job.key)
        self.on_queued()
        return result

    async def _resolve_rlaif(self, job: TrainingJob) -> None:
        """Judge version → JudgeConfig (stored on the job; `latest` becomes the concrete version); the start
        version → its adapter (uri + sha256) and base model."""
        r = job.rlaif
        registry = self.policy.registry
        if registry is None:
            raise FailedPrecondition(
                "this trainer has no registry configured; RLAIF needs one to resolve judge versions",
                reason="REGISTRY_NOT_CONFIGURED",
            )
        r.judge = await registry.judge(r.judge_version)
        self.policy.judge_endpoints.check(r.judge)
        r.judge_version = r.judge["name"]
        if r.start_from_version:
            name, uri, sha, base = await registry.start_version(r.start_from_version)
            if job.base_model and job.base_model != base:
                raise InvalidArgument(
                    f"base_model {job.base_model!r} differs from {name}'s lineage.base_model {base!r}; leave base_model empty or use that base",
                    field="training_job.base_model",
                    reason="BASE_MODEL_MISMATCH",
                )
            r.start_from_version, r.parent_artifact_uri, r.parent_artifact_sha256 = name, uri, sha
            job.base_model = base

    async def _resolve_export(self, job: TrainingJob) -> None:
        """The exported version → its adapter (uri + sha256), base model (the job's base) and model (the target)."""
        registry = self.policy.registry
        if registry is None:
            raise FailedPrecondition(
                "this trainer has no registry configured; EXPORT needs one to read the version and record the export",
                reason="REGISTRY_NOT_CONFIGURED",
            )
        e = job.export
        name, e.artifact_uri, e.artifact_sha256, job.base_model = await registry.export_version(e.model_version)
        e.model_version = name
        job.target_model = name.split("/versions/")[0]

    # -- datasets --------------------------------------------------------------------------------

    async def preview_dataset(
        self, parent: str, dataset_uri: str, method: Method | None, base_model: str, max_seq_length: int,
        chat_template: str, max_rows: int,
    ) -> DatasetPreview:  # fmt: skip
        """A dataset's first rows and its check, with CreateTrainingJob's roots, path rules and validation."""
        PROJECT.parse(parent, "parent")
        v = Violations()
        if not dataset_uri.strip():
            v.add("dataset_uri", "dataset_uri is required (a JSONL file under one of the trainer's dataset roots)")
        if method is Method.EXPORT:
            v.add("method", "an EXPORT job has no dataset")
        if not 0 <= max_rows <= MAX_PREVIEW_ROWS:
            v.add("max_rows", f"max_rows must be in [0, {MAX_PREVIEW_ROWS}] (0 = 5)")
        if not 0 <= max_seq_length <= 131072:
            v.add("max_seq_length", "max_seq_length must be in [0, 131072] (0 = 512)")
        if (max_seq_length or chat_template) and not base_model:
            v.add("base_model", "max_seq_length and chat_template need the base model whose tokenizer measures the rows")
        if chat_template and (problem := chat_template_problem(chat_template)):
            v.add("chat_template", problem)
        v.raise_if_any()
        p = self.policy
        return await asyncio.to_thread(
            p.preview_dataset, dataset_uri, p.dataset_roots, method=method.value if method else "", base_model=base_model,
            max_seq_length=max_seq_length or 512, chat_template=chat_template, model_cache_dir=p.model_cache_dir,
            model_roots=p.model_roots, max_rows=max_rows or 5,
        )  # fmt: skip

    # -- worker logs -----------------------------------------------------------------------------

    async def read_logs(self, name: str, attempt: int, tail_lines: int, offset: int | None) -> tuple[TrainingJob, int, LogChunk]:
        """An attempt's worker output (0 = the latest attempt): its last lines, or forward from `offset`, a position
        an earlier read returned. Returns the job as read, the attempt and the lines."""
        v = Violations()
        if attempt < 0:
            v.add("attempt", "attempt must not be negative (0 = the latest)")
        if not 0 <= tail_lines <= MAX_LOG_LINES:
            v.add(
                "tail_lines",
                f"tail_lines must be in [0, {MAX_LOG_LINES}] (0 = {DEFAULT_LOG_LINES}, or {MAX_LOG_LINES} from an offset)",
            )
        if offset is not None and offset < 0:
            v.add("offset", "offset must not be negative: pass the next_offset of an earlier read (or 0, the start)")
        v.raise_if_any()
        async with self.uow.transaction() as uow:
            job = await self._get(uow.jobs, name)
        facts = {"training_job": name, "state": job.state.value}
        if job.attempts == 0:
            raise NotFound(
                f"training job {name} is {job.state.value.lower()} and no worker has started for it yet: its log exists "
                "once its first attempt starts",
                reason="LOGS_NOT_FOUND", metadata={**facts, "attempt": "0"},
            )  # fmt: skip
        if attempt > job.attempts:
            raise InvalidArgument(
                f"training job {name} has had {job.attempts} attempts: attempt must be in [0, {job.attempts}] (0 = the latest)",
                field="attempt",
            )
        attempt = attempt or job.attempts
        facts["attempt"] = str(attempt)
        # a worker still running may be writing its last line: that line waits until it is complete
        query = LogQuery(tail_lines or (DEFAULT_LOG_LINES if offset is None else MAX_LOG_LINES), offset,
                         live=attempt == job.attempts and job.state.active)  # fmt: skip
        if job.executor is Executor.KUBERNETES:
            return job, attempt, await self._pod_log(job, attempt, query, facts)
        chunk = await self.local.read_log(job.job_id, attempt, query) if self.local is not None else None
        if chunk is not None:
            return job, attempt, chunk
        owner = job.attempt_owners.get(attempt, "")
        if owner and owner != self.replica:
            raise FailedPrecondition(
                f"attempt {attempt} of {name} ran on trainer replica {owner}: its worker's log lies on that replica's "
                "disk; ask again (calls are balanced over the replicas) or reach that replica",
                reason="LOGS_ELSEWHERE", metadata={**facts, "replica": owner},
            )  # fmt: skip
        raise NotFound(
            f"attempt {attempt} of training job {name} has no worker log on this trainer replica (yet)",
            reason="LOGS_NOT_FOUND", metadata=facts,
        )  # fmt: skip

    async def _pod_log(self, job: TrainingJob, attempt: int, query: LogQuery, facts: dict[str, str]) -> LogChunk:
        if self.cluster is None:
            raise FailedPrecondition(
                f"training job {job.name} runs on Kubernetes, which this trainer is not configured for; ask a trainer "
                "that is (--kube-api)",
                reason="EXECUTOR_NOT_CONFIGURED", metadata={"executor": Executor.KUBERNETES.value},
            )  # fmt: skip
        if attempt != job.attempts:  # each attempt starts from a new Kubernetes Job: the earlier one's pods are deleted
            raise NotFound(
                f"attempt {attempt} of training job {job.name} ran in a Kubernetes Job that no longer exists; only the "
                f"latest attempt's ({job.attempts}) pod log can be read",
                reason="LOGS_NOT_FOUND", metadata=facts,
            )  # fmt: skip
        try:
            return await self.cluster.read_log(job, query)
        except LogUnavailable as exc:
            raise NotFound(
                f"attempt {attempt} of training job {job.name} has no log to read (yet): {exc}",
                reason="LOGS_NOT_FOUND", metadata=facts,
            ) from None  # fmt: skip

    # -- read ------------------------------------------------------------------------------------

    async def get_job(self, name: str) -> TrainingJob:
        async with self.uow.transaction() as uow:
            job = await self._get(uow.jobs, name)
            await self._explain_queue(uow.jobs, [job])
            return job

    async def _explain_queue(self, jobs: JobRepository, page: list[TrainingJob]) -> None:
        """Fills queue_position and wait_reason of the queued jobs in `page` (the queue as a replica sees it)."""
        if not any(j.state is JobState.QUEUED for j in page):
            return
        queue = await jobs.queued()
        reasons = wait_reasons(queue, await jobs.usage(), self.policy.quotas, self.replica_capacity())
        positions = {q.key: i for i, q in enumerate(queue, 1)}
        for job in page:
            if job.state is JobState.QUEUED:
                job.queue_position = positions.get(job.key, 0)
                job.wait_reason = reasons.get(job.key, "more than 1000 jobs ahead in the queue")

    def replica_capacity(self) -> Capacity:
        p = self.policy
        return Capacity(p.replica_slots, 0, p.replica_gpus, p.replica_gpus)

    async def list_jobs(self, parent: str, size: int, token: str, filter_text: str, order_by: str) -> Page:
        project = PROJECT.parse(parent, "parent")["project"]
        limit = page_size(size)
        filters = parse_filter(
            filter_text,
            {"target_model"},
            enums={"state": ("STATE_", {s.value for s in JobState}), "method": ("TRAINING_METHOD_", {m.value for m in Method})},
        )
        _, desc = parse_order_by(order_by, {"create_time"}, "create_time desc")
        query = [parent, filter_text, order_by]
        cursor = self.tokens.decode(token, query, datetime, int)
        async with self.uow.transaction() as uow:
            jobs, after = await uow.jobs.page(project, filters, desc, cursor, limit)
            await self._explain_queue(uow.jobs, jobs)
        return Page(jobs, self.tokens.encode(after, query) if after is not None else "")

    # -- state changes ---------------------------------------------------------------------------

    async def cancel_job(self, name: str) -> TrainingJob:
        async with self.uow.transaction() as uow:
            job = await self._get(uow.jobs, name, lock=True)
            try:
                target = cancel_transition(job.state)
            except ValueError as exc:
                raise FailedPrecondition(str(exc), reason="TRAINING_JOB_FINISHED", metadata={"state": job.state.value}) from None
            if target is not None:
                now = utcnow()
                values: dict[str, Any] = {"state": target.value}
                if target is JobState.CANCELLED:
                    values.update(end_time=now, lease_owner="", lease_expires_at=0.0)
                await uow.jobs.update(job.key, **values)
                message = (
                    "cancelled before it started" if target is JobState.CANCELLED else "cancel requested; stopping the worker"
                )
                await uow.jobs.append_event(
                    job.key, JobEvent(EventType.STATE_CHANGED, stage=job.stage, state=target, message=message, create_time=now)
                )
            result = await self._get(uow.jobs, name)
            uow.wake(job.key)
        if target is JobState.CANCELLING and self.on_cancel is not None:
            await self.on_cancel(job.key)
        return result

    async def pause_job(self, name: str) -> TrainingJob:
        """A queued job is held (PAUSED); a running one saves a checkpoint and stops (PAUSING → PAUSED, by its worker)."""
        async with self.uow.transaction() as uow:
            job = await self._get(uow.jobs, name, lock=True)
            try:
                target = pause_transition(job.state)
            except ValueError as exc:
                raise FailedPrecondition(
                    str(exc), reason="TRAINING_JOB_NOT_PAUSABLE", metadata={"state": job.state.value}
                ) from None
            if target is not None:
                message = (
                    "paused before it started; ResumeTrainingJob queues it again"
                    if target is JobState.PAUSED
                    else "pause requested: the worker saves a checkpoint after its current step and stops"
                )
                await self._transition(uow, job, target, message)
            result = await self._get(uow.jobs, name)
            uow.wake(job.key)
        return result

    async def resume_job(self, name: str) -> TrainingJob:
        """A paused job is queued again; its next attempt resumes from the checkpoint saved when it paused."""
        async with self.uow.transaction() as uow:
            job = await self._get(uow.jobs, name, lock=True)
            try:
                target = resume_transition(job.state)
            except ValueError as exc:
                raise FailedPrecondition(
                    str(exc), reason="TRAINING_JOB_NOT_PAUSED", metadata={"state": job.state.value}
                ) from None
            if target is not None:
                await self._transition(uow, job, target, "resumed: queued again; it continues from its last checkpoint")
            result = await self._get(uow.jobs, name)
            await self._explain_queue(uow.jobs, [result])
            uow.wake(job.key)
        if target is not None:
            self.on_queued()
        return result

    async def checkpoint_job(self, name: str) -> TrainingJob:
        """Asks the running worker for a checkpoint after its current training step (a CHECKPOINT event follows)."""
        async with self.uow.transaction() as uow:
            job = await self._get(uow.jobs, name, lock=True)
            if job.state is not JobState.RUNNING:
                raise FailedPrecondition(
                    f"training job {name} is {job.state.value.lower()}; only a running job can save a checkpoint on request",
                    reason="TRAINING_JOB_NOT_RUNNING",
                    metadata={"state": job.state.value},
                )
            await uow.jobs.request_checkpoint(job.key)
            await uow.jobs.append_event(
                job.key,
                JobEvent(EventType.LOG, stage=job.stage, create_time=utcnow(),
                         message="checkpoint requested: saved after the current training step"),
            )  # fmt: skip
            result = await self._get(uow.jobs, name)
            uow.wake(job.key)
        return result

    @staticmethod
    async def _transition(uow, job: TrainingJob, target: JobState, message: str) -> None:
        now = utcnow()
        await uow.jobs.update(job.key, state=target.value)
        await uow.jobs.append_event(
            job.key, JobEvent(EventType.STATE_CHANGED, stage=job.stage, state=target, message=message, create_time=now)
        )

    async def delete_job(self, name: str) -> None:
        async with self.uow.transaction() as uow:
            job = await self._get(uow.jobs, name, lock=True)
            if not job.state.terminal:
                raise FailedPrecondition(
                    f"training job {name} is {job.state.value.lower()}; cancel it and wait until it is cancelled before deleting",
                    reason="TRAINING_JOB_NOT_FINISHED",
                    metadata={"state": job.state.value},
                )
            await uow.jobs.delete(job.key)
            uow.wake(job.key)

    # -- events ----------------------------------------------------------------------------------

    async def list_events(self, parent: str, after: int, size: int, token: str) -> Page:
        if after < 0:
            raise InvalidArgument("after_sequence must not be negative", field="after_sequence", reason="INVALID_CURSOR")
        limit = page_size(size)
        query = [parent, after]
        cursor = self.tokens.decode(token, query, int)
        start = int(cursor[0]) if cursor else after
        async with self.uow.transaction() as uow:
            job = await self._get(uow.jobs, parent, field="parent")
            events = await uow.jobs.events_after(job.key, job.name, start, limit + 1)
        next_token = self.tokens.encode([events[limit - 1].sequence], query) if len(events) > limit else ""
        return Page(events[:limit], next_token)

    async def watch(self, name: str, after: int) -> AsyncIterator[JobEvent]:
        """Replays events after the cursor, then follows live; ends after the terminal state's event."""
        if after < 0:
            raise InvalidArgument("after_sequence must not be negative", field="after_sequence", reason="INVALID_CURSOR")
        async with self.uow.transaction() as uow:
            job = await self._get(uow.jobs, name)
        pk = job.key
        sub = await self.hub.subscribe(pk, name)
        try:
            sent = after
            while True:
                # Replay from the table (history, or catching up after lagging behind the feed). Pages are
                # read in short transactions and sent outside them: a slow client never holds a lock.
                while True:
                    async with self.uow.transaction() as uow:
                        events = await uow.jobs.events_after(pk, name, sent, EVENT_PAGE)
                        current = await uow.jobs.last_sequence(pk)
                    for event in events:
                        yield event
                        sent = event.sequence
                        if event.is_terminal:
                            return
                    if len(events) < EVENT_PAGE:
                        break
                if current is None:
                    return
                if JobState(current[1]).terminal and current[0] <= sent:
                    return  # the cursor is past the end of a finished job
                # Live: the shared feed delivers every event committed after we subscribed.
                while True:
                    item = await sub.queue.get()
                    if item == GONE:
                        return
                    if item == LAGGED:
                        sub.lagged = False
                        while not sub.queue.empty():
                            sub.queue.get_nowait()
                        break
                    if item.sequence <= sent:
                        continue
                    if item.sequence != sent + 1:
                        break  # never expected; re-read from the table rather than skip
                    yield item
                    sent = item.sequence
                    if item.is_terminal:
                        return
        finally:
            self.hub.unsubscribe(pk, sub)
