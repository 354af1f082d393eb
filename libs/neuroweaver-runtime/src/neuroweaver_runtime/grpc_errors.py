"""Domain errors on the wire: canonical gRPC status codes, `google.rpc.Status` with ErrorInfo and BadRequest.

The server side (`to_rpc_status`, `internal_status`) is used by the error interceptor; the client side
(`error_info`, `field_violations`) by anything that calls a service and switches on the reason or the fields.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from .errors import (
    MAX_DETAILS_BYTES,
    MAX_MESSAGE_CHARS,
    MAX_METADATA_ENTRIES,
    MAX_VIOLATIONS,
    DomainError,
    ErrorKind,
    truncate,
)


def status_code(kind: ErrorKind) -> grpc.StatusCode:
    """The canonical code of an error kind (each kind is named after its code)."""
    return grpc.StatusCode[kind.name]


def to_rpc_status(error: DomainError, domain: str) -> status_pb2.Status:
    """Builds the google.rpc.Status (with ErrorInfo and BadRequest details) for a domain error, bounded in size."""
    metadata = {truncate(k, 64): truncate(v) for k, v in list(error.metadata.items())[:MAX_METADATA_ENTRIES]}
    details = [_pack(error_details_pb2.ErrorInfo(reason=truncate(error.reason, 64), domain=domain, metadata=metadata))]
    violations = [
        error_details_pb2.BadRequest.FieldViolation(field=truncate(v.field), description=truncate(v.description, 200))
        for v in error.violations[:MAX_VIOLATIONS]
    ]
    while violations:
        bad = _pack(error_details_pb2.BadRequest(field_violations=violations))
        if bad.ByteSize() <= MAX_DETAILS_BYTES or len(violations) == 1:
            details.append(bad)
            break
        violations = violations[: len(violations) // 2]
    code = status_code(error.kind).value[0]
    return status_pb2.Status(code=code, message=truncate(error.message, MAX_MESSAGE_CHARS), details=details)


def internal_status(domain: str) -> status_pb2.Status:
    """The status for an unexpected exception: generic message, details only in the server log."""
    info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=domain)
    return status_pb2.Status(
        code=code_pb2.INTERNAL, message="internal error; the server logged the details", details=[_pack(info)]
    )


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def error_info(err: grpc.aio.AioRpcError | grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """Client side: extracts the ErrorInfo from a failed call, or None."""
    for detail in _details(err):
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def field_violations(err: grpc.aio.AioRpcError | grpc.RpcError) -> list[error_details_pb2.BadRequest.FieldViolation]:
    """Client side: the BadRequest field violations of a failed call."""
    out = []
    for detail in _details(err):
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend(bad.field_violations)
    return out


def _details(err) -> list[any_pb2.Any]:
    metadata = err.trailing_metadata() or ()
    for key, value in metadata:
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            return list(status.details)
    return []
