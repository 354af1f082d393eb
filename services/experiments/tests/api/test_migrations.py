"""Schema migrations on SQLite and PostgreSQL: head matches the tables the code uses; 0002 (idempotency keys
moved from `event_keys` into a unique index on `metric_events`) keeps every stored key a duplicate, both ways;
0003 turns variant_stats' (n, Σx, Σx²) into (n, mean, M2) and back; 0005 keys exposure_counts by bucket class too;
0006 adds the CUPED covariate columns, NULL on existing rows, and drops them again; 0007 adds judged answers."""

from __future__ import annotations

import asyncio
import tempfile
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

from neuroweaver_experiments.adapters import tables as t
from neuroweaver_experiments.app import MIGRATIONS
from neuroweaver_runtime import migrations
from neuroweaver_runtime.db import normalize_url
from neuroweaver_runtime.testing import create_postgres_database


@pytest.fixture(params=["sqlite", "postgres"])
async def empty_db(request):
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='nw-exp-mig-')}/experiments.db"
        return
    url, drop = await create_postgres_database("nwexpmig")
    try:
        yield url
    finally:
        await drop()


def _event(key: str | None, unit: str = "u-1") -> dict:
    return dict(
        experiment_id=7,
        unit_id=unit,
        metric="score",
        value=1.0,
        event_time=datetime(2026, 11, 1, tzinfo=UTC),
        idempotency_key=key,
    )


async def test_head_matches_the_tables(empty_db):
    await asyncio.to_thread(migrations.upgrade, empty_db, MIGRATIONS)
    engine = create_async_engine(normalize_url(empty_db))
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), t.metadata)
            )
    finally:
        await engine.dispose()
    assert diff == []


async def test_event_keys_move_into_metric_events_and_back(empty_db):
    await asyncio.to_thread(migrations.upgrade, empty_db, MIGRATIONS, "0001")
    engine = create_async_engine(normalize_url(empty_db))
    try:
        async with engine.begin() as conn:  # what 0001's ingest wrote: a key row and its event row, per keyed event
            await conn.execute(sa.text("INSERT INTO event_keys (experiment_id, key) VALUES (7, 'k1'), (7, 'k2')"))
            await conn.execute(t.metric_events.insert(), [_event("k1"), _event("k2"), _event(None)])

        await asyncio.to_thread(migrations.upgrade, empty_db, MIGRATIONS)
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
            assert "event_keys" not in tables
            assert (await conn.execute(sa.text("SELECT count(*) FROM metric_events"))).scalar() == 3
        async with engine.begin() as conn:  # keyless events never conflict; a new key is taken
            await conn.execute(t.metric_events.insert(), [_event(None), _event("k3")])
        with pytest.raises(IntegrityError):  # a stored key is still a duplicate
            async with engine.begin() as conn:
                await conn.execute(t.metric_events.insert(), [_event("k1", unit="u-2")])

        await asyncio.to_thread(migrations.downgrade, empty_db, MIGRATIONS, "0001")
        async with engine.connect() as conn:
            keys = (await conn.execute(sa.text("SELECT key FROM event_keys ORDER BY key"))).scalars().all()
        assert keys == ["k1", "k2", "k3"]
    finally:
        await engine.dispose()


async def test_variant_stats_convert_to_centred_moments_and_back(empty_db):
    await asyncio.to_thread(migrations.upgrade, empty_db, MIGRATIONS, "0002")
    engine = create_async_engine(normalize_url(empty_db))
    xs = [3.0, 5.0, 10.0]
    try:
        async with engine.begin() as conn:  # (n, Σx, Σx²) as 0002's ingest kept them
            await conn.execute(sa.text(
                "INSERT INTO experiments (id, name, project, display_name, description, variants, weights_history, hash_seed, "
                "coverage, primary_metric, guardrail_metrics, secondary_metrics, min_sample_size, significance_level, analysis, "
                "auto_conclude, promote_alias, labels, state, winner, conclusion, create_time, update_time, revision) VALUES "
                "(7, 'projects/p/experiments/e', 'p', '', '', '[]', '[]', 's', 1, '{}', '[]', '[]', 1, 0.05, 'sequential', "
                "false, '', '{}', 'RUNNING', '', '', :t, :t, 1)"), {"t": datetime(2026, 11, 1, tzinfo=UTC)})  # fmt: skip
            await conn.execute(
                sa.text(
                    "INSERT INTO variant_stats (experiment_id, metric, variant, n, sum, sum_sq) VALUES (7, 'm', :v, :n, :s, :q)"
                ),
                [
                    dict(v="a", n=3, s=sum(xs), q=sum(x * x for x in xs)),
                    dict(v="b", n=1, s=2.0, q=4.0),
                    dict(v="c", n=0, s=0.0, q=0.0),
                ],
            )
        await asyncio.to_thread(migrations.upgrade, empty_db, MIGRATIONS, "0003")
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.text("SELECT variant, n, mean, m2 FROM variant_stats ORDER BY variant"))).all()
        assert [tuple(r) for r in rows] == [("a", 3, 6.0, pytest.approx(26.0)), ("b", 1, 2.0, 0.0), ("c", 0, 0.0, 0.0)]
        await asyncio.to_thread(migrations.downgrade, empty_db, MIGRATIONS, "0002")
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.text("SELECT variant, n, sum, sum_sq FROM variant_stats ORDER BY variant"))).all()
        assert [tuple(r) for r in rows] == [("a", 3, 18.0, pytest.approx(134.0)), ("b", 1, 2.0, 4.0), ("c", 0, 0.0, 0.0)]
    finally:
        await engine.dispose()


