"""Loads what a model server serves into the engine that decodes it: the base model (builtin, a local dir, a GGUF
file or a file:// URI) and its LoRA adapter (a PEFT directory or a GGUF LoRA file), whose sha256 is checked before
any weight is read. Blocking (disk, torch, llama.cpp): the service runs it in a thread.

Engines: `transformers` (HF checkpoint + PEFT adapter), `llama.cpp` (GGUF base + GGUF LoRA, CPU), `vllm` (HF
checkpoint + PEFT adapter, CUDA). `auto` follows the device: CUDA → vllm when installed, else transformers; CPU →
llama.cpp when the base has a GGUF (a builtin model or a .gguf file) and the adapter, if any, is a GGUF LoRA, else
transformers. A GGUF LoRA adapter only llama.cpp can load.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..engines.base import ENGINES

if TYPE_CHECKING:  # torch and llama.cpp load only when a model does
    from ..domain import Limits
    from ..engines.base import QueuedEngine

ENGINE_CHOICES = ("auto", *ENGINES)
# The engine adapter name of a version that is the base itself (no adapter) among several on one base: PEFT's name for
# rows without an adapter in a mixed batch; llama.cpp decodes it with no LoRA set, vLLM with no LoRARequest.
BASE_ADAPTER = "__base__"


def adapter_name(index: int, has_adapter: bool) -> str:
    """The engine's name for the adapter of the version at `index` among several on one base (0 = the first)."""
    return f"v{index}" if has_adapter else BASE_ADAPTER


@dataclass(frozen=True)
class LoadSpec:
    base_model: str  # builtin:..., a local dir, a .gguf file or a file:// URI
    adapter_uri: str  # file:// URI or path of a PEFT adapter dir or a GGUF LoRA file; empty = base model only
    adapter_sha256: str
    load_in_4bit: bool
    device: str = "auto"
    engine: str = "auto"
    threads: int = 0  # llama.cpp: CPU threads (0 = every core this process may use)
    context_length: int = 0  # llama.cpp: tokens per request (0 = the model's, at most 2048)
    # Several versions on one base (multi-LoRA): the other versions' adapters (uri, sha256), loaded beside
    # `adapter_uri` as engine adapters v1, v2, ... (`adapter_uri` is v0); the base weights are loaded once. ("", "")
    # (and an empty `adapter_uri`): that version is the base itself, engine adapter BASE_ADAPTER.
    extra_adapters: tuple[tuple[str, str], ...] = ()

    @property
    def adapters(self) -> list[tuple[str, str, str]]:
        """(engine adapter name, uri, sha256) of every version when several share the base; [] with one version."""
        if not self.extra_adapters:
            return []
        every = ((self.adapter_uri, self.adapter_sha256), *self.extra_adapters)
        return [(adapter_name(i, bool(uri)), uri, sha) for i, (uri, sha) in enumerate(every)]

    @property
    def loras(self) -> list[tuple[str, str, str]]:
        """`adapters` less the version that is the base (nothing to load for it)."""
        return [a for a in self.adapters if a[1]]


@dataclass(frozen=True)
class Loaded:
    engine: QueuedEngine
    adapter_sha256: str  # of the adapter actually loaded ("" without one)


def _local_path(ref: str) -> Path | None:
    from neuroweaver_ml import uri_to_path

    if ref.startswith("builtin:"):
        return None
    try:
        return uri_to_path(ref)
    except ValueError:
        return None


def gguf_file(path: Path) -> Path | None:
    """A .gguf file, or the only .gguf file of a directory (an exported artifact); None otherwise."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "adapter_config.json").exists():
        files = sorted(path.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
    return None


def gguf_base(base_model: str) -> Path | None:
    """The GGUF file of a base model: a builtin model's own GGUF (installed package) or a .gguf path."""
    if base_model.startswith("builtin:"):
        from neuroweaver_ml.models import BUILTIN_MODELS, builtin_gguf_path

        name = base_model[len("builtin:") :].lower()
        if name not in BUILTIN_MODELS:
            return None
        try:
            return builtin_gguf_path(name)
        except Exception:  # noqa: BLE001 - ModelNotFound: the package is missing
            return None
    path = _local_path(base_model)
    return gguf_file(path) if path is not None and path.exists() else None


