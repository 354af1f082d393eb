"""Training-job use cases on in-memory repositories: create (idempotent), get/list, cancel, delete, events, watch."""

from __future__ import annotations

import asyncio

import pytest

from neuroweaver_runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from neuroweaver_trainer.domain.job import EventType, Executor, JobEvent, JobState, Method, RlaifSettings, TrainingJob

P = "projects/default"
REQUEST = "7d7b1e4a-55f4-4f25-9d0e-3d2a4f1c2b11"


def _job(**fields) -> TrainingJob:
    values = dict(
        name="", base_model="builtin:smollm2-135m-instruct", dataset_uri="file:///data/chat.jsonl", method=Method.SFT_LORA,
        target_model=f"{P}/models/advisor", version_bump="minor",
    )  # fmt: skip
    values.update(fields)
    return TrainingJob(**values)


async def test_create_queues_once_and_answers_retries(fakes):
    svc = fakes.service
    job = await svc.create_job(P, "j1", _job(), REQUEST, "body", False)
    assert (job.name, job.state, job.last_sequence, job.dataset_digest) == (f"{P}/trainingJobs/j1", JobState.QUEUED, 1, "ab" * 32)
    assert fakes.notifier.woken == [f"job{job.key}"] and fakes.queued == [1]
    again = await svc.create_job(P, "j1", _job(), REQUEST, "body", False)
    assert again == job and len(fakes.store.jobs) == 1 and fakes.queued == [1]
    with pytest.raises(InvalidArgument) as caught:
        await svc.create_job(P, "j2", _job(), REQUEST, "another body", False)
    assert caught.value.reason == "REQUEST_ID_REUSED"
    with pytest.raises(AlreadyExists) as caught:
        await svc.create_job(P, "j1", _job(), "", "body", False)
    assert caught.value.reason == "TRAINING_JOB_ALREADY_EXISTS"
    events = (await svc.list_events(job.name, 0, 10, "")).items
    assert [(e.type, e.state, e.sequence) for e in events] == [(EventType.STATE_CHANGED, JobState.QUEUED, 1)]


async def test_create_checks_before_storing(fakes):
    svc = fakes.service
    checked = await svc.create_job(P, "dry", _job(), "", "body", True)  # validate_only: nothing stored
    assert checked.state is JobState.QUEUED and fakes.store.jobs == {}
    with pytest.raises(FailedPrecondition) as caught:
        await svc.create_job(P, "k8s", _job(executor=Executor.KUBERNETES), "", "body", False)
    assert caught.value.reason == "EXECUTOR_NOT_CONFIGURED"
    with pytest.raises(InvalidArgument):
        await svc.create_job(P, "bad", _job(base_model="", dataset_uri=""), "", "body", False)
    rlaif = RlaifSettings(prompts_uri="file:///p.jsonl", judge_version=f"{P}/judges/j/versions/1")
    with pytest.raises(FailedPrecondition) as caught:  # RLAIF needs the registry, which this trainer lacks
        await svc.create_job(P, "rl", _job(method=Method.RLAIF, rlaif=rlaif), "", "body", False)
    assert caught.value.reason == "REGISTRY_NOT_CONFIGURED"
    assert fakes.store.jobs == {}


async def test_get_and_list_pages_newest_first(fakes):
    svc = fakes.service
    for i in range(5):
        await svc.create_job(P, f"j{i}", _job(), "", "body", False)
    assert (await svc.get_job(f"{P}/trainingJobs/j2")).name == f"{P}/trainingJobs/j2"
    with pytest.raises(NotFound) as caught:
        await svc.get_job(f"{P}/trainingJobs/missing")
    assert caught.value.reason == "TRAINING_JOB_NOT_FOUND"
    names, token = [], ""
    while True:
        page = await svc.list_jobs(P, 2, token, "", "")
        names += [j.name.rsplit("/", 1)[-1] for j in page.items]
        token = page.next_page_token
        if not token:
            break
    assert names == ["j4", "j3", "j2", "j1", "j0"]


async def test_cancel_a_queued_job_ends_it_and_a_running_one_stops_its_worker(fakes):
    svc = fakes.service
    queued = await svc.create_job(P, "q", _job(), "", "body", False)
    cancelled = await svc.cancel_job(queued.name)
    assert cancelled.state is JobState.CANCELLED and cancelled.end_time is not None and fakes.cancelled == []
    assert (await svc.cancel_job(queued.name)).state is JobState.CANCELLED  # again: nothing to do
    running = await svc.create_job(P, "r", _job(), "", "body", False)
    fakes.store.jobs[running.key].job.state = JobState.RUNNING
    stopping = await svc.cancel_job(running.name)
    assert stopping.state is JobState.CANCELLING and fakes.cancelled == [running.key]
    fakes.store.jobs[running.key].job.state = JobState.SUCCEEDED
    with pytest.raises(FailedPrecondition) as caught:
        await svc.cancel_job(running.name)
    assert caught.value.reason == "TRAINING_JOB_FINISHED" and caught.value.metadata == {"state": "SUCCEEDED"}


async def test_delete_only_finished_jobs(fakes):
    svc = fakes.service
    job = await svc.create_job(P, "d", _job(), "", "body", False)
    with pytest.raises(FailedPrecondition) as caught:
        await svc.delete_job(job.name)
    assert caught.value.reason == "TRAINING_JOB_NOT_FINISHED" and job.key in fakes.store.jobs
    await svc.cancel_job(job.name)
    await svc.delete_job(job.name)
    assert fakes.store.jobs == {}
    with pytest.raises(NotFound):
        await svc.get_job(job.name)


async def test_watch_replays_then_follows_until_the_final_state(fakes):
    svc = fakes.service
    job = await svc.create_job(P, "w", _job(), "", "body", False)
    seen: list[JobEvent] = []

    async def watch():
        async for event in svc.watch(job.name, 0):
            seen.append(event)

    watcher = asyncio.create_task(watch())
    deadline = asyncio.get_running_loop().time() + 5
    while not seen and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert [e.sequence for e in seen] == [1]
    await svc.cancel_job(job.name)  # its STATE_CHANGED → CANCELLED event ends the watch
    await asyncio.wait_for(watcher, 5)
    assert [(e.sequence, e.state) for e in seen] == [(1, JobState.QUEUED), (2, JobState.CANCELLED)]
