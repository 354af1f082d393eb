"""A task cancelled while SQLite runs its statement (a gRPC client that disconnects or passes its deadline) must not
leave the write lock held: before the fix, every later writer waited the 30 s busy timeout and failed with
"database is locked" (the deployer's WatchDeployment INTERNAL in CI)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from neuroweaver_runtime.db import Database

# ~0.7 s of SQLite work on the development machine: long enough to cancel the task while it runs.
SLOW_SELECT = text("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) SELECT count(*) FROM c")


async def _database(path) -> Database:
    database = Database(f"sqlite:///{path / 'c.db'}")
    async with database.transaction() as s:
        await s.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)"))
        await s.execute(text("INSERT INTO t (id, v) VALUES (1, 0)"))
    return database


@pytest.fixture
async def db(tmp_path):
    database = await _database(tmp_path)
    yield database
    await database.dispose()


async def _increment(db: Database) -> None:
    async with db.transaction() as s:
        await s.execute(text("UPDATE t SET v = v + 1 WHERE id = 1"))


async def _value(db: Database) -> int:
    async with db.read() as s:
        return (await s.execute(text("SELECT v FROM t WHERE id = 1"))).scalar_one()


async def test_a_cancelled_statement_finishes_and_releases_the_write_lock(db):
    await _cancel_mid_statement(db)


def test_a_cancelled_statement_releases_the_write_lock_under_uvloop(tmp_path):
    """The deployer serves under uvloop."""
    import uvloop

    async def scenario():
        database = await _database(tmp_path)
        try:
            await _cancel_mid_statement(database)
        finally:
            await database.dispose()

    uvloop.run(scenario())


async def _cancel_mid_statement(db: Database) -> None:
    started = asyncio.Event()

    async def slow_writer():
        async with db.transaction() as s:  # BEGIN IMMEDIATE: holds the write lock
            await s.execute(text("UPDATE t SET v = v + 100 WHERE id = 1"))
            started.set()
            await s.execute(SLOW_SELECT)

    task = asyncio.create_task(slow_writer())
    await started.wait()
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task  # the cancellation is delivered, not swallowed
    async with asyncio.timeout(10):  # the busy timeout is 30 s: a held lock fails here
        await _increment(db)
    # The statement ran to completion, and so did its transaction: no await outside the driver came before COMMIT.
    assert await _value(db) == 101


async def test_cancellation_at_an_await_outside_the_driver_rolls_back(db):
    inside = asyncio.Event()

    async def writer():
        async with db.transaction() as s:
            await s.execute(text("UPDATE t SET v = v + 100 WHERE id = 1"))
            inside.set()
            await asyncio.Event().wait()  # e.g. a call to another service inside the transaction

    task = asyncio.create_task(writer())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(10):
        await _increment(db)
    assert await _value(db) == 1


async def test_a_timeout_around_a_statement_still_raises_timeout_error(db):
    """The driver re-arms the cancellation with uncancel() first, so asyncio.timeout tells its own expiry apart."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1), db.read() as s:
            await s.execute(SLOW_SELECT)
    async with asyncio.timeout(10):
        await _increment(db)
    assert await _value(db) == 1
