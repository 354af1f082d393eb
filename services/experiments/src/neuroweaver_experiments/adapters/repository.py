"""Experiments persistence: rows ⇄ domain dataclasses, per resource (the ports of service/ports.py). Every method
runs inside the unit of work's transaction (adapters/unit_of_work.py).

The hot paths (assignment batches, metric ingestion) are set-based: one statement per table per batch.
On PostgreSQL they go straight to asyncpg with `unnest` arrays (no per-row SQL compilation);
on SQLite they use SQLAlchemy Core `INSERT ... ON CONFLICT` with multi-row VALUES.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy import text as sql_text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from neuroweaver_runtime.filtering import Comparison
from neuroweaver_runtime.timestamps import aware

from ..domain.cuped import PairDelta, PairedStats
from ..domain.experiment import Experiment, ExperimentState, Variant
from ..domain.judging import AnswerJudging
from ..domain.statistics import (
    AnalysisMethod,
    Decision,
    DecisionOutcome,
    Direction,
    Interval,
    MetricKind,
    MetricSpec,
    SequentialState,
    SufficientStats,
)
from . import tables as t

_SQLITE_CHUNK = 2000  # rows per multi-row statement (SQLite allows 32,766 bound variables)
# First key of the (space, experiment id) advisory locks of auto-conclude looks (`claim_look`): "nwac".
LOOK_LOCKS = 0x6E776163


def _mul(a: str, b: str) -> str:
    """a * b in SQL, 0 where a factor is below 1e-150: PostgreSQL raises "underflow" where IEEE arithmetic (and
    the SQLite path) gives ~0 or a subnormal; the difference from the Python path stays below ~1e-138."""
    return f"(CASE WHEN abs({a}) < 1e-150 OR abs({b}) < 1e-150 THEN 0 ELSE ({a}) * ({b}) END)"


def _div(a: str, b: str) -> str:
    """a / b for a divisor of at least 1 (a count), 0 where |a| < 1e-280 (the same underflow)."""
    return f"(CASE WHEN abs({a}) < 1e-280 THEN 0 ELSE ({a}) / ({b}) END)"


# One ingest batch on PostgreSQL (see `SqlMetricRepository.ingest`). Data-modifying CTEs all run, once;
# each sees the others' rows only through RETURNING, which is all this needs. x is the unit's CUPED covariate
# (0 without one), y its value; the co-moment arithmetic is domain.cuped's (fold_pair_changes, PairDelta.apply).
_INGEST_SQL = """
WITH ev AS (
    SELECT unit_id, metric, value, coalesce(event_time, $10) AS event_time, NULLIF(key, '') AS key, covariate, ord
    FROM unnest($2::text::text[], $3::text::text[], $4::text::float8[], $5::text::timestamptz[], $6::text::text[],
                $11::text::float8[])
        WITH ORDINALITY AS e(unit_id, metric, value, event_time, key, covariate, ord)
), taken AS (
    INSERT INTO metric_events (experiment_id, unit_id, metric, value, event_time, idempotency_key, covariate)
    SELECT $1, unit_id, metric, value, event_time, key, covariate FROM ev ORDER BY key, ord
    ON CONFLICT (experiment_id, idempotency_key) DO NOTHING
    RETURNING id, unit_id, metric, value, covariate
), variants AS (
    SELECT * FROM unnest($7::text::text[], $8::text::text[]) AS v(unit_id, variant)
), added AS (
    SELECT metric, unit_id, count(*) AS c, sum(value ORDER BY id) AS s, count(*) FILTER (WHERE value > 0) AS p,
        (array_agg(covariate ORDER BY id) FILTER (WHERE covariate IS NOT NULL))[1] AS cov
    FROM taken GROUP BY metric, unit_id
), units AS (
    -- the first covariate stays; covariate_since = the count after the batch that set it
    INSERT INTO unit_metrics AS um (experiment_id, metric, unit_id, variant, count, total, positives, covariate,
        covariate_since)
    SELECT $1, a.metric, a.unit_id, v.variant, a.c, a.s, a.p, a.cov, CASE WHEN a.cov IS NOT NULL THEN a.c END
    FROM added a JOIN variants v USING (unit_id)
    ORDER BY a.metric, a.unit_id
    ON CONFLICT (experiment_id, metric, unit_id) DO UPDATE SET count = um.count + excluded.count,
        total = um.total + excluded.total, positives = um.positives + excluded.positives,
        covariate = coalesce(um.covariate, excluded.covariate),
        covariate_since = CASE WHEN um.covariate IS NULL AND excluded.covariate IS NOT NULL
            THEN um.count + excluded.count ELSE um.covariate_since END
    RETURNING um.metric, um.unit_id, um.variant, um.count, um.total, um.positives, um.covariate, um.covariate_since
), vals AS (
    SELECT u.metric, u.variant, u.count - a.c <= 0 AS is_new,
        CASE WHEN u.metric = ANY($9::text[]) THEN (u.positives > 0)::int::float8
             WHEN abs(u.total) < 1e-300 THEN 0 ELSE u.total / u.count END AS y_new,
        CASE WHEN u.count - a.c <= 0 THEN NULL
             WHEN u.metric = ANY($9::text[]) THEN (u.positives - a.p > 0)::int::float8
             WHEN abs(u.total - a.s) < 1e-300 THEN 0
             ELSE (u.total - a.s) / (u.count - a.c) END AS y_old,
        coalesce(u.covariate, 0) AS x_new,
        CASE WHEN u.covariate_since = u.count THEN 0 ELSE coalesce(u.covariate, 0) END AS x_old,
        -- units with a covariate: +1 for a new unit with one, or an existing unit whose first one came now
        (u.covariate_since IS NOT NULL AND u.covariate_since = u.count)::int AS dc
    FROM units u JOIN added a USING (metric, unit_id)
), shifts AS (
    SELECT metric, variant, percentile_cont(0.5) WITHIN GROUP (ORDER BY x_new) AS kx,
        percentile_cont(0.5) WITHIN GROUP (ORDER BY y_new) AS ky
    FROM vals GROUP BY metric, variant
), terms AS (
    -- domain.cuped.fold_pair_changes: new units add (x - kx), (y - ky) and their squares and product, changed
    -- units the differences of those between the new and the old (x, y)
    SELECT metric, variant, kx, ky, is_new::int AS dn, dc,
        CASE WHEN is_new THEN x_new - kx ELSE x_new - x_old END AS dsx,
        CASE WHEN is_new THEN y_new - ky ELSE y_new - y_old END AS dsy,
        CASE WHEN is_new THEN {mul_new_x} ELSE {mul_changed_x} END AS dqx,
        CASE WHEN is_new THEN {mul_new_y} ELSE {mul_changed_y} END AS dqy,
        CASE WHEN is_new THEN {mul_new_xy} ELSE {mul_new_xy} - {mul_old_xy} END AS dqxy
    FROM vals JOIN shifts USING (metric, variant)
    WHERE is_new OR y_old <> y_new OR x_old <> x_new OR dc <> 0
), batch AS (
    SELECT metric, variant, kx, ky, sum(dn) AS dn, sum(dc) AS dc, sum(dsx) AS sx, sum(dsy) AS ds, sum(dqx) AS sxx,
        sum(dqy) AS dq, sum(dqxy) AS sxy
    FROM terms GROUP BY metric, variant, kx, ky
), stats AS (
    -- a new row is the batch's own moments; an existing one merges it around its means, as
    -- domain.cuped.PairDelta.apply (a = mean_x - kx, b = mean - ky): the row is locked here, so vs is its latest
    -- version. NULL co-moments (rows from before covariates were tracked) stay NULL.
    INSERT INTO variant_stats AS vs (experiment_id, metric, variant, n, mean, m2, covariate_units, covariate_mean,
        covariate_m2, comoment)
    SELECT $1, metric, variant, dn, CASE WHEN dn > 0 THEN ky + {new_mean} ELSE 0 END,
        CASE WHEN dn > 0 THEN dq - {new_m2} ELSE 0 END, dc,
        CASE WHEN dn > 0 THEN kx + {new_mean_x} ELSE 0 END,
        CASE WHEN dn > 0 THEN sxx - {new_m2_x} ELSE 0 END,
        CASE WHEN dn > 0 THEN sxy - {new_c} ELSE 0 END
    FROM batch ORDER BY metric, variant
    ON CONFLICT (experiment_id, metric, variant) DO UPDATE SET
        (n, mean, m2, covariate_units, covariate_mean, covariate_m2, comoment) = (
        SELECT vs.n + b.dn, vs.mean + {merged_mean}, vs.m2 + b.dq - {merged_m2}, vs.covariate_units + b.dc,
            vs.covariate_mean + {merged_mean_x}, vs.covariate_m2 + b.sxx - {merged_m2_x},
            vs.comoment + b.sxy - {merged_c}
        FROM batch b WHERE b.metric = vs.metric AND b.variant = vs.variant)
)
SELECT count(*) FROM taken
""".format(
    mul_new_x=_mul("x_new - kx", "x_new - kx"),
    mul_changed_x=_mul("x_new - x_old", "(x_new - kx) + (x_old - kx)"),
    mul_new_y=_mul("y_new - ky", "y_new - ky"),
    mul_changed_y=_mul("y_new - y_old", "(y_new - ky) + (y_old - ky)"),
    mul_new_xy=_mul("x_new - kx", "y_new - ky"),
    mul_old_xy=_mul("x_old - kx", "y_old - ky"),
    new_mean=_div("ds", "dn"),
    new_m2=_div(_mul("ds", "ds"), "dn"),
    new_mean_x=_div("sx", "dn"),
    new_m2_x=_div(_mul("sx", "sx"), "dn"),
    new_c=_div(_mul("sx", "ds"), "dn"),
    merged_mean=_div("b.ds - " + _mul("b.dn", "vs.mean - b.ky"), "vs.n + b.dn"),
    merged_m2=_div(
        f"{_mul('b.ds', 'b.ds')} + 2 * {_mul('vs.n * (vs.mean - b.ky)', 'b.ds')}"
        f" - vs.n * b.dn * {_mul('vs.mean - b.ky', 'vs.mean - b.ky')}",
        "vs.n + b.dn",
    ),
    merged_mean_x=_div("b.sx - " + _mul("b.dn", "vs.covariate_mean - b.kx"), "vs.n + b.dn"),
    merged_m2_x=_div(
        f"{_mul('b.sx', 'b.sx')} + 2 * {_mul('vs.n * (vs.covariate_mean - b.kx)', 'b.sx')}"
        f" - vs.n * b.dn * {_mul('vs.covariate_mean - b.kx', 'vs.covariate_mean - b.kx')}",
        "vs.n + b.dn",
    ),
    merged_c=_div(
        f"{_mul('b.sx', 'b.ds')} + {_mul('vs.n * (vs.covariate_mean - b.kx)', 'b.ds')}"
        f" + {_mul('vs.n * (vs.mean - b.ky)', 'b.sx')}"
        f" - vs.n * b.dn * {_mul('vs.covariate_mean - b.kx', 'vs.mean - b.ky')}",
        "vs.n + b.dn",
    ),
)


def _text_array(items: Sequence[str]) -> str:
    """A PostgreSQL text[] literal (sent as one text parameter, cast in SQL): asyncpg's array encoder checks
    every element against collections.abc types, ~6 ms per 5,000 strings; this is ~0.1 ms. Every element is
    double-quoted, so only backslash and double quote need escaping (commas, braces, NULL stay literal)."""
    plain = "".join(items)
    if "\\" in plain or '"' in plain:
        items = [i.replace("\\", "\\\\").replace('"', '\\"') for i in items]
    return '{"' + '","'.join(items) + '"}' if items else "{}"


def _int_array(values: Sequence[int]) -> str:
    """An int[] literal (one text parameter)."""
    return "{" + ",".join(map(str, values)) + "}"


def _float_array(values: Sequence[float]) -> str:
    """A float8[] literal (one text parameter): repr round-trips every finite double exactly, and skips asyncpg's
    per-element type checks (~4 ms per 5,000 values)."""
    return "{" + ",".join(map(repr, values)) + "}"


def _optional_float_array(values: Sequence[float | None]) -> str:
    """A float8[] literal with NULL for None."""
    return "{" + ",".join("NULL" if v is None else repr(v) for v in values) + "}"


def _time_array(times: Sequence[datetime | None]) -> str:
    """A timestamptz[] literal (one text parameter), NULL where the event has no time of its own."""
    return "{" + ",".join("NULL" if t is None else f'"{t.isoformat()}"' for t in times) + "}"


def metric_to_json(m: MetricSpec) -> dict:
    return {"name": m.name, "kind": m.kind.value, "direction": m.direction.value, "tolerance": m.tolerance}


def metric_from_json(d: dict) -> MetricSpec:
    return MetricSpec(d["name"], MetricKind(d["kind"]), Direction(d["direction"]), float(d.get("tolerance", 0.0)))


def _chunks(rows: Sequence, size: int = _SQLITE_CHUNK) -> Iterable[Sequence]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def _finite(x: float, default: float) -> float:
    return default if math.isnan(x) else x


def _paired(row) -> PairedStats:
    """A variant_stats row as co-moments (x parts 0 where NULL: callers check `comoment` for tracking)."""
    return PairedStats(
        int(row.n),
        float(row.covariate_mean or 0.0),
        float(row.mean),
        float(row.covariate_m2 or 0.0),
        float(row.m2),
        float(row.comoment or 0.0),
        int(row.covariate_units or 0),
    )


class _Repository:
    def __init__(self, session: AsyncSession, is_postgres: bool) -> None:
        self.s = session
        self.pg = is_postgres

    async def _raw(self):
        """The asyncpg connection of this session's transaction (PostgreSQL only)."""
        conn = await self.s.connection()
        raw = await conn.get_raw_connection()
        return raw.driver_connection


