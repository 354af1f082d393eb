import pytest

from neuroweaver_ml.errors import DigestMismatch
from neuroweaver_ml.generation import generate, generate_batch, generate_stream, load_for_inference

MSGS = [{"role": "user", "content": "What is 3 plus 4?"}]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_for_inference(tiny_model_dir)


def test_length_and_token_counts(tiny):
    model, tok = tiny
    r = generate(model, tok, MSGS, max_new_tokens=12)
    prompt_ids = tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert r.prompt_tokens == len(prompt_ids)
    assert r.finish_reason in ("length", "stop")
    if r.finish_reason == "length":
        assert r.completion_tokens == 12


def test_stop_string_truncates_and_reports_stop(tiny):
    model, tok = tiny
    full = generate(model, tok, "The brake pads", max_new_tokens=24)
    assert len(full.text) > 6, full
    stop = full.text[3:6]
    cut = full.text.find(stop)
    r = generate(model, tok, "The brake pads", max_new_tokens=24, stop=[stop, "never-occurs"])
    assert r.finish_reason == "stop"
    assert r.text == full.text[:cut]
    assert r.completion_tokens <= full.completion_tokens
    # the stream never leaks a stop string and concatenates to the same text
    deltas = list(generate_stream(model, tok, "The brake pads", max_new_tokens=24, stop=stop))
    assert "".join(d.text for d in deltas) == r.text
    assert deltas[-1].finish_reason == "stop" and deltas[-1].completion_tokens == r.completion_tokens
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_stream_equals_generate(tiny):
    model, tok = tiny
    r = generate(model, tok, MSGS, max_new_tokens=16)
    deltas = list(generate_stream(model, tok, MSGS, max_new_tokens=16))
    assert "".join(d.text for d in deltas) == r.text
    assert (deltas[-1].finish_reason, deltas[-1].prompt_tokens, deltas[-1].completion_tokens) == (
        r.finish_reason,
        r.prompt_tokens,
        r.completion_tokens,
    )


def test_batch_with_left_padding_matches_single(tiny):
    model, tok = tiny
    prompts = [MSGS, "Oil", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tires?"}]]
    batch = generate_batch(model, tok, prompts, max_new_tokens=10)
    singles = [generate(model, tok, p, max_new_tokens=10) for p in prompts]
    assert [b.text for b in batch] == [s.text for s in singles]
    assert [b.prompt_tokens for b in batch] == [s.prompt_tokens for s in singles]


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    a = generate(model, tok, MSGS, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=11)
    b = generate(model, tok, MSGS, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=11)
    others = {generate(model, tok, MSGS, max_new_tokens=16, temperature=1.0, seed=s).text for s in range(4)}
    assert a == b and len(others) > 1


def test_bad_arguments(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="context"):
        generate(model, tok, "x", max_new_tokens=5000)
    with pytest.raises(ValueError):
        generate(model, tok, [{"content": "no role"}])
    with pytest.raises(ValueError):
        generate(model, tok, "x", top_p=0)


@pytest.mark.slow
def test_adapter_digest_is_verified(tiny_model_dir, chat_file, tmp_path):
    from neuroweaver_ml.training import SFTConfig, run_sft

    res = run_sft(
        SFTConfig(
            base_model_dir=str(tiny_model_dir),
            train_file=str(chat_file),
            output_dir=str(tmp_path / "job"),
            max_steps=2,
            lora_r=4,
            checkpoint_every_steps=0,
        )
    )
    lm = load_for_inference(tiny_model_dir, res.adapter_dir, expected_adapter_sha256=res.adapter_sha256)
    assert lm.adapter_sha256 == res.adapter_sha256
    assert generate(lm.model, lm.tokenizer, MSGS, max_new_tokens=3).completion_tokens >= 1
    merged = load_for_inference(tiny_model_dir, res.adapter_dir, merge_adapter=True)
    assert (
        generate(merged.model, merged.tokenizer, MSGS, max_new_tokens=6).text
        == generate(lm.model, lm.tokenizer, MSGS, max_new_tokens=6).text
    )
    with pytest.raises(DigestMismatch):
        load_for_inference(tiny_model_dir, res.adapter_dir, expected_adapter_sha256="ab" * 32)


def test_a_scoring_adapter_is_refused(tiny_model_dir, tmp_path):
    """A reward model's LoRA (task SEQ_CLS, with a score head) loads onto a causal LM without complaint from PEFT,
    and would generate from a model missing its trained head: refused with the reason instead."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    scorer = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS", modules_to_save=["score"])
    get_peft_model(scorer, lora).save_pretrained(str(tmp_path / "reward"))
    with pytest.raises(ValueError, match="SEQ_CLS adapter .* cannot generate text"):
        load_for_inference(tiny_model_dir, tmp_path / "reward")


def test_unused_imports_are_blocked_only_while_loading(tmp_path):
    """In a fresh interpreter: inside `unused_imports_blocked` scipy and bitsandbytes cannot be imported and transformers
    and peft see them as not installed; afterwards they import again and the availability checks say so."""
    import subprocess
    import sys

    code = """
import importlib, importlib.util
import transformers.utils.import_utils as t
from neuroweaver_ml.generation import unused_imports_blocked
with unused_imports_blocked():
    import peft.import_utils as p  # `import peft` imports both when it can
    assert importlib.util.find_spec("scipy") is None and importlib.util.find_spec("bitsandbytes") is None
    assert not t.is_scipy_available() and not t.is_bitsandbytes_available() and not p.is_bnb_available()
    try:
        import scipy  # noqa: F401
        raise SystemExit("scipy imported")
    except ImportError:
        pass
assert t.is_scipy_available() and p.is_bnb_available() and importlib.import_module("scipy.optimize")
with unused_imports_blocked(load_in_4bit=True):  # a 4-bit model: nothing blocked
    assert importlib.util.find_spec("bitsandbytes") is not None
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