async def test_exposure_counts_gain_bucket_classes_and_back(empty_db):
    await asyncio.to_thread(migrations.upgrade, empty_db, MIGRATIONS, "0004")
    engine = create_async_engine(normalize_url(empty_db))
    select = "SELECT epoch, bucket_class, variant, units FROM exposure_counts ORDER BY epoch, bucket_class, variant"
    try:
        async with engine.begin() as conn:  # per (epoch, variant) as 0004's assignment writer counted them
            await conn.execute(sa.text(
                "INSERT INTO experiments (id, name, project, display_name, description, variants, weights_history, hash_seed, "
                "coverage, primary_metric, guardrail_metrics, secondary_metrics, min_sample_size, significance_level, analysis, "
                "auto_conclude, promote_alias, labels, state, winner, conclusion, create_time, update_time, revision) VALUES "
                "(7, 'projects/p/experiments/e', 'p', '', '', '[]', '[]', 's', 0.5, '{}', '[]', '[]', 1, 0.05, 'sequential', "
                "false, '', '{}', 'RUNNING', '', '', :t, :t, 1)"), {"t": datetime(2026, 11, 1, tzinfo=UTC)})  # fmt: skip
            await conn.execute(
                sa.text("INSERT INTO exposure_counts (experiment_id, epoch, variant, units) VALUES (7, :e, :v, :n)"),
                [dict(e=0, v="a", n=961), dict(e=0, v="b", n=974), dict(e=1, v="b", n=1077)],
            )
        await asyncio.to_thread(migrations.upgrade, empty_db, MIGRATIONS)
        async with engine.begin() as conn:  # old rows: class not recorded (-1); new rows count per class
            assert [tuple(r) for r in (await conn.execute(sa.text(select))).all()] == [
                (0, -1, "a", 961),
                (0, -1, "b", 974),
                (1, -1, "b", 1077),
            ]
            await conn.execute(
                sa.text(
                    "INSERT INTO exposure_counts (experiment_id, epoch, bucket_class, variant, units) VALUES (7, 1, :k, :v, :n)"
                ),
                [dict(k=0, v="a", n=5), dict(k=0, v="b", n=6), dict(k=2500, v="b", n=7)],
            )
        with pytest.raises(IntegrityError):  # the key is (experiment, epoch, class, variant)
            async with engine.begin() as conn:
                await conn.execute(
                    sa.text(
                        "INSERT INTO exposure_counts (experiment_id, epoch, bucket_class, variant, units) VALUES (7, 1, 0, 'a', 1)"
                    )
                )
        await asyncio.to_thread(migrations.downgrade, empty_db, MIGRATIONS, "0004")
        async with engine.connect() as conn:  # the classes of an (epoch, variant) summed into one row
            rows = (
                await conn.execute(sa.text("SELECT epoch, variant, units FROM exposure_counts ORDER BY epoch, variant"))
            ).all()
        assert [tuple(r) for r in rows] == [(0, "a", 961), (0, "b", 974), (1, "a", 5), (1, "b", 1090)]
        await asyncio.to_thread(migrations.upgrade, empty_db, MIGRATIONS)
    finally:
        await engine.dispose()


