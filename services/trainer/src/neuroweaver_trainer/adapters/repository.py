"""Trainer persistence: rows ⇄ domain dataclasses, the durable queue and gap-free event sequences.

Every method runs inside the caller's transaction (adapters/unit_of_work.py). Used by the server's use cases, its
scheduler and the worker processes (which open their own connection to the same database).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Float, and_, cast, delete, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from neuroweaver_runtime.filtering import Comparison
from neuroweaver_runtime.timestamps import aware

from ..domain.job import (
    ACTIVE_STATES,
    EventType,
    Executor,
    ExportSettings,
    Hyperparameters,
    Interrupt,
    JobEvent,
    JobState,
    LoraSettings,
    Method,
    Resources,
    RlaifSettings,
    StepMetrics,
    TrackingSettings,
    TrainingJob,
)
from ..domain.scheduling import QueuedJob, Usage
from ..service.ports import notify_key
from . import tables as t

EVENT_CHANNEL = "nw_trainer_events"
QUEUE_LOCK = 0x6E775F7175657565  # pg_advisory_xact_lock key of the trainer's claims ("nw_queue")

__all__ = ["EVENT_CHANNEL", "SqlJobRepository", "notify_key"]


class SqlJobRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.s = session

    @property
    def is_postgres(self) -> bool:
        return self.s.get_bind().dialect.name == "postgresql"

    def database_now(self) -> ColumnElement[float]:
        """The database's clock in epoch seconds, evaluated in the statement: every replica's lease decisions
        (claim, renew, expiry) use this one clock, whatever its own says."""
        if self.is_postgres:
            # clock_timestamp(), not now(): a claim late in a long transaction still sees the current time.
            return cast(func.extract("epoch", func.clock_timestamp()), Float)
        return (func.julianday("now") - 2440587.5) * 86400.0  # the Unix epoch is Julian day 2440587.5

    # -- jobs ------------------------------------------------------------------------------------

    async def get(self, name: str, *, lock: bool = False) -> TrainingJob | None:
        query = select(t.jobs).where(t.jobs.c.name == name)
        if lock:
            query = query.with_for_update()
        row = (await self.s.execute(query)).first()
        return job_from_row(row) if row is not None else None

    async def get_by_key(self, key: int) -> TrainingJob | None:
        row = (await self.s.execute(select(t.jobs).where(t.jobs.c.id == key))).first()
        return job_from_row(row) if row is not None else None

    async def add(self, job: TrainingJob, project: str) -> None:
        spec = {
            "lora": dataclasses.asdict(job.lora),
            "hyperparameters": dataclasses.asdict(job.hyperparameters),
            "resources": dataclasses.asdict(job.resources),
        }
        if job.rlaif.configured or job.rlaif.judge:
            spec["rlaif"] = dataclasses.asdict(job.rlaif)
        if job.export.configured:
            spec["export"] = dataclasses.asdict(job.export)
        if job.tracking.configured:
            spec["tracking"] = dataclasses.asdict(job.tracking)
        assert job.method is not None  # validate_job refuses a job without a method before it is stored
        result = await self.s.execute(
            t.jobs.insert().values(
                name=job.name, project=project, display_name=job.display_name, base_model=job.base_model,
                dataset_uri=job.dataset_uri, eval_dataset_uri=job.eval_dataset_uri, method=job.method.value,
                executor=job.executor.value, spec=spec, target_model=job.target_model, version_bump=job.version_bump,
                labels=job.labels, state=job.state.value, stage="", error="", model_version="", output_uri="",
                dataset_digest=job.dataset_digest, eval_dataset_digest=job.eval_dataset_digest, current_step=0,
                total_steps=0, resumed_from_step=0, attempts=0, metrics={}, creator=job.creator,
                create_time=job.create_time, last_sequence=0, lease_owner="", lease_expires_at=0.0, external_ref="",
                trace_parent=job.trace_parent, priority=job.priority, gpus=job.resources.gpus,
            )
        )  # fmt: skip
        job.key = int(result.inserted_primary_key[0])  # type: ignore[attr-defined]  # DML executes to a CursorResult; AsyncSession.execute is typed Result

    async def update(self, key: int, *, fence_attempt: int | None = None, **values: Any) -> bool:
        """Updates a job; with `fence_attempt`, only while that attempt still owns it. True when a row changed."""
        query = update(t.jobs).where(t.jobs.c.id == key)
        if fence_attempt is not None:
            query = query.where(t.jobs.c.attempts == fence_attempt)
        return (await self.s.execute(query.values(**values))).rowcount > 0  # type: ignore[attr-defined]  # DML executes to a CursorResult; AsyncSession.execute is typed Result

    async def delete(self, key: int) -> None:
        await self.s.execute(delete(t.events).where(t.events.c.job_id == key))
        await self.s.execute(delete(t.jobs).where(t.jobs.c.id == key))

    async def page(
        self, project: str, filters: list[Comparison], desc: bool, cursor: list | None, limit: int
    ) -> tuple[list[TrainingJob], list | None]:
        c = t.jobs.c
        query = select(t.jobs).where(c.project == project)
        for f in filters:
            if f.label_key is not None:
                col = c.labels[f.label_key].as_string()
                query = query.where(col == f.value if f.op == "=" else or_(col.is_(None), col != f.value))
                continue
            column = {"state": c.state, "method": c.method, "target_model": c.target_model}[f.field]
            query = query.where(column == f.value if f.op == "=" else column != f.value)
        if cursor is not None:
            bound, tie = datetime.fromisoformat(cursor[0]), cursor[1]
            if desc:
                query = query.where(or_(c.create_time < bound, and_(c.create_time == bound, c.id < tie)))
            else:
                query = query.where(or_(c.create_time > bound, and_(c.create_time == bound, c.id > tie)))
        order = (c.create_time.desc(), c.id.desc()) if desc else (c.create_time, c.id)
        rows = list((await self.s.execute(query.order_by(*order).limit(limit + 1))).all())
        after = [rows[limit - 1].create_time.isoformat(), rows[limit - 1].id] if len(rows) > limit else None
        return [job_from_row(r) for r in rows[:limit]], after

    # -- events ----------------------------------------------------------------------------------

    async def append_event(self, key: int, event: JobEvent, *, fence_attempt: int | None = None) -> int | None:
        """Appends an event with the job's next sequence; None when the fence no longer holds.

        The sequence comes from `UPDATE ... SET last_sequence = last_sequence + 1`, which locks the job row
        until commit, so per-job sequences are gap-free and committed in order (a reader of `seq > cursor`
        can never skip a late-committing event).
        """
        query = update(t.jobs).where(t.jobs.c.id == key)
        if fence_attempt is not None:
            query = query.where(t.jobs.c.attempts == fence_attempt)
        query = query.values(last_sequence=t.jobs.c.last_sequence + 1).returning(t.jobs.c.last_sequence)
        seq = (await self.s.execute(query)).scalar()
        if seq is None:
            return None
        await self.s.execute(
            t.events.insert().values(
                job_id=key, sequence=seq, type=event.type.value, stage=event.stage,
                state=event.state.value if event.state else "", step=dataclasses.asdict(event.step) if event.step else None,
                metrics=event.metrics, message=event.message, create_time=event.create_time,
            )
        )  # fmt: skip
        if self.is_postgres:
            await self.s.execute(text("SELECT pg_notify(:c, :p)"), {"c": EVENT_CHANNEL, "p": f"{notify_key(key)}:{seq}"})
        return int(seq)

    async def events_after(self, key: int, job_name: str, after: int, limit: int) -> list[JobEvent]:
        c = t.events.c
        query = select(t.events).where(c.job_id == key, c.sequence > after).order_by(c.sequence).limit(limit)
        return [event_from_row(r, job_name) for r in (await self.s.execute(query)).all()]

    async def last_sequence(self, key: int) -> tuple[int, str] | None:
        """(last sequence, state) of a job, or None when it was deleted."""
        row = (await self.s.execute(select(t.jobs.c.last_sequence, t.jobs.c.state).where(t.jobs.c.id == key))).first()
        return (int(row.last_sequence), row.state) if row else None

    # -- queue -----------------------------------------------------------------------------------

    async def lock_queue(self) -> None:
        """Serialises claims across replicas for the rest of the transaction, so quota counts cannot race:
        a transaction-scoped advisory lock on PostgreSQL (SQLite's `BEGIN IMMEDIATE` already serialises writers)."""
        if self.is_postgres:
            await self.s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": QUEUE_LOCK})

    async def expired(self, executors: list[str], limit: int = 20) -> list[TrainingJob]:
        """Active jobs whose lease expired by the database's clock (their worker or whole replica died), in queue
        order: a replica adopts them before it starts anything new."""
        c = t.jobs.c
        query = (
            select(t.jobs)
            .where(c.state.in_([s.value for s in ACTIVE_STATES]), c.lease_expires_at < self.database_now())
            .where(c.executor.in_(executors))
            .order_by(c.priority.desc(), c.create_time, c.id)
            .limit(limit)
        )
        return [job_from_row(r) for r in (await self.s.execute(query)).all()]

    async def queued(self, executors: list[str] | None = None, limit: int = 1000) -> list[QueuedJob]:
        """Queued jobs in queue order (priority, then age), lightly: what scheduling decisions need."""
        c = t.jobs.c
        query = select(c.id, c.name, c.project, c.priority, c.gpus, c.executor).where(c.state == JobState.QUEUED.value)
        if executors is not None:
            query = query.where(c.executor.in_(executors))
        rows = (await self.s.execute(query.order_by(c.priority.desc(), c.create_time, c.id).limit(limit))).all()
        return [
            QueuedJob(r.id, r.name, r.project, int(r.priority), int(r.gpus), r.executor == Executor.LOCAL.value) for r in rows
        ]

    async def usage(self) -> dict[str, Usage]:
        """Jobs and GPUs each project's active jobs hold (on every replica and in the cluster)."""
        c = t.jobs.c
        query = (
            select(c.project, func.count(), func.coalesce(func.sum(c.gpus), 0))
            .where(c.state.in_([s.value for s in ACTIVE_STATES]))
            .group_by(c.project)
        )
        return {r[0]: Usage(int(r[1]), int(r[2])) for r in (await self.s.execute(query)).all()}

    async def claim(self, key: int, owner: str, lease_seconds: float) -> TrainingJob | None:
        """Takes the lease of a queued job, or of an active one whose lease expired; None when it is no longer
        claimable (cancelled, paused or claimed meanwhile). Returns the job before the claim."""
        c = t.jobs.c
        claimable = or_(
            c.state == JobState.QUEUED.value,
            and_(c.state.in_([s.value for s in ACTIVE_STATES]), c.lease_expires_at < self.database_now()),
        )
        row = (await self.s.execute(select(t.jobs).where(c.id == key, claimable).with_for_update())).first()
        if row is None:
            return None
        expires = self.database_now() + lease_seconds
        await self.s.execute(update(t.jobs).where(c.id == key).values(lease_owner=owner, lease_expires_at=expires))
        return job_from_row(row)

    async def hand_back(self, key: int, attempt: int, state: JobState) -> bool:
        """This attempt gives the job back (paused or queued again): lease released, controls cleared, the attempt
        counted as yielded. Fenced by the attempt."""
        c = t.jobs.c
        query = update(t.jobs).where(c.id == key, c.attempts == attempt)
        values = dict(state=state.value, lease_owner="", lease_expires_at=0.0, interrupt=Interrupt.NONE.value)
        result = await self.s.execute(query.values(**values, yielded_attempts=c.yielded_attempts + 1))
        return result.rowcount > 0  # type: ignore[attr-defined]  # DML executes to a CursorResult

    async def request_checkpoint(self, key: int) -> None:
        c = t.jobs.c
        await self.s.execute(update(t.jobs).where(c.id == key).values(checkpoint_requests=c.checkpoint_requests + 1))

    async def renew_leases(self, owner: str, keys: list[int], lease_seconds: float) -> dict[int, tuple[str, str]]:
        """Extends the leases this owner still holds to `lease_seconds` from the database's now; returns
        {job id: (state, lease owner)} of every listed job."""
        if not keys:
            return {}
        c = t.jobs.c
        expires = self.database_now() + lease_seconds
        await self.s.execute(update(t.jobs).where(c.id.in_(keys), c.lease_owner == owner).values(lease_expires_at=expires))
        rows = (await self.s.execute(select(c.id, c.state, c.lease_owner).where(c.id.in_(keys)))).all()
        return {r.id: (r.state, r.lease_owner) for r in rows}

    async def count_by_state(self) -> dict[str, int]:
        rows = (await self.s.execute(select(t.jobs.c.state, func.count()).group_by(t.jobs.c.state))).all()
        return {r[0]: int(r[1]) for r in rows}


# -- row conversion ------------------------------------------------------------------------------


def job_from_row(row) -> TrainingJob:
    spec = row.spec or {}
    return TrainingJob(
        name=row.name, display_name=row.display_name, base_model=row.base_model, dataset_uri=row.dataset_uri,
        eval_dataset_uri=row.eval_dataset_uri, method=Method(row.method),
        lora=LoraSettings(**spec.get("lora", {})), hyperparameters=Hyperparameters(**spec.get("hyperparameters", {})),
        executor=Executor(row.executor), resources=Resources(**spec.get("resources", {})),
        rlaif=RlaifSettings(**spec.get("rlaif", {})), export=ExportSettings(**spec.get("export", {})),
        tracking=TrackingSettings(**spec.get("tracking", {})),
        target_model=row.target_model, version_bump=row.version_bump, labels=dict(row.labels or {}),
        state=JobState(row.state), stage=row.stage, error=row.error, model_version=row.model_version,
        output_uri=row.output_uri, dataset_digest=row.dataset_digest, eval_dataset_digest=row.eval_dataset_digest,
        current_step=int(row.current_step), total_steps=int(row.total_steps), resumed_from_step=int(row.resumed_from_step),
        attempts=int(row.attempts), metrics={k: float(v) for k, v in (row.metrics or {}).items()},
        create_time=aware(row.create_time), start_time=aware(row.start_time), end_time=aware(row.end_time),
        creator=row.creator, last_sequence=int(row.last_sequence), trace_parent=row.trace_parent or "", key=row.id,
        priority=int(row.priority), interrupt=Interrupt(row.interrupt), checkpoint_requests=int(row.checkpoint_requests),
        yielded_attempts=int(row.yielded_attempts),
        attempt_owners={int(k): str(v) for k, v in (row.attempt_owners or {}).items()},
    )  # fmt: skip


def event_from_row(row, job_name: str) -> JobEvent:
    return JobEvent(
        type=EventType(row.type), stage=row.stage, state=JobState(row.state) if row.state else None,
        step=StepMetrics(**row.step) if row.step else None, metrics={k: float(v) for k, v in (row.metrics or {}).items()},
        message=row.message, job=job_name, sequence=int(row.sequence), create_time=aware(row.create_time),
    )  # fmt: skip
