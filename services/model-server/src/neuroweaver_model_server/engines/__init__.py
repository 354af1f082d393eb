"""Decoding engines behind the model server's one contract: `transformers` (`transformers_engine.TransformersEngine`,
continuous batching over one KV cache with per-request sampling), `llama.cpp` (`llamacpp.LlamaCppEngine`, GGUF on the CPU with continuous batching)
and `vllm` (`vllm_engine.VllmEngine`, CUDA, multi-LoRA). Each is a `base.QueuedEngine`: encode a prompt, run a request
(deltas, the last with finish reason and usage), queue depth, stop. The heavy ones import their library lazily."""

from .base import ENGINES, QueuedEngine
from .transformers_engine import TransformersEngine

__all__ = ["ENGINES", "QueuedEngine", "TransformersEngine"]