class SqlExperimentRepository(_Repository):
    async def get(self, name: str, *, lock: bool = False) -> Experiment | None:
        query = select(t.experiments).where(t.experiments.c.name == name)
        if lock:
            query = query.with_for_update()
        row = (await self.s.execute(query)).first()
        return to_experiment(row) if row is not None else None

    async def current(self, known: Experiment, *, share: bool = False) -> Experiment | None:
        query = select(t.experiments).where(t.experiments.c.id == known.key)
        if share:
            query = query.with_for_update(read=True)  # FOR SHARE (SQLite: its transactions hold the database lock)
        row = (await self.s.execute(query)).first()
        if row is None:
            return None
        return known if row.revision == known.revision else to_experiment(row)

    async def revision(self, key: int) -> int | None:
        query = select(t.experiments.c.revision).where(t.experiments.c.id == key)
        return (await self.s.execute(query)).scalar()

    async def project_version(self, project: str) -> int:
        query = select(func.coalesce(func.sum(t.experiments.c.revision), 0)).where(t.experiments.c.project == project)
        return int((await self.s.execute(query)).scalar() or 0)

    async def running(self, project: str) -> list[Experiment]:
        query = (
            select(t.experiments)
            .where(t.experiments.c.project == project, t.experiments.c.state == ExperimentState.RUNNING.value)
            .order_by(t.experiments.c.name)
        )
        return [to_experiment(row) for row in await self.s.execute(query)]

    async def auto_concluding(self) -> list[Experiment]:
        c = t.experiments.c
        query = (
            select(t.experiments)
            .where(
                c.state == ExperimentState.RUNNING.value,
                c.auto_conclude.is_(True),
                c.analysis == AnalysisMethod.SEQUENTIAL.value,
            )
            .order_by(c.name)
        )
        return [to_experiment(row) for row in await self.s.execute(query)]

    async def claim_look(self, key: int) -> bool:
        if not self.pg:
            return True
        claimed = await self.s.execute(
            sql_text("SELECT pg_try_advisory_xact_lock(:space, :key)"), {"space": LOOK_LOCKS, "key": key}
        )
        return bool(claimed.scalar())

    @staticmethod
    def _values(exp: Experiment) -> dict[str, Any]:
        return dict(
            display_name=exp.display_name,
            description=exp.description,
            variants=[v.__dict__ for v in exp.variants],
            weights_history=exp.weights_history,
            hash_seed=exp.hash_seed,
            coverage=exp.coverage,
            primary_metric=metric_to_json(exp.primary_metric) if exp.primary_metric else {},
            guardrail_metrics=[metric_to_json(m) for m in exp.guardrail_metrics],
            secondary_metrics=[metric_to_json(m) for m in exp.secondary_metrics],
            min_sample_size=exp.min_sample_size,
            significance_level=exp.significance_level,
            analysis=exp.analysis.value,
            auto_conclude=exp.auto_conclude,
            promote_alias=exp.promote_alias,
            labels=exp.labels,
            answer_judging=asdict(exp.answer_judging) if exp.answer_judging is not None else None,
            state=exp.state.value,
            winner=exp.winner,
            conclusion=exp.conclusion,
            update_time=exp.update_time,
            start_time=exp.start_time,
            end_time=exp.end_time,
        )

    async def add(self, experiment: Experiment, project: str) -> None:
        result = await self.s.execute(
            t.experiments.insert().values(
                name=experiment.name,
                project=project,
                create_time=experiment.create_time,
                revision=1,
                **self._values(experiment),
            )
        )
        experiment.key, experiment.revision = int(result.inserted_primary_key[0]), 1  # type: ignore[attr-defined]  # DML executes to a CursorResult; AsyncSession.execute is typed Result

    async def save(self, experiment: Experiment) -> None:
        await self.s.execute(
            update(t.experiments)
            .where(t.experiments.c.id == experiment.key)
            .values(revision=t.experiments.c.revision + 1, **self._values(experiment))
        )

    async def page(
        self, project: str, filters: list[Comparison], order_field: str, desc: bool, cursor: list | None, limit: int
    ) -> tuple[list[Experiment], list | None]:
        c = t.experiments.c
        query = select(t.experiments).where(c.project == project)
        for f in filters:
            if f.label_key is not None:
                col = c.labels[f.label_key].as_string()
                query = query.where(col == f.value if f.op == "=" else or_(col.is_(None), col != f.value))
            else:
                query = query.where(c.state == f.value if f.op == "=" else c.state != f.value)
        order_col = getattr(c, order_field)
        if cursor is not None:
            text, tie = cursor
            bound: str | datetime = text if order_field == "name" else datetime.fromisoformat(text)
            if desc:
                query = query.where(or_(order_col < bound, and_(order_col == bound, c.name < tie)))
            else:
                query = query.where(or_(order_col > bound, and_(order_col == bound, c.name > tie)))
        query = query.order_by(order_col.desc(), c.name.desc()) if desc else query.order_by(order_col, c.name)
        rows = list((await self.s.execute(query.limit(limit + 1))).all())
        after = None
        if len(rows) > limit:
            last = rows[limit - 1]
            value = getattr(last, order_field)
            after = [value.isoformat() if order_field != "name" else value, last.name]
        return [to_experiment(r) for r in rows[:limit]], after


