"""The deployer's unit of work on SQLAlchemy: one session, the deployment repository, idempotency keys, integrity
errors; and read views on `Database.read()` sessions, which take no write lock (SQLite) and open no transaction
(PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession

from neuroweaver_runtime.db import Database
from neuroweaver_runtime.unit_of_work import SqlUnitOfWorkBase

from . import tables
from .repository import SqlDeploymentRepository


class SqlReadView:
    def __init__(self, session: AsyncSession) -> None:
        self.deployments = SqlDeploymentRepository(session)


class SqlUnitOfWork(SqlUnitOfWorkBase):
    def __init__(self, session: AsyncSession) -> None:
        super().__init__(session, tables.idempotency_keys)
        self.deployments = SqlDeploymentRepository(session)


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
