"""The async database layer: SQLite (embedded default) or PostgreSQL (asyncpg), SQLAlchemy 2.

SQLite transactions start with `BEGIN IMMEDIATE`, so concurrent writers queue on the database lock
instead of failing on lock upgrade; PostgreSQL uses row locks (`SELECT ... FOR UPDATE`) in use cases.

`Database.read()` is the path for read-only use cases: on SQLite it begins a plain (deferred) transaction,
which takes no write lock, so reads never queue behind a writer (WAL gives them a consistent snapshot); on
PostgreSQL it runs in autocommit, saving the BEGIN/COMMIT round trips (under READ COMMITTED each statement
sees its own snapshot either way). It shares the connection pool with `transaction()`.

On SQLite, a statement handed to the driver runs to completion even when the awaiting task is cancelled (a gRPC
client that disconnects or passes its deadline cancels its handler): the cancellation lands at the task's next await
outside the driver. Cancelled mid-statement, SQLAlchemy's asyncio clean-up leaves the aiosqlite connection in its
transaction, so a `BEGIN IMMEDIATE` held the database's write lock until every other writer failed with
"database is locked" (see `_StatementsFinishOnCancel`). So a transaction cancelled mid-statement commits on SQLite
when its body has no other await before the end, as if the cancellation had come just after; on PostgreSQL
SQLAlchemy closes the connection and the server rolls it back. A cancelled caller cannot tell these apart, and
retries carry request ids.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import aiosqlite
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

log = logging.getLogger(__name__)


def normalize_url(url: str) -> str:
    """Accepts `postgresql://` and `sqlite:///` and picks the async drivers."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
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
                self.url, echo=echo, async_creator=partial(_connect_sqlite, parsed.database or ":memory:")
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


class _RunsToCompletion(asyncio.Future):
    """A driver call's future that refuses cancellation: a task cancelled while awaiting it gets its CancelledError
    when the call is done (how asyncio's Task treats a future whose cancel() returns False; tests pin it)."""

    def cancel(self, msg=None) -> bool:
        return False


class _StatementsFinishOnCancel(aiosqlite.Connection):
    """An aiosqlite connection whose calls run to completion when the awaiting task is cancelled.

    Every driver call (execute, fetch, begin, commit, rollback, close) goes through `_execute`, which is aiosqlite's
    own body with a `_RunsToCompletion` future. The CancelledError that arrives once the call is done is taken back
    and re-armed (`uncancel` + `cancel`, so `asyncio.timeout` still tells its expiry apart), and the call's result
    returned: the cancellation lands at the task's next await outside the driver, and a transaction in flight commits
    or rolls back as a whole instead of being left open on a pooled connection.
    """

    async def _execute(self, fn, *args, **kwargs):
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        call = _RunsToCompletion(loop=asyncio.get_running_loop())
        self._tx.put_nowait((call, partial(fn, *args, **kwargs)))
        try:
            return await call
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not call.done() or task is None:
                raise
            task.uncancel()  # this delivery is taken back (the count of requests stays as it was) ...
            task.cancel()  # ... and made again, for the next await outside the driver
            return call.result()


async def _connect_sqlite(database: str) -> aiosqlite.Connection:
    # What SQLAlchemy's aiosqlite dialect does for a file URL, with the connection class above.
    connection = _StatementsFinishOnCancel(partial(sqlite3.connect, database, timeout=30), iter_chunk_size=64)
    connection._thread.daemon = True  # as SQLAlchemy does: an unclosed connection must not keep the process alive
    return await connection