_VARIANT_FIELDS = {f.name for f in fields(Variant)}


def _variant(stored: dict) -> Variant:
    """A stored variant; keys of older rows that are no field any more (`served_model_name`, a version-specific name
    copied at start, replaced by the derived `Variant.model`) are dropped."""
    return Variant(**{k: v for k, v in stored.items() if k in _VARIANT_FIELDS})


def to_experiment(row) -> Experiment:
    return Experiment(
        name=row.name,
        display_name=row.display_name,
        description=row.description,
        variants=[_variant(v) for v in row.variants],
        weights_history=[list(w) for w in row.weights_history],
        hash_seed=row.hash_seed,
        coverage=row.coverage,
        primary_metric=metric_from_json(row.primary_metric) if row.primary_metric else None,
        guardrail_metrics=[metric_from_json(m) for m in row.guardrail_metrics],
        secondary_metrics=[metric_from_json(m) for m in row.secondary_metrics],
        min_sample_size=row.min_sample_size,
        significance_level=row.significance_level,
        analysis=AnalysisMethod(row.analysis),
        auto_conclude=row.auto_conclude,
        promote_alias=row.promote_alias,
        labels=dict(row.labels or {}),
        answer_judging=AnswerJudging(**row.answer_judging) if row.answer_judging else None,
        state=ExperimentState(row.state),
        winner=row.winner,
        conclusion=row.conclusion,
        create_time=aware(row.create_time),
        update_time=aware(row.update_time),
        start_time=aware(row.start_time),
        end_time=aware(row.end_time),
        revision=row.revision,
        key=row.id,
    )


