"""Decoding engines. Today one: `batcher.Engine`, a bounded queue and a dynamic batcher over transformers models
(`neuroweaver_ml.generation`'s decoding loop)."""

from .batcher import Engine

__all__ = ["Engine"]
