"""The trainer's unit of work on SQLAlchemy: one session, the job repository, idempotency keys, integrity errors.

Transactions commit when their block ends cleanly; then the jobs they marked are woken in this process through the
Notifier (watchers, event feeds). Other processes learn of new events by the NOTIFY `append_event` sends
(PostgreSQL) or a worker's pipe.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession

from neuroweaver_runtime.db import Database
from neuroweaver_runtime.notify import Notifier
from neuroweaver_runtime.unit_of_work import SqlUnitOfWorkBase

from ..service.ports import notify_key
from . import tables
from .repository import SqlJobRepository


class SqlUnitOfWork(SqlUnitOfWorkBase):
    def __init__(self, session: AsyncSession) -> None:
        super().__init__(session, tables.idempotency_keys)
        self.jobs = SqlJobRepository(session)
        self.woken: set[int] = set()

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
