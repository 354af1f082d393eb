"""Deployer persistence: rows ⇄ domain dataclasses. Every method runs inside the caller's transaction."""

from __future__ import annotations

import builtins
from dataclasses import asdict
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

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
from . import tables as t


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
    )


def to_resolved(row) -> ResolvedVersion | None:
    return ResolvedVersion(**row.target) if row.target else None


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


class DeployerRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.s = session

    async def row(self, name: str, *, for_update: bool = False):
        query = select(t.deployments).where(t.deployments.c.name == name)
        if for_update:
            query = query.with_for_update()
        return (await self.s.execute(query)).first()

    async def insert(self, d: Deployment, target: ResolvedVersion) -> int:
        result = await self.s.execute(
            t.deployments.insert().values(
                name=d.name,
                project=d.project,
                state=d.state.value,
                served_version=target.name,
                served_model_name=d.served_model_name,
                target=asdict(target),
                endpoint="",
                openai_base_url="",
                ready_replicas=0,
                revision=d.revision,
                conditions=[],
                create_time=d.create_time,
                update_time=d.update_time,
                generation=1,
                **spec_values(d),
            )
        )
        return result.inserted_primary_key[0]  # type: ignore[attr-defined]  # DML executes to a CursorResult; AsyncSession.execute is typed Result

    async def update(self, row_id: int, *, bump: bool = True, **values: Any) -> None:
        if "conditions" in values:
            values["conditions"] = _conditions_out(values["conditions"])
        if "target" in values and values["target"] is not None:
            values["target"] = asdict(values["target"])
        if bump:
            values["generation"] = t.deployments.c.generation + 1
        await self.s.execute(update(t.deployments).where(t.deployments.c.id == row_id).values(**values))

    async def delete(self, row_id: int) -> None:
        await self.s.execute(delete(t.revisions).where(t.revisions.c.deployment_id == row_id))
        await self.s.execute(delete(t.deployments).where(t.deployments.c.id == row_id))

    async def list(
        self, project: str, state: str | None, backend: str | None, order: str, desc: bool, cursor: list | None, limit: int
    ):
        c = t.deployments.c
        query = select(t.deployments).where(c.project == project)
        if state:
            query = query.where(c.state == state)
        if backend:
            query = query.where(c.backend == backend)
        col = c.name if order == "name" else c.create_time
        if cursor is not None:
            if order == "name":
                query = query.where(c.name < cursor[0] if desc else c.name > cursor[0])
            else:
                value = datetime.fromisoformat(cursor[0])
                if desc:
                    query = query.where(or_(col < value, and_(col == value, c.name < cursor[1])))
                else:
                    query = query.where(or_(col > value, and_(col == value, c.name > cursor[1])))
        query = query.order_by(col.desc() if desc else col.asc(), c.name.desc() if desc else c.name.asc()).limit(limit)
        return list((await self.s.execute(query)).all())

    async def all_rows(self):
        return list((await self.s.execute(select(t.deployments))).all())

    async def add_revision(self, deployment_id: int, rev: Revision) -> None:
        await self.s.execute(
            t.revisions.insert().values(
                deployment_id=deployment_id,
                revision=rev.revision,
                model_version=rev.model_version,
                cause=rev.cause,
                actor=rev.actor,
                create_time=rev.create_time,
            )
        )

    async def revisions(self, deployment_id: int, deployment: str, before: int | None, limit: int) -> builtins.list[Revision]:
        c = t.revisions.c
        query = select(t.revisions).where(c.deployment_id == deployment_id)
        if before is not None:
            query = query.where(c.revision < before)
        rows = (await self.s.execute(query.order_by(c.revision.desc()).limit(limit))).all()
        return [Revision(deployment, r.revision, r.model_version, r.cause, r.actor, aware(r.create_time)) for r in rows]

    async def revision(self, deployment_id: int, deployment: str, number: int) -> Revision | None:
        c = t.revisions.c
        r = (await self.s.execute(select(t.revisions).where(c.deployment_id == deployment_id, c.revision == number))).first()
        return Revision(deployment, r.revision, r.model_version, r.cause, r.actor, aware(r.create_time)) if r else None
