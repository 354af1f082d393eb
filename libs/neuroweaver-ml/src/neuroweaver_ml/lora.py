"""LoRA target-module resolution by inspecting the model, not by per-architecture name tables."""

from __future__ import annotations

from typing import Any

# Leaf names that are heads/embeddings in common architectures even when they are Linear layers.
_EXCLUDED_LEAF_NAMES = {"lm_head", "embed_out", "output", "score", "classifier", "wte", "wpe", "embed_tokens"}


def _linear_types() -> tuple[type, ...]:
    import torch.nn as nn

    types: list[type] = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2 style projections

        types.append(Conv1D)
    except ImportError:  # pragma: no cover
        pass
    try:
        import bitsandbytes as bnb

        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except Exception:  # noqa: BLE001 - bitsandbytes is optional
        pass
    return tuple(types)


def find_lora_target_modules(model: Any) -> list[str]:
    """Leaf names of every Linear-like module (``nn.Linear``, HF ``Conv1D``, bnb ``Linear4bit`` /
    ``Linear8bitLt``) inside the transformer blocks: all attention and MLP projections.

    The output head and embeddings are never returned (found through
    ``get_output_embeddings``/``get_input_embeddings`` and by name). If a PEFT wrapper is passed,
    LoRA's own sub-layers are ignored. Returns sorted unique leaf names, e.g.
    ``['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']`` for Llama.
    """
    excluded_ids = set()
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        fn = getattr(model, getter, None)
        if fn is not None:
            try:
                mod = fn()
            except (NotImplementedError, AttributeError):
                mod = None
            if mod is not None:
                excluded_ids.add(id(mod))
    linear_types = _linear_types()
    names: set[str] = set()
    for full_name, module in model.named_modules():
        if id(module) in excluded_ids or not isinstance(module, linear_types):
            continue
        parts = full_name.split(".")
        leaf = parts[-1]
        if leaf in _EXCLUDED_LEAF_NAMES or any(p.startswith("lora_") for p in parts) or leaf == "base_layer":
            continue
        if any(p in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B") for p in parts):
            continue
        names.add(leaf)
    if not names:
        raise ValueError(f"no Linear projections found in {type(model).__name__} to put LoRA on")
    return sorted(names)
