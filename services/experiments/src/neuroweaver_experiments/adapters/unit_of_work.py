"""The experiments' unit of work on SQLAlchemy: one session, its repositories, idempotency keys, integrity errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession

from neuroweaver_runtime.db import Database
from neuroweaver_runtime.unit_of_work import SqlUnitOfWorkBase

from . import tables
from .answers import SqlAnswerRepository
from .repository import SqlAssignmentRepository, SqlExperimentRepository, SqlMetricRepository


class SqlUnitOfWork(SqlUnitOfWorkBase):
    def __init__(self, session: AsyncSession, is_postgres: bool) -> None:
        super().__init__(session, tables.idempotency_keys)
        self.experiments = SqlExperimentRepository(session, is_postgres)
        self.assignments = SqlAssignmentRepository(session, is_postgres)
        self.metrics = SqlMetricRepository(session, is_postgres)
        self.answers = SqlAnswerRepository(session, is_postgres)


class SqlUnitOfWorkFactory:
    def __init__(self, db: Database) -> None:
        self.db = db

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlUnitOfWork]:
        async with self.db.transaction() as session:
            yield SqlUnitOfWork(session, self.db.is_postgres)