def is_gguf_adapter(adapter_uri: str) -> bool:
    path = _local_path(adapter_uri) if adapter_uri else None
    return path is not None and gguf_file(path) is not None


def cuda_available(device: str) -> bool:
    if device == "cpu":
        return False
    if device.startswith("cuda"):
        return True
    # auto: look for an NVIDIA driver before importing torch (the llama.cpp path never needs torch)
    if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia")):
        return False
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def choose_engine(spec: LoadSpec) -> str:
    """The engine `spec.engine` names, or the one `auto` picks (see the module docstring)."""
    if spec.engine != "auto":
        return spec.engine
    from ..engines import llamacpp

    if spec.loras and not cuda_available(spec.device):  # several versions, adapters of one kind (check_spec)
        return "llama.cpp" if is_gguf_adapter(spec.loras[0][1]) else "transformers"
    if is_gguf_adapter(spec.adapter_uri):
        return "llama.cpp"
    if cuda_available(spec.device):
        return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    if llamacpp.available() and not spec.load_in_4bit and not spec.adapter_uri and gguf_base(spec.base_model) is not None:
        return "llama.cpp"
    return "transformers"


def check_spec(spec: LoadSpec) -> str:
    """Refuses combinations an engine cannot serve before anything loads; returns the chosen engine.
    Raises ValueError with a message for the operator."""
    if spec.engine not in ENGINE_CHOICES:
        raise ValueError(f"--engine {spec.engine!r} must be one of {', '.join(ENGINE_CHOICES)}")
    engine = choose_engine(spec)
    gguf_adapter = is_gguf_adapter(spec.adapter_uri)
    if spec.extra_adapters:
        if len(spec.adapters) - len(spec.loras) > 1:
            raise ValueError(
                "several versions on one base (--extra-versions): at most one may be the base itself (no adapter); "
                "two would be the same weights"
            )
        kinds = {is_gguf_adapter(uri) for _, uri, _ in spec.loras}
        if len(kinds) > 1:
            raise ValueError("versions on one base need adapters of one kind: all PEFT directories or all GGUF LoRA files")
        gguf_adapter = kinds == {True}  # an adapter of any version stands for all of them below
    if engine == "llama.cpp":
        from ..engines import llamacpp

        if not llamacpp.available():
            raise ValueError("the llama.cpp engine needs llama-cpp-python (pip install llama-cpp-python)")
        if spec.load_in_4bit:
            raise ValueError("--load-in-4bit is bitsandbytes NF4 (transformers); llama.cpp serves the GGUF's own quantization")
        if spec.device.startswith("cuda"):
            raise ValueError("the llama.cpp engine runs on the CPU here; use --device cpu or auto")
        if gguf_base(spec.base_model) is None:
            raise ValueError(
                f"the llama.cpp engine needs a GGUF base model (a builtin model or a .gguf file), not {spec.base_model!r}"
            )
        if (spec.adapter_uri or spec.loras) and not gguf_adapter:
            raise ValueError("the llama.cpp engine needs the adapter as a GGUF LoRA (.gguf), not a PEFT directory")
    else:
        if gguf_adapter:
            raise ValueError(f"a GGUF LoRA adapter is served by the llama.cpp engine only, not {engine}")
        path = _local_path(spec.base_model)
        if path is not None and path.suffix == ".gguf":
            raise ValueError(f"the {engine} engine needs a transformers checkpoint directory, not a .gguf file")
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("the vllm engine needs vLLM installed (pip install vllm) and a CUDA GPU")
    return engine


