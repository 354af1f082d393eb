"""Through gRPC and a worker process: a LoRA job whose zero-valued settings are explicit trains with them (no warmup,
seed 0, no gradient clipping, no LoRA dropout, one evaluation at the end) and the service returns them as set."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
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


async def test_sft_settings_users_expect_reach_the_training_run(trainers, registry, tiny_model, data_root, h, rpc_err):
    """warmup_steps, optimizer, bf16 precision (autocast on CPU), packing off and train_on_inputs through a real run;
    a setting out of range is INVALID_ARGUMENT naming its field."""
    trainer = await trainers()
    job = h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, max_steps=3, checkpoint_every=3)
    hp = job.hyperparameters
    hp.warmup_steps, hp.optimizer, hp.precision, hp.sequence_packing, hp.train_on_inputs = (
        2,
        "adafactor",
        h.tpb.PRECISION_BF16,
        False,
        True,
    )
    bad = h.tpb.TrainingJob()
    bad.CopyFrom(job)
    bad.hyperparameters.optimizer = "adam"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await trainer.stub.CreateTrainingJob(h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job=bad))
    code, _, violations = rpc_err(exc)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "training_job.hyperparameters.optimizer" in [f for f, _ in violations]

    created = await trainer.stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job_id="expected", training_job=job)
    )
    events = await asyncio.wait_for(h.watch_all(trainer.stub, created.name), 240)
    assert events[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED, events[-1].message
    run = Path(trainer.config["data_dir"]) / "jobs" / "expected" / "run"
    cfg = json.loads((run / "run_config.json").read_text())["config"]
    assert (cfg["warmup_steps"], cfg["optim"], cfg["precision"], cfg["padding_free"], cfg["completion_only_loss"]) == (
        2, "adafactor", "bf16", False, False,
    )  # fmt: skip
    # the trainer state transformers wrote: warmup 2 → the first step's learning rate is below the peak
    steps = [e for e in events if e.type == h.tpb.EVENT_TYPE_STEP]
    assert len(steps) == 3 and steps[0].step.learning_rate < hp.learning_rate


async def test_early_stopping_and_a_chat_template_through_a_real_run(trainers, registry, tiny_model, data_root, h):
    """A learning rate that makes the eval loss worse: early stopping ends the job before max_steps and registers the
    best evaluation's weights; the job's chat template ships with the registered adapter's tokenizer."""
    from transformers import AutoTokenizer

    from neuroweaver_ml import uri_to_path

    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    trainer = await trainers()
    job = h.job_pb(tiny_model, data_root / "chat.jsonl", method=h.tpb.TRAINING_METHOD_SFT_LORA, max_steps=60, eval_every=2)
    hp = job.hyperparameters
    hp.learning_rate, hp.lr_scheduler, hp.early_stopping_patience, hp.chat_template = 0.3, "constant", 2, template
    created = await trainer.stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job_id="early", training_job=job)
    )
    events = await asyncio.wait_for(h.watch_all(trainer.stub, created.name), 240)
    assert events[-1].state == h.tpb.TrainingJob.STATE_SUCCEEDED, events[-1].message
    done = [e for e in events if e.type == h.tpb.EVENT_TYPE_STAGE_COMPLETED and e.stage == "sft"]
    assert "early stopping kept step" in done[0].message
    steps = [e.step.step for e in events if e.type == h.tpb.EVENT_TYPE_STEP]
    assert steps[-1] < 60
    final = await trainer.stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=created.name))
    evals = {int(e.metrics["step"]): e.metrics["eval_loss"] for e in events if e.type == h.tpb.EVENT_TYPE_EVAL}
    assert final.metrics["eval_loss"] == pytest.approx(min(evals.values()))  # the kept weights' loss
    adapter = uri_to_path(final.output_uri) / "adapter"
    assert AutoTokenizer.from_pretrained(str(adapter)).chat_template == template
