"""Domain errors raised by neuroweaver_ml.

Services map them to gRPC codes: ``ModelNotFound`` → NOT_FOUND / FAILED_PRECONDITION,
``DatasetInvalid`` and ``PathNotAllowed`` → INVALID_ARGUMENT, ``DigestMismatch`` → FAILED_PRECONDITION,
``ResumeMismatch`` → FAILED_PRECONDITION.
"""

from __future__ import annotations


class NeuroWeaverMLError(Exception):
    """Base class of every error this library raises on purpose."""

    reason = "ML_ERROR"


class ModelNotFound(NeuroWeaverMLError):
    """A base-model reference could not be resolved to a loadable local checkpoint."""

    reason = "MODEL_NOT_FOUND"

    def __init__(self, reference: str, tried: list[str]):
        self.reference = reference
        self.tried = list(tried)
        super().__init__(f"base model {reference!r} not found; tried: " + "; ".join(self.tried))


class DatasetInvalid(NeuroWeaverMLError):
    """A dataset failed validation; ``problems`` holds the (line-numbered) findings."""

    reason = "DATASET_INVALID"

    def __init__(self, path: str, problems: list):
        self.path = path
        self.problems = list(problems)
        shown = "; ".join(str(p) for p in self.problems[:5])
        more = f" (+{len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        super().__init__(f"dataset {path} is invalid: {shown}{more}")


class PathNotAllowed(NeuroWeaverMLError):
    """A path or URI resolves outside the allowed roots (or uses an unsupported scheme)."""

    reason = "PATH_NOT_ALLOWED"


class DigestMismatch(NeuroWeaverMLError):
    """An artifact's sha256 differs from the expected one."""

    reason = "DIGEST_MISMATCH"

    def __init__(self, path: str, expected: str, actual: str):
        self.path, self.expected, self.actual = path, expected, actual
        super().__init__(f"sha256 of {path} is {actual}, expected {expected}")


class ResumeMismatch(NeuroWeaverMLError):
    """An output dir holds checkpoints of a run with a different configuration."""

    reason = "RESUME_MISMATCH"
