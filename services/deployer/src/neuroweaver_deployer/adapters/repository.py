"""Deployer persistence: rows ⇄ domain dataclasses. Every method runs inside its unit of work's session.

Leases (service/leases.py) are timed by the database's clock, evaluated in the statement (`database_now`), never a
replica's. On PostgreSQL every write of a deployment also `NOTIFY`s `CHANGES_CHANNEL` with its name (delivered at
commit): every replica LISTENs, so watchers anywhere wake and the owner converges a change another replica stored."""

from __future__ import annotations

import builtins
import enum
from dataclasses import asdict
from datetime import datetime
from typing import Any

from sqlalchemy import Float, and_, cast, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from neuroweaver_runtime.timestamps import aware

from ..domain.model import (
    Autoscaling,
    Backend,
    Condition,
    Deployment,
    ResolvedVersion,
    Resources,
    Revision,
    Serving,
    State,
    Toleration,
)
from ..service.ports import Fence, HeldLease, LeaseLost
from . import tables as t

CHANGES_CHANNEL = "nw_deployer_changes"


def _conditions_out(conditions: list[Condition]) -> list[dict]:
    return [
        {**asdict(c), "last_transition_time": c.last_transition_time.isoformat() if c.last_transition_time else None}
        for c in conditions
    ]


def _conditions_in(raw: list[dict]) -> list[Condition]:
    out = []
    for c in raw or []:
        ltt = c.get("last_transition_time")
        out.append(
            Condition(
                c["type"], c["status"], c.get("reason", ""), c.get("message", ""), datetime.fromisoformat(ltt) if ltt else None
            )
        )
    return out


def to_deployment(row) -> Deployment:
    res = dict(row.resources)
    res["tolerations"] = [Toleration(**x) for x in res.get("tolerations", [])]
    return Deployment(
        name=row.name,
        display_name=row.display_name,
        model_version=row.model_version,
        model_alias=row.model_alias,
        backend=Backend(row.backend),
        replicas=row.replicas,
        autoscaling=Autoscaling(**row.autoscaling),
        resources=Resources(**res),
        serving=Serving(**row.serving),
        namespace=row.namespace,
        labels=dict(row.labels),
        state=State(row.state),
        served_version=row.served_version,
        served_model_name=row.served_model_name,
        endpoint=row.endpoint,
        openai_base_url=row.openai_base_url,
        ready_replicas=row.ready_replicas,
        revision=row.revision,
        conditions=_conditions_in(row.conditions),
        create_time=aware(row.create_time),
        update_time=aware(row.update_time),
        generation=row.generation,
        target=_resolved(row.target) if row.target else None,
        key=row.id,
    )


def _resolved(raw: dict[str, Any]) -> ResolvedVersion:
    """A stored target (JSON) → the resolved version, with the versions served beside it (co_served)."""
    values = dict(raw)
    co_served = tuple(_resolved(x) for x in values.pop("co_served", ()))
    return ResolvedVersion(**values, co_served=co_served)


def spec_values(d: Deployment) -> dict[str, Any]:
    return {
        "display_name": d.display_name,
        "model_version": d.model_version,
        "model_alias": d.model_alias,
        "backend": d.backend.value,
        "replicas": d.replicas,
        "autoscaling": asdict(d.autoscaling),
        "resources": asdict(d.resources),
        "serving": asdict(d.serving),
        "namespace": d.namespace,
        "labels": d.labels,
    }


def _column(name: str, value: Any) -> Any:
    """A domain value of a `Deployment` field → what its column stores."""
    if name == "conditions":
        return _conditions_out(value)
    if isinstance(value, enum.Enum):
        return value.value
    if name in ("autoscaling", "resources", "serving", "target") and value is not None:
        return asdict(value)
    return value


def _fenced(query, fence: Fence | None):
    c = t.deployments.c
    return query if fence is None else query.where(c.lease_owner == fence.owner, c.lease_epoch == fence.epoch)


class SqlDeploymentRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.s = session

    @property
    def is_postgres(self) -> bool:
        return self.s.get_bind().dialect.name == "postgresql"

    def database_now(self) -> ColumnElement[float]:
        """The database's clock in epoch seconds, evaluated in the statement (as the trainer's leases)."""
        if self.is_postgres:
            # clock_timestamp(), not now(): a claim late in a long transaction still sees the current time.
            return cast(func.extract("epoch", func.clock_timestamp()), Float)
        return (func.julianday("now") - 2440587.5) * 86400.0  # the Unix epoch is Julian day 2440587.5

    async def _notify(self, where: ColumnElement[bool]) -> None:
        """NOTIFY each matching deployment's name (PostgreSQL; queued until commit, dropped on rollback)."""
        if self.is_postgres:
            c = t.deployments.c
            await self.s.execute(select(func.pg_notify(CHANGES_CHANNEL, c.name)).where(where))

    async def get(self, name: str, *, lock: bool = False, fence: Fence | None = None) -> Deployment | None:
        query = _fenced(select(t.deployments).where(t.deployments.c.name == name), fence)
        if lock:
            query = query.with_for_update()
        row = (await self.s.execute(query)).first()
        return to_deployment(row) if row is not None else None

    async def add(self, d: Deployment) -> None:
        assert d.target is not None  # a deployment is stored with the version it serves
        result = await self.s.execute(
            t.deployments.insert().values(
                name=d.name,
                project=d.project,
                state=d.state.value,
                served_version=d.target.name,
                served_model_name=d.served_model_name,
                target=asdict(d.target),
                endpoint="",
                openai_base_url="",
                ready_replicas=0,
                revision=d.revision,
                conditions=[],
                create_time=d.create_time,
                update_time=d.update_time,
                generation=1,
                lease_owner="",
                lease_expires_at=0.0,
                lease_epoch=0,
                **spec_values(d),
            )
        )
        d.key = result.inserted_primary_key[0]  # type: ignore[attr-defined]  # DML executes to a CursorResult; AsyncSession.execute is typed Result
        await self._notify(t.deployments.c.id == d.key)

    async def update(self, key: int, *, bump: bool = True, fence: Fence | None = None, **values: Any) -> None:
        c = t.deployments.c
        columns = {name: _column(name, value) for name, value in values.items()}
        if bump:
            columns["generation"] = c.generation + 1
        result = await self.s.execute(_fenced(update(t.deployments).where(c.id == key), fence).values(**columns))
        if fence is not None and result.rowcount != 1:  # type: ignore[attr-defined]  # a CursorResult
            raise LeaseLost(f"deployment {key} is no longer leased to {fence.owner} at epoch {fence.epoch}")
        await self._notify(c.id == key)

    async def delete(self, key: int, *, fence: Fence | None = None) -> None:
        c = t.deployments.c
        await self._notify(c.id == key)
        await self.s.execute(delete(t.revisions).where(t.revisions.c.deployment_id == key))
        result = await self.s.execute(_fenced(delete(t.deployments).where(c.id == key), fence))
        if fence is not None and result.rowcount != 1:  # type: ignore[attr-defined]  # a CursorResult; rolls back
            raise LeaseLost(f"deployment {key} is no longer leased to {fence.owner} at epoch {fence.epoch}")

    # -- leases ------------------------------------------------------------------------------------

    async def _held(self, where: ColumnElement[bool]) -> builtins.list[HeldLease]:
        c = t.deployments.c
        rows = (await self.s.execute(select(c.name, c.lease_epoch, c.generation, c.state).where(where))).all()
        return [HeldLease(r.name, r.lease_epoch, r.generation, r.state == State.DELETING.value) for r in rows]

    async def claim_leases(
        self, owner: str, lease_seconds: float, backends: builtins.list[Backend], name: str | None = None
    ) -> builtins.list[HeldLease]:
        c = t.deployments.c
        free = or_(c.lease_owner == "", c.lease_expires_at < self.database_now())
        query = select(c.id).where(free, c.lease_owner != owner, c.backend.in_([b.value for b in backends]))
        if name is not None:
            query = query.where(c.name == name)
        if self.is_postgres:
            # A row locked by a writer (its owner mid-apply, a delete marking it) is not free to take right now.
            query = query.with_for_update(skip_locked=True)
        ids = [r.id for r in (await self.s.execute(query)).all()]
        if not ids:
            return []
        await self.s.execute(
            update(t.deployments)
            .where(c.id.in_(ids), free)  # re-checked: the statement's own clock and row versions decide
            .values(lease_owner=owner, lease_expires_at=self.database_now() + lease_seconds, lease_epoch=c.lease_epoch + 1)
        )
        return await self._held(and_(c.id.in_(ids), c.lease_owner == owner))

    async def renew_leases(self, owner: str, lease_seconds: float) -> builtins.list[HeldLease]:
        c = t.deployments.c
        await self.s.execute(
            update(t.deployments).where(c.lease_owner == owner).values(lease_expires_at=self.database_now() + lease_seconds)
        )
        return await self._held(c.lease_owner == owner)

    async def release_leases(self, owner: str) -> builtins.list[str]:
        c = t.deployments.c
        names = [r.name for r in (await self.s.execute(select(c.name).where(c.lease_owner == owner))).all()]
        if names:
            await self._notify(c.lease_owner == owner)  # the other replicas claim them at once
            await self.s.execute(update(t.deployments).where(c.lease_owner == owner).values(lease_owner="", lease_expires_at=0.0))
        return names

    async def page(
        self,
        project: str,
        state: State | None,
        backend: Backend | None,
        order_field: str,
        desc: bool,
        cursor: builtins.list | None,
        limit: int,
    ) -> builtins.list[Deployment]:
        c = t.deployments.c
        query = select(t.deployments).where(c.project == project)
        if state is not None:
            query = query.where(c.state == state.value)
        if backend is not None:
            query = query.where(c.backend == backend.value)
        col = c.name if order_field == "name" else c.create_time
        if cursor is not None:
            if order_field == "name":
                query = query.where(c.name < cursor[0] if desc else c.name > cursor[0])
            else:
                value = datetime.fromisoformat(cursor[0])
                if desc:
                    query = query.where(or_(col < value, and_(col == value, c.name < cursor[1])))
                else:
                    query = query.where(or_(col > value, and_(col == value, c.name > cursor[1])))
        query = query.order_by(col.desc() if desc else col.asc(), c.name.desc() if desc else c.name.asc()).limit(limit)
        return [to_deployment(r) for r in (await self.s.execute(query)).all()]

    async def all(self) -> builtins.list[Deployment]:
        return [to_deployment(r) for r in (await self.s.execute(select(t.deployments))).all()]

    async def add_revision(self, key: int, revision: Revision) -> None:
        await self.s.execute(
            t.revisions.insert().values(
                deployment_id=key,
                revision=revision.revision,
                model_version=revision.model_version,
                cause=revision.cause,
                actor=revision.actor,
                create_time=revision.create_time,
            )
        )

    async def revisions(self, key: int, deployment: str, before: int | None, limit: int) -> builtins.list[Revision]:
        c = t.revisions.c
        query = select(t.revisions).where(c.deployment_id == key)
        if before is not None:
            query = query.where(c.revision < before)
        rows = (await self.s.execute(query.order_by(c.revision.desc()).limit(limit))).all()
        return [Revision(deployment, r.revision, r.model_version, r.cause, r.actor, aware(r.create_time)) for r in rows]

    async def revision(self, key: int, deployment: str, number: int) -> Revision | None:
        c = t.revisions.c
        r = (await self.s.execute(select(t.revisions).where(c.deployment_id == key, c.revision == number))).first()
        return Revision(deployment, r.revision, r.model_version, r.cause, r.actor, aware(r.create_time)) if r else None
