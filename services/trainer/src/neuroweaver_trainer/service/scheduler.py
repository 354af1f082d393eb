"""The durable queue's consumer: claims jobs, starts their workers, keeps their leases, reacts to exits.

* Claim: the oldest QUEUED job, or a RUNNING/CANCELLING one whose lease expired because its worker or
  whole replica died (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so replicas share the queue safely).
* Lease: renewed every `heartbeat_seconds` while this replica's worker lives; `attempts` is the fencing
  token every worker write carries, so a worker that lost its lease cannot write any more. Expiry is timed by
  the database's clock (the repository's), never this replica's, so a skewed clock neither steals a live lease
  nor stretches its own.
* Exit: a worker writes SUCCEEDED/FAILED/CANCELLED itself. If it dies without doing so, the job is requeued
  (it resumes from its last checkpoint) up to `max_attempts`, then fails with the reason.
* Cancel: SIGTERM to the local worker (it stops after the current step and keeps the last checkpoint);
  SIGKILL after `cancel_grace_seconds`. Kubernetes: the Job is deleted.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from dataclasses import dataclass, field

from neuroweaver_runtime.notify import Notifier
from neuroweaver_runtime.process import Child
from neuroweaver_runtime.timestamps import utcnow

from ..domain.job import EventType, Executor, JobEvent, JobState
from .ports import EXIT_INTERRUPTED, ClusterWorkers, LocalWorkers, UnitOfWorkFactory

log = logging.getLogger(__name__)


@dataclass
class SchedulerSettings:
    max_concurrent_jobs: int = 1
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    poll_seconds: float = 2.0
    max_attempts: int = 3
    cancel_grace_seconds: float = 15.0
    owner: str = field(default_factory=lambda: f"trainer-{uuid.uuid4().hex[:10]}")


@dataclass
class _Running:
    pk: int
    name: str
    attempt: int
    executor: Executor
    proc: Child | None = None
    ref: str = ""  # Kubernetes Job `namespace/name`
    cancel_sent: float = 0.0
    terminal_seen: float = 0.0  # when the heartbeat first saw the worker's final state
    task: asyncio.Task | None = None


class Scheduler:
    def __init__(
        self,
        uow: UnitOfWorkFactory,
        notifier: Notifier,
        settings: SchedulerSettings,
        local: LocalWorkers,
        kube: ClusterWorkers | None = None,
    ) -> None:
        self.uow, self.notifier, self.s = uow, notifier, settings
        self.local, self.kube = local, kube
        self.running: dict[int, _Running] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._last_heartbeat = 0.0

    @property
    def executors(self) -> list[str]:
        return [Executor.LOCAL.value] + ([Executor.KUBERNETES.value] if self.kube else [])

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="trainer-scheduler")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self, grace: float = 10.0) -> None:
        """Stops claiming; interrupts local workers (they keep their checkpoints) and hands their jobs back."""
        self._stopping = True
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        for r in list(self.running.values()):
            if r.proc is not None:
                self.local.signal(r.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for r in list(self.running.values()):
            if r.proc is not None:
                try:
                    await asyncio.wait_for(r.proc.wait(), max(0.1, deadline - time.monotonic()))
                except TimeoutError:
                    self.local.signal(r.proc, signal.SIGKILL)
                    await r.proc.wait()
        for r in list(self.running.values()):
            if r.task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(r.task), 5)
                except (TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001
                    r.task.cancel()
        # Kubernetes jobs keep running; their leases expire and another replica adopts them.

    # -- main loop -------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                now = time.monotonic()
                if now - self._last_heartbeat >= self.s.heartbeat_seconds:
                    self._last_heartbeat = now
                    await self._heartbeat()
                while len(self.running) < self.s.max_concurrent_jobs and not self._stopping:
                    if not await self._claim_one():
                        break
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must survive database hiccups
                log.exception("scheduler iteration failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), min(self.s.poll_seconds, self.s.heartbeat_seconds))
            except TimeoutError:
                pass

    async def _claim_one(self) -> bool:
        """Claims and starts one job; False when the queue has nothing claimable."""
        now = utcnow()
        async with self.uow.transaction() as uow:
            repo = uow.jobs
            claimed = await repo.claim_next(self.s.owner, self.s.lease_seconds, self.executors)
            if claimed is None:
                return False
            state = claimed.state
            if state is JobState.CANCELLING:  # its worker died while stopping: nothing left to stop
                await repo.update(claimed.key, state=JobState.CANCELLED.value, end_time=now, lease_owner="", lease_expires_at=0.0)
                await repo.append_event(
                    claimed.key,
                    JobEvent(
                        EventType.STATE_CHANGED,
                        stage=claimed.stage,
                        state=JobState.CANCELLED,
                        message="cancelled (its worker had already stopped)",
                        create_time=now,
                    ),
                )
                pk = None
            elif claimed.attempts >= self.s.max_attempts:
                reason = f"gave up after {claimed.attempts} attempts: the worker kept dying (last: lease expired, no heartbeat)"
                await repo.update(
                    claimed.key, state=JobState.FAILED.value, error=reason, end_time=now, lease_owner="", lease_expires_at=0.0
                )
                await repo.append_event(
                    claimed.key,
                    JobEvent(
                        EventType.STATE_CHANGED, stage=claimed.stage, state=JobState.FAILED, message=reason, create_time=now
                    ),
                )
                pk = None
            else:
                attempt = claimed.attempts + 1
                await repo.update(
                    claimed.key, state=JobState.RUNNING.value, attempts=attempt, start_time=claimed.start_time or now, error=""
                )
                message = f"attempt {attempt} claimed by {self.s.owner}"
                if state is JobState.RUNNING:
                    message = f"lease of attempt {claimed.attempts} expired (its worker or trainer died); attempt {attempt} resumes from the last checkpoint"
                await repo.append_event(
                    claimed.key,
                    JobEvent(
                        EventType.STATE_CHANGED, stage=claimed.stage, state=JobState.RUNNING, message=message, create_time=now
                    ),
                    fence_attempt=attempt,
                )
                pk = claimed.key
            job = await repo.get_by_key(claimed.key)
            assert job is not None  # claimed in this transaction, under its claimed lock
            uow.wake(claimed.key)
        if pk is None:
            return True
        r = _Running(pk, job.name, job.attempts, job.executor)
        self.running[pk] = r
        try:
            if job.executor is Executor.KUBERNETES:
                assert self.kube is not None
                r.ref = await self.kube.start(job)
                async with self.uow.transaction() as uow:
                    await uow.jobs.update(pk, fence_attempt=r.attempt, external_ref=r.ref)
                r.task = asyncio.create_task(self._watch_kube(r))
            else:
                r.proc = await self.local.start(job, r.attempt, on_event=self.notifier.wake)
                r.task = asyncio.create_task(self._watch_local(r))
        except Exception as exc:  # noqa: BLE001 - a start failure is the job's failure, not the loop's
            log.exception("could not start worker for %s", job.name)
            self.running.pop(pk, None)
            await self._finish(pk, r.attempt, JobState.FAILED, f"could not start the worker: {exc}")
        return True

    async def _heartbeat(self) -> None:
        if not self.running:
            return
        async with self.uow.transaction() as uow:
            states = await uow.jobs.renew_leases(self.s.owner, list(self.running), self.s.lease_seconds)
        for pk, r in list(self.running.items()):
            state, owner = states.get(pk, ("", ""))
            if state and JobState(state).terminal:
                # The worker wrote its final state and is exiting; make sure it does.
                r.terminal_seen = r.terminal_seen or time.monotonic()
                if r.proc is not None and time.monotonic() - r.terminal_seen > self.s.cancel_grace_seconds:
                    self.local.signal(r.proc, signal.SIGKILL)
            elif owner != self.s.owner:  # lost the lease (or the job was deleted): our worker is fenced anyway
                log.warning("lost the lease of %s; stopping its worker", r.name)
                if r.proc is not None:
                    self.local.signal(r.proc, signal.SIGKILL)
            elif state == JobState.CANCELLING.value:
                await self.cancel(pk)

    # -- cancel ----------------------------------------------------------------------------------

    async def cancel(self, pk: int) -> None:
        """Stops the worker of a CANCELLING job this replica runs (called by the use case and the heartbeat)."""
        r = self.running.get(pk)
        if r is None:
            return
        if r.proc is not None:
            if not r.cancel_sent:
                r.cancel_sent = time.monotonic()
                self.local.signal(r.proc, signal.SIGTERM)
            elif time.monotonic() - r.cancel_sent > self.s.cancel_grace_seconds:
                self.local.signal(r.proc, signal.SIGKILL)
        elif r.ref and self.kube is not None and not r.cancel_sent:
            r.cancel_sent = time.monotonic()
            await self.kube.delete(r.ref)

    # -- watching workers ------------------------------------------------------------------------

    async def _watch_local(self, r: _Running) -> None:
        assert r.proc is not None
        code = await r.proc.wait()
        self.running.pop(r.pk, None)
        try:
            await self._after_exit(r, code)
        except Exception:  # noqa: BLE001
            log.exception("handling the exit of %s failed", r.name)
        self.wake()

    async def _after_exit(self, r: _Running, code: int) -> None:
        async with self.uow.transaction() as uow:
            job = await uow.jobs.get_by_key(r.pk)
        if job is None or job.attempts != r.attempt:
            return
        state = job.state
        if state.terminal:
            return
        if state is JobState.CANCELLING:
            await self._finish(r.pk, r.attempt, JobState.CANCELLED, "cancelled; the last checkpoint is kept")
        elif code == EXIT_INTERRUPTED or self._stopping:
            await self._requeue(
                r, "the trainer is shutting down; the job is queued again and will resume from its last checkpoint"
            )
        elif r.attempt >= self.s.max_attempts:
            what = f"signal {-code}" if code < 0 else f"exit code {code}"
            await self._finish(
                r.pk, r.attempt, JobState.FAILED,
                f"the worker died ({what}) on attempt {r.attempt} of {self.s.max_attempts}; see {self.local.log_path(r.name.rsplit('/', 1)[-1], r.attempt)}",
            )  # fmt: skip
        else:
            what = f"signal {-code}" if code < 0 else f"exit code {code}"
            await self._requeue(r, f"the worker died ({what}); queued again to resume from its last checkpoint")

    async def _watch_kube(self, r: _Running) -> None:
        assert self.kube is not None
        while True:
            await asyncio.sleep(self.s.heartbeat_seconds)
            try:
                async with self.uow.transaction() as uow:
                    job = await uow.jobs.get_by_key(r.pk)
                if job is None or job.attempts != r.attempt or job.state.terminal:
                    break  # the in-cluster worker reported its result (or someone else owns the job)
                st = await self.kube.state(r.ref)
                if st.phase == "Succeeded":
                    # Re-read: the worker writes its final state before the pod exits.
                    async with self.uow.transaction() as uow:
                        job = await uow.jobs.get_by_key(r.pk)
                    if job is not None and not job.state.terminal:
                        await self._finish(
                            r.pk,
                            r.attempt,
                            JobState.FAILED,
                            f"Kubernetes Job {r.ref} completed but its worker never reported a result",
                        )
                    break
                if st.phase == "Failed":
                    await self._finish(
                        r.pk,
                        r.attempt,
                        JobState.FAILED,
                        f"Kubernetes Job {r.ref} failed ({st.reason or 'no reason given'}); see its pod logs",
                    )
                    break
                if st.phase == "Missing":
                    if job.state is JobState.CANCELLING:
                        await self._finish(r.pk, r.attempt, JobState.CANCELLED, f"cancelled; Kubernetes Job {r.ref} deleted")
                    else:
                        await self._finish(
                            r.pk, r.attempt, JobState.FAILED, f"Kubernetes Job {r.ref} disappeared (deleted outside the trainer?)"
                        )
                    break
                if job.state is JobState.CANCELLING:
                    await self.cancel(r.pk)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the Kubernetes API may be briefly unreachable; keep polling
                log.exception("polling Kubernetes Job %s failed", r.ref)
        self.running.pop(r.pk, None)
        self.wake()

    # -- state writes ----------------------------------------------------------------------------

    async def _finish(self, pk: int, attempt: int, state: JobState, message: str) -> None:
        now = utcnow()
        async with self.uow.transaction() as uow:
            values = {"state": state.value, "end_time": now, "lease_owner": "", "lease_expires_at": 0.0}
            if state is JobState.FAILED:
                values["error"] = message
            if await uow.jobs.update(pk, fence_attempt=attempt, **values):
                await uow.jobs.append_event(pk, JobEvent(EventType.STATE_CHANGED, state=state, message=message, create_time=now))
            uow.wake(pk)

    async def _requeue(self, r: _Running, message: str) -> None:
        now = utcnow()
        async with self.uow.transaction() as uow:
            if await uow.jobs.update(
                r.pk, fence_attempt=r.attempt, state=JobState.QUEUED.value, lease_owner="", lease_expires_at=0.0
            ):
                await uow.jobs.append_event(
                    r.pk, JobEvent(EventType.STATE_CHANGED, state=JobState.QUEUED, message=message, create_time=now)
                )
            uow.wake(r.pk)
