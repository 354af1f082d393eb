"""Loading base + adapter for inference and generating text (single, batched, streaming).

One decoding loop (KV cache, left padding) serves all three entry points so that stop strings,
eos handling, sampling and token accounting behave the same everywhere. Stop strings are matched
on decoded text; a streamed delta never contains any part of a stop string.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .artifacts import verify_digest

Messages = list[dict[str, str]]
PromptLike = str | Messages
FinishReason = Literal["stop", "length"]


@dataclass
class LoadedModel:
    """A model ready for generation. Unpacks as ``model, tokenizer = load_for_inference(...)``."""

    model: Any
    tokenizer: Any
    device: str
    base_dir: str
    adapter_dir: str | None = None
    adapter_sha256: str | None = None
    load_in_4bit: bool = False

    def __iter__(self):
        return iter((self.model, self.tokenizer))

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass
class StreamDelta:
    """A piece of streamed text. The last delta has ``finish_reason`` set and the token counts."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


# Installed libraries that transformers and peft import whenever they are present, though loading a float causal LM
# for inference never uses them (measured on a model server's cold start, 2 CPU cores):
# - bitsandbytes (~1.9 s): peft imports it at `import peft` (`peft.helpers`, a try/except for an SVD helper) and when
#   it injects LoRA layers (`peft.tuners.lora.bnb`, to recognise quantized layers); its own import wraps its CPU
#   kernels in `torch.compile`, which imports torch._dynamo and torch._inductor. Used by 4-bit models only.
# - scipy (~0.6 s): every transformers model class imports `transformers.loss`, whose object-detection losses import
#   `scipy.optimize` for Hungarian matching when scipy is installed (it is: the experiments service's statistics).
# Neither library has a switch (both checks are `importlib.util.find_spec`).
_UNUSED_BY_INFERENCE = ("scipy", "bitsandbytes")
_AVAILABILITY_CHECKS = (
    ("peft.import_utils", ("is_bnb_available", "is_bnb_4bit_available")),
    ("transformers.utils.import_utils", ("is_bitsandbytes_available", "is_scipy_available")),
)


@contextlib.contextmanager
def unused_imports_blocked(load_in_4bit: bool = False) -> Iterator[None]:
    """Inside, `import` of the libraries above fails and transformers and peft take them for not installed; those
    already imported stay as they are. Nothing is blocked for a 4-bit model (bitsandbytes, which may use scipy).

    `sys.modules[name] = None` is Python's documented way to make an import fail (find_spec then says None). Afterwards
    the entries are removed and transformers' and peft's cached availability checks cleared, so the libraries work
    again in this process; what was imported meanwhile keeps going without them (peft's SVD helper for quantized
    weights and transformers' object-detection matchers). Not thread-safe against a concurrent first import of one
    of them (a model server loads its model once, before serving)."""
    import sys

    def forget_availability() -> None:
        for module, checks in _AVAILABILITY_CHECKS:
            for check in checks:
                clear = getattr(getattr(sys.modules.get(module), check, None), "cache_clear", None)
                if clear is not None:
                    clear()

    names = [] if load_in_4bit else [n for n in _UNUSED_BY_INFERENCE if n not in sys.modules]
    if not names:
        yield
        return
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]
    forget_availability()  # a check that said "installed" before would make transformers import it regardless
    try:
        yield
    finally:
        for name in names:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
        forget_availability()


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_for_inference(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike | None = None,
    load_in_4bit: bool = False,
    *,
    expected_adapter_sha256: str | None = None,
    device: str = "auto",
    merge_adapter: bool = False,
) -> LoadedModel:
    """Load a base checkpoint (optionally NF4 4-bit) and apply a LoRA adapter.

    The adapter directory's digest (see ``artifacts.digest_path``) is verified against
    ``expected_adapter_sha256`` before loading (``DigestMismatch`` otherwise).
    ``merge_adapter=True`` folds the LoRA weights into the base (faster decoding; not with 4-bit).
    The tokenizer comes from the adapter dir when it has one, else from the base; padding side left.
    Libraries inference never uses are not imported meanwhile (``unused_imports_blocked``).
    """
    with unused_imports_blocked(load_in_4bit):
        return _load_for_inference(base_dir, adapter_dir, load_in_4bit, expected_adapter_sha256, device, merge_adapter)


