"""Leases are timed by the database's clock: a replica whose own clock is an hour off (time.time patched in this,
the schedulers' process) neither steals a live lease nor keeps an expired one, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import select

from neuroweaver_runtime import migrations
from neuroweaver_runtime.db import Database
from neuroweaver_runtime.notify import Notifier
from neuroweaver_runtime.testing import create_postgres_database
from neuroweaver_runtime.timestamps import utcnow
from neuroweaver_trainer.adapters import tables as t
from neuroweaver_trainer.adapters.repository import SqlJobRepository
from neuroweaver_trainer.adapters.unit_of_work import SqlUnitOfWorkFactory
from neuroweaver_trainer.app import MIGRATIONS
from neuroweaver_trainer.domain.job import JobState, Method, TrainingJob, apply_defaults
from neuroweaver_trainer.service.scheduler import Scheduler, SchedulerSettings

HOUR = 3600.0


class HeldWorker:
    """A worker process stand-in that runs until released."""

    def __init__(self) -> None:
        self.exited = asyncio.Event()

    async def wait(self) -> int:
        await self.exited.wait()
        return 0


class HeldWorkers:
    def __init__(self) -> None:
        self.started: list[HeldWorker] = []

    async def start(self, job, attempt, on_event, devices=()):
        self.started.append(HeldWorker())
        return self.started[-1]

    def signal(self, proc, sig):
        proc.exited.set()

    def log_path(self, job_id, attempt):
        return f"/logs/{job_id}-{attempt}.log"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db(request, tmp_path):
    drop = None
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'trainer.db'}"
    else:
        url, drop = await create_postgres_database("nwtrainerclock")
    await asyncio.to_thread(migrations.upgrade, url, MIGRATIONS)
    database = Database(url)
    yield database
    await database.dispose()
    if drop is not None:
        await drop()


@pytest.fixture
def clock(monkeypatch):
    """`clock.skew = ±HOUR` shifts time.time() for everything in this process, the scheduler included."""
    real = time.time
    state = type("Clock", (), {"skew": 0.0})()
    monkeypatch.setattr(time, "time", lambda: real() + state.skew)
    return state


@pytest.fixture
async def replicas(db):
    """`replicas(owner, lease_seconds)` → a scheduler on the shared database; their worker tasks end with the test."""
    made: list[Scheduler] = []

    def make(owner: str, lease_seconds: float = 30.0) -> Scheduler:
        settings = SchedulerSettings(owner=owner, lease_seconds=lease_seconds, max_attempts=3)
        made.append(Scheduler(SqlUnitOfWorkFactory(db, Notifier()), Notifier(), settings, HeldWorkers()))
        return made[-1]

    yield make
    for scheduler in made:
        for r in scheduler.running.values():
            if r.task is not None:
                r.task.cancel()


async def _queue_job(db: Database) -> int:
    job = TrainingJob(
        name="projects/default/trainingJobs/clock", base_model="b", dataset_uri="file:///d.jsonl", method=Method.SFT_LORA,
        target_model="projects/default/models/m", state=JobState.QUEUED, create_time=utcnow(),
    )  # fmt: skip
    apply_defaults(job)
    async with db.transaction() as s:
        await SqlJobRepository(s).add(job, "default")
    assert job.key is not None
    return job.key


async def _lease(db: Database, key: int) -> tuple[str, int, float]:
    """(lease owner, attempts, seconds the lease has left by the database's clock)."""
    async with db.transaction() as s:
        left = t.jobs.c.lease_expires_at - SqlJobRepository(s).database_now()
        row = (await s.execute(select(t.jobs.c.lease_owner, t.jobs.c.attempts, left).where(t.jobs.c.id == key))).one()
    return row[0], int(row[1]), float(row[2])


async def test_a_fast_clock_does_not_steal_the_live_lease_of_a_slow_one(db, clock, replicas):
    key = await _queue_job(db)
    clock.skew = -HOUR  # the owner's clock is an hour behind: its lease must not look expired to others
    slow = replicas("replica-slow", lease_seconds=30.0)
    assert await slow._claim_one()
    await slow._heartbeat()
    owner, attempts, left = await _lease(db, key)
    assert (owner, attempts) == ("replica-slow", 1) and 25.0 < left <= 30.0

    clock.skew = +HOUR  # a replica an hour ahead must not see it as expired either
    fast = replicas("replica-fast")
    assert not await fast._claim_one()
    owner, attempts, _ = await _lease(db, key)
    assert (owner, attempts) == ("replica-slow", 1)
    await slow._heartbeat()  # the owner keeps it
    assert await _lease(db, key) == ("replica-slow", 1, pytest.approx(30.0, abs=5.0))


async def test_a_fast_clock_does_not_keep_an_expired_lease(db, clock, replicas):
    key = await _queue_job(db)
    clock.skew = +HOUR  # the owner's clock is an hour ahead: its lease must still end after lease_seconds
    fast = replicas("replica-fast", lease_seconds=1.0)
    assert await fast._claim_one()
    await fast._heartbeat()
    owner, _, left = await _lease(db, key)
    assert owner == "replica-fast" and 0.0 < left <= 1.0
    # ... then the replica dies (no more heartbeats); one whose clock is an hour behind adopts the job when the
    # lease ends by the database's clock.
    clock.skew = -HOUR
    slow = replicas("replica-slow")
    deadline = time.monotonic() + 20.0
    while not await slow._claim_one():
        assert time.monotonic() < deadline, f"the expired lease was never claimable: {await _lease(db, key)}"
        await asyncio.sleep(0.1)  # polling interval while waiting for the lease to expire
    owner, attempts, left = await _lease(db, key)
    assert (owner, attempts) == ("replica-slow", 2) and 25.0 < left <= 30.0  # attempts stays the fencing token
