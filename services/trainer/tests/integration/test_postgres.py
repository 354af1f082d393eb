"""PostgreSQL variants: replicas sharing the queue with SKIP LOCKED never claim a job twice, and a watcher on
one server sees events written by another process through LISTEN/NOTIFY (the poll fallback is set to 30 s,
so only a notification can deliver them in time)."""

from __future__ import annotations

import asyncio
import time

import pytest

from neuroweaver_runtime import migrations
from neuroweaver_runtime.db import Database
from neuroweaver_runtime.testing import create_postgres_database
from neuroweaver_runtime.timestamps import utcnow
from neuroweaver_trainer.adapters.repository import SqlJobRepository
from neuroweaver_trainer.app import MIGRATIONS
from neuroweaver_trainer.domain.job import EventType, JobEvent, JobState, Method, StepMetrics, TrainingJob, apply_defaults

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pg_url():
    url, drop = await create_postgres_database("nwtrainer")
    await asyncio.to_thread(migrations.upgrade, url, MIGRATIONS)
    yield url
    await drop()


async def test_skip_locked_claims_never_double_claim(pg_url):
    setup = Database(pg_url)
    async with setup.transaction() as s:
        repo = SqlJobRepository(s)
        for i in range(30):
            job = TrainingJob(
                name=f"projects/default/trainingJobs/q-{i}", base_model="b", dataset_uri="file:///d.jsonl", method=Method.SFT_LORA,
                target_model="projects/default/models/m", state=JobState.QUEUED, create_time=utcnow(),
            )  # fmt: skip
            apply_defaults(job)
            await repo.add(job, "default")
    await setup.dispose()

    async def replica(owner: str) -> list[int]:
        db = Database(pg_url)
        claimed = []
        try:
            while True:
                async with db.transaction() as s:
                    repo = SqlJobRepository(s)
                    job = await repo.claim_next(owner, 60.0, ["LOCAL"])
                    if job is None:
                        return claimed
                    await asyncio.sleep(0.01)  # hold the row lock so the replicas overlap
                    await repo.update(job.key, state=JobState.RUNNING.value, attempts=job.attempts + 1)
                    claimed.append(job.key)
        finally:
            await db.dispose()

    a, b, c = await asyncio.gather(replica("r1"), replica("r2"), replica("r3"))
    assert len(a) + len(b) + len(c) == 30
    assert len(set(a) | set(b) | set(c)) == 30
    assert a and b and c  # all replicas got work: SKIP LOCKED let them pass each other

    check = Database(pg_url)
    async with check.transaction() as s:
        counts = await SqlJobRepository(s).count_by_state()
    await check.dispose()
    assert counts == {"RUNNING": 30}


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
