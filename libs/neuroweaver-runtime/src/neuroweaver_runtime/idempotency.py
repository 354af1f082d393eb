"""Idempotent creates (AIP-155): a `request_id` seen before returns the resource the first call made.

Each service adds `idempotency_table(metadata)` to its schema and calls `find`/`remember` inside the
same transaction as the create, so a retry after a lost response can never create a second resource.
"""

from __future__ import annotations

import hashlib
import uuid

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
