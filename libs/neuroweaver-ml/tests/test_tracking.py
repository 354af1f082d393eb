"""neuroweaver_ml.tracking with real trainers and a real MLflow server: the stages of one job (a TRL reward model,
then TRL DPO) log into one run under stage-prefixed names and one TensorBoard run directory each; a tracker that
is unreachable or cannot write is reported once and never stops training."""

from __future__ import annotations

import time

import pytest

from neuroweaver_ml.testing import mlflow_server, write_jsonl
from neuroweaver_ml.tracking import TrackingConfig, TrackingSession, activate, attach_trackers

QUESTIONS = [
    ("How often should I rotate my tires?", "Every 5,000 to 7,500 miles."),
    ("What does the check engine light mean?", "The engine computer logged a fault; read the code."),
    ("When should brake pads be replaced?", "When they are worn to about 3 mm."),
    ("How often should I change the oil?", "Every 5,000 miles with synthetic oil."),
]


@pytest.mark.slow
def test_stages_of_one_job_log_into_one_run_and_one_tensorboard_dir_each(tiny_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from neuroweaver_ml.rlaif import DPOJobConfig, RewardModelConfig, run_dpo, run_reward_model

    pf = write_jsonl(
        tmp_path / "prefs.jsonl", [{"prompt": q, "chosen": a, "rejected": "I don't know."} for q, a in QUESTIONS] * 2
    )
    warnings: list[str] = []
    with mlflow_server(tmp_path / "mlflow") as uri:
        cfg = TrackingConfig(
            mlflow_tracking_uri=uri, mlflow_experiment="stages", run_name="job-1", tensorboard_dir=str(tmp_path / "tb"),
            state_file=str(tmp_path / "tracking.json"), params={"method": "test", "lr": 1e-4}, stage_names={"policy": "dpo"},
        )  # fmt: skip
        session = TrackingSession(cfg, on_warning=warnings.append)
        session.start()
        with activate(session):
            rm = run_reward_model(
                RewardModelConfig(
                    preference_file=str(pf),
                    output_dir=str(tmp_path / "rm"),
                    max_steps=3,
                    batch_size=4,
                    eval_fraction=0.25,
                    learning_rate=1e-4,
                    device="cpu",
                )  # fmt: skip
            )
            dpo = run_dpo(
                DPOJobConfig(
                    base_model_dir=str(tiny_model_dir),
                    preference_file=str(pf),
                    output_dir=str(tmp_path / "dpo"),
                    max_steps=2,
                    batch_size=2,
                    lora_r=4,
                    lora_alpha=8,
                    checkpoint_every_steps=2,
                    device="cpu",
                )  # fmt: skip
            )
        assert rm.status == dpo.status == "completed"
        session.finish()
        assert warnings == []

        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("stages").experiment_id])
        assert [r.info.run_id for r in runs] == [session.run_id]
        run = runs[0]
        assert run.info.status == "FINISHED" and run.data.params == {"method": "test", "lr": "0.0001"}
        assert [m.step for m in client.get_metric_history(session.run_id, "reward_model/loss")] == [1, 2, 3]
        assert [m.step for m in client.get_metric_history(session.run_id, "dpo/loss")] == [1, 2]
        assert any(k.startswith("dpo/rewards/") for k in run.data.metrics), sorted(run.data.metrics)

        # a later attempt (same state file, same server) continues the run
        again = TrackingSession(cfg)
        again.start()
        assert again.resumed and again.run_id == session.run_id
        again.close()

    for stage, steps in (("reward_model", [1, 2, 3]), ("dpo", [1, 2])):
        acc = EventAccumulator(str(tmp_path / "tb" / stage))
        acc.Reload()
        assert [s.step for s in acc.Scalars("train/loss")] == steps


def test_an_unreachable_server_is_reported_once_and_training_callbacks_skip_it(tmp_path, monkeypatch):
    import socket

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    warnings: list[str] = []
    session = TrackingSession(TrackingConfig(mlflow_tracking_uri=dead, tensorboard_dir=str(tmp_path / "tb")), warnings.append)
    t0 = time.monotonic()
    session.start()
    assert time.monotonic() - t0 < 30
    assert session.run_id is None and len(warnings) == 1 and dead in warnings[0] and "training goes on" in warnings[0]
    names = [type(cb).__name__ for cb in session.callbacks("sft")]
    assert names == ["SafeTensorBoardCallback"]  # TensorBoard still on, MLflow off
    session.log_metrics({"loss": 1.0}, 1, "sft")  # no-ops, no raise
    session.log_artifacts([(str(tmp_path), "x")])
    session.finish()


def test_an_unwritable_tensorboard_dir_is_reported_and_skipped(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    warnings: list[str] = []
    session = TrackingSession(TrackingConfig(tensorboard_dir=str(tmp_path / "file" / "tb")), warnings.append)
    session.start()
    assert session.callbacks("sft") == [] and len(warnings) == 1 and "TensorBoard" in warnings[0]
    assert session.callbacks("policy") == [] and len(warnings) == 1  # said once


def test_no_active_session_attaches_nothing():
    class Trainer:
        added: list = []

        def add_callback(self, cb):
            self.added.append(cb)

    t = Trainer()
    attach_trackers(t, "sft")
    assert t.added == []
    with activate(TrackingSession(TrackingConfig(tensorboard_dir=""))):
        attach_trackers(t, "sft")  # a session without trackers: nothing either
    assert t.added == []
