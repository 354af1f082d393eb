"""Local evaluation: the assignment configs SDKs evaluate in-process, and the batches of exposures and metric events
they send back.

`watch` yields a snapshot of the project's RUNNING experiments, then each change. The stored part of the config
version is the sum of the project's experiments' revisions (`ExperimentRepository.project_version`): every write
through any replica bumps it, so polling it (one indexed aggregate every `poll` seconds, sooner after a local write)
notices other replicas' changes too. Endpoints are the deployer's current ones (`LiveEndpoints`); a move of one is a
change too, so the version sent is `stored << 20 | moves`, `moves` counting this process's endpoint moves: strictly
increasing on one stream; a stream resumed on another replica (other `moves`) starts with a snapshot.

`ingest` stores one batch: exposures first, validated against the phase they name (experiment RUNNING, the phase
exists, the unit's bucket is inside that phase's coverage and the phase assigns it `variant`), through the same
group-commit writer as AssignVariant (`INSERT ... ON CONFLICT DO NOTHING`, first exposures counted per epoch, bucket
class and variant, so the sample-ratio test stays right); a unit already stored with another variant is a conflict
and its stored variant is returned. Then the metric events, through the metric ingest use case (idempotency keys),
one transaction per experiment. The caller acknowledges the batch only after both committed, so a batch resent after a
disconnect changes nothing that was stored before: exposures are idempotent per unit, events per key. A stream may
store several batches at once (`store(..., after=previous)`): their exposures share the writer's transactions, their
events follow in batch order, and the acknowledgements stay in order.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime

from neuroweaver_runtime.assignment import BucketClasses, PhasedPlan, hash_buckets
from neuroweaver_runtime.errors import DomainError, FieldViolation, InvalidArgument
from neuroweaver_runtime.names import PROJECT

from ..domain.experiment import EXPERIMENT, UNRECORDED_CLASS, Experiment, require_running
from .assignments import Assigner, Snapshot
from .endpoints import LiveEndpoints
from .ingest import MAX_BATCH, EventBatch, Ingestor
from .ports import UnitOfWorkFactory

MAX_EXPOSURES = 10_000
_MOVES_BITS = 20  # low bits of a config version: endpoint moves seen by this process
_MOVES_MASK = (1 << _MOVES_BITS) - 1
MAX_VIOLATIONS = 100


@dataclass(frozen=True, slots=True)
class ExposureIn:
    experiment: str
    unit_id: str
    variant: str
    epoch: int
    time: datetime | None = None  # not stored: the first exposure's time is when it is stored


@dataclass
class ConfigChange:
    version: int
    snapshot: bool
    configs: list[Experiment]
    removed: list[str]


@dataclass
class IngestOutcome:
    exposures_accepted: int = 0
    exposures_duplicate: int = 0
    conflicts: list[tuple[str, str, str]] = field(default_factory=list)  # (experiment, unit, stored variant)
    events_accepted: int = 0
    events_duplicate: int = 0


@dataclass
class CheckedBatch:
    # experiment → (snapshot, [(index, unit, variant, bucket, epoch, bucket class)]) of the exposures to store
    rows: dict[str, tuple[Snapshot, list[tuple[int, str, str, int, int, int]]]]
    events: EventBatch
    outcome: IngestOutcome  # duplicates within the batch, counted while checking


class _Plans:
    """Per experiment revision: the phased plan and each epoch's bucket → class table (built on first use)."""

    def __init__(self, exp: Experiment) -> None:
        self.revision = exp.revision
        phases = exp.weights_history or [exp.weights]
        self.plan = PhasedPlan(exp.hash_seed, phases, exp.coverage)
        self._classes = BucketClasses(phases, exp.coverage)
        self._tables: dict[int, list[int | None]] = {}

    def variants(self, epoch: int) -> list[int | None]:
        """bucket → what phase `epoch` assigns (None outside its coverage)."""
        return self.plan.plans[epoch].table

    def klass(self, epoch: int, bucket: int) -> int:
        table = self._tables.get(epoch)
        if table is None:
            table = self._tables[epoch] = self._classes.table(epoch)
        key = table[bucket]
        return UNRECORDED_CLASS if key is None else key


