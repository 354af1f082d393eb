"""`Database.read()`: reads on SQLite take no write lock, so they never wait for a writer; writes still serialise."""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from neuroweaver_runtime.db import Database


async def test_sqlite_read_does_not_wait_for_a_writer(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        async with db.transaction() as s:
            await s.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))
            await s.execute(text("INSERT INTO t (v) VALUES ('committed')"))
        writer_holds_lock = asyncio.Event()
        release = asyncio.Event()

        async def writer():
            async with db.transaction() as s:  # BEGIN IMMEDIATE: holds the write lock until release
                await s.execute(text("UPDATE t SET v = 'uncommitted'"))
                writer_holds_lock.set()
                await release.wait()

        task = asyncio.create_task(writer())
        await writer_holds_lock.wait()
        try:
            async with asyncio.timeout(2):  # a BEGIN IMMEDIATE would wait up to busy_timeout (30 s) here
                async with db.read() as s:
                    assert (await s.execute(text("SELECT v FROM t"))).scalar() == "committed"
            # and a second writer still queues behind the first one
            with_lock = asyncio.create_task(_write(db, "second"))
            await asyncio.sleep(0.3)
            assert not with_lock.done()
        finally:
            release.set()
            await task
        await with_lock
        async with db.read() as s:
            assert (await s.execute(text("SELECT v FROM t"))).scalar() == "second"
    finally:
        await db.dispose()


async def _write(db: Database, value: str) -> None:
    async with db.transaction() as s:
        await s.execute(text("UPDATE t SET v = :v"), {"v": value})


async def test_read_sessions_share_the_pool_and_see_commits(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'p.db'}")
    try:
        assert db.read_engine.pool is db.engine.pool
        async with db.transaction() as s:
            await s.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
            await s.execute(text("INSERT INTO t DEFAULT VALUES"))
        async with db.read() as s:
            assert (await s.execute(text("SELECT count(*) FROM t"))).scalar() == 1
    finally:
        await db.dispose()
