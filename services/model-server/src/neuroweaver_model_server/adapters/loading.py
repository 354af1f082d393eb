"""Loads what a model server serves: the base model (builtin, a local dir or a file:// URI) and its LoRA adapter,
whose sha256 is checked before any weight is read. Blocking (disk, torch): the service runs it in a thread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only when a model does
    from neuroweaver_ml.generation import LoadedModel


@dataclass(frozen=True)
class LoadSpec:
    base_model: str  # builtin:..., a local dir or a file:// URI
    adapter_uri: str  # file:// URI or path of a PEFT adapter dir; empty = base model only
    adapter_sha256: str
    load_in_4bit: bool
    device: str = "auto"


def load_model(spec: LoadSpec) -> LoadedModel:
    """Resolves the base model, verifies the adapter's digest and loads both ."""
    from neuroweaver_ml import load_for_inference, resolve_base_model, uri_to_path

    base_dir = resolve_base_model(spec.base_model)
    adapter_dir = uri_to_path(spec.adapter_uri) if spec.adapter_uri else None
    return load_for_inference(
        base_dir,
        adapter_dir,
        spec.load_in_4bit,
        expected_adapter_sha256=spec.adapter_sha256 or None,
        device=spec.device,
        # One server serves one version: folding the LoRA weights into the base removes the adapter's extra
        # matmuls from every decode step (the demo's unmerged candidate answered ~1.4x slower than its base).
        # Not with 4-bit weights, where load_for_inference keeps the adapter separate.
        merge_adapter=True,
    )
