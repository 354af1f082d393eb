"""Recorded answers (judged_answers) on SQLAlchemy Core, SQLite and PostgreSQL: insert with duplicate keys skipped,
claim under a lease (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so replicas never claim the same answer), settle, and
count for the judging status."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from neuroweaver_runtime.timestamps import aware

from ..domain.experiment import ExperimentState
from ..domain.judging import AnswerState, JudgingStatus, PendingAnswer
from . import tables as t

_A = t.judged_answers.c


class SqlAnswerRepository:
    def __init__(self, session: AsyncSession, is_postgres: bool) -> None:
        self.s = session
        self.pg = is_postgres

    async def add(self, rows: Sequence[dict]) -> set[str]:
        """Inserts the rows whose (experiment, key) is new; returns the keys inserted."""
        if not rows:
            return set()
        insert = pg_insert if self.pg else sqlite_insert
        query = (
            insert(t.judged_answers)
            .values(list(rows))
            .on_conflict_do_nothing(index_elements=["experiment_id", "idempotency_key"])
            .returning(_A.idempotency_key)
        )
        return {r[0] for r in await self.s.execute(query)}

    async def claimable(self, now: float) -> list[tuple[int, str]]:
        """(key, name) of the RUNNING experiments with PENDING answers whose lease has expired."""
        e = t.experiments.c
        query = (
            select(e.id, e.name)
            .where(
                e.state == ExperimentState.RUNNING.value,
                select(_A.id)
                .where(_A.experiment_id == e.id, _A.state == AnswerState.PENDING.value, _A.lease_expires_at < now)
                .exists(),
            )
            .order_by(e.id)
        )
        return [(int(k), str(n)) for k, n in await self.s.execute(query)]

    async def claim(
        self, experiment_key: int, limit: int, owner: str, now: float, until: float, exclude: Sequence[int] = ()
    ) -> list[PendingAnswer]:
        """Leases up to `limit` claimable answers of the experiment to `owner`, oldest first (not those in `exclude`)."""
        pick = (
            select(_A.id)
            .where(_A.experiment_id == experiment_key, _A.state == AnswerState.PENDING.value, _A.lease_expires_at < now)
            .order_by(_A.id)
            .limit(limit)
        )
        if exclude:
            pick = pick.where(_A.id.notin_(list(exclude)))
        if self.pg:
            pick = pick.with_for_update(skip_locked=True)
        ids = [r[0] for r in await self.s.execute(pick)]
        if not ids:
            return []
        await self.s.execute(update(t.judged_answers).where(_A.id.in_(ids)).values(lease_owner=owner, lease_expires_at=until))
        e = t.experiments.c
        rows = await self.s.execute(
            select(t.judged_answers, e.name).join(t.experiments, e.id == _A.experiment_id).where(_A.id.in_(ids)).order_by(_A.id)
        )
        return [
            PendingAnswer(
                id=r.id,
                experiment_key=r.experiment_id,
                experiment=r.name,
                unit_id=r.unit_id,
                prompt=r.prompt,
                answer=r.answer,
                reference=r.reference,
                key=r.idempotency_key,
                judge_version=r.judge_version,
                metric=r.metric,
                answer_time=aware(r.answer_time) or r.answer_time,
                attempts=r.attempts,
            )
            for r in rows
        ]

    async def settle(
        self, answer_id: int, owner: str, state: AnswerState, now: datetime, *, score: float | None = None, error: str = ""
    ) -> bool:
        """Final state of a claimed answer (only while `owner` still holds it); False when it does not."""
        result = await self.s.execute(
            update(t.judged_answers)
            .where(_A.id == answer_id, _A.lease_owner == owner, _A.state == AnswerState.PENDING.value)
            .values(state=state.value, score=score, error=error, attempts=_A.attempts + 1, lease_owner="", update_time=now)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]  # DML executes to a CursorResult

    async def retry_later(self, answer_id: int, owner: str, error: str, not_before: float, now: datetime) -> None:
        """Back to PENDING with the error and one more attempt, claimable again after `not_before`."""
        await self.s.execute(
            update(t.judged_answers)
            .where(_A.id == answer_id, _A.lease_owner == owner, _A.state == AnswerState.PENDING.value)
            .values(error=error, attempts=_A.attempts + 1, lease_owner="", lease_expires_at=not_before, update_time=now)
        )

    async def renew(self, owner: str, ids: Sequence[int], until: float) -> None:
        """Extends `owner`'s leases of these answers (still being judged) to `until`."""
        if ids:
            await self.s.execute(
                update(t.judged_answers)
                .where(_A.id.in_(list(ids)), _A.lease_owner == owner, _A.state == AnswerState.PENDING.value)
                .values(lease_expires_at=until)
            )

    async def release(self, owner: str, ids: Sequence[int] | None = None) -> None:
        """Gives `owner`'s leases back (all of them, or `ids`) without counting an attempt."""
        query = update(t.judged_answers).where(_A.lease_owner == owner, _A.state == AnswerState.PENDING.value)
        if ids is not None:
            query = query.where(_A.id.in_(list(ids)))
        await self.s.execute(query.values(lease_owner="", lease_expires_at=0.0))

    async def set_lineage(self, experiment_key: int, event_key: str, judge_version: str) -> None:
        """Names the judge version on the score's metric event."""
        m = t.metric_events.c
        await self.s.execute(
            update(t.metric_events)
            .where(and_(m.experiment_id == experiment_key, m.idempotency_key == event_key))
            .values(judge_version=judge_version)
        )

    async def status(self, experiment_key: int, judge_version: str, metric: str) -> JudgingStatus:
        counts: dict[str, int] = dict(
            (
                await self.s.execute(select(_A.state, func.count()).where(_A.experiment_id == experiment_key).group_by(_A.state))
            ).all()
        )
        status = JudgingStatus(judge_version, metric)
        status.scored = int(counts.get(AnswerState.SCORED.value, 0))
        status.failed = int(counts.get(AnswerState.FAILED.value, 0))
        status.pending = int(counts.get(AnswerState.PENDING.value, 0))
        status.sampled = status.scored + status.failed + status.pending
        status.received = status.sampled + int(counts.get(AnswerState.SKIPPED.value, 0))
        last = (
            await self.s.execute(
                select(_A.error, _A.update_time)
                .where(_A.experiment_id == experiment_key, _A.error != "")
                .order_by(_A.update_time.desc(), _A.id.desc())
                .limit(1)
            )
        ).first()
        if last is not None:
            status.last_error, status.last_error_time = last[0], aware(last[1])
        return status