def _load_for_inference(base_dir, adapter_dir, load_in_4bit, expected_adapter_sha256, device, merge_adapter) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = _device(device)
    on_gpu = dev.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    adapter_sha = None
    if adapter_dir is not None:
        config = Path(adapter_dir, "adapter_config.json")
        if not config.is_file():
            raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
        task = json.loads(config.read_text()).get("task_type")
        if task not in (None, "CAUSAL_LM"):
            raise ValueError(
                f"{adapter_dir} is a {task} adapter (a reward model's scoring head, for example), not a "
                "causal-LM adapter: it cannot generate text"
            )
        if expected_adapter_sha256:
            adapter_sha, _ = verify_digest(adapter_dir, expected_adapter_sha256)
    tok_src = adapter_dir if adapter_dir is not None and Path(adapter_dir, "tokenizer_config.json").is_file() else base_dir
    tokenizer = AutoTokenizer.from_pretrained(str(tok_src))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Any: transformers' stubs reject .to(str) (a decorated method) and PeftModel is no PreTrainedModel
    model: Any
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), quantization_config=q, dtype=dtype, device_map={"": dev})
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).to(dev)  # type: ignore[arg-type]  # transformers wraps .to() (functools.wraps): its stub takes the str for self
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        if merge_adapter and not load_in_4bit:
            model = model.merge_and_unload()
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=dev,
        base_dir=str(base_dir),
        adapter_dir=str(adapter_dir) if adapter_dir is not None else None,
        adapter_sha256=adapter_sha,
        load_in_4bit=load_in_4bit,
    )


def encode_prompt(tokenizer, prompt: PromptLike) -> list[int]:
    """Messages → chat template with the generation prompt; a string → raw text (no special
    tokens added, the same way prompt/completion datasets are tokenized for training)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        raise ValueError("prompt must be a string or a list of {role, content} messages")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; pass a plain string prompt")
    out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gc = getattr(model, "generation_config", None)
    for v in (getattr(gc, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


def _find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text`` or -1."""
    best = -1
    for s in stops:
        if s:
            i = text.find(s)
            if i != -1 and (best == -1 or i < best):
                best = i
    return best


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing chars might be the start of a stop string (or an incomplete character)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    if text.endswith("\ufffd"):
        n = max(n, 1)
    return n


