"""Export: merged weights give base+adapter's logits; GGUFs load in llama.cpp and decode like the merged model.

Tolerances (tiny Llamas; measured max |Δlogit| in brackets): merged float32 vs base+adapter (PEFT, unmerged) < 1e-4
[3e-7]; merged float16 < 2e-2 [4e-4] while the adapter moves the logits by > 0.1 [1.1], so a merge that lost the
adapter fails; a QLoRA-trained adapter merged through the float32 base < 1e-4 [3e-7], merged into the 4-bit layers
instead > 10x that [0.13]. GGUF f16 / q8_0 / GGUF LoRA on the f16 base: the first 8 greedy tokens equal the merged
model's. SmolLM2 (smollm2 marker): f16 gives the 12 greedy tokens; q8_0 and q4_k_m predict every confident one;
the GGUF LoRA on the packaged Q4_1 base halves (at least) the logit gap to the merged model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neuroweaver_ml.artifacts import digest_path
from neuroweaver_ml.export import (
    ExportFailed,
    ExportToolsMissing,
    convert_lora_to_gguf,
    convert_to_gguf,
    export,
    fetch_tools,
    merge_adapter,
    require_tools,
)
from neuroweaver_ml.testing import make_lora_adapter

GREEDY_TOKENS = 8


@pytest.fixture(scope="session")
def smoltok_tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer (llama.cpp's converter knows its pre-tokenizer)."""
    from transformers import AutoTokenizer

    from neuroweaver_ml.models import build_tiny_llama, builtin_gguf_path

    gguf = builtin_gguf_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return build_tiny_llama(tmp_path_factory.mktemp("smoltiny") / "m", tokenizer=tok, hidden_size=128, intermediate_size=256)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _base_plus_adapter(base_dir: Path, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def _ids(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Check the brake pads and oil."}], tokenize=False, add_generation_prompt=True
    )
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def _load(d: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()


def test_merged_logits_equal_base_plus_adapter(tiny_model_dir, tmp_path):
    adapter, _ = make_lora_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
    ids = _ids(tiny_model_dir)
    ref = _logits(_base_plus_adapter(tiny_model_dir, adapter), ids)
    base_only = _logits(_load(tiny_model_dir), ids)
    assert (ref - base_only).abs().max() > 0.1  # the adapter matters, so the tolerances below can catch a lost merge

    m32 = merge_adapter(tiny_model_dir, adapter, tmp_path / "m32", quantization="f32", card={"version": "x/1.0.0"})
    d32 = (_logits(_load(m32.path), ids) - ref).abs().max().item()
    assert d32 < 1e-4, d32
    m16 = merge_adapter(tiny_model_dir, adapter, tmp_path / "m16")
    cfg = json.loads((m16.path / "config.json").read_text())
    assert cfg["dtype"] == "float16"
    from safetensors import safe_open

    with safe_open(str(m16.path / "model.safetensors"), "pt") as f:
        assert not any("lora" in k for k in f.keys())
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    d16 = (_logits(_load(m16.path), ids) - ref).abs().max().item()
    assert d16 < 2e-2, d16
    assert (m16.path / "tokenizer_config.json").is_file() and "version: x/1.0.0" not in (m16.path / "README.md").read_text()
    assert "- version: x/1.0.0" in (m32.path / "README.md").read_text()
    with pytest.raises(FileExistsError):
        merge_adapter(tiny_model_dir, adapter, m16.path)
    with pytest.raises(ExportFailed, match="not a PEFT LoRA adapter"):
        merge_adapter(tiny_model_dir, tiny_model_dir, tmp_path / "bad")
    with pytest.raises(ExportFailed, match="f16, bf16, f32"):
        merge_adapter(tiny_model_dir, adapter, tmp_path / "bad", quantization="q4_k_m")


@pytest.mark.slow
def test_qlora_trained_adapter_merges_into_the_dequantized_base(tiny_model_dir, chat_file, tmp_path):
    """An adapter trained on an NF4 base merges into the unquantized weights: base(f32)+adapter's logits to 1e-4;
    merging into the 4-bit layers instead (peft on the bnb model) is measurably worse."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from neuroweaver_ml.training import SFTConfig, run_sft

    cfg = SFTConfig(
        base_model_dir=str(tiny_model_dir), train_file=str(chat_file), output_dir=str(tmp_path / "q"), method="qlora",
        max_steps=4, batch_size=4, learning_rate=5e-3, checkpoint_every_steps=0, seed=7, lora_r=4, lora_alpha=8,
    )  # fmt: skip
    res = run_sft(cfg, lambda e: None)
    assert res.status == "completed" and res.method == "qlora"
    adapter = Path(res.adapter_dir)
    ids = _ids(tiny_model_dir)
    ref = _logits(_base_plus_adapter(tiny_model_dir, adapter), ids)
    assert (ref - _logits(_load(tiny_model_dir), ids)).abs().max() > 1e-3  # training moved the adapter off zero
    merged = merge_adapter(tiny_model_dir, adapter, tmp_path / "merged", quantization="f32")
    good = (_logits(_load(merged.path), ids) - ref).abs().max().item()
    assert good < 1e-4, good
    # The bug users hit: merge into the 4-bit weights (dequantize, add, re-quantize) and lose the update.
    from peft import PeftModel

    q = AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )
    naive = PeftModel.from_pretrained(q, str(adapter)).merge_and_unload()
    bad = (_logits(naive, ids) - ref).abs().max().item()
    assert bad > 10 * good, (bad, good)


def test_tools_are_fetched_from_the_sdist_or_refused_clearly(tmp_path, monkeypatch):
    assert (require_tools() / "convert_hf_to_gguf.py").is_file()
    monkeypatch.setenv("NW_LLAMA_CPP_TOOLS", str(tmp_path / "none"))
    with pytest.raises(ExportToolsMissing, match="make install"):
        require_tools()
    with pytest.raises(ExportToolsMissing):
        convert_to_gguf(tmp_path, tmp_path / "x.gguf")


def _greedy_hf(model_dir: Path, ids: torch.Tensor) -> list[int]:
    model = _load(model_dir)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def _greedy_llama(ids: torch.Tensor, model_path: Path, lora_path: Path | None = None, n: int = GREEDY_TOKENS) -> list[int]:
    from llama_cpp import Llama

    kw = {"lora_path": str(lora_path)} if lora_path else {}
    llm = Llama(model_path=str(model_path), n_ctx=256, n_threads=2, verbose=False, seed=0, **kw)
    out = []
    for tok in llm.generate(ids[0].tolist(), temp=0.0, top_k=1, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    llm.close()
    return out


@pytest.mark.slow
def test_gguf_exports_load_in_llama_cpp_and_decode_like_the_merged_model(smoltok_tiny_dir, tmp_path):
    import gguf

    adapter, _ = make_lora_adapter(smoltok_tiny_dir, tmp_path / "adapter", seed=5)
    ids = _ids(smoltok_tiny_dir)
    merged = merge_adapter(smoltok_tiny_dir, adapter, tmp_path / "merged", quantization="f32")
    expected = _greedy_hf(merged.path, ids)
    assert expected != _greedy_hf(smoltok_tiny_dir, ids)  # the adapter changes the greedy output

    for quant in ("f16", "q8_0"):
        res = export("gguf", quant, smoltok_tiny_dir, adapter, tmp_path / f"gguf-{quant}")
        assert res.path.name == f"model-{quant}.gguf" and "convert_hf_to_gguf" in res.tool
        ftype = gguf.GGUFReader(str(res.path)).get_field("general.file_type").contents()
        assert ftype == {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
        assert _greedy_llama(ids, res.path) == expected, quant

    q4 = export("gguf", "q4_k_m", smoltok_tiny_dir, adapter, tmp_path / "gguf-q4")
    assert "llama_model_quantize" in q4.tool
    assert gguf.GGUFReader(str(q4.path)).get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert q4.path.stat().st_size < (tmp_path / "gguf-f16" / "model-f16.gguf").stat().st_size
    assert len(_greedy_llama(ids, q4.path)) == GREEDY_TOKENS  # loads and decodes (random weights: no match claimed)

    # The adapter alone as a GGUF LoRA, applied by llama.cpp on the f16 base.
    base_gguf = convert_to_gguf(smoltok_tiny_dir, tmp_path / "base-f16.gguf", "f16").path
    lora = convert_lora_to_gguf(adapter, smoltok_tiny_dir, tmp_path / "adapter.gguf", "f16")
    reader = gguf.GGUFReader(str(lora.path))
    assert reader.get_field("general.type").contents() == "adapter"
    assert _greedy_llama(ids, base_gguf, lora.path) == expected
    sha, size = digest_path(lora.path)
    assert size == lora.path.stat().st_size and len(sha) == 64


def test_fetch_tools_keeps_a_complete_dir(tmp_path):
    done = require_tools()
    assert fetch_tools(done) == done  # complete: not downloaded again


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_gguf_exports_decode_like_the_merged_model(smollm2_dir, tmp_path):
    """The demo model (SmolLM2-135M-Instruct + an adapter): llama.cpp's f16 GGUF decodes the merged model's 12 greedy
    tokens. q8_0 and q4_k_m, fed the merged model's greedy tokens (teacher forcing), predict each of them wherever the
    merged model is confident (top-2 logit margin >= 1.0; quantization may flip a near tie, not a confident choice),
    and at least 6 of the 12 steps are confident."""
    import gguf

    adapter, _ = make_lora_adapter(smollm2_dir, tmp_path / "adapter", seed=1)
    # a milder update (B scaled by 0.3), as a short fine-tune makes: the model stays confident in its first answer
    from safetensors.torch import load_file, save_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v * 0.3 if "lora_B" in k else v for k, v in weights.items()}, str(adapter / "adapter_model.safetensors"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "How often should I rotate my tires?"}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    merged = merge_adapter(smollm2_dir, adapter, tmp_path / "merged", quantization="f32")
    model = _load(merged.path)
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0
        )
    expected = out.sequences[0, ids.shape[1] :].tolist()
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    base_out = _load(smollm2_dir).generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert base_out[0, ids.shape[1] :].tolist() != expected  # the adapter changes the answer
    del model
    for quant in ("f16", "q8_0", "q4_k_m"):
        res = convert_to_gguf(merged.path, tmp_path / f"model-{quant}.gguf", quant)
        assert gguf.GGUFReader(str(res.path)).get_field("general.file_type").contents() == {
            "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
        }[quant]  # fmt: skip
        if quant == "f16":
            got = _greedy_llama(ids, res.path, n=12)
            assert got == expected, (quant, tok.decode(got), tok.decode(expected))
        else:
            predicted = _teacher_forced_llama(ids, expected, res.path)
            confident = [i for i, m in enumerate(margins) if m >= 1.0]
            assert len(confident) >= 6, margins
            assert [predicted[i] for i in confident] == [expected[i] for i in confident], (quant, predicted, expected, margins)
        res.path.unlink()

    # The adapter alone as a GGUF LoRA, applied by llama.cpp on the packaged Q4_1 GGUF the base was dequantized from
    # (what the llama.cpp engine serves): its logits come much closer to the merged model's than the base's alone
    # (measured: mean |Δ| 0.09 with the LoRA, 0.36 without; centred logits over the 12 teacher-forced steps).
    from neuroweaver_ml.models import builtin_gguf_path

    lora = convert_lora_to_gguf(adapter, smollm2_dir, tmp_path / "adapter-f16.gguf", "f16").path
    reference = torch.stack([s_[0] for s_ in out.scores]).numpy()
    packaged = builtin_gguf_path("smollm2-135m-instruct")
    with_lora = _teacher_forced_logits(ids, expected, packaged, lora)
    without = _teacher_forced_logits(ids, expected, packaged, None)

    def gap(logits):
        centred = lambda x: x - x.mean(-1, keepdims=True)  # noqa: E731
        return float(abs(centred(logits) - centred(reference)).mean())

    assert gap(with_lora) < 0.5 * gap(without), (gap(with_lora), gap(without))


def _teacher_forced_logits(ids: torch.Tensor, continuation: list[int], model_path: Path, lora_path: Path | None):
    """llama.cpp's next-token logits at each step of prompt + continuation (its own choices never fed back)."""
    import numpy as np
    from llama_cpp import Llama

    kw = {"lora_path": str(lora_path)} if lora_path else {}
    llm = Llama(model_path=str(model_path), n_ctx=256, n_threads=2, verbose=False, logits_all=True, **kw)
    llm.eval(ids[0].tolist() + continuation[:-1])
    start = ids.shape[1] - 1
    out = np.stack([np.asarray(llm.scores[start + i]) for i in range(len(continuation))])
    llm.close()
    return out


def _teacher_forced_llama(ids: torch.Tensor, continuation: list[int], model_path: Path) -> list[int]:
    """llama.cpp's top-1 next token at each step of prompt + continuation."""
    return [int(row.argmax()) for row in _teacher_forced_logits(ids, continuation, model_path, None)]
