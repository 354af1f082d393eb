"""The async database layer: SQLite (embedded default) or PostgreSQL (asyncpg), SQLAlchemy 2.

SQLite transactions start with `BEGIN IMMEDIATE`, so concurrent writers queue on the database lock
instead of failing on lock upgrade; PostgreSQL uses row locks (`SELECT ... FOR UPDATE`) in use cases.

`Database.read()` is the path for read-only use cases: on SQLite it begins a plain (deferred) transaction,
which takes no write lock, so reads never queue behind a writer (WAL gives them a consistent snapshot); on
PostgreSQL it runs in autocommit, saving the BEGIN/COMMIT round trips (under READ COMMITTED each statement
sees its own snapshot either way). It shares the connection pool with `transaction()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

log = logging.getLogger(__name__)


def normalize_url(url: str) -> str:
    """Accepts `postgresql://` and `sqlite:///` and picks the async drivers."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///"):]
    return url


class Database:
    def __init__(self, url: str, *, pool_size: int = 10, echo: bool = False) -> None:
        self.url = normalize_url(url)
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: AsyncEngine = create_async_engine(
                self.url, echo=echo, connect_args={"timeout": 30}
            )
            _sqlite_setup(self.engine)
        else:
            self.engine = create_async_engine(
                self.url, echo=echo, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
            )
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # Same pool; connections checked out through it are marked read-only (see `read`).
        options = {_READ_ONLY: True} if self.dialect == "sqlite" else {"isolation_level": "AUTOCOMMIT"}
        self.read_engine: AsyncEngine = self.engine.execution_options(**options)
        self.read_sessions = async_sessionmaker(self.read_engine, expire_on_commit=False)

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session in one transaction: committed on success, rolled back on any exception."""
        async with self.sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads only: no write lock on SQLite, no BEGIN/COMMIT on PostgreSQL.

        Writing through it is a bug (on PostgreSQL each statement would commit on its own).
        """
        async with self.read_sessions() as session:
            yield session

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def wait_until_ready(self, timeout: float = 60.0) -> None:
        """Retries the connection while the database starts (compose, Kubernetes)."""
        deadline = asyncio.get_running_loop().time() + timeout
        delay = 0.2
        while True:
            try:
                await self.ping()
                return
            except Exception as exc:  # noqa: BLE001 - any connection failure is retried until the deadline
                if asyncio.get_running_loop().time() > deadline:
                    raise
                log.warning("database not ready yet: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def dispose(self) -> None:
        await self.engine.dispose()


_READ_ONLY = "neuroweaver_read_only"


def _sqlite_setup(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn):
        # Reads begin deferred (a shared snapshot, no lock); writes take the write lock up front.
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(_READ_ONLY) else "BEGIN IMMEDIATE")
