"""Domain errors raised by neuroweaver_ml.

Services map them to gRPC codes: ``ModelNotFound`` → NOT_FOUND / FAILED_PRECONDITION,
``DatasetInvalid`` and ``PathError`` (``PathNotAllowed``, ``PathNotFound``, ``PathUnusable``) → INVALID_ARGUMENT, ``DigestMismatch`` → FAILED_PRECONDITION,
``ResumeMismatch`` → FAILED_PRECONDITION.
"""

from __future__ import annotations


class NeuroWeaverMLError(Exception):
    """Base class of every error this library raises on purpose."""

    reason = "ML_ERROR"


class ModelNotFound(NeuroWeaverMLError):
    """A base-model reference could not be resolved to a loadable local checkpoint.

    ``tried`` says what was looked at, without server paths (it may end up in an API error);
    ``exists`` is true when the reference named something that exists but is not a model."""

    reason = "MODEL_NOT_FOUND"

    def __init__(self, reference: str, tried: list[str], *, exists: bool = False):
        self.reference = reference
        self.tried = list(tried)
        self.exists = exists
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


class PathError(NeuroWeaverMLError):
    """A path input was refused or is unusable. ``detail`` completes a sentence that starts with the
    field's name ("training_job.base_model" + " is outside ..."); it never holds a server path, a root,
    a symlink target or the input itself, so it is safe in an API error."""

    reason = "PATH_ERROR"

    def __init__(self, detail: str):
        self.detail = detail
        super().__init__("path " + detail)


class PathNotAllowed(PathError):
    """A path or URI is refused without looking at the filesystem outside the roots: outside every allowed
    root (after ``..`` and symlinks), relative, an unsupported scheme, NUL/control characters, too long."""

    reason = "PATH_NOT_ALLOWED"


class PathNotFound(PathError):
    """A path inside the allowed roots does not exist."""

    reason = "PATH_NOT_FOUND"


class PathUnusable(PathError):
    """A path inside the allowed roots exists but cannot be used: wrong type (a device, FIFO, a directory
    where a file is needed), unreadable, or a symlink loop."""

    reason = "PATH_UNUSABLE"


class DigestMismatch(NeuroWeaverMLError):
    """An artifact's sha256 differs from the expected one."""

    reason = "DIGEST_MISMATCH"

    def __init__(self, path: str, expected: str, actual: str):
        self.path, self.expected, self.actual = path, expected, actual
        super().__init__(f"sha256 of {path} is {actual}, expected {expected}")


class ResumeMismatch(NeuroWeaverMLError):
    """An output dir holds checkpoints of a run with a different configuration."""

    reason = "RESUME_MISMATCH"
