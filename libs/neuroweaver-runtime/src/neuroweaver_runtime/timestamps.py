"""Conversions between timezone-aware datetimes (domain) and protobuf Timestamps (API)."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime | None) -> datetime | None:
    """`value` with UTC attached when it has no time zone: SQLite hands back naive datetimes for UTC columns."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def to_timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def from_timestamp(ts: Timestamp, field: str | None = None) -> datetime:
    """A client-supplied Timestamp outside 0001-01-01..9999-12-31 or with nanos outside [0, 1e9) is INVALID_ARGUMENT."""
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        from .errors import InvalidArgument

        raise InvalidArgument(f"{field or 'timestamp'}: {exc}", field=field, reason="INVALID_TIMESTAMP") from None
