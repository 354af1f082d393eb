"""The trainer's unit of work on SQLAlchemy: one session, the job repository, idempotency keys, integrity errors.

Transactions commit when their block ends cleanly; then the jobs they marked are woken in this process through the
Notifier (watchers, event feeds). Other processes learn of new events by the NOTIFY `append_event` sends
(PostgreSQL) or a worker's pipe.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from neuroweaver_runtime.db import Database
from neuroweaver_runtime.errors import Aborted, DomainError
from neuroweaver_runtime.idempotency import CreateOnce
from neuroweaver_runtime.notify import Notifier

from ..service.ports import notify_key
from . import tables
from .repository import SqlJobRepository


class SqlUnitOfWork:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.jobs = SqlJobRepository(session)
        self.woken: set[int] = set()

    async def find_request(self, request_id: str, method: str, fingerprint: str) -> str | None:
        return await CreateOnce(tables.idempotency_keys, method, request_id, fingerprint).earlier(self.session)

    async def remember_request(self, request_id: str, method: str, fingerprint: str, resource: str) -> None:
        # A concurrent call with the same request_id got there first (both missed in `find_request`): this one rolls
        # back, and its retry finds what the other created.
        with self.duplicate(
            Aborted(
                "another call with this request_id completed meanwhile; retry to get its result",
                reason="REQUEST_ID_IN_FLIGHT",
            )
        ):
            await CreateOnce(tables.idempotency_keys, method, request_id, fingerprint).remember(self.session, resource)

    @contextmanager
    def duplicate(self, error: DomainError) -> Iterator[None]:
        try:
            yield
        except IntegrityError:
            raise error from None

    def wake(self, key: int) -> None:
        self.woken.add(key)


class SqlUnitOfWorkFactory:
    def __init__(self, db: Database, notifier: Notifier) -> None:
        self.db = db
        self.notifier = notifier

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlUnitOfWork]:
        async with self.db.transaction() as session:
            uow = SqlUnitOfWork(session)
            yield uow
        for key in uow.woken:
            self.notifier.wake(notify_key(key))
