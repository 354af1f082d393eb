"""Priorities, project quotas, GPUs and preemption: the pure policy (domain/scheduling.py) and the scheduler that
applies it, on in-memory repositories with held stand-in workers."""

from __future__ import annotations

import asyncio

import pytest

from neuroweaver_runtime.errors import FailedPrecondition
from neuroweaver_trainer.domain.job import Interrupt, JobState, Method, Resources, TrainingJob
from neuroweaver_trainer.domain.scheduling import (
    Capacity,
    QueuedJob,
    Quota,
    Quotas,
    RunningJob,
    Usage,
    next_runnable,
    preemption_victims,
    wait_reasons,
)
from neuroweaver_trainer.service.scheduler import Scheduler, SchedulerSettings

P = "projects/default"


def q(key: int, priority: int = 0, gpus: int = 0, project: str = "default", local: bool = True) -> QueuedJob:
    return QueuedJob(key, f"projects/{project}/trainingJobs/j{key}", project, priority, gpus, local)


ROOMY = Capacity(slots=4, free_slots=4, gpus=4, free_gpus=4)


# -- the policy ------------------------------------------------------------------------------------


def test_quotas_parse_and_fall_back_to_the_default():
    quotas = Quotas.parse("team-a=jobs:2,gpus:4,priority:100; team-b=jobs:1 ;*=gpus:8,priority:-5")
    assert quotas.of("team-a") == Quota(2, 4, 100) and quotas.of("team-b") == Quota(1, None)
    assert quotas.of("anyone") == Quota(None, 8, -5)
    assert Quotas.parse("").of("x") == Quota()


@pytest.mark.parametrize(
    "text", ["team-a", "team-a=jobs", "team-a=jobs:-1", "Team=jobs:1", "a=cpus:2", "a=", "a=priority:x", "a=priority:"]
)
def test_quotas_refuse_what_they_cannot_read(text):
    with pytest.raises(ValueError):
        Quotas.parse(text)


def test_the_first_job_in_queue_order_that_fits_runs_and_later_ones_backfill():
    queue = [q(1, gpus=4), q(2, project="team-a"), q(3)]
    usage = {"team-a": Usage(jobs=1)}
    quotas = Quotas({"team-a": Quota(max_jobs=1)})
    free = Capacity(slots=2, free_slots=1, gpus=4, free_gpus=2)
    # job 1 needs 4 GPUs (2 free), job 2's project is at its quota: job 3 backfills
    assert next_runnable(queue, usage, quotas, free) == queue[2]
    assert next_runnable(queue, usage, quotas, Capacity(2, 0, 4, 4)) is None  # no free slot


def test_wait_reasons_name_the_quota_the_gpus_or_the_jobs_ahead():
    queue = [q(1, priority=5), q(2, gpus=8), q(3, project="team-a"), q(4, gpus=3, project="team-b"), q(5)]
    usage = {"team-a": Usage(jobs=2), "team-b": Usage(jobs=1, gpus=2)}
    quotas = Quotas({"team-a": Quota(max_jobs=2), "team-b": Quota(max_gpus=4)})
    reasons = wait_reasons(queue, usage, quotas, ROOMY)
    assert reasons[1].startswith("0 runnable jobs ahead")
    assert reasons[2] == "needs 8 GPUs; a replica of this trainer has 4"
    assert reasons[3] == "project team-a runs 2 of its 2 concurrent jobs (quota)"
    assert reasons[4] == "needs 3 GPUs; project team-b uses 2 of its 4 (quota)"
    assert reasons[5].startswith("1 runnable job ahead")


def test_preemption_takes_the_fewest_lowest_priority_newest_jobs():
    running = [
        RunningJob(1, "a", priority=0, gpus=1, started=1.0),
        RunningJob(2, "b", priority=0, gpus=1, started=2.0),
        RunningJob(3, "c", priority=-5, gpus=0, started=3.0),
        RunningJob(4, "d", priority=9, gpus=2, started=4.0),
    ]
    full = Capacity(slots=4, free_slots=0, gpus=4, free_gpus=0)
    # a slot is needed: the lowest priority goes first
    assert [v.key for v in preemption_victims(q(9, priority=5), running, full)] == [3]
    # a slot and 2 GPUs: c frees the slot but no GPU; the newest priority-0 jobs free the GPUs
    assert [v.key for v in preemption_victims(q(9, priority=5, gpus=2), running, full)] == [3, 2, 1]
    # only jobs of lower priority are preempted: 3 GPUs cannot be freed below priority 9
    assert preemption_victims(q(9, priority=5, gpus=3), running, full) == []
    assert preemption_victims(q(9, priority=0), running, full) == [running[2]]
    assert preemption_victims(q(9, priority=-5), running, full) == []  # equal priority never preempts
    # room enough already: nobody is preempted
    assert preemption_victims(q(9, priority=5), running, Capacity(4, 1, 4, 0)) == []