def _load_peft_adapters(spec: LoadSpec):
    """The base once, then every version's PEFT adapter on it under its engine name (v0, v1, ...), unmerged: the
    transformers engine picks each row's adapter per forward pass (PEFT `adapter_names`; BASE_ADAPTER, the version
    that is the base, is PEFT's `__base__`: the adapters are skipped for its rows)."""
    from neuroweaver_ml import load_for_inference, resolve_base_model, uri_to_path, verify_digest
    from neuroweaver_ml.generation import unused_imports_blocked

    paths = []
    for name, uri, sha in spec.loras:
        path = uri_to_path(uri)
        verify_digest(path, sha)  # every digest checked before any weight is read
        paths.append((name, path))
    loaded = load_for_inference(resolve_base_model(spec.base_model), None, spec.load_in_4bit, device=spec.device)
    model = None
    with unused_imports_blocked(spec.load_in_4bit):  # peft imports bitsandbytes for nothing on a float base (seconds)
        from peft import PeftModel

        for name, path in paths:
            if model is None:
                model = PeftModel.from_pretrained(loaded.model, str(path), adapter_name=name, is_trainable=False)
            else:
                model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    assert model is not None
    model.eval()
    return model, loaded.tokenizer


def load_engine(spec: LoadSpec, limits: Limits) -> Loaded:
    """Checks the adapter's digest, loads base + adapter into the chosen engine and starts it."""
    from neuroweaver_ml import uri_to_path, verify_digest

    engine = check_spec(spec)
    adapter = uri_to_path(spec.adapter_uri) if spec.adapter_uri else None
    if engine == "llama.cpp":
        from ..engines.llamacpp import LlamaCppEngine

        base = gguf_base(spec.base_model)
        assert base is not None  # check_spec
        lora = None
        sha = ""
        named = {}
        for name, uri, digest in spec.loras:  # several versions: every GGUF LoRA on the one model, digests first
            path = uri_to_path(uri)
            verify_digest(path, digest)
            named[name] = str(gguf_file(path))
        if named and len(spec.loras) < len(spec.adapters):
            named[BASE_ADAPTER] = ""  # the version that is the base: decoded with no LoRA set
        if named:
            adapter = None  # the first version is "v0" among them; a request always names its version's adapter
        if adapter is not None:
            if spec.adapter_sha256:
                sha, _ = verify_digest(adapter, spec.adapter_sha256)
            lora = gguf_file(adapter)
        return Loaded(
            LlamaCppEngine(
                str(base),
                lora_path=str(lora) if lora else None,
                adapters=named or None,
                max_queue=limits.max_queue,
                max_batch_size=limits.max_batch_size,
                threads=spec.threads,
                context_length=spec.context_length,
            ),
            sha,
        )
    if engine == "vllm":
        from neuroweaver_ml import resolve_base_model

        from ..engines.vllm_engine import VllmEngine

        sha = verify_digest(adapter, spec.adapter_sha256)[0] if adapter is not None and spec.adapter_sha256 else ""
        named = {}
        for name, uri, digest in spec.loras:  # several versions: one LoRARequest each (vLLM multi-LoRA; none for the base)
            named[name] = str(uri_to_path(uri))
            verify_digest(named[name], digest)
        return Loaded(
            VllmEngine(
                str(resolve_base_model(spec.base_model)),
                adapter_dir=str(adapter) if adapter is not None else None,
                max_queue=limits.max_queue,
                max_batch_size=limits.max_batch_size,
                max_new_tokens_limit=limits.max_new_tokens_limit,
                **({"adapters": named} if named else {}),
            ),
            sha,
        )
    from neuroweaver_ml import load_for_inference, resolve_base_model

    from ..engines.transformers_engine import TransformersEngine

    if spec.extra_adapters:
        model, tokenizer = _load_peft_adapters(spec)
        return Loaded(TransformersEngine(model, tokenizer, max_queue=limits.max_queue, max_batch_size=limits.max_batch_size), "")

    loaded = load_for_inference(
        resolve_base_model(spec.base_model),
        adapter,
        spec.load_in_4bit,
        expected_adapter_sha256=spec.adapter_sha256 or None,
        device=spec.device,
        # One server serves one version: folding the LoRA weights into the base removes the adapter's extra
        # matmuls from every decode step (the demo's unmerged candidate answered ~1.4x slower than its base).
        # Not with 4-bit weights, where load_for_inference keeps the adapter separate.
        merge_adapter=True,
    )
    return Loaded(
        TransformersEngine(loaded.model, loaded.tokenizer, max_queue=limits.max_queue, max_batch_size=limits.max_batch_size),
        loaded.adapter_sha256 or "",
    )
