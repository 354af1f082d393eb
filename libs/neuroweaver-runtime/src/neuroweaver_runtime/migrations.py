"""Alembic migrations without an alembic.ini: services call `upgrade(url, script_location)`.

Each service's `migrations/env.py` is two lines that call `run_env(metadata)`.

On PostgreSQL a run holds a session-level advisory lock (one key per service, `migration_lock_key`) on a
connection of its own: replicas starting together on a fresh database migrate one at a time, and the later ones
find the schema at head and do nothing. SQLite needs none: one process owns the file.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from sqlalchemy import pool, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .db import normalize_url


def alembic_config(url: str, script_location: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", script_location)
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, script_location: str, revision: str = "head") -> None:
    """Blocking; from async code use `await asyncio.to_thread(upgrade, ...)`."""
    command.upgrade(alembic_config(url, script_location), revision)


def downgrade(url: str, script_location: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url, script_location), revision)


def migration_lock_key(script_location: str) -> int:
    """The advisory-lock key of a service's migrations: a signed 64-bit hash of its package name (the folder that
    holds `migrations/`), the same on every replica and install path."""
    package = Path(script_location).resolve().parent.name
    digest = hashlib.blake2b(f"neuroweaver-migrations:{package}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@asynccontextmanager
async def migration_lock(engine: AsyncEngine, script_location: str) -> AsyncIterator[None]:
    """Holds the service's migration lock on PostgreSQL (waiting for another replica's run to end); no-op on SQLite.

    The lock lives on its own autocommit connection, so it spans Alembic's transactions without keeping one open;
    if this process dies, PostgreSQL ends the session and the lock with it.
    """
    if engine.dialect.name != "postgresql":
        yield
        return
    key = migration_lock_key(script_location)
    async with engine.connect() as conn:
        autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        try:
            yield
        finally:
            await autocommit.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})


def run_env(target_metadata) -> None:
    """Body of a service's migrations/env.py (online mode, async engine)."""
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("alembic config has no sqlalchemy.url; run migrations through neuroweaver_runtime.migrations.upgrade")

    def do_run(connection) -> None:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()

    script_location = context.config.get_main_option("script_location") or ""

    async def run_async() -> None:
        engine = create_async_engine(url, poolclass=pool.NullPool)
        try:
            # Alembic reads the current revision only after the lock is held: a replica that waited finds head.
            async with migration_lock(engine, script_location), engine.connect() as conn:
                await conn.run_sync(do_run)
        finally:
            await engine.dispose()

    asyncio.run(run_async())
