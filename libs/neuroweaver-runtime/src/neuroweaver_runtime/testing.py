"""Test helpers shared by every service: fresh PostgreSQL databases and free ports.

PostgreSQL tests use `NW_TEST_POSTGRES_URL` (default `postgresql://postgres@127.0.0.1:5432/postgres`)
as an admin connection and create one throw-away database per call.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Callable

ADMIN_URL = os.environ.get("NW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def create_postgres_database(prefix: str = "nwtest") -> tuple[str, Callable]:
    """Creates an empty database; returns (sqlalchemy async URL, async drop function)."""
    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = ADMIN_URL.rsplit("/", 1)[0]
    url = base.replace("postgresql://", "postgresql+asyncpg://", 1) + "/" + name

    async def drop() -> None:
        conn2 = await asyncpg.connect(ADMIN_URL)
        try:
            await conn2.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn2.close()

    return url, drop


def postgres_available() -> bool:
    async def probe() -> bool:
        import asyncpg

        try:
            conn = await asyncio.wait_for(asyncpg.connect(ADMIN_URL), 5)
        except Exception:  # noqa: BLE001
            return False
        await conn.close()
        return True

    return asyncio.run(probe())