# -- the scheduler ---------------------------------------------------------------------------------


class HeldWorker:
    def __init__(self) -> None:
        self.exited = asyncio.Event()
        self.returncode: int | None = None

    async def wait(self) -> int:
        await self.exited.wait()
        return 0


class HeldWorkers:
    """Local workers that run until released; records each start's GPUs."""

    def __init__(self) -> None:
        self.started: dict[str, tuple[HeldWorker, list[str]]] = {}

    async def start(self, job, attempt, on_event, devices=()):
        self.started[job.name] = (HeldWorker(), list(devices))
        return self.started[job.name][0]

    def signal(self, proc, sig):
        proc.exited.set()

    def log_path(self, job_id, attempt):
        return f"/logs/{job_id}-{attempt}.log"


def _job(priority: int = 0, gpus: int = 0) -> TrainingJob:
    return TrainingJob(
        base_model="builtin:smollm2-135m-instruct", dataset_uri="file:///data/chat.jsonl", method=Method.SFT_LORA,
        target_model=f"{P}/models/advisor", priority=priority, resources=Resources(gpus=gpus),
    )  # fmt: skip


async def _create(fakes, job_id: str, priority: int = 0, gpus: int = 0, project: str = "default") -> TrainingJob:
    job = _job(priority, gpus)
    job.target_model = f"projects/{project}/models/advisor"
    return await fakes.service.create_job(f"projects/{project}", job_id, job, "", job_id, False)


async def _finish(fakes, scheduler: Scheduler, workers: HeldWorkers, name: str) -> None:
    """The worker writes SUCCEEDED and exits; the scheduler sees the exit."""
    stored = fakes.store.named(name)
    stored.job.state = JobState.SUCCEEDED
    run = next(r for r in scheduler.running.values() if r.name == name)
    workers.started[name][0].exited.set()
    await asyncio.wait_for(asyncio.shield(run.task), 5)


async def _claim_all(scheduler: Scheduler) -> None:
    while await scheduler._claim_one():
        pass


async def test_higher_priority_runs_first_then_the_oldest(fakes):
    low = await _create(fakes, "low", priority=-1)
    old = await _create(fakes, "old")
    high = await _create(fakes, "high", priority=5)
    newer_high = await _create(fakes, "newer-high", priority=5)
    workers = HeldWorkers()
    scheduler = Scheduler(fakes.uow, fakes.notifier, SchedulerSettings(owner="r1", preemption_grace_seconds=-1), workers)
    order = []
    for _ in range(4):
        await _claim_all(scheduler)
        (name,) = [r.name for r in scheduler.running.values()]
        order.append(name)
        if len(order) == 1:  # positions and reasons while the first runs
            queued = await fakes.service.get_job(newer_high.name)
            assert (queued.queue_position, queued.wait_reason) == (1, "0 runnable jobs ahead; waiting for a free slot")
            assert (await fakes.service.get_job(low.name)).queue_position == 3
        await _finish(fakes, scheduler, workers, name)
    assert order == [high.name, newer_high.name, old.name, low.name]


async def test_a_project_at_its_quota_waits_while_others_run(fakes):
    fakes.service.policy.quotas = quotas = Quotas({"default": Quota(max_jobs=1)})
    first = await _create(fakes, "first")
    second = await _create(fakes, "second")
    other = await _create(fakes, "other", project="other")
    workers = HeldWorkers()
    settings = SchedulerSettings(owner="r1", max_concurrent_jobs=3, quotas=quotas, preemption_grace_seconds=-1)
    scheduler = Scheduler(fakes.uow, fakes.notifier, settings, workers)
    await _claim_all(scheduler)
    assert sorted(r.name for r in scheduler.running.values()) == sorted([first.name, other.name])
    waiting = await fakes.service.get_job(second.name)
    assert waiting.state is JobState.QUEUED
    assert waiting.wait_reason == "project default runs 1 of its 1 concurrent jobs (quota)"
    await _finish(fakes, scheduler, workers, first.name)
    await _claim_all(scheduler)
    assert second.name in {r.name for r in scheduler.running.values()}


