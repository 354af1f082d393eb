"""Through gRPC and a worker process: a LoRA job whose zero-valued settings are explicit trains with them (no warmup,
seed 0, no gradient clipping, no LoRA dropout, one evaluation at the end) and the service returns them as set."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains in a worker process


async def test_explicit_zeros_reach_the_training_run(trainers, registry, tiny_model, data_root, h):
    trainer = await trainers()
    job = h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, max_steps=4, checkpoint_every=4)
    hp = job.hyperparameters
    hp.ClearField("eval_every_steps")
    hp.eval_interval_steps, hp.warmup_fraction, hp.random_seed, hp.gradient_clip_norm = 0, 0, 0, 0
    job.lora.lora_dropout = 0
    created = await trainer.stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job_id="zeros", training_job=job)
    )
    got = created.hyperparameters
    assert [
        (got.HasField(f), getattr(got, f))
        for f in ("eval_interval_steps", "warmup_fraction", "random_seed", "gradient_clip_norm")
    ] == [(True, 0)] * 4
    assert created.lora.HasField("lora_dropout") and created.lora.lora_dropout == 0

    events = await asyncio.wait_for(h.watch_all(trainer.stub, created.name), 240)
    assert events[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED, events[-1].message
    evals = [e for e in events if e.type == h.tpb.EVENT_TYPE_EVAL]
    assert [e.metrics["step"] for e in evals] == [4.0]  # eval_interval_steps 0: once, at the end
    run = Path(trainer.config["data_dir"]) / "jobs" / "zeros" / "run" / "run_config.json"
    cfg = json.loads(run.read_text())["config"]
    assert (cfg["warmup_ratio"], cfg["seed"], cfg["max_grad_norm"], cfg["lora_dropout"], cfg["eval_every_steps"]) == (
        0,
        0,
        0,
        0,
        0,
    )
    assert cfg["eval_fraction"] == 0.1 and cfg["method"] == "lora"
