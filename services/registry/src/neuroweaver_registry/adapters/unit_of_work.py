"""The registry's unit of work on SQLAlchemy: one session, its repositories, idempotency keys, integrity errors.

Transactions commit when their block ends cleanly; then the projects whose events they appended are woken
through the Notifier (watchers, the version cache; other replicas learn of it by the event's NOTIFY).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession

from neuroweaver_runtime.db import Database
from neuroweaver_runtime.notify import Notifier
from neuroweaver_runtime.unit_of_work import SqlUnitOfWorkBase

from ..domain.model import ModelEvent
from . import tables
from .repository import (
    SqlAliasRepository,
    SqlEventRepository,
    SqlJudgeRepository,
    SqlModelRepository,
    SqlVersionRepository,
)


class SqlUnitOfWork(SqlUnitOfWorkBase):
    def __init__(self, session: AsyncSession) -> None:
        super().__init__(session, tables.idempotency_keys)
        self.models = SqlModelRepository(session)
        self.versions = SqlVersionRepository(session)
        self.aliases = SqlAliasRepository(session)
        self.events = SqlEventRepository(session)
        self.judges = SqlJudgeRepository(session)
        self.woken: set[str] = set()

    async def append_event(self, project: str, event: ModelEvent) -> None:
        await self.events.append(project, event)
        self.woken.add(project)


class SqlUnitOfWorkFactory:
    def __init__(self, db: Database, notifier: Notifier) -> None:
        self.db = db
        self.notifier = notifier

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlUnitOfWork]:
        async with self.db.transaction() as session:
            uow = SqlUnitOfWork(session)
            yield uow
        for project in uow.woken:
            self.notifier.wake(project)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[SqlUnitOfWork]:
        async with self.db.read() as session:
            yield SqlUnitOfWork(session)
