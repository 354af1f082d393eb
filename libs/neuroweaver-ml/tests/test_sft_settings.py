"""SFT settings beyond the basics: early stopping keeps the best evaluation's weights; a chat-template override is
what tokenizes the data and what the adapter's tokenizer carries."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from neuroweaver_ml.training import SFTConfig, run_sft


def _cfg(tiny_model_dir, chat_file, out, **kw):
    base = dict(
        base_model_dir=str(tiny_model_dir), train_file=str(chat_file), output_dir=str(out), batch_size=4, seed=7,
        lora_r=4, lora_alpha=8, eval_fraction=0.2,
    )  # fmt: skip
    base.update(kw)
    return SFTConfig(**base)


@pytest.mark.slow
def test_early_stopping_stops_and_keeps_the_best_evaluations_weights(tiny_model_dir, chat_file, tmp_path):
    events = []
    # A learning rate this high makes the eval loss worse after a few steps: early stopping must end the run.
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "job", max_steps=60, learning_rate=0.3, lr_scheduler="constant",
               eval_every_steps=2, early_stopping_patience=2)  # fmt: skip
    res = run_sft(cfg, events.append)
    evals = {e.step: e.eval_loss for e in events if e.kind == "eval"}
    assert res.status == "completed" and res.stopped_early and res.global_step < 60
    best = min(evals, key=evals.get)
    assert res.best_step == best and res.eval_loss == pytest.approx(evals[best])
    # the patience ran out: the last two evaluations did not beat the best one
    assert sorted(evals)[-3] == best or all(evals[s] >= evals[best] for s in sorted(evals)[-2:])
    adapter = load_file(str(Path(res.adapter_dir) / "adapter_model.safetensors"))
    kept = load_file(str(tmp_path / "job" / "checkpoints" / f"checkpoint-{best}" / "adapter_model.safetensors"))
    assert adapter.keys() == kept.keys() and all((adapter[k] == kept[k]).all() for k in adapter)
    report = json.loads(Path(res.report_path).read_text())
    assert report["result"]["best_step"] == best


def test_early_stopping_without_evaluation_is_refused(tiny_model_dir, chat_file, tmp_path):
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "job", max_steps=4, eval_fraction=0.0, early_stopping_patience=2)
    with pytest.raises(ValueError, match="early_stopping_patience needs evaluation"):
        run_sft(cfg)


TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.slow
def test_a_chat_template_override_tokenizes_the_data_and_ships_with_the_adapter(tiny_model_dir, chat_file, tmp_path):
    from transformers import AutoTokenizer

    default = run_sft(_cfg(tiny_model_dir, chat_file, tmp_path / "a", max_steps=2, eval_fraction=0.0))
    custom = run_sft(_cfg(tiny_model_dir, chat_file, tmp_path / "b", max_steps=2, eval_fraction=0.0, chat_template=TEMPLATE))
    tok = AutoTokenizer.from_pretrained(custom.adapter_dir)
    assert tok.chat_template == TEMPLATE
    assert AutoTokenizer.from_pretrained(default.adapter_dir).chat_template != TEMPLATE
    # the same rows, rendered by another template: another token count
    tokens = [json.loads(Path(r.report_path).read_text())["dataset"]["train_tokens_per_epoch"] for r in (default, custom)]
    assert tokens[0] != tokens[1]
