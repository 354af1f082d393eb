"""A job trained by two processes (PyTorch DDP over gloo on this CPU, under torch.distributed.run): every rank trains,
rank 0 alone writes events and registers; a SIGKILLed rank fails the attempt, which resumes from the checkpoint."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow  # trains in worker processes

P = "projects/default"


def _spec(h, tiny_model, data_root, **kw):
    spec = h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, **kw)
    spec.resources.processes = 2
    return spec


def _ranks(trainer, name: str) -> dict[int, psutil.Process]:
    """The job's rank processes (children of the launcher the scheduler started), by RANK."""
    run = next(r for r in trainer.service.scheduler.running.values() if r.name == name)
    out = {}
    for child in psutil.Process(run.proc.pid).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RANK" in env and "neuroweaver_trainer.worker" in " ".join(child.cmdline()):
            out[int(env["RANK"])] = child
    return out


async def test_two_processes_train_one_job_and_rank_0_alone_writes(trainers, registry, tiny_model, data_root, h):
    trainer = await trainers()
    job = await trainer.stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent=P, training_job_id="ddp", training_job=_spec(h, tiny_model, data_root, max_steps=8, eval_every=8))
    )  # fmt: skip
    seen_ranks: dict[int, psutil.Process] = {}

    def on_event(e):
        if e.type == h.tpb.EVENT_TYPE_STEP and not seen_ranks:
            seen_ranks.update(_ranks(trainer, job.name))

    events = await asyncio.wait_for(h.watch_all(trainer.stub, job.name, on_event=on_event), 300)
    assert events[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED, events[-1].message
    assert sorted(seen_ranks) == [0, 1]  # two processes trained
    h.assert_gap_free(events)
    steps = [e.step.step for e in events if e.type == h.tpb.EVENT_TYPE_STEP]
    assert steps == list(range(1, 9))  # one event per step: rank 0 alone writes
    done = await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=job.name))
    report = json.loads((Path(trainer.config["data_dir"]) / "jobs" / "ddp" / "run" / "training_report.json").read_text())
    assert report["world_size"] == 2
    assert len(await h.registry_versions_of(registry.stub, job.name)) == 1 and done.model_version


async def test_a_killed_rank_fails_the_attempt_and_the_job_resumes_from_its_checkpoint(
    trainers, registry, tiny_model, data_root, h
):
    trainer = await trainers()
    job = await trainer.stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent=P, training_job_id="ddp-kill", training_job=_spec(h, tiny_model, data_root, max_steps=12, checkpoint_every=4, eval_every=12))
    )  # fmt: skip
    killed: list[int] = []

    def on_event(e):
        if not killed and e.type == h.tpb.EVENT_TYPE_CHECKPOINT and e.metrics["step"] >= 4:
            rank_1 = _ranks(trainer, job.name)[1]
            os.kill(rank_1.pid, signal.SIGKILL)
            killed.append(rank_1.pid)

    events = await asyncio.wait_for(h.watch_all(trainer.stub, job.name, on_event=on_event), 420)
    assert killed
    h.assert_gap_free(events)
    assert events[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED, events[-1].message
    requeued = [e for e in events if e.type == h.tpb.EVENT_TYPE_STATE_CHANGED and e.state == h.tpb.TrainingJob.STATE_QUEUED]
    assert len(requeued) == 2 and "the worker died" in requeued[1].message, [e.message for e in requeued]
    resumed = [e for e in events if e.type == h.tpb.EVENT_TYPE_RESUMED]
    assert len(resumed) == 1 and int(resumed[0].metrics["step"]) >= 4
    start = int(resumed[0].metrics["step"])
    after = [e.step.step for e in events[events.index(resumed[0]) :] if e.type == h.tpb.EVENT_TYPE_STEP]
    assert after == list(range(start + 1, 13))  # not from zero
    done = await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=job.name))
    assert done.attempts == 2 and done.resumed_from_step == start
    assert len(await h.registry_versions_of(registry.stub, job.name)) == 1
