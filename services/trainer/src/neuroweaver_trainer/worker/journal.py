"""The job's rows as one attempt writes them: fenced by the attempt number, announced on the notify fd.

Every write checks that the job's `attempts` is still this attempt (the lease's fencing token): a worker that
lost its lease, because the trainer gave the job to another attempt, writes nothing and stops (`Fenced`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from neuroweaver_ml.control import StopSignal
from neuroweaver_runtime.db import Database
from neuroweaver_runtime.timestamps import utcnow

from ..adapters.repository import SqlJobRepository, notify_key
from ..domain.job import EventType, Interrupt, JobEvent, JobState
from ..service.ports import EXIT_INTERRUPTED

log = logging.getLogger("neuroweaver.trainer.worker")


class Fenced(Exception):
    """This attempt no longer owns the job."""


class Journal:
    """Appends the job's events (with the job columns that change with them) and reads its state.

    Made on the worker's event loop; the training thread writes through `write_from_thread`."""

    def __init__(self, db: Database, pk: int, attempt: int, stop: StopSignal, notify_fd: int = -1) -> None:
        self.db = db
        self.pk = pk
        self.attempt = attempt
        self.stop = stop
        self.notify_fd = notify_fd
        self.fenced = False  # set once a write or the cancel watcher finds the job in another attempt's hands
        self._loop = asyncio.get_running_loop()

    def lose_lease(self) -> None:
        self.fenced = True
        self.stop.set()

    async def write(self, event: JobEvent, **job_values) -> None:
        event.create_time = event.create_time or utcnow()
        async with self.db.transaction() as s:
            repo = SqlJobRepository(s)
            sequence = await repo.append_event(self.pk, event, fence_attempt=self.attempt)
            if sequence is None:
                raise Fenced()
            if job_values:
                await repo.update(self.pk, fence_attempt=self.attempt, **job_values)
        self._announce(sequence)

    def _announce(self, sequence: int) -> None:
        if self.notify_fd >= 0:  # after the commit: a woken watcher must find the event
            try:
                os.write(self.notify_fd, f"{notify_key(self.pk)}:{sequence}\n".encode())
            except OSError:  # the trainer is gone (we die with it) or closed the pipe: watchers still poll
                pass

    def write_from_thread(self, event: JobEvent, **job_values) -> None:
        """Blocks the training thread until the row is committed; a fenced write stops training."""
        try:
            asyncio.run_coroutine_threadsafe(self.write(event, **job_values), self._loop).result()
        except Fenced:
            self.lose_lease()

    async def finish(self, state: JobState, message: str, stage: str, **values) -> None:
        """The final state, with its STATE_CHANGED event; the lease is released."""
        now = utcnow()
        values.update(state=state.value, end_time=now, lease_owner="", lease_expires_at=0.0)
        if state is JobState.FAILED:
            values["error"] = message
        await self.write(JobEvent(EventType.STATE_CHANGED, stage=stage, state=state, message=message, create_time=now), **values)

    async def controls(self) -> Controls | None:
        """What the job's row asks of this attempt now; None once the job is deleted."""
        async with self.db.transaction() as s:
            job = await SqlJobRepository(s).get_by_key(self.pk)
        return Controls(job.state, job.attempts, job.interrupt, job.checkpoint_requests) if job else None

    async def hand_back(self, state: JobState, message: str, stage: str) -> None:
        """Ends this attempt without ending the job: PAUSED (held) or QUEUED (preempted), its checkpoint kept.
        The attempt does not count against the trainer's max_attempts."""
        now = utcnow()
        async with self.db.transaction() as s:
            repo = SqlJobRepository(s)
            sequence = await repo.append_event(
                self.pk,
                JobEvent(EventType.STATE_CHANGED, stage=stage, state=state, message=message, create_time=now),
                fence_attempt=self.attempt,
            )
            if sequence is None:
                raise Fenced()
            await repo.hand_back(self.pk, self.attempt, state)
        self._announce(sequence)

    async def settle_stop(self, message: str, stage: str) -> int:
        """After the training stopped on request, the state the job's row asked for; the process's exit code.

        CANCELLING → CANCELLED; PAUSING → PAUSED and a preemption → QUEUED (both resume from the checkpoint saved
        on stopping); otherwise the trainer is shutting down: EXIT_INTERRUPTED, it requeues the job itself."""
        current = await self.controls()
        if current is None or current.attempts != self.attempt:
            raise Fenced()
        if current.state is JobState.CANCELLING:
            await self.finish(JobState.CANCELLED, message, stage)
        elif current.state is JobState.PAUSING:
            await self.hand_back(JobState.PAUSED, f"paused: {message}; ResumeTrainingJob queues it again", stage)
        elif current.interrupt is Interrupt.PREEMPT:
            await self.hand_back(JobState.QUEUED, f"preempted: {message}; queued again to resume from it", stage)
        else:
            log.info("interrupted (%s, shutdown); the job will resume from its last checkpoint", message)
            return EXIT_INTERRUPTED
        return 0

    async def watch_controls(self, poll_seconds: float, seen_requests: int) -> None:
        """Workers get no signal for a cancel, pause, preemption or checkpoint request (Kubernetes workers get
        none at all): poll the job's row (cheap) and steer the training through `stop`."""
        while not self.stop.is_set():
            await asyncio.sleep(poll_seconds)
            try:
                current = await self.controls()
            except Exception:  # noqa: BLE001
                continue
            if current is None or current.attempts != self.attempt:
                self.lose_lease()
                return
            if current.checkpoint_requests > seen_requests:
                self.stop.request_checkpoint()
            seen_requests = current.checkpoint_requests
            if current.state is JobState.CANCELLING:
                self.stop.stop()
            elif current.state is JobState.PAUSING or current.interrupt is Interrupt.PREEMPT:
                self.stop.stop(keep_progress=True)


@dataclass(frozen=True)
class Controls:
    state: JobState
    attempts: int
    interrupt: Interrupt
    checkpoint_requests: int


class FollowerJournal(Journal):
    """The journal of ranks 1..N-1 of a multi-process job: they train, rank 0 writes everything."""

    async def write(self, event: JobEvent, **job_values) -> None:
        pass

    def write_from_thread(self, event: JobEvent, **job_values) -> None:
        pass
