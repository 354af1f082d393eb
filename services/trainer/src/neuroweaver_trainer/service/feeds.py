"""One shared reader per watched job, fanning new events out to every watcher of that job.

Watchers replay history from the database themselves, then take live events from their feed's queue, so
N watchers cost one query per wake-up, not N, and never touch the worker that writes the events.

A feed wakes on its job's Notifier key: in-process commits (create, cancel), a pipe from each local worker
this replica started (`LocalExecutor`, one line per committed event), PostgreSQL NOTIFY from any replica or
worker process (`PostgresListener`), and a poll timer. On SQLite the pipe is the only cross-process signal
(Kubernetes workers there are seen by polling, `poll_seconds`); with PostgreSQL the timer is only a safety net.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from neuroweaver_runtime.notify import Notifier

from ..domain.job import JobEvent
from .ports import UnitOfWorkFactory, notify_key

log = logging.getLogger(__name__)

GONE = "gone"  # the job was deleted
LAGGED = "lagged"  # the watcher fell too far behind; it re-reads from the database
MAX_QUEUE = 10_000
BATCH = 1000


@dataclass(eq=False)
class Subscriber:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    lagged: bool = False

    def push(self, item) -> None:
        if self.lagged:
            return
        if self.queue.qsize() >= MAX_QUEUE:
            self.lagged = True
            self.queue.put_nowait(LAGGED)
            return
        self.queue.put_nowait(item)


class _Feed:
    def __init__(self, hub: FeedHub, job_pk: int, job_name: str) -> None:
        self.hub, self.job_pk, self.job_name = hub, job_pk, job_name
        self.subscribers: set[Subscriber] = set()
        self.last = 0
        self.ready = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def run(self) -> None:
        key = notify_key(self.job_pk)
        wake = self.hub.notifier.subscribe(key)
        try:
            async with self.hub.uow.transaction() as uow:
                current = await uow.jobs.last_sequence(self.job_pk)
            self.last = current[0] if current else 0
            self.ready.set()
            while self.subscribers:
                await wake.wait(self.hub.poll_seconds)
                try:
                    await self._read()
                except Exception as exc:  # noqa: BLE001 - a failed read is retried on the next wake-up
                    log.warning("event feed of job %s: %s", self.job_name, exc)
        finally:
            wake.close()
            self.ready.set()
            if self.hub.feeds.get(self.job_pk) is self:
                del self.hub.feeds[self.job_pk]

    async def _read(self) -> None:
        while True:
            async with self.hub.uow.transaction() as uow:
                current = await uow.jobs.last_sequence(self.job_pk)
                if current is None:
                    for sub in list(self.subscribers):
                        sub.push(GONE)
                    return
                if current[0] <= self.last:
                    return
                events = await uow.jobs.events_after(self.job_pk, self.job_name, self.last, BATCH)
            for event in events:
                for sub in list(self.subscribers):
                    sub.push(event)
                self.last = event.sequence
            if len(events) < BATCH:
                return


class FeedHub:
    def __init__(self, uow: UnitOfWorkFactory, notifier: Notifier, poll_seconds: float) -> None:
        self.uow, self.notifier, self.poll_seconds = uow, notifier, poll_seconds
        self.feeds: dict[int, _Feed] = {}

    async def subscribe(self, job_pk: int, job_name: str) -> Subscriber:
        """Registers a watcher; every event committed after this returns reaches its queue."""
        feed = self.feeds.get(job_pk)
        if feed is None or feed.task is None or feed.task.done():
            feed = _Feed(self, job_pk, job_name)
            self.feeds[job_pk] = feed
        sub = Subscriber()
        feed.subscribers.add(sub)
        if feed.task is None:
            feed.task = asyncio.create_task(feed.run(), name=f"feed-{job_pk}")
        await feed.ready.wait()
        return sub

    def unsubscribe(self, job_pk: int, sub: Subscriber) -> None:
        feed = self.feeds.get(job_pk)
        if feed is not None:
            feed.subscribers.discard(sub)
            if not feed.subscribers:
                self.notifier.wake(notify_key(job_pk))  # let the feed task see it has no subscribers and end

    def watcher_count(self, job_pk: int) -> int:
        feed = self.feeds.get(job_pk)
        return len(feed.subscribers) if feed else 0

    async def close(self) -> None:
        for feed in list(self.feeds.values()):
            if feed.task is not None:
                feed.task.cancel()
        self.feeds.clear()


def is_event(item) -> bool:
    return isinstance(item, JobEvent)
