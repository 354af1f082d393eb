"""Metric ingestion: validate a batch, drop duplicates, fold the rest into per-unit aggregates and per-variant
sufficient statistics, all in one transaction.

A batch is all-or-nothing: any bad event (unknown metric, unit never exposed, value not finite, event time
before the experiment started, another experiment's name) rejects the whole batch with INVALID_ARGUMENT whose
`BadRequest` names every bad event (`events[i].field`, the first 100) and whose ErrorInfo metadata carries
`first_bad_event_index`; a batch for an experiment that is not RUNNING is FAILED_PRECONDITION. Nothing is
applied partially, so a client may fix and resend the whole batch. Duplicates (idempotency keys already
recorded, or repeated within the batch) are skipped and counted.

The experiment row is read `FOR SHARE` inside the transaction, so a concurrent StopExperiment (which takes
the row `FOR UPDATE`) orders strictly before or after a batch: no event lands after the stop.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from neuroweaver_runtime.db import Database
from neuroweaver_runtime.errors import FieldViolation, InvalidArgument, NotFound
from neuroweaver_runtime.timestamps import utcnow

from ..adapters import tables as t
from ..adapters.repository import ExperimentsRepository, aware
from ..domain.aggregation import UnitAggregate, contribution_delta
from ..domain.experiment import EXPERIMENT, ExperimentState, require_running
from ..domain.statistics import MetricKind
from .assignments import Assigner

MAX_BATCH = 10_000
MAX_VIOLATIONS = 100

# (experiment, unit_id, metric, value, event_time or None, idempotency_key)
Event = tuple[str, str, str, float, datetime | None, str]


@dataclass
class IngestResult:
    accepted: int = 0
    duplicates: int = 0

    def __iadd__(self, other: IngestResult) -> IngestResult:
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        return self


class _Bad:
    def __init__(self) -> None:
        self.items: list[tuple[int, str, str, str]] = []

    def add(self, index: int, field: str, description: str, reason: str) -> None:
        if len(self.items) < MAX_VIOLATIONS:
            self.items.append((index, f"events[{index}].{field}", description, reason))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        index, field, description, reason = self.items[0]
        more = f" (and {len(self.items) - 1} more)" if len(self.items) > 1 else ""
        raise InvalidArgument(
            f"batch rejected, nothing was recorded: {field}: {description}{more}",
            reason=reason,
            metadata={"first_bad_event_index": str(index), "bad_events": str(len(self.items))},
            violations=[FieldViolation(f, d) for _, f, d, _ in self.items],
        )


class Ingestor:
    def __init__(self, db: Database, assigner: Assigner) -> None:
        self.db = db
        self.assigner = assigner

    async def record(self, experiment: str, events: Sequence[Event]) -> IngestResult:
        if len(events) > MAX_BATCH:
            raise InvalidArgument(
                f"at most {MAX_BATCH} events per batch, got {len(events)}; split the batch (or stream several messages)",
                field="events",
                reason="BATCH_TOO_LARGE",
                metadata={"max_events": str(MAX_BATCH), "events": str(len(events))},
            )
        if not events:
            return IngestResult()
        name = experiment or events[0][0]
        EXPERIMENT.parse(name, "experiment")
        snap = await self.assigner.snapshot(name)
        exp_id = snap.id
        bad = _Bad()
        for i, (e_exp, unit, metric, value, _, key) in enumerate(events):
            if e_exp and e_exp != name:
                bad.add(i, "experiment", f"event is for {e_exp}, the batch for {name}", "EXPERIMENT_MISMATCH")
            if not unit or len(unit) > 256:
                bad.add(i, "unit_id", "unit_id must be 1-256 characters", "INVALID_UNIT_ID")
            if not math.isfinite(value):
                bad.add(i, "value", f"value must be finite, got {value}", "INVALID_VALUE")
            if len(key) > 256:
                bad.add(i, "idempotency_key", "idempotency_key is at most 256 characters", "INVALID_IDEMPOTENCY_KEY")
            if len(metric) > 64:
                bad.add(i, "metric", "metric name is at most 64 characters", "UNKNOWN_METRIC")
        bad.raise_if_any()

        now = utcnow()
        async with self.db.transaction() as s:
            repo = ExperimentsRepository(s, self.db.is_postgres)
            query = select(t.experiments).where(t.experiments.c.id == exp_id)
            if self.db.is_postgres:
                query = query.with_for_update(read=True)
            row = (await s.execute(query)).first()
            if row is None:
                raise NotFound(f"experiment {name} does not exist", reason="EXPERIMENT_NOT_FOUND")
            state = ExperimentState(row.state)
            if state is not ExperimentState.RUNNING:
                exp = ExperimentsRepository.to_experiment(row)
                require_running(exp, "metric events are accepted")
            exp = snap.experiment if snap.experiment.revision == row.revision else ExperimentsRepository.to_experiment(row)
            start = aware(row.start_time)
            kinds = {m.name: m.kind for m in exp.metrics}

            # exposure: units with a stored assignment (cache first, then one query for the rest)
            known = self.assigner.cache.known(exp_id)
            unknown_units = list({u for _, u, *_ in events if u not in known})
            found = await repo.stored_assignments(exp_id, unknown_units) if unknown_units else {}
            if found:
                self.assigner.cache.put_many(exp_id, found)
            for i, (_, unit, metric, _, ts, _) in enumerate(events):
                if metric not in kinds:
                    bad.add(i, "metric", f"metric {metric!r} is not a metric of {name} (known: {sorted(kinds)})", "UNKNOWN_METRIC")
                if unit not in known and unit not in found:
                    bad.add(i, "unit_id", f"unit {unit!r} was never exposed (assign it with AssignVariant first)", "UNIT_NOT_EXPOSED")
                if ts is not None and start is not None and ts < start:
                    bad.add(i, "event_time", f"event time {ts.isoformat()} is before the experiment started ({start.isoformat()})", "EVENT_BEFORE_START")
            bad.raise_if_any()

            variant_of = {**known, **found} if found else known
            if self.db.is_postgres:
                return await self._record_pg(repo, exp_id, events, variant_of, kinds, now)

            # duplicates: keys seen before in this batch or in the store
            keyed: dict[str, int] = {}
            duplicates = 0
            take: list[int] = []
            for i, ev in enumerate(events):
                key = ev[5]
                if key:
                    if key in keyed:
                        duplicates += 1
                        continue
                    keyed[key] = i
                else:
                    take.append(i)
            if keyed:
                new_keys = await repo.insert_event_keys(exp_id, list(keyed))
                duplicates += len(keyed) - len(new_keys)
                take.extend(i for k, i in keyed.items() if k in new_keys)
                take.sort()
            if not take:
                return IngestResult(0, duplicates)

            await repo.insert_events(exp_id, [(events[i][1], events[i][2], events[i][3], events[i][4] or now, events[i][5] or None) for i in take])

            # per-unit aggregates of this batch
            agg: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0, 0])
            for i in take:
                _, unit, metric, value, _, _ = events[i]
                a = agg[(metric, unit)]
                a[0] += 1
                a[1] += value
                if value > 0:
                    a[2] += 1
            rows = sorted((m, u, variant_of[u], a[0], a[1], a[2]) for (m, u), a in agg.items())
            updated = await repo.upsert_unit_metrics(exp_id, rows)
            deltas: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0, 0.0])
            for metric, unit, count, total, positives in updated:
                added = agg[(metric, unit)]
                d = contribution_delta(
                    kinds[metric], UnitAggregate(int(count), float(total), int(positives)), UnitAggregate(added[0], added[1], added[2])
                )
                acc = deltas[(metric, variant_of[unit])]
                acc[0] += d.n
                acc[1] += d.sum
                acc[2] += d.sum_sq
            await repo.add_variant_stats(exp_id, {k: (v[0], v[1], v[2]) for k, v in deltas.items()})
        return IngestResult(len(take), duplicates)

    @staticmethod
    async def _record_pg(repo: ExperimentsRepository, exp_id: int, events: Sequence[Event], variant_of, kinds, now) -> IngestResult:
        """PostgreSQL: drop in-batch key repeats here, everything else in one set-based statement
        (`ExperimentsRepository.ingest_pg`)."""
        seen: set[str] = set()
        rows = []
        for _, unit, metric, value, ts, key in events:
            if key:
                if key in seen:
                    continue
                seen.add(key)
            rows.append((unit, metric, value, ts or now, key or None))
        units = {r[0] for r in rows}
        proportions = [m for m, k in kinds.items() if k is MetricKind.PROPORTION]
        accepted = await repo.ingest_pg(exp_id, rows, {u: variant_of[u] for u in units}, proportions)
        return IngestResult(accepted, len(events) - accepted)
