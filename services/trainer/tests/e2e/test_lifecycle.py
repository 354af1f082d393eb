"""Reliability: a SIGKILLed worker and a SIGKILLed trainer both resume from the last checkpoint and register
exactly one version; cancel stops a worker within seconds; an unreachable registry fails the job clearly."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver_runtime.client import open_channel
from neuroweaver_runtime.testing import free_port

pytestmark = pytest.mark.slow  # every test trains in worker processes


def _attempt_two(h, events, total: int) -> int:
    """Checks the resumed attempt's step counter; returns the step it resumed from."""
    resumed = [e for e in events if e.type == h.tpb.EVENT_TYPE_RESUMED]
    assert len(resumed) == 1, [e.message for e in resumed]
    start = int(resumed[0].metrics["step"])
    assert start >= 4
    after = [e.step.step for e in events[events.index(resumed[0]) :] if e.type == h.tpb.EVENT_TYPE_STEP]
    assert after == list(range(start + 1, total + 1))  # not from zero
    return start


async def test_worker_sigkill_resumes_from_checkpoint(trainers, registry, tiny_model, data_root, h):
    trainer = await trainers()
    job = await trainer.stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job_id="kill-worker", training_job=h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, max_steps=12, eval_every=12))
    )  # fmt: skip
    killed = []

    def on_event(e):
        if not killed and e.type == h.tpb.EVENT_TYPE_CHECKPOINT and e.metrics["step"] >= 4:
            run = next(r for r in trainer.service.scheduler.running.values() if r.name == job.name)
            os.kill(run.proc.pid, signal.SIGKILL)
            killed.append(run.proc.pid)

    events = await asyncio.wait_for(h.watch_all(trainer.stub, job.name, on_event=on_event), 180)
    assert killed
    h.assert_gap_free(events)
    assert events[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED, events[-1].message
    requeued = [e for e in events if e.type == h.tpb.EVENT_TYPE_STATE_CHANGED and e.state == h.tpb.TrainingJob.STATE_QUEUED]
    assert len(requeued) == 2 and "signal 9" in requeued[1].message
    start = _attempt_two(h, events, 12)
    done = await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=job.name))
    assert done.attempts == 2 and done.resumed_from_step == start and done.current_step == 12
    assert len(await h.registry_versions_of(registry.stub, job.name)) == 1


async def _start_trainer_process(args: list[str], log: Path):
    with open(log, "ab") as fh:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "neuroweaver_trainer", *args, stdout=fh, stderr=fh)
    return proc


async def _serving(target: str) -> None:
    channel = open_channel(target, deadline=2)
    health = health_pb2_grpc.HealthStub(channel)

    async def check():
        try:
            r = await health.Check(health_pb2.HealthCheckRequest(service="neuroweaver.trainer.v1.TrainerService"), timeout=1)
            return r.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            return False

    try:
        deadline = time.monotonic() + 60
        while not await check():
            assert time.monotonic() < deadline, "trainer process did not become SERVING"
            await asyncio.sleep(0.2)
    finally:
        await channel.close()


