"""Settings where 0 means something: an explicit 0 survives the wire, create's defaults, the stored spec and the worker,
and reaches the transformers/TRL configuration as 0; unset takes the documented default. RLAIF with `qlora` trains
both its stages on the 4-bit base."""

from __future__ import annotations

import dataclasses
import json
import threading
from types import SimpleNamespace

import pytest

from neuroweaver.trainer.v1 import training_job_pb2 as pb
from neuroweaver_runtime.errors import Violations
from neuroweaver_trainer.api.convert import job_from_pb, job_to_pb
from neuroweaver_trainer.domain.job import (
    Hyperparameters,
    LoraSettings,
    RlaifSettings,
    TrainingJob,
    apply_defaults,
    validate_job,
)
from neuroweaver_trainer.worker.config import WorkerConfig
from neuroweaver_trainer.worker.rlaif import RlaifTraining
from neuroweaver_trainer.worker.training import Training

ZEROS = pb.Hyperparameters(
    max_steps=4, warmup_fraction=0, random_seed=0, eval_interval_steps=0, eval_fraction=0, gradient_clip_norm=0,
    use_gradient_checkpointing=False,
)  # fmt: skip


def _pb_job(method=pb.TRAINING_METHOD_SFT_QLORA, hyper=None, lora=None, rlaif=None) -> pb.TrainingJob:
    return pb.TrainingJob(
        base_model="b", dataset_uri="file:///d.jsonl", method=method, target_model="projects/p/models/m",
        hyperparameters=hyper, lora=lora, rlaif=rlaif,
    )  # fmt: skip


def _created(m: pb.TrainingJob) -> TrainingJob:
    """What create stores (validated, defaults applied), read back from the stored JSON spec as the worker does."""
    job = job_from_pb(m)
    v = Violations()
    validate_job(job, v)
    assert v.items == []
    job.name = "projects/p/trainingJobs/j"
    apply_defaults(job)
    spec = json.loads(json.dumps({k: dataclasses.asdict(getattr(job, k)) for k in ("hyperparameters", "lora", "rlaif")}))
    job.hyperparameters = Hyperparameters(**spec["hyperparameters"])
    job.lora = LoraSettings(**spec["lora"])
    job.rlaif = RlaifSettings(**spec["rlaif"])
    return job


def _worker(job: TrainingJob, tmp_path, kind=Training) -> Training:
    return kind(WorkerConfig(data_dir=str(tmp_path)), job, SimpleNamespace(attempt=1), threading.Event())  # type: ignore[arg-type]


def test_explicit_zeros_are_stored_returned_and_reach_the_training_arguments(tmp_path):
    from neuroweaver_ml.training import sft_training_arguments

    job = _created(_pb_job(hyper=ZEROS, lora=pb.LoraConfig(lora_dropout=0)))
    h = job.hyperparameters
    assert (h.warmup_ratio, h.seed, h.eval_every_steps, h.eval_split, h.max_grad_norm) == (0, 0, 0, 0, 0)
    assert h.gradient_checkpointing is False and job.lora.dropout == 0  # false honoured on QLoRA too

    out = job_to_pb(job)
    for name in ("warmup_fraction", "random_seed", "eval_interval_steps", "eval_fraction", "gradient_clip_norm"):
        assert out.hyperparameters.HasField(name) and getattr(out.hyperparameters, name) == 0, name
    assert out.hyperparameters.HasField("use_gradient_checkpointing") and not out.hyperparameters.use_gradient_checkpointing
    assert out.lora.HasField("lora_dropout") and out.lora.lora_dropout == 0

    sft = _worker(job, tmp_path).sft_config("/base", "/train.jsonl", None)
    assert (sft.warmup_ratio, sft.seed, sft.eval_every_steps, sft.eval_fraction, sft.max_grad_norm, sft.lora_dropout) == (
        0, 0, 0, 0, 0, 0,
    )  # fmt: skip
    assert sft.method == "qlora" and sft.gradient_checkpointing is False
    # eval data given (an eval file) with eval_interval_steps 0: no periodic evaluation, run_sft evaluates at the end
    args = sft_training_arguments(sft, tmp_path / "ck", True, "cpu")
    assert (args.warmup_steps, args.max_grad_norm, args.seed, args.data_seed) == (0, 0, 0, 0)
    assert args.eval_strategy == "no" and args.eval_steps is None