def _sample_next(logits, temperature: float, top_p: float, generator):
    import torch

    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if 0 < top_p < 1:
        sorted_p, sorted_i = torch.sort(probs, descending=True, dim=-1)
        cum = torch.cumsum(sorted_p, dim=-1)
        remove = cum - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(remove, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, sorted_i, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Decoder:
    """Batched incremental decoding with a KV cache and left padding."""

    def __init__(self, model, tokenizer, prompts: list[list[int]], params: SamplingParams):
        import torch

        if params.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if params.temperature < 0 or not (0 < params.top_p <= 1):
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if any(not p for p in prompts):
            raise ValueError("prompt is empty")
        self.model, self.tok, self.params = model, tokenizer, params
        ctx = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        longest = max(len(p) for p in prompts)
        if ctx and longest + params.max_new_tokens > ctx:
            raise ValueError(
                f"prompt of {longest} tokens plus max_new_tokens={params.max_new_tokens} exceeds "
                f"the model's context of {ctx} tokens"
            )
        self.device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        b = len(prompts)
        ids = torch.full((b, longest), pad, dtype=torch.long)
        mask = torch.zeros((b, longest), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p) :] = torch.tensor(p)
            mask[i, longest - len(p) :] = 1
        self.input_ids, self.mask = ids.to(self.device), mask.to(self.device)
        self.prompt_lens = [len(p) for p in prompts]
        self.eos = _eos_ids(model, tokenizer)
        self.generator = None
        if params.seed is not None and params.temperature > 0:
            self.generator = torch.Generator(device=self.device).manual_seed(int(params.seed))
        self.out: list[list[int]] = [[] for _ in prompts]
        self.finish: list[FinishReason | None] = [None] * b
        self.texts = [""] * b  # decoded completion, truncated at a stop string when one was hit
        self.cache = None

    def step(self) -> bool:
        """Generate one token for every unfinished sequence; returns False when all are done."""
        import torch

        if all(f is not None for f in self.finish):
            return False
        with torch.inference_mode():
            if self.cache is None:
                pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
                o = self.model(input_ids=self.input_ids, attention_mask=self.mask, position_ids=pos, use_cache=True)
            else:
                pos = self.mask.sum(-1, keepdim=True) - 1
                o = self.model(
                    input_ids=self.input_ids,
                    attention_mask=self.mask,
                    position_ids=pos,
                    past_key_values=self.cache,
                    use_cache=True,
                )
            self.cache = o.past_key_values
            nxt = _sample_next(o.logits[:, -1, :], self.params.temperature, self.params.top_p, self.generator)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        nxt_list = nxt.tolist()
        for i, t in enumerate(nxt_list):
            if self.finish[i] is not None:
                nxt_list[i] = pad
                continue
            if t in self.eos:
                self.finish[i] = "stop"
                continue
            self.out[i].append(t)
            text = self.tok.decode(self.out[i], skip_special_tokens=True)
            cut = _find_stop(text, self.params.stop)
            if cut != -1:
                self.texts[i] = text[:cut]
                self.finish[i] = "stop"
                continue
            self.texts[i] = text
            if len(self.out[i]) >= self.params.max_new_tokens:
                self.finish[i] = "length"
        self.input_ids = torch.tensor(nxt_list, device=self.device).unsqueeze(-1)
        alive = torch.tensor([1 if f is None else 0 for f in self.finish], device=self.device).unsqueeze(-1)
        self.mask = torch.cat([self.mask, alive], dim=-1)
        return any(f is None for f in self.finish)

    def result(self, i: int) -> GenerationResult:
        return GenerationResult(
            text=self.texts[i],
            finish_reason=self.finish[i] or "length",
            prompt_tokens=self.prompt_lens[i],
            completion_tokens=len(self.out[i]),
        )


def _params(max_new_tokens, temperature, top_p, stop, seed) -> SamplingParams:
    if isinstance(stop, str):
        stop = [stop]
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=list(stop or []), seed=seed)


def generate(
    model,
    tokenizer,
    prompt: PromptLike,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] | str | None = None,
    seed: int | None = None,
) -> GenerationResult:
    """Generate one completion. ``prompt``: a list of chat messages (chat template applied) or raw text.
    ``finish_reason`` is ``stop`` (eos or a stop string; the stop string is not included) or ``length``."""
    return generate_batch(model, tokenizer, [prompt], max_new_tokens, temperature, top_p, stop, seed)[0]


def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[PromptLike],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] | str | None = None,
    seed: int | None = None,
) -> list[GenerationResult]:
    """Generate completions for several prompts in one left-padded batch (same params for all)."""
    if not prompts:
        return []
    dec = Decoder(
        model, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], _params(max_new_tokens, temperature, top_p, stop, seed)
    )
    while dec.step():
        pass
    return [dec.result(i) for i in range(len(prompts))]


def generate_stream(
    model,
    tokenizer,
    prompt: PromptLike,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] | str | None = None,
    seed: int | None = None,
) -> Iterator[StreamDelta]:
    """Yield text deltas as tokens are generated; the concatenated deltas equal ``generate(...).text``
    for the same arguments. The final delta (possibly empty text) carries finish reason and counts."""
    params = _params(max_new_tokens, temperature, top_p, stop, seed)
    dec = Decoder(model, tokenizer, [encode_prompt(tokenizer, prompt)], params)
    sent = 0
    while dec.step():
        text = dec.texts[0]
        safe = len(text) - stop_holdback(text, params.stop)
        if safe > sent:
            yield StreamDelta(text=text[sent:safe])
            sent = safe
    r = dec.result(0)
    yield StreamDelta(
        text=r.text[sent:], finish_reason=r.finish_reason, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens
    )
