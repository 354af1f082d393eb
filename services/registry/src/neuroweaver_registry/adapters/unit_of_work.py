"""The registry's unit of work on SQLAlchemy: one session, its repositories, idempotency keys, integrity errors.

Transactions commit when their block ends cleanly; then the projects whose events they appended are woken
through the Notifier (watchers, the version cache; other replicas learn of it by the event's NOTIFY).
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

from ..domain.model import ModelEvent
from . import tables
from .repository import (
    SqlAliasRepository,
    SqlEventRepository,
    SqlJudgeRepository,
    SqlModelRepository,
    SqlVersionRepository,
)


class SqlUnitOfWork:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.models = SqlModelRepository(session)
        self.versions = SqlVersionRepository(session)
        self.aliases = SqlAliasRepository(session)
        self.events = SqlEventRepository(session)
        self.judges = SqlJudgeRepository(session)
        self.woken: set[str] = set()

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
