"""Steering running jobs with real workers: a checkpoint on request, pause and resume from the pause's checkpoint,
preemption by a higher-priority job (the victim resumes from its checkpoint, never from zero), GPUs per worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

pytestmark = pytest.mark.slow  # every test trains in worker processes


@pytest.fixture(autouse=True)
def _workers_read_their_row_often(monkeypatch):
    """Workers inherit the trainer's environment: they read pause/preempt/checkpoint requests every 0.2 s, so a request
    lands within a few steps and the jobs can be short."""
    monkeypatch.setenv("NW_TRAINER_STOP_POLL_SECONDS", "0.2")


P = "projects/default"


def _steps_after_resume(h, events) -> tuple[int, list[int]]:
    resumed = [e for e in events if e.type == h.tpb.EVENT_TYPE_RESUMED]
    assert len(resumed) == 1, [e.message for e in resumed]
    after = [e.step.step for e in events[events.index(resumed[0]) :] if e.type == h.tpb.EVENT_TYPE_STEP]
    return int(resumed[0].metrics["step"]), after


async def test_checkpoint_on_request_then_pause_and_resume_from_the_pause(trainers, registry, tiny_model, data_root, h, rpc_err):
    trainer = await trainers()
    spec = h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, max_steps=120,
                    checkpoint_every=1000, eval_every=1000)  # fmt: skip  # no periodic checkpoint before the end
    job = await trainer.stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent=P, training_job_id="steer", training_job=spec)
    )
    unchanged = await trainer.stub.ResumeTrainingJob(h.tsvc.ResumeTrainingJobRequest(name=job.name))
    assert unchanged.state in (h.tpb.TrainingJob.STATE_QUEUED, h.tpb.TrainingJob.STATE_RUNNING)  # nothing to resume
    asked: dict[str, int] = {}
    events: list = []

    async def steer(e):
        events.append(e)
        if e.type == h.tpb.EVENT_TYPE_STEP and e.step.step >= 3 and "checkpoint" not in asked:
            asked["checkpoint"] = e.step.step
            await trainer.stub.CheckpointTrainingJob(h.tsvc.CheckpointTrainingJobRequest(name=job.name))
        elif e.type == h.tpb.EVENT_TYPE_CHECKPOINT and "checkpoint" in asked and "pause" not in asked:
            asked["pause"] = int(e.metrics["step"])
            paused = await trainer.stub.PauseTrainingJob(h.tsvc.PauseTrainingJobRequest(name=job.name))
            assert paused.state == h.tpb.TrainingJob.STATE_PAUSING
        elif e.type == h.tpb.EVENT_TYPE_STATE_CHANGED and e.state == h.tpb.TrainingJob.STATE_PAUSED:
            raise _Paused()

    with pytest.raises(_Paused):
        await asyncio.wait_for(h.watch_all(trainer.stub, job.name, on_event=steer), 180)
    checkpoints = [int(e.metrics["step"]) for e in events if e.type == h.tpb.EVENT_TYPE_CHECKPOINT]
    # the requested checkpoint (no periodic one is due before step 1000), then the one saved on pausing
    assert len(checkpoints) == 2 and asked["checkpoint"] <= checkpoints[0] < checkpoints[1] < 120, checkpoints
    paused_at = checkpoints[1]
    assert "paused" in events[-1].message
    held = await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=job.name))
    assert held.state == h.tpb.TrainingJob.STATE_PAUSED and held.current_step == paused_at
    await asyncio.sleep(2)  # a paused job is not claimed again
    assert (await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=job.name))).attempts == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await trainer.stub.CheckpointTrainingJob(h.tsvc.CheckpointTrainingJobRequest(name=job.name))
    assert rpc_err(err)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "TRAINING_JOB_NOT_RUNNING")

    resumed = await trainer.stub.ResumeTrainingJob(h.tsvc.ResumeTrainingJobRequest(name=job.name))
    assert resumed.state in (h.tpb.TrainingJob.STATE_QUEUED, h.tpb.TrainingJob.STATE_RUNNING)
    rest = await asyncio.wait_for(h.watch_all(trainer.stub, job.name, after=events[-1].sequence), 300)
    h.assert_gap_free(events + rest)
    assert rest[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED, rest[-1].message
    start, steps = _steps_after_resume(h, rest)
    assert start == paused_at and steps == list(range(paused_at + 1, 121))  # from the pause, not zero
    done = await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=job.name))
    assert done.attempts == 2 and done.resumed_from_step == paused_at
    assert len(await h.registry_versions_of(registry.stub, job.name)) == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await trainer.stub.PauseTrainingJob(h.tsvc.PauseTrainingJobRequest(name=job.name))
    assert rpc_err(err)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "TRAINING_JOB_NOT_PAUSABLE")


class _Paused(Exception):
    pass


async def test_a_higher_priority_job_preempts_and_the_victim_resumes_from_its_checkpoint(
    trainers, registry, tiny_model, data_root, h
):
    trainer = await trainers(max_concurrent_jobs=1, preemption_grace_seconds=0.5)
    long = h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, max_steps=100,
                    checkpoint_every=1000, eval_every=1000)  # fmt: skip
    low = await trainer.stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent=P, training_job_id="low", training_job=long)
    )
    await h.wait_for(lambda: any(r.name == low.name for r in trainer.service.scheduler.running.values()), 60, what="low to start")
    # an older-by-creation job of the same priority waits behind the urgent one
    same = h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, max_steps=2, eval_every=2)
    same_job = await trainer.stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent=P, training_job_id="same", training_job=same)
    )

    async def low_stepped():
        return (await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=low.name))).current_step >= 3

    await h.wait_for(low_stepped, 60, what="low to train a few steps")
    urgent = h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, max_steps=4,
                      eval_every=4, priority=10)  # fmt: skip
    high = await trainer.stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent=P, training_job_id="urgent", training_job=urgent)
    )
    queued = await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=high.name))
    assert queued.queue_position == 1 and "waiting for a free slot" in queued.wait_reason
    done_high = await h.wait_state(trainer.stub, high.name, timeout=180)
    assert done_high.state == h.tpb.TrainingJob.STATE_SUCCEEDED, done_high.error
    events = await asyncio.wait_for(h.watch_all(trainer.stub, low.name), 300)
    assert events[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED, events[-1].message
    preempted = [e for e in events if e.type == h.tpb.EVENT_TYPE_LOG and "preempted by" in e.message]
    assert len(preempted) == 1 and f"preempted by {high.name} (priority 10 > 0)" in preempted[0].message
    handed_back = [e for e in events if e.type == h.tpb.EVENT_TYPE_STATE_CHANGED and "preempted:" in e.message]
    assert len(handed_back) == 1 and handed_back[0].state == h.tpb.TrainingJob.STATE_QUEUED
    saved = [int(e.metrics["step"]) for e in events if e.type == h.tpb.EVENT_TYPE_CHECKPOINT]
    start, steps = _steps_after_resume(h, events)
    assert start == saved[0] > 0 and steps == list(range(start + 1, 101))  # from the preemption's checkpoint
    low_done = await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=low.name))
    assert low_done.attempts == 2
    # urgent ran before `same` (created earlier), and low (older than `same`) resumed before it
    same_done = await h.wait_state(trainer.stub, same_job.name, timeout=120)
    assert done_high.start_time.ToDatetime() < low_done.end_time.ToDatetime() < same_done.start_time.ToDatetime()


async def test_each_local_worker_sees_only_its_own_gpus(trainers, tiny_model, data_root, h, rpc_err):
    trainer = await trainers(max_concurrent_jobs=3, gpu_devices="0,1", preemption_grace_seconds=-1)
    spec = h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, max_steps=2, eval_every=2)
    spec.resources.gpus = 1
    names = []
    for i in range(3):
        job = await trainer.stub.CreateTrainingJob(
            h.tsvc.CreateTrainingJobRequest(parent=P, training_job_id=f"gpu-{i}", training_job=spec)
        )
        names.append(job.name)
    for name in names:
        done = await h.wait_state(trainer.stub, name, timeout=180)
        assert done.state == h.tpb.TrainingJob.STATE_SUCCEEDED, done.error
    logs = Path(trainer.config["data_dir"]) / "jobs"
    seen = [(logs / n.rsplit("/", 1)[-1] / "worker-1.log").read_text() for n in names]
    gpus = [next(line for line in text.splitlines() if "starts (" in line) for text in seen]
    # the first two ran at once on devices of their own; the third got the one freed first
    assert "GPUs: 0)" in gpus[0] and "GPUs: 1)" in gpus[1], gpus
    assert ("GPUs: 0)" in gpus[2]) != ("GPUs: 1)" in gpus[2]), gpus
    spec.resources.gpus = 3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await trainer.stub.CreateTrainingJob(
            h.tsvc.CreateTrainingJobRequest(parent=P, training_job_id="gpu-x", training_job=spec)
        )
    assert rpc_err(err)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_ENOUGH_GPUS")


async def test_nw_train_queue_pause_and_resume_on_a_trainer_that_runs_nothing(trainers, tiny_model, data_root, h, tmp_path):
    """The CLI, as a real `nw` process: `train queue` lists queued jobs in run order with why each waits; `train pause`
    holds a queued job out of the queue and `train resume` puts it back in its place."""
    import json
    import sys

    trainer = await trainers(run_jobs=False, max_concurrent_jobs=1, project_quotas="default=jobs:4")
    spec = h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, max_steps=2)
    for job_id, priority in (("first", 0), ("second", 0), ("urgent", 7)):
        spec.priority = priority
        await trainer.stub.CreateTrainingJob(h.tsvc.CreateTrainingJobRequest(parent=P, training_job_id=job_id, training_job=spec))

    async def nw(*argv: str):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "neuroweaver_sdk.cli", "--trainer", f"127.0.0.1:{trainer.port}", *argv,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return out.decode()

    rows = json.loads(await nw("--json", "train", "queue"))["training_jobs"]
    assert [(r["name"].rsplit("/", 1)[-1], r["queue_position"]) for r in rows] == [("urgent", 1), ("first", 2), ("second", 3)]
    assert rows[0]["priority"] == 7 and rows[1]["wait_reason"].startswith("1 runnable job ahead")
    table = await nw("train", "queue")
    assert "urgent" in table and "waiting for a free slot" in table
    paused = json.loads(await nw("--json", "train", "pause", "first"))
    assert paused["state"] == "STATE_PAUSED"
    rows = json.loads(await nw("--json", "train", "queue"))["training_jobs"]
    assert [r["name"].rsplit("/", 1)[-1] for r in rows] == ["urgent", "second"]
    assert json.loads(await nw("--json", "train", "resume", "first"))["state"] == "STATE_QUEUED"
    rows = json.loads(await nw("--json", "train", "queue"))["training_jobs"]
    assert [r["name"].rsplit("/", 1)[-1] for r in rows] == ["urgent", "first", "second"]  # back in its place (age)
