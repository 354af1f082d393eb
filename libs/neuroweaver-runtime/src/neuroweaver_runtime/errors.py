"""Domain errors: what went wrong (a kind), a stable reason, and the details a caller can act on.

Domain and use-case code raise these; they carry no gRPC and no protobuf, so `domain/` packages stay free of both.
The API edge (`grpc_errors`) maps each kind onto its canonical gRPC status code and builds the `google.rpc.Status`
with an `ErrorInfo{reason, domain, metadata}` and, for invalid fields, a `BadRequest` with field violations.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ErrorKind(enum.StrEnum):
    """The kind of failure. Each is named after the canonical status code (google.rpc.Code) it maps to."""

    UNKNOWN = "UNKNOWN"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """Base of every expected failure. `reason` is a stable UPPER_SNAKE identifier clients may switch on."""

    kind: ErrorKind = ErrorKind.UNKNOWN
    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        violations: list[FieldViolation] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self.violations = list(violations or [])


class InvalidArgument(DomainError):
    kind = ErrorKind.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, field: str | None = None, **kwargs) -> None:  # noqa: A002
        violations = kwargs.pop("violations", None) or ([FieldViolation(field, message)] if field else [])
        super().__init__(message, violations=violations, **kwargs)
        self.field = field


class NotFound(DomainError):
    kind = ErrorKind.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    kind = ErrorKind.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    kind = ErrorKind.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(DomainError):
    """Concurrency conflicts: stale etag, compare-and-set mismatch. The client should re-read and retry."""

    kind = ErrorKind.ABORTED
    default_reason = "ABORTED"


class PermissionDenied(DomainError):
    kind = ErrorKind.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    kind = ErrorKind.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(DomainError):
    kind = ErrorKind.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(DomainError):
    kind = ErrorKind.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(DomainError):
    kind = ErrorKind.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


@dataclass
class Violations:
    """Collects several field violations and raises them as one INVALID_ARGUMENT."""

    items: list[FieldViolation] = field(default_factory=list)

    def add(self, field_path: str, description: str) -> None:
        self.items.append(FieldViolation(field_path, description))

    def raise_if_any(self, reason: str = "INVALID_ARGUMENT") -> None:
        if self.items:
            first = self.items[0]
            more = f" (and {len(self.items) - 1} more)" if len(self.items) > 1 else ""
            raise InvalidArgument(f"{first.field}: {first.description}{more}", reason=reason, violations=self.items)


# Bounds on what an error carries back. Messages quote the caller's input, and the status travels in trailers:
# one larger than the peer's metadata limit would reach the caller as RESOURCE_EXHAUSTED instead of the real error
# (the message is also percent-encoded in `grpc-message`: up to 12 bytes per non-ASCII character).
MAX_MESSAGE_CHARS = 200
MAX_DETAIL_CHARS = 120
MAX_VIOLATIONS = 10
MAX_METADATA_ENTRIES = 16
MAX_DETAILS_BYTES = 2000


def truncate(value: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """`value` cut to about `limit` characters, marking the cut with how much was left out."""
    if len(value) <= limit:
        return value
    marker = f"…[+{len(value)} chars]"  # at least as long as the final marker
    keep = max(limit - len(marker), 0)
    return f"{value[:keep]}…[+{len(value) - keep} chars]"


# SQLSTATEs meaning "the database is (temporarily) unreachable": connection exceptions (class 08), admin/crash
# shutdown and "cannot connect now" (57P01-57P03), too many connections (53300).
_UNAVAILABLE_SQLSTATES = ("57P01", "57P02", "57P03", "53300")
_UNAVAILABLE_CLASS_NAMES = {"ConnectionDoesNotExistError"}


def unavailable_from_db_error(exc: BaseException) -> Unavailable | None:
    """An UNAVAILABLE (retryable) error when `exc` is a lost or refused database connection, else None.

    Meant for the server interceptor's catch-all: a PostgreSQL restart must surface as UNAVAILABLE, which clients
    retry (writes carry request_id), not INTERNAL. Walks the exception chain (SQLAlchemy wraps the driver's error in
    `.orig`; asyncpg raises OSError for refused connections). Constraint violations and other SQL errors stay None.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if getattr(e, "connection_invalidated", False) or isinstance(e, (ConnectionError, TimeoutError)):
            return _db_unavailable(e)
        if isinstance(e, OSError) and type(e) is OSError or type(e).__name__ == "gaierror":
            return _db_unavailable(e)
        sqlstate = getattr(e, "sqlstate", None)
        if isinstance(sqlstate, str) and (sqlstate.startswith("08") or sqlstate in _UNAVAILABLE_SQLSTATES):
            return _db_unavailable(e)
        if type(e).__module__.startswith("asyncpg") and type(e).__name__ in _UNAVAILABLE_CLASS_NAMES:
            return _db_unavailable(e)
        stack.extend([getattr(e, "orig", None), e.__cause__, e.__context__])
    return None


def _db_unavailable(cause: BaseException) -> Unavailable:
    return Unavailable("the database is unavailable; retry with backoff", reason="DATABASE_UNAVAILABLE",
                       metadata={"cause": type(cause).__name__})  # fmt: skip
