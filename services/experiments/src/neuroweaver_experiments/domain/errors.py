"""Domain errors of the experiments service.

Self-contained on purpose (no gRPC, no protobuf): the API layer maps them onto canonical status codes
(`InvalidArgument` → INVALID_ARGUMENT with a `BadRequest.FieldViolation` for `field`, `NotFound` →
NOT_FOUND, `FailedPrecondition` → FAILED_PRECONDITION, `Aborted` → ABORTED) with an
`ErrorInfo.reason` taken from `reason`. The constructor shape (`message` first, keyword-only
`field`/`reason`/`metadata`) is the same as `neuroweaver_runtime.errors`, so these classes can later be
replaced by the runtime's without touching the callers.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base of every expected failure. `reason` is a stable UPPER_SNAKE id clients may switch on."""

    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.field = field
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}

    def __repr__(self) -> str:
        extra = f", field={self.field!r}" if self.field else ""
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r}{extra})"


class InvalidArgument(DomainError):
    """The request itself is wrong; `field` names the offending field (for example `variants[1].weight`)."""

    default_reason = "INVALID_ARGUMENT"


class NotFound(DomainError):
    default_reason = "NOT_FOUND"


class FailedPrecondition(DomainError):
    """The request is well formed but the resource is not in a state that allows it."""

    default_reason = "FAILED_PRECONDITION"


class Aborted(DomainError):
    """Concurrency conflict (stale etag, compare-and-set mismatch): re-read and retry."""

    default_reason = "ABORTED"


__all__ = ["Aborted", "DomainError", "FailedPrecondition", "InvalidArgument", "NotFound"]