def test_unset_settings_take_the_documented_defaults(tmp_path):
    from neuroweaver_ml.training import sft_training_arguments

    job = _created(_pb_job(hyper=pb.Hyperparameters(max_steps=4)))
    h = job.hyperparameters
    assert (h.warmup_ratio, h.seed, h.eval_every_steps, h.eval_split, h.max_grad_norm) == (0.03, 42, 50, 0.05, 1.0)
    assert h.gradient_checkpointing is True and job.lora.dropout == 0.05  # on by default when the base is 4-bit
    sft = _worker(job, tmp_path).sft_config("/base", "/train.jsonl", None)
    args = sft_training_arguments(sft, tmp_path / "ck", True, "cpu")
    assert (args.warmup_steps, args.max_grad_norm, args.seed) == (0.03, 1.0, 42)
    assert args.eval_strategy == "steps" and args.eval_steps == 50

    assert _created(_pb_job(method=pb.TRAINING_METHOD_SFT_LORA)).hyperparameters.gradient_checkpointing is False
    assert _created(_pb_job(method=pb.TRAINING_METHOD_REWARD_MODEL)).hyperparameters.eval_split == 0.2


def test_deprecated_fields_keep_their_meaning_and_the_optional_fields_win():
    old = _created(_pb_job(hyper=pb.Hyperparameters(seed=7, eval_every_steps=0, warmup_ratio=0.1, gradient_checkpointing=True)))
    assert (old.hyperparameters.seed, old.hyperparameters.eval_every_steps, old.hyperparameters.warmup_ratio) == (7, 50, 0.1)
    both = _created(_pb_job(hyper=pb.Hyperparameters(seed=7, random_seed=0, eval_split=0.3, eval_fraction=0)))
    assert (both.hyperparameters.seed, both.hyperparameters.eval_split) == (0, 0)
    out = job_to_pb(old)
    assert (out.hyperparameters.seed, out.hyperparameters.random_seed) == (7, 7)  # older clients read the deprecated one
    rl = job_from_pb(_pb_job(method=pb.TRAINING_METHOD_RLAIF, rlaif=pb.RlaifConfig(kl_coefficient=0.2, kl_beta=0))).rlaif
    assert rl.kl_coefficient == 0


def _rlaif(**values) -> pb.RlaifConfig:
    return pb.RlaifConfig(prompts_uri="file:///p.jsonl", judge_version="projects/p/judges/j/versions/1", **values)


def test_rlaif_zero_kl_and_margin_reach_the_pipeline_config(tmp_path):
    job = _created(
        _pb_job(
            method=pb.TRAINING_METHOD_RLAIF, hyper=pb.Hyperparameters(random_seed=0), lora=pb.LoraConfig(lora_dropout=0),
            rlaif=_rlaif(kl_beta=0, min_score_margin=0, algorithm=pb.RlaifConfig.POLICY_ALGORITHM_GRPO),
        )
    )  # fmt: skip
    cfg = _worker(job, tmp_path, RlaifTraining).rlaif_config("/base", "/p.jsonl", None, "/sft", None)  # type: ignore[attr-defined]
    assert (cfg.kl_coefficient, cfg.min_margin, cfg.seed, cfg.lora_dropout, cfg.quantize_4bit) == (0, 0, 0, 0, False)
    unset = _created(_pb_job(method=pb.TRAINING_METHOD_RLAIF, rlaif=_rlaif()))
    assert (unset.rlaif.kl_coefficient, unset.rlaif.min_margin) == (0.04, 1.0)
    assert unset.hyperparameters.gradient_checkpointing is False  # full-precision RLAIF


