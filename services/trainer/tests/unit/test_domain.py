"""Domain rules: defaults, validation, the cancel state machine, deterministic registration ids."""

from __future__ import annotations

import pytest

from neuroweaver_runtime.errors import InvalidArgument, Violations
from neuroweaver_trainer.domain.job import (
    JobState,
    Method,
    TrainingJob,
    apply_defaults,
    cancel_transition,
    hyperparameters_as_strings,
    registration_request_id,
    validate_job,
)


def _job(**kw) -> TrainingJob:
    values = dict(
        name="projects/p/trainingJobs/j",
        base_model="b",
        dataset_uri="file:///d",
        method=Method.SFT_QLORA,
        target_model="projects/p/models/m",
    )
    values.update(kw)
    return TrainingJob(**values)


def test_defaults_follow_the_contract():
    job = _job()
    apply_defaults(job)
    h = job.hyperparameters
    assert (h.learning_rate, h.batch_size, h.max_seq_length, h.checkpoint_every_steps, h.lr_scheduler) == (
        2e-4,
        4,
        512,
        50,
        "cosine",
    )
    assert h.gradient_checkpointing is True  # default on QLoRA
    assert (job.lora.r, job.lora.alpha, job.lora.dropout, job.version_bump) == (8, 16, 0.05, "minor")
    strings = hyperparameters_as_strings(job)
    assert strings["learning_rate"] == "0.0002" and strings["lora_target_modules"] == "auto"


def test_validation_collects_every_violation():
    job = _job(method=None, target_model="nope", version_bump="giant", labels={"Bad Key": "x"})
    job.hyperparameters.batch_size = -1
    job.hyperparameters.eval_split = 1.5
    v = Violations()
    validate_job(job, v)
    fields = {x.field for x in v.items}
    assert {"training_job.method", "training_job.target_model", "training_job.version_bump", "training_job.hyperparameters.batch_size",
            "training_job.hyperparameters.eval_fraction", "training_job.labels.Bad Key"} <= fields  # fmt: skip
    with pytest.raises(InvalidArgument):
        v.raise_if_any()
    ok = Violations()
    validate_job(_job(), ok)
    assert ok.items == []


def test_cancel_state_machine():
    assert cancel_transition(JobState.QUEUED) is JobState.CANCELLED
    assert cancel_transition(JobState.RUNNING) is JobState.CANCELLING
    assert cancel_transition(JobState.CANCELLING) is None and cancel_transition(JobState.CANCELLED) is None
    for state in (JobState.SUCCEEDED, JobState.FAILED):
        with pytest.raises(ValueError):
            cancel_transition(state)


def test_registration_request_id_is_deterministic_per_job():
    a = registration_request_id("projects/p/trainingJobs/a")
    assert a == registration_request_id("projects/p/trainingJobs/a")
    assert a != registration_request_id("projects/p/trainingJobs/b")
