"""The pure parts of the pages: what a training-job event becomes for the browser, the list's progress and ETA,
and which actions a job's state offers."""

from __future__ import annotations

import math

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from neuroweaver.trainer.v1 import training_job_pb2 as tpb
from neuroweaver_console.training import _allowed_actions, event_json, job_summary

S = tpb.TrainingJob


def test_step_event_with_a_nan_loss_is_valid_json_without_the_point():
    ev = tpb.TrainingJobEvent(
        sequence=7, type=tpb.EVENT_TYPE_STEP, stage="sft",
        step=tpb.StepMetrics(step=3, total_steps=10, loss=math.nan, learning_rate=1e-3, eta=Duration(seconds=75)),
    )  # fmt: skip
    out = event_json(ev)
    assert out["seq"] == 7 and out["type"] == "step" and out["stage"] == "sft"
    assert out["step"] == {"step": 3, "total": 10, "loss": None, "lr": 1e-3, "eta": "1m 15s"}  # JSON has no NaN


def test_eval_and_state_events():
    ev = event_json(tpb.TrainingJobEvent(sequence=2, type=tpb.EVENT_TYPE_EVAL, metrics={"eval_loss": 1.5, "step": 20.0}))
    assert ev["metrics"] == {"eval_loss": 1.5, "step": 20.0} and "step" not in ev
    state = event_json(tpb.TrainingJobEvent(sequence=3, type=tpb.EVENT_TYPE_STATE_CHANGED, state=S.STATE_SUCCEEDED))
    assert state["state"] == "succeeded" and state["type"] == "state changed"


def test_list_eta_comes_from_the_rate_so_far():
    start = Timestamp(seconds=1_000)
    job = S(name="projects/default/trainingJobs/tj-1", state=S.STATE_RUNNING, current_step=25, total_steps=100, start_time=start)
    row = job_summary(job, now=1_100)  # 25 steps in 100 s: 75 more take 300 s
    assert (row["id"], row["percent"], row["eta"], row["state"]) == ("tj-1", 25, "5m 00s", "running")
    assert job_summary(S(state=S.STATE_QUEUED, total_steps=100), now=1_100)["eta"] == "–"
    assert job_summary(S(state=S.STATE_SUCCEEDED, current_step=100, total_steps=100))["percent"] == 100


def test_actions_follow_the_state():
    assert _allowed_actions(S.STATE_RUNNING) == ["checkpoint", "pause", "cancel"]
    assert _allowed_actions(S.STATE_PAUSED) == ["resume", "cancel"]
    assert _allowed_actions(S.STATE_QUEUED) == ["cancel"]
    assert _allowed_actions(S.STATE_SUCCEEDED) == _allowed_actions(S.STATE_CANCELLED) == []
