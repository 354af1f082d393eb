"""Idempotent creates (AIP-155): a `request_id` seen before returns the resource the first call made.

Each service adds `idempotency_table(metadata)` to its schema. A create use case builds one `CreateOnce`
(`request_id` checked, the request's `request_fingerprint` from the servicer) and, inside the same transaction as
the insert, asks it for the `earlier()` resource and `remember()`s the new one, so a retry after a lost response can
never create a second resource.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, DateTime, MetaData, String, Table, select
from sqlalchemy.ext.asyncio import AsyncSession

from .errors import InvalidArgument
from .timestamps import utcnow


def idempotency_table(metadata: MetaData) -> Table:
    return Table(
        "idempotency_keys",
        metadata,
        Column("request_id", String(64), primary_key=True),
        Column("method", String(128), nullable=False),
        Column("fingerprint", String(64), nullable=False),
        Column("resource", String(512), nullable=False),
        Column("create_time", DateTime(timezone=True), nullable=False),
    )


def validate_request_id(request_id: str) -> str:
    if not request_id:
        return ""
    try:
        return str(uuid.UUID(request_id))
    except ValueError:
        raise InvalidArgument("request_id must be a UUID", field="request_id", reason="INVALID_REQUEST_ID") from None


def fingerprint(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def request_fingerprint(request: Any) -> str:
    """Digest of a create request (a protobuf message) without its request_id: the same id with another body is misuse."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    return fingerprint(copy.SerializeToString(deterministic=True))


async def find(session: AsyncSession, table: Table, request_id: str, method: str, print_: str) -> str | None:
    """The resource created by an earlier call with this request_id, or None."""
    if not request_id:
        return None
    row = (await session.execute(select(table).where(table.c.request_id == request_id))).first()
    if row is None:
        return None
    if row.method != method or row.fingerprint != print_:
        raise InvalidArgument(
            "request_id was already used for a different request", field="request_id", reason="REQUEST_ID_REUSED"
        )
    return row.resource


async def remember(session: AsyncSession, table: Table, request_id: str, method: str, print_: str, resource: str) -> None:
    if request_id:
        await session.execute(
            table.insert().values(
                request_id=request_id, method=method, fingerprint=print_, resource=resource, create_time=utcnow()
            )
        )


@dataclass(frozen=True)
class CreateOnce:
    """One create call's idempotency key: `earlier()` and `remember()` always agree on table, method and body."""

    table: Table
    method: str  # the RPC, e.g. CreateDeployment: one request_id never answers two kinds of create
    request_id: str  # validated; empty = the caller asked for no idempotency
    fingerprint: str

    @classmethod
    def of(cls, table: Table, method: str, request_id: str, fingerprint: str) -> CreateOnce:
        """Checks `request_id` (INVALID_ARGUMENT unless empty or a UUID) before anything touches storage."""
        return cls(table, method, validate_request_id(request_id), fingerprint)

    async def earlier(self, session: AsyncSession) -> str | None:
        """The resource an earlier call with this request_id created, or None (REQUEST_ID_REUSED for another body)."""
        return await find(session, self.table, self.request_id, self.method, self.fingerprint)

    async def remember(self, session: AsyncSession, resource: str) -> None:
        """Records `resource` as this request_id's answer, in the transaction that created it."""
        await remember(session, self.table, self.request_id, self.method, self.fingerprint, resource)
