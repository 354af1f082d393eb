import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neuroweaver_ml.artifacts import digest_path
from neuroweaver_ml.errors import DatasetInvalid, ResumeMismatch
from neuroweaver_ml.training import (
    SFTCollator,
    SFTConfig,
    find_resume_checkpoint,
    load_base_for_training,
    run_sft,
)

HERE = Path(__file__).parent


def _cfg(tiny_model_dir, chat_file, out, **kw):
    base = dict(
        base_model_dir=str(tiny_model_dir),
        train_file=str(chat_file),
        output_dir=str(out),
        max_steps=6,
        batch_size=4,
        learning_rate=1e-3,
        checkpoint_every_steps=2,
        seed=7,
        lora_r=4,
        lora_alpha=8,
    )
    base.update(kw)
    return SFTConfig(**base)


@pytest.mark.slow
def test_lora_sft_end_to_end(tiny_model_dir, chat_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    events = []
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "job", eval_fraction=0.1, eval_every_steps=3)
    res = run_sft(cfg, events.append)
    assert res.status == "completed"
    assert res.global_step == res.total_steps == 6 and res.resumed_from_step == 0
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == [1, 2, 3, 4, 5, 6]
    assert all(e.loss > 0 and e.tokens_per_second > 0 and e.rss_bytes > 0 and e.total_steps == 6 for e in steps)
    assert steps[-1].loss < steps[0].loss  # lr 1e-3 on a repetitive dataset: the loss goes down
    assert steps[-1].eta_seconds == 0
    assert [e.step for e in events if e.kind == "eval"] == [3, 6]
    assert [e.step for e in events if e.kind == "checkpoint"] == [2, 4, 6]
    assert res.eval_loss is not None and res.train_loss is not None
    assert res.tokens_seen == steps[-1].tokens_seen > 0
    assert res.eval_examples == 4 and res.train_examples == 36
    adapter = Path(res.adapter_dir)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "tokenizer_config.json").is_file()
    assert "LoRA adapter trained by NeuroWeaver" in (adapter / "README.md").read_text()
    assert digest_path(adapter) == (res.adapter_sha256, res.adapter_size_bytes)
    report = json.loads(Path(res.report_path).read_text())
    assert report["result"]["adapter_sha256"] == res.adapter_sha256 and report["dataset"]["format"] == "chat"
    # checkpoints are kept with rotation (keep_checkpoints=2)
    assert sorted(p.name for p in (tmp_path / "job" / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    # the adapter loads with plain PEFT and changes the output
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    x = torch.tensor([[5, 6, 7, 8]])
    before = base(x).logits
    peft_model = PeftModel.from_pretrained(base, adapter)
    assert not torch.allclose(before, peft_model(x).logits)
    # calling again on a finished run returns the recorded result without training
    again_events = []
    again = run_sft(cfg, again_events.append)
    assert again == res and again_events == []


@pytest.mark.slow
def test_qlora_really_quantizes_on_cpu(tiny_model_dir, chat_file, tmp_path):
    import bitsandbytes as bnb

    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "q", method="qlora", max_steps=3)
    model = load_base_for_training(cfg, "cpu")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert isinstance(q_proj.weight, bnb.nn.Params4bit) and q_proj.weight.dtype == torch.uint8
    assert q_proj.weight.quant_state.quant_type == "nf4"
    del model
    events = []
    res = run_sft(cfg, events.append)
    assert res.status == "completed" and res.method == "qlora" and res.global_step == 3
    assert all(torch.isfinite(torch.tensor(e.loss)) for e in events if e.kind == "step")
    from neuroweaver_ml.generation import generate, load_for_inference

    lm = load_for_inference(tiny_model_dir, res.adapter_dir, load_in_4bit=True, expected_adapter_sha256=res.adapter_sha256)
    assert isinstance(lm.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    out = generate(lm.model, lm.tokenizer, [{"role": "user", "content": "hi"}], max_new_tokens=4)
    assert out.completion_tokens >= 1


def test_padding_free_batches_give_the_same_loss_as_padded(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    feats = [
        {"input_ids": [5, 9, 13, 21, 8], "labels": [-100, -100, 13, 21, 8]},
        {"input_ids": [30, 31, 32], "labels": [-100, 31, 32]},
    ]

    def loss_sum(batch):
        # use_cache=False as in training: with a KV cache transformers ignores packed position_ids
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
        logits = out.logits[..., :-1, :]
        labels = batch["labels"][..., 1:]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )

    flat = SFTCollator(pad_token_id=2, padding_free=True)(feats)
    padded = SFTCollator(pad_token_id=2, padding_free=False)(feats)
    assert flat["input_ids"].shape == (1, 8) and flat["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    with torch.no_grad():
        assert torch.allclose(loss_sum(flat), loss_sum(padded), atol=1e-4)


@pytest.mark.slow
def test_cancel_stops_within_a_step_and_keeps_the_checkpoint(tiny_model_dir, chat_file, tmp_path):
    seen = []
    res = run_sft(
        _cfg(tiny_model_dir, chat_file, tmp_path / "c", max_steps=20),
        lambda e: seen.append(e),
        should_stop=lambda: any(e.kind == "step" and e.step >= 3 for e in seen),
    )
    assert res.status == "cancelled" and res.adapter_dir is None
    assert res.global_step == 4  # polled after step 4's optimizer step; step 3's event arrives in on_log
    assert res.last_checkpoint and Path(res.last_checkpoint).name == "checkpoint-2"
    assert not (tmp_path / "c" / "adapter").exists()


@pytest.mark.slow
def test_resume_after_sigkill(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "r"
    cfg = _cfg(tiny_model_dir, chat_file, out, max_steps=8, checkpoint_every_steps=3)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_sft_worker.py"), json.dumps(dataclasses.asdict(cfg))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(HERE)},
    )
    child_events = []
    try:
        for line in proc.stdout:
            if line.startswith("{"):
                child_events.append(json.loads(line))
                if child_events[-1]["kind"] == "checkpoint":
                    break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert child_events[-1] == {"kind": "checkpoint", "step": 3, "path": str(out / "checkpoints" / "checkpoint-3")}
    # a half-written newer checkpoint (killed while saving) must be ignored and cleaned up
    partial = out / "checkpoints" / "checkpoint-4"
    partial.mkdir()
    (partial / "trainer_state.json").write_text("{")
    assert find_resume_checkpoint(out).name == "checkpoint-3" and not partial.exists()

    events = []
    res = run_sft(cfg, events.append)
    assert res.status == "completed"
    assert res.resumed_from_step == 3 and events[0].kind == "resumed" and events[0].step == 3
    assert [e.step for e in events if e.kind == "step"] == [4, 5, 6, 7, 8]
    assert res.global_step == res.total_steps == 8
    # the resumed run reproduces an uninterrupted one (same data order, RNG, optimizer state)
    ref = run_sft(dataclasses.replace(cfg, output_dir=str(tmp_path / "ref")))
    from safetensors.torch import load_file

    a = load_file(Path(res.adapter_dir) / "adapter_model.safetensors")
    b = load_file(Path(ref.adapter_dir) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.slow
def test_resume_with_a_different_config_is_refused(tiny_model_dir, chat_file, tmp_path):
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "m", max_steps=10)
    seen = []
    first = run_sft(cfg, seen.append, should_stop=lambda: any(e.kind == "checkpoint" for e in seen))
    assert first.status == "cancelled" and first.last_checkpoint
    with pytest.raises(ResumeMismatch, match="different configuration"):
        run_sft(dataclasses.replace(cfg, learning_rate=5e-4))


def test_invalid_dataset_raises(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DatasetInvalid, match="line 1: 'messages' must end with an assistant message"):
        run_sft(_cfg(tiny_model_dir, bad, tmp_path / "x"))


@pytest.mark.parametrize("flag", ["liger_kernels", "offload_activations"])
def test_gpu_memory_features_are_refused_without_a_gpu_before_any_work(tiny_model_dir, chat_file, tmp_path, flag):
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "m", device="cpu", **{flag: True})
    with pytest.raises(ValueError, match=f"{flag} need a CUDA GPU \\(device here: cpu\\)"):
        run_sft(cfg)
    assert not (tmp_path / "m" / "run_config.json").exists()  # nothing written: refused before the run started
    # off by default and, off, left out of the fingerprint: runs fingerprinted before these settings still resume
    assert flag not in _cfg(tiny_model_dir, chat_file, tmp_path / "n").fingerprint_fields()
    assert cfg.fingerprint_fields()[flag] is True


def test_gpu_memory_features_reach_the_trainer():
    from neuroweaver_ml.training import _trainer_class, sft_training_arguments

    cfg = SFTConfig(base_model_dir="b", train_file="t", output_dir="o", liger_kernels=True, offload_activations=True)
    args = sft_training_arguments(cfg, Path("/tmp/nw-unused"), False, "cpu")
    assert args.use_liger_kernel is True  # transformers' Trainer applies Liger to the (PEFT-unwrapped) model at init
    from transformers import Trainer

    offloading = _trainer_class(cfg)  # its training step runs inside TRL's activation-offloading context
    assert issubclass(offloading, Trainer) and offloading.training_step is not Trainer.training_step
    assert _trainer_class(dataclasses.replace(cfg, offload_activations=False)) is Trainer