async def test_covariate_columns_arrive_null_and_go(empty_db):
    await asyncio.to_thread(migrations.upgrade, empty_db, MIGRATIONS, "0005")
    engine = create_async_engine(normalize_url(empty_db))
    try:
        async with engine.begin() as conn:  # statistics and a unit as 0005's ingest wrote them
            await conn.execute(sa.text(
                "INSERT INTO experiments (id, name, project, display_name, description, variants, weights_history, hash_seed, "
                "coverage, primary_metric, guardrail_metrics, secondary_metrics, min_sample_size, significance_level, analysis, "
                "auto_conclude, promote_alias, labels, state, winner, conclusion, create_time, update_time, revision) VALUES "
                "(7, 'projects/p/experiments/e', 'p', '', '', '[]', '[]', 's', 1, '{}', '[]', '[]', 1, 0.05, 'sequential', "
                "false, '', '{}', 'RUNNING', '', '', :t, :t, 1)"), {"t": datetime(2026, 11, 1, tzinfo=UTC)})  # fmt: skip
            await conn.execute(
                sa.text(
                    "INSERT INTO variant_stats (experiment_id, metric, variant, n, mean, m2) VALUES (7, 'm', 'a', 2, 1.5, 0.5)"
                )
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO unit_metrics (experiment_id, metric, unit_id, variant, count, total, positives) "
                    "VALUES (7, 'm', 'u', 'a', 2, 3.0, 2)"
                )
            )
        await asyncio.to_thread(migrations.upgrade, empty_db, MIGRATIONS)
        async with engine.connect() as conn:  # not tracked: the rows' covariates are unknown
            stats = (
                await conn.execute(
                    sa.text("SELECT n, mean, m2, covariate_units, covariate_mean, covariate_m2, comoment FROM variant_stats")
                )
            ).one()
            unit = (await conn.execute(sa.text("SELECT count, total, covariate, covariate_since FROM unit_metrics"))).one()
        assert tuple(stats) == (2, 1.5, 0.5, None, None, None, None)
        assert tuple(unit) == (2, 3.0, None, None)
        await asyncio.to_thread(migrations.downgrade, empty_db, MIGRATIONS, "0005")
        async with engine.connect() as conn:
            for table in ("variant_stats", "unit_metrics", "metric_events"):
                columns = (await conn.execute(sa.text(f"SELECT * FROM {table}"))).keys()
                assert not {c for c in columns if c.startswith("covariate") or c == "comoment"}, table
            assert tuple((await conn.execute(sa.text("SELECT n, mean, m2 FROM variant_stats"))).one()) == (2, 1.5, 0.5)
    finally:
        await engine.dispose()


async def test_judged_answers_arrive_and_go(empty_db):
    """0007: experiments.answer_judging and metric_events.judge_version arrive NULL on existing rows, judged_answers is
    created with its unique (experiment, key); downgrade drops them and keeps the rows."""
    await asyncio.to_thread(migrations.upgrade, empty_db, MIGRATIONS, "0006")
    engine = create_async_engine(normalize_url(empty_db))
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO metric_events (experiment_id, unit_id, metric, value, event_time, idempotency_key) "
                    "VALUES (7, 'u', 'score', 1.0, :t, 'k1')"
                ),
                {"t": datetime(2026, 11, 1, tzinfo=UTC)},
            )
        await asyncio.to_thread(migrations.upgrade, empty_db, MIGRATIONS)
        now = datetime(2026, 12, 7, tzinfo=UTC)
        row = dict(
            experiment_id=7, idempotency_key="a1", unit_id="u", variant="control", prompt="p", answer="a", reference="",
            judge_version="projects/p/judges/j/versions/1", metric="score", state="PENDING", score=None, error="",
            attempts=0, lease_owner="", lease_expires_at=0.0, answer_time=now, update_time=now,
        )  # fmt: skip
        async with engine.begin() as conn:
            assert (await conn.execute(sa.text("SELECT judge_version FROM metric_events"))).scalar() is None
            await conn.execute(t.judged_answers.insert(), [row])
        with pytest.raises(IntegrityError):  # one answer per (experiment, key)
            async with engine.begin() as conn:
                await conn.execute(t.judged_answers.insert(), [row])
        await asyncio.to_thread(migrations.downgrade, empty_db, MIGRATIONS, "0006")
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
            assert "judged_answers" not in tables
            assert "judge_version" not in (await conn.execute(sa.text("SELECT * FROM metric_events"))).keys()
            assert "answer_judging" not in (await conn.execute(sa.text("SELECT * FROM experiments"))).keys()
            assert (await conn.execute(sa.text("SELECT count(*) FROM metric_events"))).scalar() == 1
        await asyncio.to_thread(migrations.upgrade, empty_db, MIGRATIONS)
    finally:
        await engine.dispose()
