"""The job's rows as one attempt writes them: fenced by the attempt number, announced on the notify fd.

Every write checks that the job's `attempts` is still this attempt (the lease's fencing token): a worker that
lost its lease, because the trainer gave the job to another attempt, writes nothing and stops (`Fenced`).
"""

from __future__ import annotations

import asyncio
import os
import threading

from neuroweaver_runtime.db import Database
from neuroweaver_runtime.timestamps import utcnow

from ..adapters.repository import SqlJobRepository, notify_key
from ..domain.job import EventType, JobEvent, JobState


class Fenced(Exception):
    """This attempt no longer owns the job."""


class Journal:
    """Appends the job's events (with the job columns that change with them) and reads its state.

    Made on the worker's event loop; the training thread writes through `write_from_thread`."""

    def __init__(self, db: Database, pk: int, attempt: int, stop: threading.Event, notify_fd: int = -1) -> None:
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

    async def state(self) -> tuple[str, int] | None:
        """(state, attempts) of the job as the database has it; None once it is deleted."""
        async with self.db.transaction() as s:
            job = await SqlJobRepository(s).get_by_key(self.pk)
        return (job.state.value, job.attempts) if job else None

    async def watch_cancel(self, poll_seconds: float) -> None:
        """Kubernetes workers get no signal on cancel: poll the job's state (cheap) and stop on CANCELLING."""
        while not self.stop.is_set():
            await asyncio.sleep(poll_seconds)
            try:
                current = await self.state()
            except Exception:  # noqa: BLE001
                continue
            if current is None or current[1] != self.attempt:
                self.lose_lease()
            elif current[0] == JobState.CANCELLING.value:
                self.stop.set()
