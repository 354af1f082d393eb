"""The scheduler's claims on in-memory repositories: attempts are the fencing token, failures end the job."""

from __future__ import annotations

from neuroweaver_trainer.domain.job import JobState, Method, TrainingJob
from neuroweaver_trainer.service.scheduler import Scheduler, SchedulerSettings

P = "projects/default"


class BrokenWorkers:
    """A local executor whose workers cannot start."""

    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []

    async def start(self, job, attempt, on_event, devices=()):
        self.started.append((job.name, attempt))
        raise OSError("no python here")

    def signal(self, proc, sig):
        raise AssertionError("nothing to signal")

    def log_path(self, job_id, attempt):
        return f"/logs/{job_id}-{attempt}.log"


def _job() -> TrainingJob:
    return TrainingJob(
        name="", base_model="builtin:smollm2-135m-instruct", dataset_uri="file:///data/chat.jsonl", method=Method.SFT_LORA,
        target_model=f"{P}/models/advisor", version_bump="minor",
    )  # fmt: skip


async def test_a_claim_that_cannot_start_its_worker_fails_the_job(fakes):
    job = await fakes.service.create_job(P, "s1", _job(), "", "body", False)
    workers = BrokenWorkers()
    scheduler = Scheduler(fakes.uow, fakes.notifier, SchedulerSettings(owner="replica-a"), workers)
    assert await scheduler._claim_one()
    assert workers.started == [(job.name, 1)] and scheduler.running == {}
    stored = fakes.store.jobs[job.key]
    assert (stored.job.state, stored.job.attempts, stored.lease_owner) == (JobState.FAILED, 1, "")
    assert "could not start the worker" in stored.job.error
    assert [e.state for e in stored.events] == [JobState.QUEUED, JobState.RUNNING, JobState.FAILED]
    assert not await scheduler._claim_one()  # nothing claimable is left


async def test_an_expired_lease_after_the_last_attempt_fails_the_job_at_claim(fakes):
    job = await fakes.service.create_job(P, "s2", _job(), "", "body", False)
    stored = fakes.store.jobs[job.key]
    stored.job.state, stored.job.attempts, stored.lease_owner, stored.lease_expires_at = JobState.RUNNING, 3, "dead", 1.0
    scheduler = Scheduler(fakes.uow, fakes.notifier, SchedulerSettings(owner="replica-b", max_attempts=3), BrokenWorkers())
    assert await scheduler._claim_one()
    stored = fakes.store.jobs[job.key]
    assert stored.job.state is JobState.FAILED and stored.job.error.startswith("gave up after 3 failed attempts")
    assert fakes.notifier.woken[-1] == f"job{job.key}"