async def test_each_local_job_gets_its_own_gpus(fakes):
    fakes.service.policy.replica_gpus = 2
    a = await _create(fakes, "a", gpus=1)
    b = await _create(fakes, "b", gpus=1)
    c = await _create(fakes, "c", gpus=1)
    workers = HeldWorkers()
    settings = SchedulerSettings(owner="r1", max_concurrent_jobs=3, gpu_devices=["0", "1"], preemption_grace_seconds=-1)
    scheduler = Scheduler(fakes.uow, fakes.notifier, settings, workers)
    await _claim_all(scheduler)
    assert {n: workers.started[n][1] for n in workers.started} == {a.name: ["0"], b.name: ["1"]}
    await _finish(fakes, scheduler, workers, a.name)
    await _claim_all(scheduler)
    assert workers.started[c.name][1] == ["0"]  # the device a released
    with pytest.raises(FailedPrecondition) as err:
        await _create(fakes, "too-big", gpus=3)
    assert err.value.reason == "NOT_ENOUGH_GPUS"


async def test_a_waiting_higher_priority_job_preempts_and_the_victim_is_requeued(fakes):
    low = await _create(fakes, "low")
    workers = HeldWorkers()
    settings = SchedulerSettings(owner="r1", preemption_grace_seconds=0.0)
    scheduler = Scheduler(fakes.uow, fakes.notifier, settings, workers)
    await _claim_all(scheduler)
    same = await _create(fakes, "same")  # equal priority: waits, preempts nothing
    assert not await scheduler._claim_one()
    assert fakes.store.named(low.name).job.interrupt is Interrupt.NONE
    high = await _create(fakes, "high", priority=10)
    assert not await scheduler._claim_one()
    stored = fakes.store.named(low.name)
    assert stored.job.interrupt is Interrupt.PREEMPT
    assert f"preempted by {high.name} (priority 10 > 0)" in stored.events[-1].message
    assert not await scheduler._claim_one()  # asked once; the victim is still saving
    # the worker saves its checkpoint, hands the job back and exits (Journal.settle_stop)
    async with fakes.uow.transaction() as uow:
        assert await uow.jobs.hand_back(stored.job.key, 1, JobState.QUEUED)
    run = scheduler.running[stored.job.key]
    workers.started[low.name][0].exited.set()
    await asyncio.wait_for(asyncio.shield(run.task), 5)
    requeued = fakes.store.named(low.name).job
    assert (requeued.state, requeued.yielded_attempts, requeued.interrupt) == (JobState.QUEUED, 1, Interrupt.NONE)
    await _claim_all(scheduler)
    assert [r.name for r in scheduler.running.values()] == [high.name]
    await _finish(fakes, scheduler, workers, high.name)
    await _claim_all(scheduler)
    assert [r.name for r in scheduler.running.values()] == [low.name]  # older than `same`, same priority
    resumed = fakes.store.named(low.name)
    assert resumed.job.attempts == 2 and "resumes from the last checkpoint" in resumed.events[-1].message
    assert same.name not in workers.started


async def test_preemption_waits_its_grace_for_another_replica(fakes):
    await _create(fakes, "low")
    workers = HeldWorkers()
    scheduler = Scheduler(fakes.uow, fakes.notifier, SchedulerSettings(owner="r1", preemption_grace_seconds=30.0), workers)
    await _claim_all(scheduler)
    await _create(fakes, "high", priority=10)
    assert not await scheduler._claim_one()
    assert fakes.store.named("projects/default/trainingJobs/low").job.interrupt is Interrupt.NONE


async def test_yielded_attempts_do_not_count_against_max_attempts(fakes):
    job = await _create(fakes, "many-pauses")
    stored = fakes.store.jobs[job.key]
    stored.job.attempts, stored.job.yielded_attempts = 5, 4  # four pauses/preemptions and one death
    workers = HeldWorkers()
    scheduler = Scheduler(fakes.uow, fakes.notifier, SchedulerSettings(owner="r1", max_attempts=3), workers)
    await _claim_all(scheduler)
    assert fakes.store.jobs[job.key].job.state is JobState.RUNNING and job.name in workers.started


async def test_a_project_may_not_ask_for_more_priority_than_its_ceiling(fakes):
    """On a shared trainer the operator caps each project's priority: otherwise any project could preempt the rest."""
    fakes.service.policy.quotas = Quotas({"default": Quota(max_priority=10)}, default=Quota(max_priority=0))
    assert (await _create(fakes, "ok", priority=10)).priority == 10
    with pytest.raises(FailedPrecondition) as err:
        await _create(fakes, "too-high", priority=11)
    assert err.value.reason == "PRIORITY_ABOVE_QUOTA"
    with pytest.raises(FailedPrecondition):
        await _create(fakes, "elsewhere", priority=1, project="other")
    assert (await _create(fakes, "background", priority=-50, project="other")).priority == -50