async def test_trainer_sigkill_and_restart_resumes(registry, tiny_model, data_root, tmp_path, h):
    port = free_port()
    target = f"127.0.0.1:{port}"
    data = tmp_path / "trainer"
    args = [
        "--port", str(port), "--metrics-port", "-1", "--data-dir", str(data), "--dataset-roots", str(data_root),
        "--registry-target", registry.target, "--lease-seconds", "3", "--heartbeat-seconds", "0.5",
        "--queue-poll-seconds", "0.5", "--watch-poll-seconds", "0.1", "--model-cache-dir", str(tmp_path / "models"),
        "--model-roots", str(Path(tiny_model).parent),
    ]  # fmt: skip
    proc = await _start_trainer_process(args, tmp_path / "trainer.log")
    channel = open_channel(target)
    stub = h.tgrpc.TrainerServiceStub(channel)
    try:
        await _serving(target)
        job = await stub.CreateTrainingJob(
            h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job_id="kill-trainer", training_job=h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, max_steps=12, eval_every=12))
        )  # fmt: skip
        events: list = []
        try:
            async for resp in stub.WatchTrainingJob(h.tsvc.WatchTrainingJobRequest(name=job.name)):
                events.append(resp.event)
                if resp.event.type == h.tpb.EVENT_TYPE_CHECKPOINT and resp.event.metrics["step"] >= 4:
                    proc.kill()  # SIGKILL the whole trainer; its worker dies with it (PDEATHSIG)
                    await proc.wait()
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
        assert proc.returncode == -signal.SIGKILL
        proc = await _start_trainer_process(args, tmp_path / "trainer.log")
        await _serving(target)
        # Resume the stream from the last sequence we saw: nothing is missed, nothing repeated.
        events += await asyncio.wait_for(h.watch_all(stub, job.name, after=events[-1].sequence), 180)
        h.assert_gap_free(events)
        assert events[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED, events[-1].message
        assert any("lease of attempt 1 expired" in e.message for e in events)
        start = _attempt_two(h, events, 12)
        done = await stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=job.name))
        assert done.attempts == 2 and done.resumed_from_step == start
        assert len(await h.registry_versions_of(registry.stub, job.name)) == 1
    finally:
        await channel.close()
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def test_cancel_stops_worker_and_keeps_checkpoint(trainers, tiny_model, data_root, h):
    trainer = await trainers(cancel_grace_seconds=30.0)
    job = await trainer.stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job_id="cancel-me", training_job=h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, max_steps=500, checkpoint_every=2, eval_every=500))
    )  # fmt: skip
    asked = []

    async def on_event(e):
        if not asked and e.type == h.tpb.EVENT_TYPE_CHECKPOINT:
            asked.append(time.monotonic())
            run = next(r for r in trainer.service.scheduler.running.values() if r.name == job.name)
            asked.append(run.proc)
            j = await trainer.stub.CancelTrainingJob(h.tsvc.CancelTrainingJobRequest(name=job.name))
            assert j.state == h.tpb.TrainingJob.STATE_CANCELLING

    events = await asyncio.wait_for(h.watch_all(trainer.stub, job.name, on_event=on_event), 120)
    stopped_after = time.monotonic() - asked[0]
    assert events[-1].state == h.tpb.TrainingJob.STATE_CANCELLED, events[-1].message
    assert stopped_after < 10, stopped_after
    assert "last checkpoint kept" in events[-1].message
    proc = asked[1]
    # The worker process is gone (its memory with it): it exits by itself after writing CANCELLED; the
    # scheduler SIGKILLs it only if it lingers past cancel_grace_seconds.
    await asyncio.wait_for(proc.wait(), 40)
    assert proc.returncode is not None
    done = await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=job.name))
    assert done.state == h.tpb.TrainingJob.STATE_CANCELLED and done.current_step < 500
    checkpoints = Path(trainer.config["data_dir"]) / "jobs" / "cancel-me" / "run" / "checkpoints"
    assert any(p.name.startswith("checkpoint-") for p in checkpoints.iterdir())


async def test_registry_unreachable_fails_clearly(trainers, registry, tiny_model, data_root, h):
    trainer = await trainers(registry_target=f"127.0.0.1:{free_port()}", registry_retry_seconds=5.0)
    job = await trainer.stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job_id="no-registry", training_job=h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, max_steps=2, eval_every=2))
    )  # fmt: skip
    events = await asyncio.wait_for(h.watch_all(trainer.stub, job.name), 120)
    assert events[-1].state == h.tpb.TrainingJob.STATE_FAILED
    done = await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=job.name))
    assert done.state == h.tpb.TrainingJob.STATE_FAILED and not done.model_version
    assert "unreachable" in done.error and "nothing was registered" in done.error and "adapter is stored at" in done.error
    retries = [e for e in events if e.type == h.tpb.EVENT_TYPE_LOG and "registry unreachable" in e.message]
    assert len(retries) >= 2
    assert await h.registry_versions_of(registry.stub, job.name) == []
