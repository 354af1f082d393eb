"""The deployer's unit of work on SQLAlchemy: one session, the deployment repository, idempotency keys, integrity
errors; and read views on `Database.read()` sessions, which take no write lock (SQLite) and open no transaction
(PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from neuroweaver_runtime.db import Database
from neuroweaver_runtime.errors import Aborted, DomainError
from neuroweaver_runtime.idempotency import CreateOnce

from . import tables
from .repository import SqlDeploymentRepository


class SqlReadView:
    def __init__(self, session: AsyncSession) -> None:
        self.deployments = SqlDeploymentRepository(session)


class SqlUnitOfWork:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.deployments = SqlDeploymentRepository(session)

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


class SqlUnitOfWorkFactory:
    def __init__(self, db: Database) -> None:
        self.db = db

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlUnitOfWork]:
        async with self.db.transaction() as session:
            yield SqlUnitOfWork(session)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[SqlReadView]:
        async with self.db.read() as session:
            yield SqlReadView(session)
