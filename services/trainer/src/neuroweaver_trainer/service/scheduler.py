"""The durable queue's consumer: claims jobs, starts their workers, keeps their leases, reacts to exits.

* Claim: first an active job whose lease expired because its worker or whole replica died, else the first
  QUEUED job in priority order that fits its project's quota and this replica's free slots and GPUs
  (domain/scheduling.py). Claims are serialised across replicas (an advisory lock on PostgreSQL), so quota
  counts cannot race. A local job gets its own GPUs (CUDA_VISIBLE_DEVICES), never another job's.
* Preemption: when the first job that fits its quota waits only for this replica's room for longer than
  `preemption_grace_seconds` (another replica with room would have taken it), running jobs of lower priority
  are asked to save a checkpoint and go back to the queue; they resume from that checkpoint later.
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
import socket
import time
import uuid
from dataclasses import dataclass, field

from neuroweaver_runtime.notify import Notifier
from neuroweaver_runtime.process import Child
from neuroweaver_runtime.timestamps import utcnow

from ..domain.job import EventType, Executor, Interrupt, JobEvent, JobState, TrainingJob
from ..domain.scheduling import (
    Capacity,
    Quotas,
    RunningJob,
    Usage,
    capacity_block,
    next_runnable,
    preemption_victims,
    quota_block,
)
from .ports import EXIT_INTERRUPTED, ClusterWorkers, LocalWorkers, UnitOfWorkFactory

log = logging.getLogger(__name__)


@dataclass
class SchedulerSettings:
    max_concurrent_jobs: int = 1
    gpu_devices: list[str] = field(default_factory=list)  # GPU indices this replica gives to local jobs
    quotas: Quotas = field(default_factory=Quotas)
    preemption_grace_seconds: float = 10.0  # < 0: never preempt
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    poll_seconds: float = 2.0
    max_attempts: int = 3
    cancel_grace_seconds: float = 15.0
    # this replica as a lease owner: its host name (the pod's on Kubernetes) says where its local workers' logs lie
    owner: str = field(default_factory=lambda: f"{socket.gethostname()[:80]}-trainer-{uuid.uuid4().hex[:10]}")


@dataclass
class _Running:
    pk: int
    name: str
    attempt: int
    executor: Executor
    priority: int = 0
    devices: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    preempting: bool = False
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
        self._blocked_since: dict[int, float] = {}  # queued job → when it was first seen waiting for room here

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
                while not self._stopping and await self._claim_one():
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must survive database hiccups
                log.exception("scheduler iteration failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), min(self.s.poll_seconds, self.s.heartbeat_seconds))
            except TimeoutError:
                pass

    def _free_devices(self) -> list[str]:
        busy = {d for r in self.running.values() for d in r.devices}
        return [d for d in self.s.gpu_devices if d not in busy]

    def capacity(self) -> Capacity:
        slots, gpus = self.s.max_concurrent_jobs, len(self.s.gpu_devices)
        return Capacity(slots, slots - len(self.running), gpus, len(self._free_devices()))

    async def _claim_one(self) -> bool:
        """Claims and starts one job; False when nothing claimable fits this replica now."""
        now = utcnow()
        capacity = self.capacity()
        if capacity.free_slots <= 0:
            await self._consider_preemption(capacity)
            return False
        async with self.uow.transaction() as uow:
            repo = uow.jobs
            await repo.lock_queue()
            claimed = None
            for stale in await repo.expired(self.executors):  # adopted before anything new starts
                if stale.executor is Executor.LOCAL and stale.resources.gpus > capacity.free_gpus:
                    continue
                if claimed := await repo.claim(stale.key, self.s.owner, self.s.lease_seconds):
                    break
            if claimed is None:
                pick = next_runnable(await repo.queued(self.executors), await repo.usage(), self.s.quotas, capacity)
                claimed = await repo.claim(pick.key, self.s.owner, self.s.lease_seconds) if pick else None
            job = None
            if claimed is not None:
                if await self._take(repo, claimed, now):
                    job = await repo.get_by_key(claimed.key)
                uow.wake(claimed.key)
        if claimed is None:
            await self._consider_preemption(capacity)
            return False
        if job is None:  # the claim settled the job instead of starting it
            return True
        pk = job.key
        devices = self._free_devices()[: job.resources.gpus] if job.executor is Executor.LOCAL else []
        r = _Running(pk, job.name, job.attempts, job.executor, job.priority, devices)
        self.running[pk] = r
        try:
            if job.executor is Executor.KUBERNETES:
                assert self.kube is not None
                r.ref = await self.kube.start(job)
                async with self.uow.transaction() as uow:
                    await uow.jobs.update(pk, fence_attempt=r.attempt, external_ref=r.ref)
                r.task = asyncio.create_task(self._watch_kube(r))
            else:
                r.proc = await self.local.start(job, r.attempt, on_event=self.notifier.wake, devices=devices)
                r.task = asyncio.create_task(self._watch_local(r))
        except Exception as exc:  # noqa: BLE001 - a start failure is the job's failure, not the loop's
            log.exception("could not start worker for %s", job.name)
            self.running.pop(pk, None)
            await self._finish(pk, r.attempt, JobState.FAILED, f"could not start the worker: {exc}")
        return True

    async def _take(self, repo, claimed: TrainingJob, now) -> bool:
        """Starts the claimed job's next attempt; False when the claim settled it instead (a worker that died while
        cancelling or pausing leaves nothing to run; one that kept dying fails the job)."""
        state = claimed.state
        settled = {JobState.CANCELLING: (JobState.CANCELLED, "cancelled (its worker had already stopped)"),
                   JobState.PAUSING: (JobState.PAUSED, "paused (its worker stopped; it resumes from its last checkpoint)")}  # fmt: skip
        failed_attempts = claimed.attempts - claimed.yielded_attempts
        if state in settled:
            target, message = settled[state]
            values: dict = {"state": target.value, "lease_owner": "", "lease_expires_at": 0.0, "interrupt": ""}
            if target.terminal:
                values["end_time"] = now
            await repo.update(claimed.key, **values)
            await repo.append_event(
                claimed.key, JobEvent(EventType.STATE_CHANGED, stage=claimed.stage, state=target, message=message, create_time=now)
            )  # fmt: skip
            return False
        if failed_attempts >= self.s.max_attempts:
            reason = f"gave up after {failed_attempts} failed attempts: the worker kept dying (last: lease expired, no heartbeat)"
            await repo.update(
                claimed.key, state=JobState.FAILED.value, error=reason, end_time=now, lease_owner="", lease_expires_at=0.0
            )
            await repo.append_event(
                claimed.key,
                JobEvent(EventType.STATE_CHANGED, stage=claimed.stage, state=JobState.FAILED, message=reason, create_time=now),
            )
            return False
        attempt = claimed.attempts + 1
        await repo.update(
            claimed.key, state=JobState.RUNNING.value, attempts=attempt, start_time=claimed.start_time or now, error="",
            interrupt="", attempt_owners={**claimed.attempt_owners, attempt: self.s.owner},
        )  # fmt: skip
        message = f"attempt {attempt} claimed by {self.s.owner}"
        if state is JobState.RUNNING:
            message = f"lease of attempt {claimed.attempts} expired (its worker or trainer died); attempt {attempt} resumes from the last checkpoint"
        elif claimed.attempts:
            message += "; it resumes from the last checkpoint"
        await repo.append_event(
            claimed.key,
            JobEvent(EventType.STATE_CHANGED, stage=claimed.stage, state=JobState.RUNNING, message=message, create_time=now),
            fence_attempt=attempt,
        )
        self._blocked_since.pop(claimed.key, None)
        return True

    async def _consider_preemption(self, capacity: Capacity) -> None:
        """Asks lower-priority jobs on this replica to make room for the first queued job that fits its quota but
        not this replica, once it has waited `preemption_grace_seconds` (a replica with room would have taken it)."""
        if self.s.preemption_grace_seconds < 0 or self._stopping:
            return
        async with self.uow.transaction() as uow:
            queue = await uow.jobs.queued(self.executors)
            usage = await uow.jobs.usage()
        waiting = {j.key for j in queue}
        for key in list(self._blocked_since):
            if key not in waiting:
                del self._blocked_since[key]
        head = next((j for j in queue if not quota_block(j, self.s.quotas.of(j.project), usage.get(j.project, Usage()))), None)
        if head is None or not capacity_block(head, capacity):
            return
        since = self._blocked_since.setdefault(head.key, time.monotonic())
        if time.monotonic() - since < self.s.preemption_grace_seconds:
            return
        running = [
            RunningJob(r.pk, r.name, r.priority, len(r.devices), r.started)
            for r in self.running.values()
            if not r.preempting and not r.cancel_sent
        ]
        victims = preemption_victims(head, running, capacity)
        for victim in victims:
            r = self.running[victim.key]
            r.preempting = True
            now = utcnow()
            async with self.uow.transaction() as uow:
                if await uow.jobs.update(
                    r.pk, fence_attempt=r.attempt, interrupt=Interrupt.PREEMPT.value
                ):  # the worker polls it: checkpoint, then back to the queue
                    await uow.jobs.append_event(
                        r.pk,
                        JobEvent(
                            EventType.LOG, message=f"preempted by {head.name} (priority {head.priority} > {r.priority}): "
                            "saving a checkpoint, then back to the queue", create_time=now,
                        ),
                        fence_attempt=r.attempt,
                    )  # fmt: skip
                    uow.wake(r.pk)
            log.info("preempting %s for %s", r.name, head.name)

    async def _heartbeat(self) -> None:
        if not self.running:
            return
        async with self.uow.transaction() as uow:
            states = await uow.jobs.renew_leases(self.s.owner, list(self.running), self.s.lease_seconds)
        for pk, r in list(self.running.items()):
            state, owner = states.get(pk, ("", ""))
            if state and (JobState(state).terminal or JobState(state).waiting):
                # The worker wrote its final state (or handed the job back) and is exiting; make sure it does.
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
        if state.terminal or state.waiting:
            return  # the worker wrote the outcome (or handed the job back) itself
        what = f"signal {-code}" if code < 0 else f"exit code {code}"
        if state is JobState.CANCELLING:
            await self._finish(r.pk, r.attempt, JobState.CANCELLED, "cancelled; the last checkpoint is kept")
        elif state is JobState.PAUSING:
            await self._hand_back(r, JobState.PAUSED, f"paused (the worker stopped: {what}); it resumes from its last checkpoint")
        elif code == EXIT_INTERRUPTED or self._stopping or job.interrupt is Interrupt.PREEMPT:
            await self._hand_back(
                r, JobState.QUEUED, "the trainer is shutting down; the job is queued again and will resume from its last checkpoint"
                if job.interrupt is Interrupt.NONE else f"preempted (the worker stopped: {what}); queued again to resume from its last checkpoint",
            )  # fmt: skip
        elif r.attempt - job.yielded_attempts >= self.s.max_attempts:
            await self._finish(
                r.pk, r.attempt, JobState.FAILED,
                f"the worker died ({what}) on attempt {r.attempt} ({r.attempt - job.yielded_attempts} failed of at most {self.s.max_attempts}); see {self.local.log_path(r.name.rsplit('/', 1)[-1], r.attempt)}",
            )  # fmt: skip
        else:
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
                if job.state.waiting:
                    # Handed back (paused or preempted): remove the finished Job so the next attempt can create one.
                    await self.kube.delete(r.ref)
                    break
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
        """The worker died: the job is queued again (the attempt counts against max_attempts)."""
        now = utcnow()
        async with self.uow.transaction() as uow:
            if await uow.jobs.update(
                r.pk, fence_attempt=r.attempt, state=JobState.QUEUED.value, lease_owner="", lease_expires_at=0.0
            ):
                await uow.jobs.append_event(
                    r.pk, JobEvent(EventType.STATE_CHANGED, state=JobState.QUEUED, message=message, create_time=now)
                )
            uow.wake(r.pk)

    async def _hand_back(self, r: _Running, state: JobState, message: str) -> None:
        """The attempt ended without failing (shutdown, pause, preemption): PAUSED or QUEUED, not counted as failed."""
        now = utcnow()
        async with self.uow.transaction() as uow:
            if await uow.jobs.hand_back(r.pk, r.attempt, state):
                await uow.jobs.append_event(
                    r.pk, JobEvent(EventType.STATE_CHANGED, state=state, message=message, create_time=now)
                )
            uow.wake(r.pk)