class LocalEvaluation:
    def __init__(
        self, uow: UnitOfWorkFactory, assigner: Assigner, ingestor: Ingestor, endpoints: LiveEndpoints, *, poll: float = 0.25
    ) -> None:
        self.uow = uow
        self.assigner = assigner
        self.ingestor = ingestor
        self.endpoints = endpoints
        self.poll = poll
        self._plans: dict[int, _Plans] = {}
        self._changed = asyncio.Event()  # set by local writes: watches look at once instead of at the next poll
        self._moves = 0  # endpoint moves reported by the deployer (LiveEndpoints)
        # project → (stored version, when read): one query per project per poll however many watches are open
        self._versions: dict[str, tuple[int, float]] = {}
        self._reading: dict[str, asyncio.Future[int]] = {}
        self._writes = 0  # local writes so far: a read that started before one is not cached

    def changed(self) -> None:
        self._versions.clear()  # a local write: the next look reads the store
        self._reading.clear()
        self._writes += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def endpoint_moved(self) -> None:
        self._moves += 1
        self.changed()

    def _version(self, stored: int, moves: int) -> int:
        return (stored << _MOVES_BITS) | (moves & _MOVES_MASK)

    # -- watch -----------------------------------------------------------------------------------------------

    async def watch(self, parent: str, since_version: int) -> AsyncIterator[ConfigChange]:
        project = PROJECT.parse(parent, "parent")["project"]
        if since_version < 0:
            raise InvalidArgument("since_version must be >= 0", field="since_version", reason="INVALID_VERSION")
        sent: dict[str, tuple[int, tuple[tuple[str, str, str], ...]]] = {}  # name → (revision, endpoints) last sent
        stored, moves = since_version >> _MOVES_BITS, since_version & _MOVES_MASK
        first = True
        while True:
            changed = self._changed
            now_moves = self._moves
            current = await self._stored_version(project)
            running = None
            if first or current != stored or now_moves != moves:
                async with self.uow.transaction() as uow:
                    running = await uow.experiments.running(project)
            if running is not None:
                for exp in running:
                    await self.endpoints.apply(exp)
                now = {e.name: (e.revision, tuple((v.endpoint, v.openai_base_url, v.model) for v in e.variants)) for e in running}
                version = self._version(current, now_moves)
                if first:
                    if since_version == 0 or version != since_version:
                        yield ConfigChange(version, True, running, [])
                else:
                    configs = [e for e in running if sent.get(e.name) != now[e.name]]
                    removed = sorted(set(sent) - set(now))
                    if configs or removed:
                        yield ConfigChange(version, False, configs, removed)
                sent, stored, moves, first = now, current, now_moves, False
            try:
                await asyncio.wait_for(changed.wait(), self.poll)
            except TimeoutError:
                pass

    async def _stored_version(self, project: str) -> int:
        """The project's stored config version, read at most once per `poll` seconds for all watches (single flight)."""
        cached = self._versions.get(project)
        if cached is not None and time.monotonic() - cached[1] < self.poll * 0.8:
            return cached[0]
        reading = self._reading.get(project)
        if reading is None:
            reading = self._reading[project] = asyncio.ensure_future(self._read_version(project))
        return await asyncio.shield(reading)

    async def _read_version(self, project: str) -> int:
        writes, started = self._writes, time.monotonic()
        reading = self._reading.get(project)
        try:
            async with self.uow.transaction() as uow:
                version = await uow.experiments.project_version(project)
            if writes == self._writes:
                self._versions[project] = (version, started)
            return version
        finally:
            if self._reading.get(project) is reading:
                self._reading.pop(project, None)

    # -- ingest ----------------------------------------------------------------------------------------------

    def _plans_for(self, snap: Snapshot) -> _Plans:
        plans = self._plans.get(snap.id)
        if plans is None or plans.revision != snap.experiment.revision:
            plans = self._plans[snap.id] = _Plans(snap.experiment)
        return plans

    async def ingest(self, exposures: list[ExposureIn], events: EventBatch) -> IngestOutcome:
        return await self.store(await self.check(exposures, events))

    async def check(self, exposures: list[ExposureIn], events: EventBatch) -> CheckedBatch:
        """Validates a batch's exposures against the phases they name (no writes: a stream checks batch k+1 while
        batch k is stored)."""
        if len(exposures) > MAX_EXPOSURES:
            raise InvalidArgument(
                f"at most {MAX_EXPOSURES} exposures per batch, got {len(exposures)}", field="exposures", reason="BATCH_TOO_LARGE"
            )
        if len(events) > MAX_BATCH:
            raise InvalidArgument(
                f"at most {MAX_BATCH} events per batch, got {len(events)}", field="events", reason="BATCH_TOO_LARGE"
            )
        out = IngestOutcome()
        bad: list[FieldViolation] = []
        reasons: list[str] = []

        def violation(i: int, name: str, description: str, reason: str) -> None:
            if len(bad) < MAX_VIOLATIONS:
                bad.append(FieldViolation(f"exposures[{i}].{name}", description))
                reasons.append(reason)

        by_experiment: dict[str, list[int]] = {}
        for i, x in enumerate(exposures):
            indices = by_experiment.get(x.experiment)
            if indices is None:  # each name parsed once per batch
                EXPERIMENT.parse(x.experiment, f"exposures[{i}].experiment")
                indices = by_experiment[x.experiment] = []
            indices.append(i)
        rows: dict[str, tuple[Snapshot, list[tuple[int, str, str, int, int, int]]]] = {}
        for name, indices in by_experiment.items():
            snap = await self.assigner.snapshot(name, f"exposures[{indices[0]}].experiment")
            if max(exposures[i].epoch for i in indices) > snap.experiment.epoch:  # the SDK saw a newer phase first
                self.assigner.invalidate(name)
                snap = await self.assigner.snapshot(name, f"exposures[{indices[0]}].experiment")
            require_running(snap.experiment, "exposures are accepted")
            plans = self._plans_for(snap)
            ids = snap.experiment.variant_ids
            last = snap.experiment.epoch
            buckets = hash_buckets(snap.experiment.hash_seed, [exposures[i].unit_id for i in indices])  # vectorised
            seen: set[str] = set()
            items = []
            for i, bucket in zip(indices, buckets, strict=True):  # the hot loop of IngestEvents: locals only
                x = exposures[i]
                unit, variant, epoch = x.unit_id, x.variant, x.epoch
                if not unit or len(unit) > 256:
                    violation(i, "unit_id", "unit_id must be 1-256 characters", "INVALID_UNIT_ID")
                    continue
                if not 0 <= epoch <= last:
                    violation(i, "epoch", f"{name} has phases 0..{last}, not {epoch}", "UNKNOWN_EPOCH")
                    continue
                if variant not in ids:
                    violation(i, "variant", f"{variant!r} is not a variant of {name} (variants: {ids})", "UNKNOWN_VARIANT")
                    continue
                expected = plans.variants(epoch)[bucket]
                if expected is None:
                    violation(
                        i, "unit_id", f"unit {unit!r} is outside the coverage of phase {epoch}: no exposure", "NOT_IN_COVERAGE"
                    )
                    continue
                if ids[expected] != variant:
                    violation(
                        i,
                        "variant",
                        f"phase {epoch} assigns unit {unit!r} {ids[expected]!r}, not {variant!r}",
                        "VARIANT_MISMATCH",
                    )
                    continue
                if unit in seen:  # repeated in this batch
                    out.exposures_duplicate += 1
                    continue
                seen.add(unit)
                items.append((i, unit, variant, bucket, epoch, plans.klass(epoch, bucket)))
            rows[name] = (snap, items)
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise InvalidArgument(
                f"batch rejected, nothing was recorded: {bad[0].field}: {bad[0].description}{more}",
                reason=reasons[0],
                violations=bad,
            )
        return CheckedBatch(rows, events, out)

    async def store(self, batch: CheckedBatch, after: asyncio.Future | None = None) -> IngestOutcome:
        """Stores a checked batch: exposures (one group commit), then its metric events; returns once both committed.

        `after`: the store of the stream's previous batch, when batches are stored concurrently. The exposures of both
        go to the group-commit writer at once (they share transactions), but this batch's events wait until `after`
        is done, so an event always finds its unit's exposure from an earlier batch stored (events of one stream are
        recorded in batch order, as before)."""
        rows, events, out = batch.rows, batch.events, batch.outcome
        for name, (snap, items) in rows.items():
            known = self.assigner.cache.known(snap.id)
            todo = []
            for item in items:
                stored = known.get(item[1])
                if stored is None:
                    todo.append(item)
                elif stored == item[2]:
                    out.exposures_duplicate += 1
                else:
                    out.conflicts.append((name, item[1], stored))
            if not todo:
                continue
            variants, mine = await self.assigner.writer.resolve_new(snap.id, [(u, v, b, e, k) for _, u, v, b, e, k in todo])
            out.exposures_accepted += len(mine)
            if len(mine) < len(todo):  # the others were stored before (or by another request of the same group)
                first = set(mine)
                for _, unit, variant, *_ in todo:
                    if unit in first:
                        continue
                    held = variants.get(unit)
                    if held == variant:
                        out.exposures_duplicate += 1
                    else:
                        out.conflicts.append((name, unit, held or ""))
            # AssignVariant's memos of "outside the coverage, nothing stored" for these units are stale now
            if snap.outside:
                snap.outside.difference_update(mine)
            if snap.replies:
                for unit in mine:
                    snap.replies.pop(unit, None)

        if after is not None:
            await asyncio.wait({after})
            if after.cancelled() or after.exception() is not None:  # the stream ends with that batch's error
                raise asyncio.CancelledError("the stream's previous batch was not stored")
        if len(events):
            groups: dict[str, list[int]] = {}
            for i, e_exp in enumerate(events.experiments):
                if not e_exp:
                    raise InvalidArgument(
                        "every event names its experiment in IngestEvents",
                        field=f"events[{i}].experiment",
                        reason="MISSING_EXPERIMENT",
                    )
                groups.setdefault(e_exp, []).append(i)
            for name, indices in groups.items():
                part = events if len(groups) == 1 else _select(events, indices)
                try:
                    result = await self.ingestor.record(name, part)
                except DomainError as exc:
                    if len(groups) > 1:  # the error names events of this experiment's part: name them in the batch
                        _to_batch_indices(exc, indices)
                    raise
                out.events_accepted += result.accepted
                out.events_duplicate += result.duplicates
        return out


_EVENT_FIELD = re.compile(r"\bevents\[(\d+)\]")


def _to_batch_indices(exc: DomainError, indices: list[int]) -> None:
    """Rewrites `events[j]` (j within one experiment's part of a batch) to the event's index in the whole batch."""
    exc.violations = [
        FieldViolation(_EVENT_FIELD.sub(lambda m: f"events[{indices[int(m.group(1))]}]", v.field), v.description)
        for v in exc.violations
    ]
    first = exc.metadata.get("first_bad_event_index")
    if first is not None and first.isdigit() and int(first) < len(indices):
        exc.metadata["first_bad_event_index"] = str(indices[int(first)])
    exc.message = _EVENT_FIELD.sub(lambda m: f"events[{indices[int(m.group(1))]}]", exc.message)


def _select(events: EventBatch, indices: list[int]) -> EventBatch:
    return EventBatch(
        [events.experiments[i] for i in indices],
        [events.unit_ids[i] for i in indices],
        [events.metrics[i] for i in indices],
        [events.values[i] for i in indices],
        [events.times[i] for i in indices],
        [events.keys[i] for i in indices],
        [events.covariates[i] for i in indices],
    )
