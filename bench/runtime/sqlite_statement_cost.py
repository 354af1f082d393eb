"""Cost of the cancellation-safe SQLite driver calls (neuroweaver_runtime.db) against SQLAlchemy's stock aiosqlite
connection, same database and queries, interleaved rounds in one process.

    .venv/bin/python bench/runtime/sqlite_statement_cost.py [--rounds 5] [--reads 3000] [--writes 1000]

A read is `db.read()` + one primary-key SELECT (BEGIN, SELECT, ROLLBACK); a write is `db.transaction()` + one
UPDATE (BEGIN IMMEDIATE, UPDATE, COMMIT).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from neuroweaver_runtime import db as dbmod
from neuroweaver_runtime.db import Database


def stock(url: str) -> Database:
    """The same Database, but on SQLAlchemy's own aiosqlite connect (what db.py used before)."""
    database = Database(url)
    engine = create_async_engine(database.url, connect_args={"timeout": 30})
    dbmod._sqlite_setup(engine)
    database.engine = engine
    database.sessions = async_sessionmaker(engine, expire_on_commit=False)
    database.read_engine = engine.execution_options(**{dbmod._READ_ONLY: True})
    database.read_sessions = async_sessionmaker(database.read_engine, expire_on_commit=False)
    return database


async def run_round(database: Database, reads: int, writes: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    for i in range(reads):
        async with database.read() as s:
            (await s.execute(text("SELECT v FROM t WHERE id = :id"), {"id": i % 100 + 1})).scalar_one()
    t1 = time.perf_counter()
    for i in range(writes):
        async with database.transaction() as s:
            await s.execute(text("UPDATE t SET v = v + 1 WHERE id = :id"), {"id": i % 100 + 1})
    t2 = time.perf_counter()
    return (t1 - t0) / reads * 1e6, (t2 - t1) / writes * 1e6


async def main(args) -> None:
    path = Path(tempfile.mkdtemp()) / "bench.db"
    url = f"sqlite:///{path}"
    ours = Database(url)
    async with ours.transaction() as s:
        await s.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)"))
        for i in range(1, 101):
            await s.execute(text("INSERT INTO t VALUES (:i, 0)"), {"i": i})
    peer = stock(url)
    results: dict[str, list[tuple[float, float]]] = {"cancellation-safe (ours)": [], "stock aiosqlite": []}
    await run_round(ours, 200, 50)  # warm-up: connections, statement caches
    await run_round(peer, 200, 50)
    for _ in range(args.rounds):
        results["cancellation-safe (ours)"].append(await run_round(ours, args.reads, args.writes))
        results["stock aiosqlite"].append(await run_round(peer, args.reads, args.writes))
    print(
        f"{args.rounds} interleaved rounds of {args.reads} reads and {args.writes} writes, µs per transaction (median [min–max])"
    )
    for name, rows in results.items():
        r = [x[0] for x in rows]
        w = [x[1] for x in rows]
        print(
            f"  {name:26s} read {statistics.median(r):7.1f} [{min(r):.1f}–{max(r):.1f}]"
            f"   write {statistics.median(w):7.1f} [{min(w):.1f}–{max(w):.1f}]"
        )
    await ours.dispose()
    await peer.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--writes", type=int, default=1000)
    asyncio.run(main(parser.parse_args()))