class SqlAssignmentRepository(_Repository):
    async def stored(self, key: int, units: Sequence[str]) -> dict[str, str]:
        if not units:
            return {}
        if self.pg:
            rows = await (await self._raw()).fetch(
                "SELECT unit_id, variant FROM assignments WHERE experiment_id = $1 AND unit_id = ANY($2::text::text[])",
                key,
                _text_array(units),
            )
            return {r[0]: r[1] for r in rows}
        out: dict[str, str] = {}
        a = t.assignments.c
        for chunk in _chunks(list(units), 10_000):
            rows = await self.s.execute(select(a.unit_id, a.variant).where(a.experiment_id == key, a.unit_id.in_(chunk)))
            out.update({r.unit_id: r.variant for r in rows})
        return out

    async def add(self, key: int, rows: Sequence[tuple[str, str, int, int, int]], now: datetime) -> set[str]:
        if not rows:
            return set()
        if not self.pg:
            inserted = await self._insert_sqlite(key, [(u, v, b) for u, v, b, _, _ in rows], now)
            await self._add_exposures_sqlite(key, Counter((e, k, v) for u, v, _, e, k in rows if u in inserted))
            return inserted
        # PostgreSQL: the insert and the exposure counts of the inserted units in one statement (one round trip);
        # epoch and class are not columns of assignments, so the counts join the inserted units back to the input
        # The columns go as array literals (one text parameter each, cast in SQL): asyncpg's array encoder checks
        # every element (~6 ms per 5,000 strings), more than the statement's own work per row.
        units, variants, buckets, epochs, classes = zip(*rows, strict=True)
        result = await (await self._raw()).fetch(
            "WITH x AS (SELECT * FROM unnest($2::text::text[], $3::text::text[], $4::text::int[], $6::text::int[], "
            "$7::text::int[]) AS r(u, v, b, e, k)), "
            "ins AS (INSERT INTO assignments (experiment_id, unit_id, variant, bucket, create_time) "
            "SELECT $1, u, v, b, $5 FROM x ON CONFLICT DO NOTHING RETURNING unit_id), "
            "exp AS (INSERT INTO exposure_counts AS ec (experiment_id, epoch, bucket_class, variant, units) "
            "SELECT $1, x.e, x.k, x.v, count(*) FROM ins JOIN x ON x.u = ins.unit_id GROUP BY x.e, x.k, x.v "
            "ORDER BY x.e, x.k, x.v "
            "ON CONFLICT (experiment_id, epoch, bucket_class, variant) DO UPDATE SET units = ec.units + excluded.units) "
            # one row back: the inserted units only when some were not (rows are unique per unit), not a row each
            "SELECT count(*), CASE WHEN count(*) < $8 THEN array_agg(unit_id) END FROM ins",
            key,
            _text_array(units),
            _text_array(variants),
            _int_array(buckets),
            now,
            _int_array(epochs),
            _int_array(classes),
            len(rows),
        )
        return set(units) if result[0][0] == len(rows) else set(result[0][1] or ())

    async def _insert_sqlite(self, key: int, rows: Sequence[tuple[str, str, int]], now: datetime) -> set[str]:
        """Multi-row INSERT ... ON CONFLICT DO NOTHING RETURNING as driver SQL: SQLAlchemy's compilation of a 2,000-row
        VALUES clause cost more than the insert itself (about 60% of a 5,000-exposure IngestEvents batch)."""
        inserted: set[str] = set()
        conn = await self.s.connection()
        bind = t.assignments.c.create_time.type.bind_processor(conn.dialect)
        when = bind(now) if bind is not None else now
        for chunk in _chunks(rows):
            sql = (
                "INSERT INTO assignments (experiment_id, unit_id, variant, bucket, create_time) VALUES "
                + ", ".join(["(?, ?, ?, ?, ?)"] * len(chunk))
                + " ON CONFLICT DO NOTHING RETURNING unit_id"
            )
            params = tuple(x for u, v, b in chunk for x in (key, u, v, b, when))
            inserted.update(r[0] for r in await conn.exec_driver_sql(sql, params))
        return inserted

    async def _add_exposures_sqlite(self, key: int, counts: Counter[tuple[int, int, str]]) -> None:
        """Adds first exposures per (epoch, bucket class, variant), in key order (concurrent writers lock rows alike)."""
        for epoch, klass, variant in sorted(counts):
            stmt = sqlite_insert(t.exposure_counts).values(
                experiment_id=key, epoch=epoch, bucket_class=klass, variant=variant, units=counts[(epoch, klass, variant)]
            )
            stmt = stmt.on_conflict_do_update(
                index_elements=["experiment_id", "epoch", "bucket_class", "variant"],
                set_={"units": t.exposure_counts.c.units + stmt.excluded.units},
            )
            await self.s.execute(stmt)

    async def exposures(self, key: int) -> dict[tuple[int, int], dict[str, int]]:
        c = t.exposure_counts.c
        rows = await self.s.execute(select(c.epoch, c.bucket_class, c.variant, c.units).where(c.experiment_id == key))
        out: dict[tuple[int, int], dict[str, int]] = {}
        for r in rows:
            out.setdefault((int(r.epoch), int(r.bucket_class)), {})[r.variant] = int(r.units)
        return out