@pytest.mark.parametrize(
    ("rlaif", "field"),
    [
        (_rlaif(kl_beta=0, algorithm=pb.RlaifConfig.POLICY_ALGORITHM_DPO), "training_job.rlaif.kl_beta"),
        (_rlaif(kl_beta=-1), "training_job.rlaif.kl_beta"),
        (_rlaif(min_score_margin=-0.5), "training_job.rlaif.min_score_margin"),
    ],
)
def test_invalid_zero_meaningful_settings_are_field_violations(rlaif, field):
    v = Violations()
    validate_job(job_from_pb(_pb_job(method=pb.TRAINING_METHOD_RLAIF, rlaif=rlaif)), v)
    assert field in {x.field for x in v.items}


@pytest.mark.parametrize(
    ("hyper", "lora", "field"),
    [
        (pb.Hyperparameters(warmup_fraction=1.0), None, "training_job.hyperparameters.warmup_fraction"),
        (pb.Hyperparameters(random_seed=-1), None, "training_job.hyperparameters.random_seed"),
        (pb.Hyperparameters(eval_interval_steps=-1), None, "training_job.hyperparameters.eval_interval_steps"),
        (pb.Hyperparameters(eval_fraction=1.0), None, "training_job.hyperparameters.eval_fraction"),
        (pb.Hyperparameters(gradient_clip_norm=-1), None, "training_job.hyperparameters.gradient_clip_norm"),
        (None, pb.LoraConfig(lora_dropout=1.0), "training_job.lora.lora_dropout"),
    ],
)
def test_out_of_range_values_are_field_violations(hyper, lora, field):
    v = Violations()
    validate_job(job_from_pb(_pb_job(hyper=hyper, lora=lora)), v)
    assert field in {x.field for x in v.items}


