"""In-memory fakes of the trainer's job repository and unit of work (the use cases' ports, service/ports.py).

A transaction works on a deep copy of the store and swaps it in on a clean exit, so a failed use case leaves
nothing behind, as a rolled-back database transaction would; the jobs it marked are woken only after that commit.
Objects handed out are copies. The API and integration tests run the same use cases on the SQL repositories.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from neuroweaver_ml import PathRoots
from neuroweaver_runtime.notify import Notifier
from neuroweaver_runtime.pagination import PageTokens
from neuroweaver_runtime.testing import Duplicate, FakeUnitOfWorkBase
from neuroweaver_trainer.domain.job import Executor, Interrupt, JobEvent, JobState, TrainingJob
from neuroweaver_trainer.domain.scheduling import QueuedJob, Usage
from neuroweaver_trainer.service.feeds import FeedHub
from neuroweaver_trainer.service.jobs import JobPolicy, TrainerService
from neuroweaver_trainer.service.ports import DatasetPreview, notify_key


@dataclass
class Stored:
    job: TrainingJob
    project: str
    lease_owner: str = ""
    lease_expires_at: float = 0.0
    external_ref: str = ""
    events: list[JobEvent] = field(default_factory=list)


@dataclass
class Store:
    last_key: int = 0
    jobs: dict[int, Stored] = field(default_factory=dict)
    requests: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # request_id → (method, fingerprint, name)

    def named(self, name: str) -> Stored | None:
        return next((s for s in self.jobs.values() if s.job.name == name), None)


_QUEUE_COLUMNS = {"lease_owner", "lease_expires_at", "external_ref"}


class FakeJobs:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def get(self, name: str, *, lock: bool = False) -> TrainingJob | None:
        stored = self.store.named(name)
        return copy.deepcopy(stored.job) if stored else None

    async def get_by_key(self, key: int) -> TrainingJob | None:
        stored = self.store.jobs.get(key)
        return copy.deepcopy(stored.job) if stored else None

    async def add(self, job: TrainingJob, project: str) -> None:
        if self.store.named(job.name):
            raise Duplicate(job.name)
        self.store.last_key += 1
        job.key = self.store.last_key
        self.store.jobs[job.key] = Stored(copy.deepcopy(job), project)

    async def update(self, key: int, *, fence_attempt: int | None = None, **values: Any) -> bool:
        stored = self.store.jobs.get(key)
        if stored is None or (fence_attempt is not None and stored.job.attempts != fence_attempt):
            return False
        for name, value in values.items():
            if name in _QUEUE_COLUMNS:
                setattr(stored, name, value)
            else:
                setattr(stored.job, name, {"state": JobState, "interrupt": Interrupt}.get(name, lambda v: v)(value))
        return True

    async def delete(self, key: int) -> None:
        del self.store.jobs[key]

    async def page(self, project, filters, desc, cursor, limit):
        assert not filters, "the fake does not filter"
        jobs = sorted((s.job for s in self.store.jobs.values() if s.project == project), key=lambda j: (j.create_time, j.key))
        if desc:
            jobs.reverse()
        if cursor is not None:
            after = [i for i, j in enumerate(jobs) if j.key == cursor[1]][0]
            jobs = jobs[after + 1 :]
        page = copy.deepcopy(jobs[: limit + 1])
        last = page[limit - 1] if len(page) > limit else None
        return page[:limit], ([last.create_time.isoformat(), last.key] if last else None)

    async def append_event(self, key: int, event: JobEvent, *, fence_attempt: int | None = None) -> int | None:
        stored = self.store.jobs.get(key)
        if stored is None or (fence_attempt is not None and stored.job.attempts != fence_attempt):
            return None
        stored.job.last_sequence += 1
        stored.events.append(dataclasses.replace(copy.deepcopy(event), job=stored.job.name, sequence=stored.job.last_sequence))
        return stored.job.last_sequence

    async def events_after(self, key: int, job_name: str, after: int, limit: int) -> list[JobEvent]:
        stored = self.store.jobs.get(key)
        return copy.deepcopy([e for e in stored.events if e.sequence > after][:limit]) if stored else []

    async def last_sequence(self, key: int) -> tuple[int, str] | None:
        stored = self.store.jobs.get(key)
        return (stored.job.last_sequence, stored.job.state.value) if stored else None

    async def lock_queue(self) -> None:
        pass  # a fake transaction works on its own copy of the store: claims cannot race

    def _expired(self, stored: Stored) -> bool:
        return stored.job.state.active and stored.lease_expires_at < time.time()  # the fake store's clock

    def _in_queue_order(self, stored: list[Stored]) -> list[Stored]:
        return sorted(stored, key=lambda s: (-s.job.priority, s.job.create_time, s.job.key))

    async def expired(self, executors: list[str], limit: int = 20) -> list[TrainingJob]:
        stale = [s for s in self.store.jobs.values() if s.job.executor.value in executors and self._expired(s)]
        return copy.deepcopy([s.job for s in self._in_queue_order(stale)][:limit])

    async def queued(self, executors: list[str] | None = None, limit: int = 1000) -> list[QueuedJob]:
        waiting = [
            s for s in self.store.jobs.values()
            if s.job.state is JobState.QUEUED and (executors is None or s.job.executor.value in executors)
        ]  # fmt: skip
        return [
            QueuedJob(s.job.key, s.job.name, s.project, s.job.priority, s.job.resources.gpus, s.job.executor is Executor.LOCAL)
            for s in self._in_queue_order(waiting)[:limit]
        ]

    async def usage(self) -> dict[str, Usage]:
        out: dict[str, Usage] = {}
        for s in self.store.jobs.values():
            if s.job.state.active:
                u = out.setdefault(s.project, Usage())
                u.jobs, u.gpus = u.jobs + 1, u.gpus + s.job.resources.gpus
        return out

    async def claim(self, key: int, owner: str, lease_seconds: float) -> TrainingJob | None:
        stored = self.store.jobs.get(key)
        if stored is None or not (stored.job.state is JobState.QUEUED or self._expired(stored)):
            return None
        before = copy.deepcopy(stored.job)
        stored.lease_owner, stored.lease_expires_at = owner, time.time() + lease_seconds
        return before

    async def hand_back(self, key: int, attempt: int, state: JobState) -> bool:
        stored = self.store.jobs.get(key)
        if stored is None or stored.job.attempts != attempt:
            return False
        stored.job.state, stored.job.interrupt = state, Interrupt.NONE
        stored.job.yielded_attempts += 1
        stored.lease_owner, stored.lease_expires_at = "", 0.0
        return True

    async def request_checkpoint(self, key: int) -> None:
        self.store.jobs[key].job.checkpoint_requests += 1

    async def renew_leases(self, owner: str, keys: list[int], lease_seconds: float) -> dict[int, tuple[str, str]]:
        expires_at, out = time.time() + lease_seconds, {}
        for key in keys:
            stored = self.store.jobs.get(key)
            if stored is None:
                continue
            if stored.lease_owner == owner:
                stored.lease_expires_at = expires_at
            out[key] = (stored.job.state.value, stored.lease_owner)
        return out


class FakeUnitOfWork(FakeUnitOfWorkBase):
    def __init__(self, store: Store) -> None:
        super().__init__(store.requests)
        self.store = store
        self.jobs = FakeJobs(store)
        self.woken: set[int] = set()

    def wake(self, key: int) -> None:
        self.woken.add(key)


class RecordingNotifier(Notifier):
    def __init__(self) -> None:
        super().__init__()
        self.woken: list[str] = []

    def wake(self, key: str) -> None:
        self.woken.append(key)
        super().wake(key)


class FakeUnitOfWorkFactory:
    def __init__(self, notifier: Notifier) -> None:
        self.store = Store()
        self.notifier = notifier

    @asynccontextmanager
    async def transaction(self):
        work = copy.deepcopy(self.store)
        uow = FakeUnitOfWork(work)
        yield uow
        self.store = work
        for key in uow.woken:
            self.notifier.wake(notify_key(key))


def checked_inputs(*args: Any, **kwargs: Any) -> SimpleNamespace:
    """Stands in for adapters/inputs.check_inputs (which reads and digests the files)."""
    return SimpleNamespace(
        dataset_digest="ab" * 32,
        eval_dataset_digest="",
        prompts_digest="",
        eval_prompts_digest="",
        dataset_rows=40,
        prompts_rows=0,
    )


def previewed(*args: Any, **kwargs: Any) -> DatasetPreview:
    """Stands in for adapters/inputs.preview_dataset (which reads the file)."""
    return DatasetPreview(rows=[(1, {"prompt": "p", "completion": "c"}, False)], row_count=1, format="prompt_completion",
                          sha256="ab" * 32, size_bytes=40)  # fmt: skip


@dataclass
class Fakes:
    service: TrainerService
    uow: FakeUnitOfWorkFactory
    notifier: RecordingNotifier
    queued: list[int]
    cancelled: list[int]

    @property
    def store(self) -> Store:
        return self.uow.store


@pytest.fixture
async def fakes():
    notifier = RecordingNotifier()
    uow = FakeUnitOfWorkFactory(notifier)
    hub = FeedHub(uow, notifier, poll_seconds=0.05)
    queued: list[int] = []
    cancelled: list[int] = []

    async def on_cancel(key: int) -> None:
        cancelled.append(key)

    policy = JobPolicy(
        dataset_roots=PathRoots([]), check_inputs=checked_inputs, preview_dataset=previewed, executors={Executor.LOCAL}
    )
    service = TrainerService(
        uow, PageTokens("unit-test-secret"), policy, hub, on_queued=lambda: queued.append(1), on_cancel=on_cancel
    )
    yield Fakes(service, uow, notifier, queued, cancelled)
    await hub.close()
