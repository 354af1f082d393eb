"""Alembic migrations without an alembic.ini: services call `upgrade(url, script_location)`.

Each service's `migrations/env.py` is two lines that call `run_env(metadata)`.
"""

from __future__ import annotations

import asyncio

from alembic import command, context
from alembic.config import Config
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import create_async_engine

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

    async def run_async() -> None:
        engine = create_async_engine(url, poolclass=pool.NullPool)
        async with engine.connect() as conn:
            await conn.run_sync(do_run)
        await engine.dispose()

    asyncio.run(run_async())
