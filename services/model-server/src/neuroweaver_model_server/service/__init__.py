"""Model-server use cases (`inference.InferenceService`)."""

from .inference import InferenceService

__all__ = ["InferenceService"]
