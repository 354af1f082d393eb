"""Registry persistence: rows ⇄ domain objects, one repository per resource, all inside one unit of work's session.

Domain objects carry their row id in `key`; the other repositories address rows by it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, literal, or_, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.ext.asyncio import AsyncSession

from neuroweaver_runtime.filtering import Comparison
from neuroweaver_runtime.timestamps import aware

from ..domain.model import (
    AliasAction,
    AliasHistoryEntry,
    Artifact,
    ArtifactFormat,
    Direction,
    Judge,
    JudgeVersion,
    Lineage,
    Metric,
    Model,
    ModelAlias,
    ModelEvent,
    ModelState,
    ModelVersion,
    VersionState,
)
from ..service.ports import Resolved
from . import tables as t

# Every registry write takes this transaction-scoped advisory lock (PostgreSQL) right before it appends its
# audit event, so event sequences are committed in order and a watcher never skips a late-committing event.
_EVENT_LOCK_KEY = 0x4E57_5245  # "NWRE"


class _Repository:
    def __init__(self, session: AsyncSession) -> None:
        self.s = session


class SqlModelRepository(_Repository):
    async def get(self, name: str, *, lock: bool = False, aliases: bool = False) -> Model | None:
        query = select(t.models).where(t.models.c.name == name)
        if lock:
            query = query.with_for_update()
        row = (await self.s.execute(query)).first()
        if row is None:
            return None
        return await self._to_model(row) if aliases else model_from_row(row, {})

    async def add(self, model: Model) -> None:
        result = await self.s.execute(
            t.models.insert().values(
                name=model.name,
                project=model.project,
                display_name=model.display_name,
                description=model.description,
                specialization=model.specialization,
                base_model=model.base_model,
                labels=model.labels,
                state=model.state.value,
                latest_version="",
                version_count=0,
                creator=model.creator,
                create_time=model.create_time,
                update_time=model.update_time,
                revision=1,
            )
        )
        model.key = int(result.inserted_primary_key[0])  # type: ignore[attr-defined]  # DML executes to a CursorResult; AsyncSession.execute is typed Result

    async def update(self, model: Model, **values: Any) -> None:
        values = {k: v.value if isinstance(v, ModelState) else v for k, v in values.items()}
        await self.s.execute(
            update(t.models).where(t.models.c.id == model.key).values(revision=t.models.c.revision + 1, **values)
        )

    async def delete(self, model: Model) -> None:
        # Explicit child deletes: SQLite enforces ON DELETE CASCADE only with foreign_keys=ON on every connection.
        version_ids = select(t.versions.c.id).where(t.versions.c.model_id == model.key)
        await self.s.execute(delete(t.version_metrics).where(t.version_metrics.c.version_id.in_(version_ids)))
        for table in (t.versions, t.aliases, t.alias_history):
            await self.s.execute(delete(table).where(table.c.model_id == model.key))
        await self.s.execute(delete(t.models).where(t.models.c.id == model.key))

    async def page(
        self, project: str, filters: list[Comparison], order_field: str, desc: bool, cursor: list | None, limit: int
    ) -> tuple[list[Model], list | None]:
        c = t.models.c
        query = select(t.models).where(c.project == project)
        field_map = {"specialization": c.specialization, "state": c.state, "base_model": c.base_model}
        query = query.where(*_filter_clauses(filters, field_map, c.labels))
        query = _keyset(query, getattr(c, order_field), c.name, desc, cursor, order_field != "name")
        rows = list((await self.s.execute(query.limit(limit + 1))).all())
        items = [await self._to_model(r) for r in rows[:limit]]
        after = None
        if len(rows) > limit:
            last = rows[limit - 1]
            value = getattr(last, order_field)
            after = [value.isoformat() if order_field != "name" else value, last.name]
        return items, after

    async def _to_model(self, row) -> Model:
        aliases = await self.s.execute(
            select(t.aliases.c.alias, t.aliases.c.version).where(t.aliases.c.model_id == row.id).order_by(t.aliases.c.alias)
        )
        return model_from_row(row, {r.alias: r.version for r in aliases})


class SqlVersionRepository(_Repository):
    async def get(self, model: Model, version: str, *, details: bool = True) -> ModelVersion | None:
        query = select(t.versions).where(t.versions.c.model_id == model.key, t.versions.c.version == version)
        row = (await self.s.execute(query)).first()
        if row is None:
            return None
        if not details:
            return version_from_row(model.name, row, [], [])
        return (await self._to_versions(model.name, [row]))[0]

    async def resolve(self, kind: str, model_name: str, ref: str) -> Resolved:
        """One statement (model ⟕ [alias] ⟕ version ⟕ metrics, aliases aggregated), one row per metric."""
        dialect = self.s.get_bind().dialect.name
        statement = _version_statements(dialect)[kind]
        rows = list((await self.s.execute(statement, {"model_name": model_name, "ref": ref})).all())
        if not rows:
            return Resolved(model_exists=False)
        first = rows[0]
        resolved = Resolved(True, first.m_latest, first.alias_target if kind == "alias" else None)
        if first.id is not None:
            metrics = [metric_from_row(r) for r in rows if r.metric_name is not None]
            resolved.version = version_from_row(model_name, first, metrics, alias_list(first, dialect))
        return resolved

    async def highest(self, model: Model) -> str | None:
        c = t.versions.c
        query = select(c.version).where(c.model_id == model.key).order_by(c.sort_key.desc()).limit(1)
        return (await self.s.execute(query)).scalar()

    async def highest_and_taken(self, model: Model, sort_key: str) -> tuple[str | None, bool]:
        """The highest version and whether `sort_key` is taken, in one round trip."""
        c = t.versions.c
        highest = select(c.version).where(c.model_id == model.key).order_by(c.sort_key.desc()).limit(1).scalar_subquery()
        taken = select(c.id).where(c.model_id == model.key, c.sort_key == sort_key).exists()
        row = (await self.s.execute(select(highest.label("highest"), taken.label("taken")))).one()
        return row.highest, bool(row.taken)

    async def add(self, model: Model, mv: ModelVersion, sort_key: str) -> None:
        lineage = mv.lineage
        result = await self.s.execute(
            t.versions.insert().values(
                model_id=model.key,
                version=mv.version,
                sort_key=sort_key,
                state=mv.state.value,
                artifact_uri=mv.artifact.uri,
                artifact_sha256=mv.artifact.sha256,
                artifact_size=mv.artifact.size_bytes,
                artifact_format=mv.artifact.format.value,
                lineage=lineage.__dict__,
                training_job=lineage.training_job,
                base_model=lineage.base_model,
                labels=mv.labels,
                notes=mv.notes,
                creator=mv.creator,
                create_time=mv.create_time,
                update_time=mv.update_time,
                revision=1,
                artifacts=[],
            )
        )
        mv.key = int(result.inserted_primary_key[0])  # type: ignore[attr-defined]  # DML executes to a CursorResult; AsyncSession.execute is typed Result
        await self.add_metrics(mv, mv.metrics)

    async def add_metrics(self, version: ModelVersion, metrics: Sequence[Metric]) -> None:
        if metrics:
            await self.s.execute(
                t.version_metrics.insert(),
                [
                    dict(
                        version_id=version.key,
                        name=m.name,
                        value=m.value,
                        direction=m.direction.value,
                        source=m.source,
                        record_time=m.record_time,
                    )
                    for m in metrics
                ],
            )

    async def set_artifacts(self, version: ModelVersion) -> None:
        await self.update(version, artifacts=[export_to_json(a) for a in version.artifacts], update_time=version.update_time)

    async def update(self, version: ModelVersion, **values: Any) -> None:
        values = {k: v.value if isinstance(v, VersionState) else v for k, v in values.items()}
        await self.s.execute(
            update(t.versions).where(t.versions.c.id == version.key).values(revision=t.versions.c.revision + 1, **values)
        )

    async def count(self, model: Model) -> int:
        query = select(func.count()).select_from(t.versions).where(t.versions.c.model_id == model.key)
        return int((await self.s.execute(query)).scalar() or 0)

    async def page(
        self, model: Model, filters: list[Comparison], order_field: str, desc: bool, cursor: list | None, limit: int
    ) -> tuple[list[ModelVersion], list | None]:
        c = t.versions.c
        query = select(t.versions).where(c.model_id == model.key)
        field_map = {"state": c.state, "base_model": c.base_model, "training_job": c.training_job}
        query = query.where(*_filter_clauses(filters, field_map, c.labels))
        order_col = c.sort_key if order_field == "version" else c.create_time
        query = _keyset(query, order_col, c.id, desc, cursor, order_field != "version")
        rows = list((await self.s.execute(query.limit(limit + 1))).all())
        items = await self._to_versions(model.name, rows[:limit])
        after = None
        if len(rows) > limit:
            last = rows[limit - 1]
            after = [last.sort_key if order_field == "version" else last.create_time.isoformat(), last.id]
        return items, after

    async def _to_versions(self, model_name: str, rows: list) -> list[ModelVersion]:
        if not rows:
            return []
        ids = [r.id for r in rows]
        metric_rows = await self.s.execute(
            select(t.version_metrics).where(t.version_metrics.c.version_id.in_(ids)).order_by(t.version_metrics.c.id)
        )
        metrics: dict[int, list[Metric]] = {i: [] for i in ids}
        for m in metric_rows:
            metrics[m.version_id].append(Metric(m.name, m.value, Direction(m.direction), m.source, aware(m.record_time)))
        model_ids = {r.model_id for r in rows}
        alias_rows = await self.s.execute(
            select(t.aliases.c.model_id, t.aliases.c.alias, t.aliases.c.version)
            .where(t.aliases.c.model_id.in_(model_ids))
            .order_by(t.aliases.c.alias)
        )
        aliases: dict[tuple[int, str], list[str]] = {}
        for a in alias_rows:
            aliases.setdefault((a.model_id, a.version), []).append(a.alias)
        return [version_from_row(model_name, r, metrics[r.id], aliases.get((r.model_id, r.version), [])) for r in rows]


class SqlAliasRepository(_Repository):
    async def get(self, model: Model, alias: str) -> ModelAlias | None:
        query = select(t.aliases).where(t.aliases.c.model_id == model.key, t.aliases.c.alias == alias)
        row = (await self.s.execute(query)).first()
        return None if row is None else _alias(model, row)

    async def all(self, model: Model) -> list[ModelAlias]:
        query = select(t.aliases).where(t.aliases.c.model_id == model.key).order_by(t.aliases.c.alias)
        return [_alias(model, r) for r in (await self.s.execute(query)).all()]

    async def set(self, model: Model, alias: str, target: ModelAlias) -> None:
        values = dict(version=target.version, actor=target.actor, reason=target.reason, update_time=target.update_time)
        result = await self.s.execute(
            update(t.aliases).where(t.aliases.c.model_id == model.key, t.aliases.c.alias == alias).values(**values)
        )
        if result.rowcount == 0:  # type: ignore[attr-defined]  # DML executes to a CursorResult; AsyncSession.execute is typed Result
            await self.s.execute(t.aliases.insert().values(model_id=model.key, alias=alias, **values))

    async def delete(self, model: Model, alias: str) -> None:
        await self.s.execute(delete(t.aliases).where(t.aliases.c.model_id == model.key, t.aliases.c.alias == alias))

    async def append_history(self, model: Model, entry: AliasHistoryEntry) -> None:
        await self.s.execute(
            t.alias_history.insert().values(
                model_id=model.key,
                alias=entry.alias.rsplit("/", 1)[-1],
                action=entry.action.value,
                from_version=entry.from_version,
                to_version=entry.to_version,
                actor=entry.actor,
                reason=entry.reason,
                create_time=entry.create_time,
            )
        )

    async def history(self, model: Model, alias: str, before: int | None, limit: int) -> list[AliasHistoryEntry]:
        c = t.alias_history.c
        query = select(t.alias_history).where(c.model_id == model.key, c.alias == alias)
        if before is not None:
            query = query.where(c.id < before)
        rows = (await self.s.execute(query.order_by(c.id.desc()).limit(limit))).all()
        return [_history(model, r) for r in rows]

    async def last_move(self, model: Model, alias: str) -> AliasHistoryEntry | None:
        c = t.alias_history.c
        query = select(t.alias_history).where(c.model_id == model.key, c.alias == alias).order_by(c.id.desc()).limit(1)
        row = (await self.s.execute(query)).first()
        return None if row is None else _history(model, row)


class SqlEventRepository(_Repository):
    async def append(self, project: str, event: ModelEvent) -> int:
        if self.s.get_bind().dialect.name == "postgresql":
            # One round trip: the advisory lock is taken (FROM lock) before the row's sequence is drawn,
            # and the NOTIFY is queued for commit time.
            result = await self.s.execute(
                _PG_APPEND_EVENT,
                {
                    "k": _EVENT_LOCK_KEY, "project": project, "type": event.type, "resource": event.resource,
                    "model": event.model, "actor": event.actor, "details": json.dumps(event.details),
                    "create_time": event.create_time,
                },
            )  # fmt: skip
            return int(result.scalar_one())
        result = await self.s.execute(
            t.events.insert().values(
                project=project,
                type=event.type,
                resource=event.resource,
                model=event.model,
                actor=event.actor,
                details=event.details,
                create_time=event.create_time,
            )
        )
        return int(result.inserted_primary_key[0])  # type: ignore[attr-defined]  # DML executes to a CursorResult; AsyncSession.execute is typed Result

    async def after(
        self,
        project: str,
        model: str,
        after: int,
        limit: int,
        *,
        filters: Sequence[Comparison] = (),
        before: int | None = None,
        desc: bool = False,
    ) -> list[ModelEvent]:
        c = t.events.c
        query = select(t.events).where(c.project == project, c.sequence > after)
        if model:
            query = query.where(c.model == model)
        if before is not None:
            query = query.where(c.sequence < before)
        query = query.where(*_filter_clauses(filters, {"type": c.type, "actor": c.actor, "resource": c.resource}, None))
        rows = (await self.s.execute(query.order_by(c.sequence.desc() if desc else c.sequence).limit(limit))).all()
        return [
            ModelEvent(r.type, r.resource, r.model, r.actor, dict(r.details or {}), r.sequence, aware(r.create_time))
            for r in rows
        ]

    async def newest(self, project: str) -> int:
        c = t.events.c
        return int((await self.s.execute(select(func.max(c.sequence)).where(c.project == project))).scalar() or 0)


class SqlJudgeRepository(_Repository):
    async def get(self, name: str, *, lock: bool = False) -> Judge | None:
        query = select(t.judges).where(t.judges.c.name == name)
        if lock:
            query = query.with_for_update()
        row = (await self.s.execute(query)).first()
        return None if row is None else _judge(row)

    async def add(self, judge: Judge) -> None:
        result = await self.s.execute(
            t.judges.insert().values(
                name=judge.name,
                project=judge.project,
                display_name=judge.display_name,
                description=judge.description,
                latest_version=0,
                creator=judge.creator,
                create_time=judge.create_time,
            )
        )
        judge.key = int(result.inserted_primary_key[0])  # type: ignore[attr-defined]  # DML executes to a CursorResult; AsyncSession.execute is typed Result

    async def add_version(self, judge: Judge, version: JudgeVersion) -> None:
        await self.s.execute(
            t.judge_versions.insert().values(
                judge_id=judge.key,
                version=version.version,
                config=version.config,
                creator=version.creator,
                create_time=version.create_time,
            )
        )
        await self.s.execute(update(t.judges).where(t.judges.c.id == judge.key).values(latest_version=version.version))
        judge.latest_version = version.version

    async def get_version(self, judge: Judge, number: int) -> JudgeVersion | None:
        c = t.judge_versions.c
        row = (await self.s.execute(select(t.judge_versions).where(c.judge_id == judge.key, c.version == number))).first()
        return None if row is None else _judge_version(judge.name, row)

    async def page(self, project: str, after_name: str | None, limit: int) -> list[Judge]:
        query = select(t.judges).where(t.judges.c.project == project)
        if after_name is not None:
            query = query.where(t.judges.c.name > after_name)
        return [_judge(r) for r in (await self.s.execute(query.order_by(t.judges.c.name).limit(limit))).all()]

    async def list_versions(self, judge: Judge, before: int | None, limit: int) -> list[JudgeVersion]:
        c = t.judge_versions.c
        query = select(t.judge_versions).where(c.judge_id == judge.key)
        if before is not None:
            query = query.where(c.version < before)
        rows = (await self.s.execute(query.order_by(c.version.desc()).limit(limit))).all()
        return [_judge_version(judge.name, r) for r in rows]


_PG_APPEND_EVENT = text(
    "WITH event_lock AS MATERIALIZED (SELECT pg_advisory_xact_lock(:k)) "
    "INSERT INTO model_events (project, type, resource, model, actor, details, create_time) "
    "SELECT :project, :type, :resource, :model, :actor, CAST(:details AS JSON), :create_time FROM event_lock "
    "RETURNING sequence, pg_notify('nw_registry_events', project) IS NULL"
).bindparams(bindparam("create_time", type_=t.events.c.create_time.type))


def version_from_row(model_name: str, r, metrics: list[Metric], aliases: list[str]) -> ModelVersion:
    return ModelVersion(
        name=f"{model_name}/versions/{r.version}",
        version=r.version,
        state=VersionState(r.state),
        artifact=Artifact(r.artifact_uri, r.artifact_sha256, r.artifact_size, ArtifactFormat(r.artifact_format)),
        lineage=Lineage(**(r.lineage or {})),
        metrics=metrics,
        labels=dict(r.labels or {}),
        notes=r.notes,
        aliases=aliases,
        creator=r.creator,
        create_time=aware(r.create_time),
        update_time=aware(r.update_time),
        revision=r.revision,
        artifacts=[export_from_json(a) for a in (r.artifacts or [])],
        key=r.id,
    )


def export_to_json(a: Artifact) -> dict[str, Any]:
    return {
        "uri": a.uri, "sha256": a.sha256, "size_bytes": a.size_bytes, "format": a.format.value,
        "quantization": a.quantization, "produced_by": a.produced_by,
        "create_time": a.create_time.isoformat() if a.create_time else None,
    }  # fmt: skip


def export_from_json(d: dict[str, Any]) -> Artifact:
    created = d.get("create_time")
    return Artifact(
        d["uri"], d["sha256"], int(d["size_bytes"]), ArtifactFormat(d["format"]), d.get("quantization", ""),
        d.get("produced_by", ""), aware(datetime.fromisoformat(created)) if created else None,
    )  # fmt: skip


def metric_from_row(r) -> Metric:
    return Metric(r.metric_name, r.metric_value, Direction(r.metric_direction), r.metric_source, aware(r.metric_time))


def model_from_row(r, aliases: dict[str, str]) -> Model:
    return Model(
        name=r.name,
        display_name=r.display_name,
        description=r.description,
        specialization=r.specialization,
        base_model=r.base_model,
        labels=dict(r.labels or {}),
        state=ModelState(r.state),
        latest_version=r.latest_version,
        version_count=r.version_count,
        aliases=aliases,
        creator=r.creator,
        create_time=aware(r.create_time),
        update_time=aware(r.update_time),
        revision=r.revision,
        key=r.id,
    )


def _alias(model: Model, r) -> ModelAlias:
    return ModelAlias(f"{model.name}/aliases/{r.alias}", r.version, r.actor, r.reason, aware(r.update_time))


def _history(model: Model, r) -> AliasHistoryEntry:
    return AliasHistoryEntry(
        f"{model.name}/aliases/{r.alias}",
        AliasAction(r.action),
        r.from_version,
        r.to_version,
        r.actor,
        r.reason,
        r.id,
        aware(r.create_time),
    )


def _judge(r) -> Judge:
    return Judge(r.name, r.display_name, r.description, r.latest_version, r.creator, aware(r.create_time), key=r.id)


def _judge_version(judge_name: str, r) -> JudgeVersion:
    return JudgeVersion(f"{judge_name}/versions/{r.version}", r.version, dict(r.config), r.creator, aware(r.create_time))


def alias_list(r, dialect: str) -> list[str]:
    """The aliases aggregated into `alias_list`, in the order `to_versions` gives them (ORDER BY alias)."""
    if not r.alias_list:
        return []
    names = r.alias_list.split(",")  # alias ids are [a-z0-9-], never a comma
    return names if dialect == "postgresql" else sorted(names)  # SQLite's BINARY collation is code point order


_STATEMENTS: dict[str, dict] = {}


def _version_statements(dialect: str) -> dict:
    cached = _STATEMENTS.get(dialect)
    if cached is not None:
        return cached
    m, v, vm = t.models, t.versions, t.version_metrics
    target, listed = t.aliases.alias("target_alias"), t.aliases.alias("listed_alias")
    if dialect == "postgresql":  # the database's collation, as ORDER BY alias in to_versions
        aggregated = func.string_agg(listed.c.alias, aggregate_order_by(text("','"), listed.c.alias))
    else:  # group_concat; sorted in Python (BINARY collation = code point order)
        aggregated = func.aggregate_strings(listed.c.alias, ",")
    aliases_of_version = (
        select(aggregated).where(listed.c.model_id == v.c.model_id, listed.c.version == v.c.version).scalar_subquery()
    )
    columns = [
        m.c.id.label("m_id"), m.c.latest_version.label("m_latest"), v, aliases_of_version.label("alias_list"),
        vm.c.name.label("metric_name"), vm.c.value.label("metric_value"), vm.c.direction.label("metric_direction"),
        vm.c.source.label("metric_source"), vm.c.record_time.label("metric_time"),
    ]  # fmt: skip
    ref = bindparam("ref", type_=v.c.version.type)

    def finish(joined, *extra):
        return (
            select(*columns, *extra)
            .select_from(joined.outerjoin(vm, vm.c.version_id == v.c.id))
            .where(m.c.name == bindparam("model_name", type_=m.c.name.type))
            .order_by(vm.c.id)
        )

    cached = _STATEMENTS[dialect] = {
        "semver": finish(m.outerjoin(v, and_(v.c.model_id == m.c.id, v.c.version == ref))),
        "latest": finish(m.outerjoin(v, and_(v.c.model_id == m.c.id, v.c.version == m.c.latest_version))),
        "alias": finish(
            m.outerjoin(target, and_(target.c.model_id == m.c.id, target.c.alias == ref)).outerjoin(
                v, and_(v.c.model_id == m.c.id, v.c.version == target.c.version)
            ),
            target.c.version.label("alias_target"),
        ),
    }
    return cached


def _filter_clauses(filters: Sequence[Comparison], fields: dict, labels_col) -> list:
    clauses = []
    for f in filters:
        if f.label_key is not None:
            col = labels_col[f.label_key].as_string()
            clauses.append(col == f.value if f.op == "=" else or_(col.is_(None), col != f.value))
        else:
            col = fields[f.field]
            clauses.append(col == f.value if f.op == "=" else col != f.value)
    return clauses


def _keyset(query, order_col, tie_col, desc: bool, cursor: list | None, parse_time: bool):
    """Orders by (order_col, tie_col) and continues after the cursor's (value, tie) pair.

    A row-value comparison, not `a < v OR (a = v AND t < tie)`: PostgreSQL turns the row value into an index
    condition, so a page costs its own rows; the OR form was a filter that re-read every row before the cursor
    (95,000 rows for a page near the end of a 100,000-version model, bench/registry/bench_list.py).
    """
    if cursor is not None:
        value, tie = cursor
        if parse_time:
            value = datetime.fromisoformat(value)
        after = tuple_(literal(value, order_col.type), literal(tie, tie_col.type))
        query = query.where(tuple_(order_col, tie_col) < after if desc else tuple_(order_col, tie_col) > after)
    if desc:
        return query.order_by(order_col.desc(), tie_col.desc())
    return query.order_by(order_col, tie_col)
