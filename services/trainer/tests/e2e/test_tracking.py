"""Experiment trackers through a real trainer, real worker processes and a real MLflow tracking server
(`mlflow server` as a subprocess on a free port, SQLite backend store and artifact root in a temp dir):

* an SFT job with MLflow and TensorBoard on, its worker SIGKILLed after the first checkpoint: the resumed attempt
  continues the same MLflow run (one run in the experiment), which holds the job's parameters, `sft/loss` at every
  step (equal to the job's STEP events), the final metrics, the training report and the adapter (downloaded back,
  same sha256 as the stored adapter); the TensorBoard event files, stored with the job's artifacts, read back with
  TensorBoard's own EventAccumulator, hold `train/loss` at every step;
* a job whose tracker (the trainer-wide default) is unreachable still succeeds, quickly, and says so in a LOG event;
* a bad tracking URI is INVALID_ARGUMENT with a field violation.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
import pytest

from neuroweaver_ml import digest_path, uri_to_path
from neuroweaver_runtime.testing import free_port

pytestmark = pytest.mark.slow  # trains in worker processes


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    from neuroweaver_ml.testing import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


async def test_sft_job_logs_to_mlflow_and_tensorboard_and_a_resumed_attempt_continues_the_run(
    trainers, registry, tiny_model, data_root, h, mlflow_server, tmp_path
):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = await trainers()
    job = h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, max_steps=6,
                   checkpoint_every=2, eval_every=6)  # fmt: skip
    job.tracking.mlflow_tracking_uri, job.tracking.mlflow_experiment, job.tracking.tensorboard = mlflow_server, "nw-e2e", True
    created = await trainer.stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job_id="tracked", training_job=job)
    )
    assert (created.tracking.mlflow_tracking_uri, created.tracking.mlflow_experiment, created.tracking.tensorboard) == (
        mlflow_server, "nw-e2e", True,
    )  # fmt: skip
    killed = []

    def on_event(e):
        if not killed and e.type == h.tpb.EVENT_TYPE_CHECKPOINT and e.metrics["step"] >= 2:
            run = next(r for r in trainer.service.scheduler.running.values() if r.name == created.name)
            os.kill(run.proc.pid, signal.SIGKILL)
            killed.append(run.proc.pid)

    events = await asyncio.wait_for(h.watch_all(trainer.stub, created.name, on_event=on_event), 240)
    assert killed and events[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED, events[-1].message
    done = await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=created.name))
    assert done.attempts == 2

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("nw-e2e")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # the resumed attempt continued the run
    run = runs[0]
    run_id = run.info.run_id
    logs = [e.message for e in events if e.type == h.tpb.EVENT_TYPE_LOG and e.message.startswith("tracking:")]
    assert f"logs to run {run_id}" in logs[0] and f"continues run {run_id}" in logs[1], logs
    tb_dir = Path(trainer.config["data_dir"]) / "jobs" / "tracked" / "tensorboard"
    assert f"tensorboard --logdir {tb_dir}" in logs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.tags["neuroweaver.job"] == created.name
    params = run.data.params
    assert (params["method"], params["hyperparameters.max_steps"], params["base_model"]) == ("SFT_LORA", "6", tiny_model)
    assert params["dataset_sha256"] == created.dataset_digest and params["lora.r"] == "4"

    # per-step loss: every step of the job, each value the job's STEP event reported (the steps the killed attempt
    # logged after its last checkpoint are logged again by the resumed one, which retrains them)
    history: dict[int, list[float]] = {}
    for m in client.get_metric_history(run_id, "sft/loss"):
        history.setdefault(m.step, []).append(m.value)
    steps = [e for e in events if e.type == h.tpb.EVENT_TYPE_STEP]
    assert sorted(history) == [1, 2, 3, 4, 5, 6] == sorted({e.step.step for e in steps})
    for e in steps:
        assert any(abs(v - e.step.loss) < 1e-5 for v in history[e.step.step]), (e.step.step, e.step.loss, history)
    assert {"sft/learning_rate", "sft/grad_norm", "sft/eval_loss", "train_loss", "eval_loss"} <= set(run.data.metrics)
    assert run.data.metrics["train_loss"] == pytest.approx(done.metrics["train_loss"])

    # artifacts: the report and the adapter, downloaded back from the server
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"adapter", "training_report.json"} <= top, top
    got = Path(client.download_artifacts(run_id, "adapter", str(tmp_path)))
    stored = uri_to_path(done.output_uri) / "adapter"
    assert digest_path(got)[0] == digest_path(stored)[0]
    report = Path(client.download_artifacts(run_id, "training_report.json", str(tmp_path)))
    assert report.read_bytes() == (uri_to_path(done.output_uri) / "training_report.json").read_bytes()

    # TensorBoard: the copy stored with the job's artifacts, read with TensorBoard's own reader
    assert tb_dir.is_dir()
    acc = EventAccumulator(str(uri_to_path(done.output_uri) / "tensorboard" / "sft"))
    acc.Reload()
    scalars = acc.Scalars("train/loss")
    assert sorted({s.step for s in scalars}) == [1, 2, 3, 4, 5, 6]
    for e in steps:
        assert any(abs(s.value - e.step.loss) < 1e-5 for s in scalars if s.step == e.step.step)
    assert "eval/loss" in acc.Tags()["scalars"]


async def test_an_unreachable_tracker_does_not_fail_the_job(trainers, registry, tiny_model, data_root, h, rpc_err):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    trainer = await trainers(mlflow_tracking_uri=dead)  # the trainer-wide default: every job logs there

    bad = h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, max_steps=2)
    bad.tracking.mlflow_tracking_uri = "ftp://mlflow:5000"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await trainer.stub.CreateTrainingJob(h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job=bad))
    code, _, violations = rpc_err(exc)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in violations] == ["training_job.tracking.mlflow_tracking_uri"]

    job = h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, max_steps=2, checkpoint_every=2)
    created = await trainer.stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job_id="untracked", training_job=job)
    )
    assert created.tracking.mlflow_tracking_uri == dead and created.tracking.mlflow_experiment == h.TARGET_MODEL
    events = await asyncio.wait_for(h.watch_all(trainer.stub, created.name), 180)
    assert events[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED, events[-1].message
    warnings = [e for e in events if e.type == h.tpb.EVENT_TYPE_LOG and "training goes on without MLflow" in e.message]
    assert len(warnings) == 1 and dead in warnings[0].message, [e.message for e in events]
    # the tracker cost seconds, not MLflow's default minutes of retries: from the warning's start to the first step
    first_step = next(e for e in events if e.type == h.tpb.EVENT_TYPE_STEP)
    started = next(e for e in events if e.type == h.tpb.EVENT_TYPE_STATE_CHANGED and e.state == h.tpb.TrainingJob.STATE_RUNNING)
    assert first_step.create_time.ToDatetime() - started.create_time.ToDatetime() < __import__("datetime").timedelta(seconds=60)


async def test_a_paused_job_keeps_its_run_open_and_a_cancelled_one_ends_it_killed(
    trainers, registry, tiny_model, data_root, h, mlflow_server, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("NW_TRAINER_STOP_POLL_SECONDS", "0.2")  # the workers read the pause and cancel quickly
    trainer = await trainers()
    job = h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, max_steps=200,
                   checkpoint_every=1000, eval_every=1000)  # fmt: skip
    job.tracking.mlflow_tracking_uri, job.tracking.mlflow_experiment = mlflow_server, "nw-e2e-stops"
    created = await trainer.stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job_id="tracked-stops", training_job=job)
    )

    async def stepped():
        return (await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=created.name))).current_step >= 2

    client = MlflowClient(mlflow_server)

    def run_status() -> str:
        exp = client.get_experiment_by_name("nw-e2e-stops")
        (run,) = client.search_runs([exp.experiment_id])
        return run.info.status

    await h.wait_for(stepped, 120, what="training steps")
    await trainer.stub.PauseTrainingJob(h.tsvc.PauseTrainingJobRequest(name=created.name))
    paused = await h.wait_state(trainer.stub, created.name, {h.tpb.TrainingJob.STATE_PAUSED}, 60)
    assert run_status() == "RUNNING"  # the resumed attempt continues it
    await trainer.stub.ResumeTrainingJob(h.tsvc.ResumeTrainingJobRequest(name=created.name))

    async def resumed_and_stepping():
        job = await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=created.name))
        return job.current_step > paused.current_step + 1

    await h.wait_for(resumed_and_stepping, 120, what="the resumed attempt to train")
    await trainer.stub.CancelTrainingJob(h.tsvc.CancelTrainingJobRequest(name=created.name))
    done = await h.wait_state(trainer.stub, created.name, timeout=60)
    assert done.state == h.tpb.TrainingJob.STATE_CANCELLED and done.attempts == 2
    assert run_status() == "KILLED"