def test_rlaif_qlora_trains_the_sft_stage_and_the_policy_on_the_4bit_base(tiny_model, tmp_path):
    import bitsandbytes as bnb

    from neuroweaver_ml.rlaif.training import PolicyLoraSettings, load_policy
    from neuroweaver_ml.training import load_base_for_training

    job = _created(_pb_job(method=pb.TRAINING_METHOD_RLAIF, rlaif=_rlaif(qlora=True)))
    assert job.hyperparameters.gradient_checkpointing is True  # QLoRA's default
    worker = _worker(job, tmp_path, RlaifTraining)
    sft = worker.sft_config(tiny_model, "/train.jsonl", None)
    assert sft.method == "qlora"
    model = load_base_for_training(sft, "cpu")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_state.quant_type == "nf4"
    del model
    cfg = worker.rlaif_config(tiny_model, "/p.jsonl", None, "", None)  # type: ignore[attr-defined]
    assert cfg.quantize_4bit is True
    policy, peft_config = load_policy(tiny_model, None, PolicyLoraSettings(target_modules=["q_proj"]), "cpu", quantize_4bit=True)
    assert peft_config is not None and isinstance(policy.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    plain, _ = load_policy(tiny_model, None, PolicyLoraSettings(target_modules=["q_proj"]), "cpu")
    assert not isinstance(plain.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


# -- settings users expect: each reaches the worker's configuration, each bad value is a field violation -------------


def test_sft_settings_reach_the_training_arguments(tmp_path):
    from neuroweaver_ml.training import sft_training_arguments

    hyper = pb.Hyperparameters(
        max_steps=4, warmup_steps=3, optimizer="adafactor", precision=pb.PRECISION_BF16, sequence_packing=False,
        train_on_inputs=True,
    )  # fmt: skip
    job = _created(_pb_job(method=pb.TRAINING_METHOD_SFT_LORA, hyper=hyper))
    out = job_to_pb(job).hyperparameters
    assert (out.warmup_steps, out.optimizer, out.precision, out.train_on_inputs) == (3, "adafactor", pb.PRECISION_BF16, True)
    assert out.HasField("sequence_packing") and out.sequence_packing is False
    sft = _worker(job, tmp_path).sft_config("/base", "/train.jsonl", None)
    assert (sft.warmup_steps, sft.optim, sft.precision, sft.padding_free, sft.completion_only_loss) == (
        3, "adafactor", "bf16", False, False,
    )  # fmt: skip
    args = sft_training_arguments(sft, tmp_path / "ck", False, "cpu")
    assert (args.warmup_steps, args.optim, args.bf16, args.fp16) == (3, "adafactor", True, False)  # bf16 autocast on CPU

    default = _worker(_created(_pb_job(method=pb.TRAINING_METHOD_SFT_LORA)), tmp_path).sft_config("/b", "/t.jsonl", None)
    assert (default.warmup_steps, default.optim, default.precision, default.padding_free, default.completion_only_loss) == (
        0, "", "auto", True, True,
    )  # fmt: skip
    args = sft_training_arguments(default, tmp_path / "ck", False, "cpu")
    assert (args.optim, args.bf16, args.fp16) == ("adamw_torch", False, False)


def test_precision_picks_the_weights_dtype_and_fp16_needs_a_gpu():
    import torch

    from neuroweaver_ml import SFTConfig
    from neuroweaver_ml.training import _weights_dtype

    def dtype(precision, device):
        return _weights_dtype(SFTConfig("/b", "/t", "/o", precision=precision), device)

    assert (dtype("auto", "cuda"), dtype("auto", "cpu"), dtype("fp32", "cuda")) == (torch.bfloat16, torch.float32, torch.float32)
    assert (dtype("bf16", "cpu"), dtype("fp16", "cuda")) == (torch.float32, torch.float16)  # bf16 on CPU: autocast
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        dtype("fp16", "cpu")


def test_dpo_beta_and_policy_learning_rate_reach_the_trl_configs(tmp_path):
    from neuroweaver_trainer.worker.preferences import PreferenceTraining

    dpo = _created(_pb_job(method=pb.TRAINING_METHOD_DPO, hyper=pb.Hyperparameters(dpo_beta=0.3)))
    assert _worker(dpo, tmp_path, PreferenceTraining).dpo_config("/b", "/p.jsonl", "/o").beta == 0.3  # type: ignore[attr-defined]
    unset = _created(_pb_job(method=pb.TRAINING_METHOD_DPO))
    assert unset.hyperparameters.dpo_beta == 0.1 and job_to_pb(unset).hyperparameters.dpo_beta == 0.1
    assert _worker(unset, tmp_path, PreferenceTraining).dpo_config("/b", "/p.jsonl", "/o").beta == 0.1  # type: ignore[attr-defined]

    rlaif = _created(_pb_job(method=pb.TRAINING_METHOD_RLAIF, rlaif=_rlaif(policy_learning_rate=3e-5)))
    assert _worker(rlaif, tmp_path, RlaifTraining).rlaif_config("/b", "/p", None, "/s", None).learning_rate == 3e-5  # type: ignore[attr-defined]
    assert job_to_pb(rlaif).rlaif.policy_learning_rate == 3e-5
    assert _created(_pb_job(method=pb.TRAINING_METHOD_RLAIF, rlaif=_rlaif())).rlaif.policy_learning_rate == 1e-5


@pytest.mark.parametrize(
    ("method", "hyper", "rlaif", "field"),
    [
        (pb.TRAINING_METHOD_SFT_LORA, pb.Hyperparameters(optimizer="adam"), None, "hyperparameters.optimizer"),
        (pb.TRAINING_METHOD_SFT_LORA, pb.Hyperparameters(warmup_steps=-1), None, "hyperparameters.warmup_steps"),
        (pb.TRAINING_METHOD_DPO, pb.Hyperparameters(warmup_steps=5), None, "hyperparameters.warmup_steps"),
        (pb.TRAINING_METHOD_DPO, pb.Hyperparameters(optimizer="sgd"), None, "hyperparameters.optimizer"),
        (pb.TRAINING_METHOD_REWARD_MODEL, pb.Hyperparameters(precision=pb.PRECISION_FP32), None, "hyperparameters.precision"),
        (pb.TRAINING_METHOD_REWARD_MODEL, pb.Hyperparameters(sequence_packing=True), None, "hyperparameters.sequence_packing"),
        (pb.TRAINING_METHOD_DPO, pb.Hyperparameters(train_on_inputs=True), None, "hyperparameters.train_on_inputs"),
        (pb.TRAINING_METHOD_DPO, pb.Hyperparameters(dpo_beta=0), None, "hyperparameters.dpo_beta"),
        (pb.TRAINING_METHOD_SFT_LORA, pb.Hyperparameters(dpo_beta=0.1), None, "hyperparameters.dpo_beta"),
        (pb.TRAINING_METHOD_RLAIF, None, _rlaif(policy_learning_rate=2), "rlaif.policy_learning_rate"),
        (
            pb.TRAINING_METHOD_SFT_LORA,
            pb.Hyperparameters(early_stopping_patience=-1),
            None,
            "hyperparameters.early_stopping_patience",
        ),
        (
            pb.TRAINING_METHOD_SFT_LORA,
            pb.Hyperparameters(early_stopping_patience=2, eval_fraction=0),
            None,
            "hyperparameters.early_stopping_patience",
        ),
        (
            pb.TRAINING_METHOD_SFT_LORA,
            pb.Hyperparameters(early_stopping_patience=2, eval_interval_steps=0),
            None,
            "hyperparameters.early_stopping_patience",
        ),
        (pb.TRAINING_METHOD_DPO, pb.Hyperparameters(early_stopping_patience=2), None, "hyperparameters.early_stopping_patience"),
        (
            pb.TRAINING_METHOD_SFT_LORA,
            pb.Hyperparameters(chat_template="{% for m in messages %}{{ m.content }"),
            None,
            "hyperparameters.chat_template",
        ),
        (pb.TRAINING_METHOD_SFT_LORA, pb.Hyperparameters(chat_template="hello"), None, "hyperparameters.chat_template"),
        (
            pb.TRAINING_METHOD_SFT_LORA,
            pb.Hyperparameters(chat_template="{{ messages }}" + "x" * 70000),
            None,
            "hyperparameters.chat_template",
        ),
        (
            pb.TRAINING_METHOD_REWARD_MODEL,
            pb.Hyperparameters(chat_template="{{ messages }}"),
            None,
            "hyperparameters.chat_template",
        ),
        (pb.TRAINING_METHOD_SFT_QLORA, pb.Hyperparameters(liger_kernels=True), None, "hyperparameters.liger_kernels"),
        (pb.TRAINING_METHOD_SFT_QLORA, pb.Hyperparameters(offload_activations=True), None, "hyperparameters.offload_activations"),
    ],
)
def test_new_settings_are_field_violations_where_they_do_not_apply_or_are_out_of_range(method, hyper, rlaif, field):
    v = Violations()
    validate_job(job_from_pb(_pb_job(method=method, hyper=hyper, rlaif=rlaif)), v)
    assert "training_job." + field in {x.field for x in v.items}


def test_early_stopping_and_a_chat_template_reach_the_sft_config(tmp_path):
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    job = _created(_pb_job(hyper=pb.Hyperparameters(early_stopping_patience=3, chat_template=template)))
    assert job_to_pb(job).hyperparameters.early_stopping_patience == 3
    sft = _worker(job, tmp_path).sft_config("/base", "/train.jsonl", None)
    assert (sft.early_stopping_patience, sft.chat_template) == (3, template)
    gpu = _pb_job(hyper=pb.Hyperparameters(liger_kernels=True, offload_activations=True))
    gpu.resources.gpus = 1
    sft = _worker(_created(gpu), tmp_path).sft_config("/base", "/train.jsonl", None)
    assert (sft.liger_kernels, sft.offload_activations) == (True, True)
    plain = _worker(_created(_pb_job()), tmp_path).sft_config("/base", "/train.jsonl", None)
    assert (plain.early_stopping_patience, plain.chat_template) == (0, None)


def test_an_unknown_precision_is_refused_by_name():
    from neuroweaver_runtime.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as exc:
        job_from_pb(_pb_job(hyper=pb.Hyperparameters(precision=9)))  # type: ignore[arg-type]
    assert "training_job.hyperparameters.precision" in str(exc.value)
