"""Migration 0002 (model_versions.artifacts) on SQLite and PostgreSQL: existing versions get an empty list, the head
schema equals the tables the code uses, and the downgrade drops the column and keeps the rows."""

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


async def test_0002_adds_artifacts_to_existing_versions_and_drops_them_again(empty_db):
    await asyncio.to_thread(migrations.upgrade, empty_db, MIGRATIONS, "0001")
    now = datetime(2026, 12, 1, tzinfo=UTC)
    engine = create_async_engine(normalize_url(empty_db))
    try:
        async with engine.begin() as conn:  # a version as 0001 stored it
            await conn.execute(
                sa.text(
                    "INSERT INTO models (id, name, project, display_name, description, specialization, base_model, labels,"
                    " state, latest_version, version_count, creator, create_time, update_time, revision) VALUES"
                    " (1, 'projects/default/models/m', 'default', '', '', '', 'b', '{}', 'ACTIVE', '1.0.0', 1, 'u', :t, :t, 1)"
                ),
                {"t": now},
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO model_versions (id, model_id, version, sort_key, state, artifact_uri, artifact_sha256,"
                    " artifact_size, artifact_format, lineage, training_job, base_model, labels, notes, creator, create_time,"
                    " update_time, revision) VALUES (1, 1, '1.0.0', 'k', 'REGISTERED', 'file:///a', :sha, 3, 'LORA_ADAPTER',"
                    " '{}', '', 'b', '{}', '', 'u', :t, :t, 1)"
                ),
                {"t": now, "sha": "a" * 64},
            )
        await asyncio.to_thread(migrations.upgrade, empty_db, MIGRATIONS)
        async with engine.connect() as conn:
            row = (await conn.execute(sa.select(t.versions.c.artifacts, t.versions.c.version))).one()
            assert (row.artifacts, row.version) == ([], "1.0.0")
            diff = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), t.metadata)
            )
        assert diff == []
        await asyncio.to_thread(migrations.downgrade, empty_db, MIGRATIONS, "0001")
        async with engine.connect() as conn:
            columns = await conn.run_sync(lambda c: {col["name"] for col in sa.inspect(c).get_columns("model_versions")})
            assert "artifacts" not in columns
            assert (await conn.execute(sa.text("SELECT version FROM model_versions"))).scalar_one() == "1.0.0"
    finally:
        await engine.dispose()
