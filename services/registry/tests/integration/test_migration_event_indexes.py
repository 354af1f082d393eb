"""Migration 0003 (model_events filter indexes) on SQLite and PostgreSQL: the head schema equals the tables the code
uses, a filtered newest-first page is an index search on SQLite, and the downgrade drops the indexes and keeps the
events."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from neuroweaver_registry.adapters import tables as t
from neuroweaver_registry.app import MIGRATIONS
from neuroweaver_runtime import migrations
from neuroweaver_runtime.db import normalize_url
from neuroweaver_runtime.testing import create_postgres_database

NEW = {"ix_events_project_type_seq", "ix_events_project_actor_seq", "ix_events_project_resource_seq"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def empty_db(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
        return
    url, drop = await create_postgres_database("nwregmig")
    try:
        yield url
    finally:
        await drop()


async def _indexes(engine) -> set[str]:
    async with engine.connect() as conn:
        return await conn.run_sync(lambda c: {i["name"] for i in sa.inspect(c).get_indexes("model_events")})


async def test_0003_indexes_the_event_filters_and_drops_them_again(empty_db):
    await asyncio.to_thread(migrations.upgrade, empty_db, MIGRATIONS, "0002")
    engine = create_async_engine(normalize_url(empty_db))
    try:
        async with engine.begin() as conn:  # an event as 0002 stored it
            await conn.execute(
                t.events.insert().values(
                    project="default", type="ALIAS_SET", resource="projects/default/models/m/aliases/prod",
                    model="projects/default/models/m", actor="alice", details={}, create_time=datetime(2026, 12, 1, tzinfo=UTC),
                )
            )  # fmt: skip
        assert not NEW & await _indexes(engine)
        await asyncio.to_thread(migrations.upgrade, empty_db, MIGRATIONS)
        assert NEW <= await _indexes(engine)
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), t.metadata)
            )
            assert diff == []
            if engine.dialect.name == "sqlite":
                plan = await conn.execute(
                    sa.text(
                        "EXPLAIN QUERY PLAN SELECT * FROM model_events WHERE project = 'default' AND actor = 'alice'"
                        " AND sequence > 0 ORDER BY sequence DESC LIMIT 50"
                    )
                )
                details = " ".join(str(row[-1]) for row in plan)
                assert "USING INDEX ix_events_project_actor_seq" in details and "TEMP B-TREE" not in details, details
        await asyncio.to_thread(migrations.downgrade, empty_db, MIGRATIONS, "0002")
        assert not NEW & await _indexes(engine)
        async with engine.connect() as conn:
            assert (await conn.execute(sa.select(t.events.c.actor))).scalar_one() == "alice"
    finally:
        await engine.dispose()