class SqlMetricRepository(_Repository):
    """Ingestion on PostgreSQL is set-based (`ingest`, one statement per batch); on SQLite the use case folds a batch
    through `add_events`, `add_unit_metrics` and `add_variant_stats` (multi-row statements)."""

    @property
    def set_based(self) -> bool:
        return self.pg

    async def add_events(
        self, key: int, events: Sequence[tuple[str, str, float, datetime, str | None, float | None]]
    ) -> set[str]:
        """SQLite: an event with a stored key is a duplicate and is not written."""
        new: set[str] = set()
        for chunk in _chunks(list(events)):
            stmt = (
                sqlite_insert(t.metric_events)
                .values(
                    [
                        dict(experiment_id=key, unit_id=u, metric=m, value=v, event_time=ts, idempotency_key=k, covariate=x)
                        for u, m, v, ts, k, x in chunk
                    ]
                )
                .on_conflict_do_nothing(index_elements=["experiment_id", "idempotency_key"])
                .returning(t.metric_events.c.idempotency_key)
            )
            new.update(r[0] for r in await self.s.execute(stmt) if r[0] is not None)
        return new

    async def add_unit_metrics(
        self, key: int, rows: Sequence[tuple[str, str, str, int, float, int, float | None]]
    ) -> list[tuple[str, str, int, float, int, float | None, int | None]]:
        """SQLite (see the port)."""
        if not rows:
            return []
        c = t.unit_metrics.c
        out: list[tuple[str, str, int, float, int, float | None, int | None]] = []
        for chunk in _chunks(rows):
            values = sqlite_insert(t.unit_metrics).values(
                [
                    dict(
                        experiment_id=key,
                        metric=m,
                        unit_id=u,
                        variant=v,
                        count=n,
                        total=s,
                        positives=p,
                        covariate=x,
                        covariate_since=None if x is None else n,
                    )
                    for m, u, v, n, s, p, x in chunk
                ]
            )
            ex = values.excluded
            stmt = values.on_conflict_do_update(
                index_elements=["experiment_id", "metric", "unit_id"],
                set_={
                    "count": c.count + ex.count,
                    "total": c.total + ex.total,
                    "positives": c.positives + ex.positives,
                    # the first covariate stays; a first one now marks the count it arrived with
                    "covariate": func.coalesce(c.covariate, ex.covariate),
                    "covariate_since": case(
                        (and_(c.covariate.is_(None), ex.covariate.is_not(None)), c.count + ex.count),
                        else_=c.covariate_since,
                    ),
                },
            ).returning(c.metric, c.unit_id, c.count, c.total, c.positives, c.covariate, c.covariate_since)
            out.extend((r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in await self.s.execute(stmt))
        return out

    async def add_variant_stats(self, key: int, deltas: dict[tuple[str, str], PairDelta]) -> None:
        """SQLite: reads the touched rows, merges each delta (`PairDelta.apply`) and writes them back, in key order;
        co-moments that are NULL (rows from before covariates were tracked) stay NULL. Read-modify-write is safe
        here: the ingest transaction already wrote its events, so it holds SQLite's write lock and no other writer
        can change these rows before it commits."""
        keys = sorted(deltas)
        if not keys:
            return
        c = t.variant_stats.c
        rows = await self.s.execute(select(t.variant_stats).where(c.experiment_id == key, c.metric.in_({m for m, _ in keys})))
        stored = {(r.metric, r.variant): r for r in rows}
        for m, v in keys:
            row = stored.get((m, v))
            tracked = row is None or row.comoment is not None
            merged = deltas[(m, v)].apply(_paired(row) if row is not None else PairedStats())
            cov: dict[str, Any] = dict(
                covariate_units=merged.covered,
                covariate_mean=merged.mu_x,
                covariate_m2=merged.m2_x,
                comoment=merged.c_xy,
            )
            if not tracked:
                cov = {k: None for k in cov}
            stmt = sqlite_insert(t.variant_stats).values(
                experiment_id=key, metric=m, variant=v, n=merged.n, mean=merged.mu_y, m2=merged.m2_y, **cov
            )
            stmt = stmt.on_conflict_do_update(
                index_elements=["experiment_id", "metric", "variant"],
                set_={k: stmt.excluded[k] for k in ("n", "mean", "m2", *cov)},
            )
            await self.s.execute(stmt)

    async def ingest(
        self,
        key: int,
        events: tuple[list[str], list[str], list[float], list[datetime | None], list[str], list[float | None]],
        variant_of: dict[str, str],
        proportion_metrics: Sequence[str],
        now: datetime,
    ) -> int:
        """PostgreSQL hot path of one ingest batch, in ONE statement (one round trip) of the caller's transaction:
        append the raw events whose idempotency key is not stored yet (the others are duplicates), upsert the
        per-unit aggregates of the appended ones and fold each touched unit's change of value into the
        per-variant sufficient statistics — the arithmetic of `domain.aggregation.fold_changes` and
        `StatsDelta.apply`, done set-based (each variant's batch shifted by its median new value, merged into the
        stored n, mean, M2 under the row's lock). `events` are columns (units, metrics, values, times or None for `now`, keys or '' for none),
        keys unique within the batch; `variant_of` maps every unit of the batch to its variant. Returns the
        number of events appended. Locks: events, unit rows and variant rows are written in key, (metric, unit)
        and (metric, variant) order, as in the SQLite path, so concurrent batches do not deadlock."""
        units, metrics, values, times, keys, covariates = events
        if not units:
            return 0
        raw = await self._raw()
        # The planner cannot see through the unnest/CTE row counts and overestimates ~25x, which crosses the JIT
        # threshold: JIT compilation alone took ~150 ms per 5,000-event batch. A batch is small; no JIT.
        await raw.execute("SET LOCAL jit = off")
        row = await raw.fetchrow(
            _INGEST_SQL,
            key,
            _text_array(units),
            _text_array(metrics),
            _float_array(values),
            _time_array(times),
            _text_array(keys),
            _text_array(list(variant_of)),
            _text_array(list(variant_of.values())),
            list(proportion_metrics),
            now,
            _optional_float_array(covariates),
        )
        return int(row[0])

    async def variant_stats(self, key: int) -> dict[str, dict[str, SufficientStats]]:
        c = t.variant_stats.c
        rows = await self.s.execute(select(c.metric, c.variant, c.n, c.mean, c.m2).where(c.experiment_id == key))
        out: dict[str, dict[str, SufficientStats]] = {}
        for r in rows:
            out.setdefault(r.metric, {})[r.variant] = SufficientStats(int(r.n), float(r.mean), float(r.m2))
        return out

    async def covariate_stats(self, key: int) -> dict[str, dict[str, PairedStats | None]]:
        rows = await self.s.execute(select(t.variant_stats).where(t.variant_stats.c.experiment_id == key))
        out: dict[str, dict[str, PairedStats | None]] = {}
        for r in rows:
            out.setdefault(r.metric, {})[r.variant] = _paired(r) if r.comoment is not None else None
        return out

    async def sequential_states(self, key: int) -> dict[str, dict[str, SequentialState]]:
        c = t.sequential_states.c
        rows = await self.s.execute(select(t.sequential_states).where(c.experiment_id == key))
        out: dict[str, dict[str, SequentialState]] = {}
        for r in rows:
            out.setdefault(r.metric, {})[r.variant] = SequentialState(
                r.p_value, Interval(r.diff_lower, r.diff_upper), Interval(r.lift_lower, r.lift_upper)
            )
        return out

    async def horizon_decision(self, key: int) -> DecisionOutcome | None:
        c = t.horizon_decisions.c
        row = (await self.s.execute(select(t.horizon_decisions).where(c.experiment_id == key))).first()
        if row is None:
            return None
        power = math.nan if row.power is None else float(row.power)
        return DecisionOutcome(Decision(row.decision), row.variant, row.reason, float(row.progress), power, at_horizon=True)

    async def save_horizon_decision(self, key: int, outcome: DecisionOutcome, now: datetime) -> None:
        stmt = pg_insert(t.horizon_decisions) if self.pg else sqlite_insert(t.horizon_decisions)
        await self.s.execute(
            stmt.values(
                experiment_id=key,
                decision=outcome.decision.value,
                variant=outcome.recommended_variant,
                reason=outcome.reason,
                progress=outcome.progress,
                power=None if math.isnan(outcome.power) else outcome.power,
                decide_time=now,
            ).on_conflict_do_nothing(index_elements=["experiment_id"])
        )

    async def save_sequential_states(self, key: int, states: dict[tuple[str, str], SequentialState]) -> None:
        c = t.sequential_states.c
        inf = math.inf
        for (metric, variant), st in sorted(states.items()):
            values = dict(
                p_value=_finite(st.p_value, 1.0),
                diff_lower=_finite(st.difference.lower, -inf),
                diff_upper=_finite(st.difference.upper, inf),
                lift_lower=_finite(st.lift.lower, -inf),
                lift_upper=_finite(st.lift.upper, inf),
            )
            stmt = pg_insert(t.sequential_states) if self.pg else sqlite_insert(t.sequential_states)
            stmt = stmt.values(experiment_id=key, metric=metric, variant=variant, looks=1, **values)
            stmt = stmt.on_conflict_do_update(
                index_elements=["experiment_id", "metric", "variant"], set_={**values, "looks": c.looks + 1}
            )
            await self.s.execute(stmt)
