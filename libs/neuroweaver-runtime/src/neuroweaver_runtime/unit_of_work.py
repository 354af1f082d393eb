"""What every service's SQL unit of work shares: its session, idempotency keys for creates, integrity errors.

A service's unit of work derives from `SqlUnitOfWorkBase` and adds its repositories on the same session.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Table
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from .errors import Aborted, DomainError
from .idempotency import CreateOnce


class SqlUnitOfWorkBase:
    def __init__(self, session: AsyncSession, idempotency_keys: Table) -> None:
        self.session = session
        self._idempotency_keys = idempotency_keys

    async def find_request(self, request_id: str, method: str, fingerprint: str) -> str | None:
        """The resource an earlier call with this request_id created, or None."""
        return await CreateOnce(self._idempotency_keys, method, request_id, fingerprint).earlier(self.session)

    async def remember_request(self, request_id: str, method: str, fingerprint: str, resource: str) -> None:
        # A concurrent call with the same request_id got there first (both missed in `find_request`): this one rolls
        # back, and its retry finds what the other created.
        with self.duplicate(
            Aborted(
                "another call with this request_id completed meanwhile; retry to get its result",
                reason="REQUEST_ID_IN_FLIGHT",
            )
        ):
            await CreateOnce(self._idempotency_keys, method, request_id, fingerprint).remember(self.session, resource)

    @contextmanager
    def duplicate(self, error: DomainError) -> Iterator[None]:
        """Turns a unique-constraint violation inside the block into `error` (e.g. ALREADY_EXISTS)."""
        try:
            yield
        except IntegrityError:
            raise error from None
