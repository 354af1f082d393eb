"""PostgreSQL variants: replicas claiming from the shared queue at once never claim a job twice nor exceed a project's
quota (claims are serialised by an advisory lock), and a watcher on
one server sees events written by another process through LISTEN/NOTIFY (the poll fallback is set to 30 s,
so only a notification can deliver them in time)."""

from __future__ import annotations

import asyncio
import time

import pytest

from neuroweaver_runtime import migrations
from neuroweaver_runtime.db import Database
from neuroweaver_runtime.notify import Notifier
from neuroweaver_runtime.testing import create_postgres_database
from neuroweaver_runtime.timestamps import utcnow
from neuroweaver_trainer.adapters.repository import SqlJobRepository
from neuroweaver_trainer.adapters.unit_of_work import SqlUnitOfWorkFactory
from neuroweaver_trainer.app import MIGRATIONS
from neuroweaver_trainer.domain.job import EventType, JobEvent, JobState, Method, StepMetrics, TrainingJob, apply_defaults
from neuroweaver_trainer.domain.scheduling import Quota, Quotas
from neuroweaver_trainer.service.scheduler import Scheduler, SchedulerSettings

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pg_url():
    url, drop = await create_postgres_database("nwtrainer")
    await asyncio.to_thread(migrations.upgrade, url, MIGRATIONS)
    yield url
    await drop()


class HeldWorkers:
    """Local workers that never exit (the test only looks at what was claimed)."""

    def __init__(self) -> None:
        self.started: list[str] = []

    async def start(self, job, attempt, on_event, devices=()):
        self.started.append(job.name)
        return _Held()

    def signal(self, proc, sig):
        pass

    def log_path(self, job_id, attempt):
        return f"/logs/{job_id}-{attempt}.log"


class _Held:
    returncode = None

    async def wait(self) -> int:
        await asyncio.Event().wait()
        return 0


async def test_replicas_claiming_at_once_never_double_claim_nor_exceed_a_quota(pg_url):
    setup = Database(pg_url)
    async with setup.transaction() as s:
        repo = SqlJobRepository(s)
        for i in range(30):
            project = "default" if i % 2 else "other"
            job = TrainingJob(
                name=f"projects/{project}/trainingJobs/q-{i}", base_model="b", dataset_uri="file:///d.jsonl",
                method=Method.SFT_LORA, target_model=f"projects/{project}/models/m", state=JobState.QUEUED, create_time=utcnow(),
            )  # fmt: skip
            apply_defaults(job)
            await repo.add(job, project)
    await setup.dispose()

    quotas = Quotas({"default": Quota(max_jobs=4)})  # "other" has no cap: all 15 of its jobs run
    dbs = [Database(pg_url) for _ in range(3)]
    workers = [HeldWorkers() for _ in dbs]
    schedulers = [
        Scheduler(
            SqlUnitOfWorkFactory(db, Notifier()), Notifier(),
            SchedulerSettings(owner=f"r{i}", max_concurrent_jobs=30, quotas=quotas, preemption_grace_seconds=-1), w,
        )
        for i, (db, w) in enumerate(zip(dbs, workers, strict=True))
    ]  # fmt: skip

    async def claim_all(scheduler: Scheduler) -> None:
        while await scheduler._claim_one():
            await asyncio.sleep(0)  # let the other replicas' claims interleave

    try:
        await asyncio.gather(*(claim_all(s) for s in schedulers))
        started = [name for w in workers for name in w.started]
        assert len(started) == len(set(started)) == 15 + 4
        assert sum("/default/" in name for name in started) == 4
        # every replica got work: serialised claims never pick a row another replica is taking (without the lock
        # they all pick the same head, block on its row lock and find it gone)
        assert all(w.started for w in workers)
    finally:
        for scheduler in schedulers:
            for r in scheduler.running.values():
                if r.task is not None:
                    r.task.cancel()
        for db in dbs:
            await db.dispose()

    check = Database(pg_url)
    async with check.transaction() as s:
        counts = await SqlJobRepository(s).count_by_state()
    await check.dispose()
    assert counts == {"RUNNING": 19, "QUEUED": 11}


async def test_watch_on_another_server_follows_notify(pg_url, trainers, tiny_model, data_root, h):
    a = await trainers(database_url=pg_url, run_jobs=False, watch_poll_seconds=30.0)
    b = await trainers(database_url=pg_url, run_jobs=False, watch_poll_seconds=30.0, migrate=False)
    job = await a.stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job_id="pg-watch", training_job=h.job_pb(tiny_model, data_root / "chat.jsonl"))
    )  # fmt: skip
    received: list = []
    arrived = asyncio.Event()

    def on_event(e):
        received.append((e, time.monotonic()))
        arrived.set()

    watcher = asyncio.create_task(h.watch_all(b.stub, job.name, on_event=on_event))
    await h.wait_for(lambda: received, 10, what="the queued event")

    writer = Database(pg_url)  # stands in for the worker process: its own connection, NOTIFY on commit
    async with writer.transaction() as s:
        pk = (await SqlJobRepository(s).get(job.name)).key
    latencies = []
    for step in range(1, 6):
        arrived.clear()
        sent = time.monotonic()
        async with writer.transaction() as s:
            await SqlJobRepository(s).append_event(
                pk, JobEvent(EventType.STEP, stage="sft", step=StepMetrics(step=step, total_steps=5), create_time=utcnow())
            )
        await asyncio.wait_for(arrived.wait(), 5)
        latencies.append(received[-1][1] - sent)
    async with writer.transaction() as s:
        await SqlJobRepository(s).append_event(
            pk, JobEvent(EventType.STATE_CHANGED, state=JobState.SUCCEEDED, create_time=utcnow())
        )
    await writer.dispose()
    events = await asyncio.wait_for(watcher, 10)
    h.assert_gap_free(events)
    assert [e.step.step for e in events if e.type == h.tpb.EVENT_TYPE_STEP] == [1, 2, 3, 4, 5]
    assert events[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED
    assert max(latencies) < 10.0, latencies  # well below the 30 s poll: delivered by NOTIFY (a bound, not a speed claim)
