"""Assignment: cached experiment snapshots, the sticky-unit cache and a group-commit writer.

Hot path of AssignVariant: a snapshot lookup (experiment + its `AssignmentPlan`, cached per experiment and
re-validated against the stored revision at most once per `snapshot_ttl` seconds, dropped at once by local
writes), a hash, and a dict lookup of the unit's sticky variant. Only a unit this process has not seen goes
to the database, and it does not go alone: `AssignmentWriter` gathers the new units of all concurrent
requests and writes them in one transaction (`INSERT ... ON CONFLICT DO NOTHING`, then reads back the units
some other writer stored first, then counts the first exposures per epoch, bucket class and variant: what the
sample-ratio test expects, see `domain.assignment`), and every waiting request is
answered after that commit. So an answered assignment is durable, and throughput does not cost one
transaction per request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from neuroweaver_runtime.errors import InvalidArgument, NotFound
from neuroweaver_runtime.timestamps import utcnow

from ..domain.assignment import Assignment, AssignmentPlan, BucketClasses
from ..domain.experiment import EXPERIMENT, UNRECORDED_CLASS, Experiment
from .ports import UnitOfWorkFactory

MAX_CACHED_UNITS = 2_000_000  # per process; the cache is cleared when it grows past this (the store stays exact)
MAX_CACHED_REPLIES = 500_000  # per experiment snapshot (rendered AssignVariant replies, ~0.3 KB each)


@dataclass
class Snapshot:
    id: int
    experiment: Experiment
    plan: AssignmentPlan
    checked: float
    # bucket → bucket class of the current epoch (None outside its coverage), recorded with each first exposure
    classes: list[int | None] = field(default_factory=list)
    # Units of the current plan that are outside the coverage and have no stored assignment.
    outside: set[str] = field(default_factory=set)
    # unit → rendered reply (the API layer's response object) of units whose answer cannot change while this
    # snapshot is current: a stored (sticky) assignment, or outside the coverage of this plan. Dropped with
    # the snapshot, i.e. on any revision change (weights, coverage, state) — see `Assigner.fresh`.
    replies: dict[str, object] = field(default_factory=dict)


class StickyCache:
    """unit → variant of stored assignments, per experiment id. Entries never go stale (assignments are
    sticky forever); the cache only bounds its size."""

    def __init__(self) -> None:
        self._units: dict[int, dict[str, str]] = {}
        self._size = 0

    def get(self, experiment_id: int, unit: str) -> str | None:
        units = self._units.get(experiment_id)
        return units.get(unit) if units else None

    def known(self, experiment_id: int) -> dict[str, str]:
        return self._units.get(experiment_id, {})

    def put_many(self, experiment_id: int, items: dict[str, str]) -> None:
        if self._size + len(items) > MAX_CACHED_UNITS:
            self._units.clear()
            self._size = 0
        units = self._units.setdefault(experiment_id, {})
        before = len(units)
        units.update(items)
        self._size += len(units) - before


class AssignmentWriter:
    """Group commit of new assignments (see the module docstring)."""

    def __init__(self, uow: UnitOfWorkFactory, cache: StickyCache) -> None:
        self.uow = uow
        self.cache = cache
        # experiment id → unit → (variant or None for lookup-only, bucket, epoch, bucket class, owner); epoch and class
        # per unit: requests of one batch may come from snapshots on either side of a weight change. The owner is the
        # waiter of the request whose row is written: only it stored the unit's first exposure (another request of
        # the same unit in the same group gets a duplicate, or a conflict when it named another variant).
        self._pending: dict[int, dict[str, tuple[str | None, int, int, int, asyncio.Future]]] = {}
        # one future per waiting request (not per unit: an IngestEvents batch brings thousands of units)
        self._waiters: list[asyncio.Future] = []
        self._task: asyncio.Task | None = None

    async def resolve(self, experiment_id: int, items: list[tuple[str, str | None, int, int, int]]) -> list[str | None]:
        """For each (unit, fresh variant or None, bucket, epoch, bucket class): the stored variant after this call
        (inserting the fresh one when the unit has none), or None when the unit has none and `fresh` was None."""
        stored, _ = await self.resolve_new(experiment_id, items)
        return [stored.get(unit) for unit, *_ in items]

    async def resolve_new(
        self, experiment_id: int, items: list[tuple[str, str | None, int, int, int]]
    ) -> tuple[dict[str, str], list[str]]:
        """As `resolve`, for IngestEvents: unit → stored variant (covering every stored unit of `items`), and the units
        whose first exposure this call stored (those counted in the exposure counts)."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        units = self._pending.get(experiment_id)
        if units is None:  # the first request of this group for the experiment (a whole IngestEvents batch): no merge
            self._pending[experiment_id] = {u: (v, b, e, k, fut) for u, v, b, e, k in items}
        else:
            for unit, variant, bucket, epoch, klass in items:
                entry = units.get(unit)
                # a lookup joined by an exposure (or a fresh assignment): the one with a variant is written
                if entry is None or (entry[0] is None and variant is not None):
                    units[unit] = (variant, bucket, epoch, klass, fut)
        self._waiters.append(fut)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        stored, owners = (await fut)[experiment_id]
        return stored, owners.get(fut, [])

    async def _run(self) -> None:
        await asyncio.sleep(0)  # let requests that arrived in the same loop iteration join this batch
        while self._pending:
            batch, self._pending = self._pending, {}
            waiters, self._waiters = self._waiters, []
            try:
                results = await self._write(batch)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure
                for f in waiters:
                    if not f.done():
                        f.set_exception(exc)
                continue
            for exp_id, (stored, _) in results.items():
                self.cache.put_many(exp_id, stored)
            for f in waiters:
                if not f.done():
                    f.set_result(results)

    async def _write(self, batch) -> dict[int, tuple[dict[str, str], dict[asyncio.Future, list[str]]]]:
        """One transaction for the group: per experiment, unit → stored variant, and per request (its waiter) the
        units whose first exposure it stored."""
        now = utcnow()
        out: dict[int, tuple[dict[str, str], dict[asyncio.Future, list[str]]]] = {}
        async with self.uow.transaction() as uow:
            for exp_id in sorted(batch):
                units = batch[exp_id]
                rows = [(u, v, b, e, k) for u, (v, b, e, k, _) in units.items() if v is not None]
                rows.sort()  # key order: concurrent writers lock rows alike
                inserted = await uow.assignments.add(exp_id, rows, now)  # PostgreSQL: one round trip
                stored: dict[str, str] = {}
                if len(inserted) < len(units):  # units stored before (or by a concurrent writer): read them back
                    stored.update(await uow.assignments.stored(exp_id, [u for u in units if u not in inserted]))
                owners: dict[asyncio.Future, list[str]] = {}
                for u in inserted:
                    variant, _, _, _, owner = units[u]
                    stored[u] = variant
                    mine = owners.get(owner)
                    if mine is None:
                        mine = owners[owner] = []
                    mine.append(u)
                out[exp_id] = (stored, owners)
        return out


class Assigner:
    def __init__(self, uow: UnitOfWorkFactory, *, snapshot_ttl: float = 1.0) -> None:
        self.uow = uow
        self.ttl = snapshot_ttl
        self.cache = StickyCache()
        self.writer = AssignmentWriter(uow, self.cache)
        self._snapshots: dict[str, Snapshot] = {}
        # One (re)validation per experiment at a time: when the TTL runs out under load, every request in flight
        # would otherwise run its own query (and the pool opens overflow connections for them).
        self._loading: dict[str, asyncio.Future[Snapshot]] = {}

    def invalidate(self, name: str) -> None:
        self._snapshots.pop(name, None)
        self._loading.pop(name, None)  # a load that started before the change must not be joined or installed

    def fresh(self, name: str) -> Snapshot | None:
        """The cached snapshot if it was validated less than `ttl` seconds ago (no I/O), else None.
        Consistency bound: a change committed by another replica is seen at most `ttl` seconds later (local
        changes drop the snapshot at once)."""
        snap = self._snapshots.get(name)
        if snap is not None and time.monotonic() - snap.checked < self.ttl:
            return snap
        return None

    def remember_reply(self, snap: Snapshot, unit: str, assignment: Assignment, reply: object) -> None:
        """Memoize the reply of a unit whose answer is fixed for this snapshot (sticky, or outside coverage)."""
        if not (assignment.sticky or assignment.variant is None) or self._snapshots.get(snap.experiment.name) is not snap:
            return
        if len(snap.replies) >= MAX_CACHED_REPLIES:
            snap.replies.clear()
        snap.replies[unit] = reply

    async def snapshot(self, name: str, field: str = "experiment") -> Snapshot:
        snap = self._snapshots.get(name)
        if snap is not None and time.monotonic() - snap.checked < self.ttl:
            return snap
        EXPERIMENT.parse(name, field)
        loading = self._loading.get(name)
        if loading is None:
            loading = self._loading[name] = asyncio.ensure_future(self._load(name, snap))
            loading.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if no caller waits
        return await asyncio.shield(loading)  # a cancelled caller does not cancel the others' load

    async def _load(self, name: str, snap: Snapshot | None) -> Snapshot:
        """Revalidate `snap` (one `SELECT revision`) or read the experiment; install the result unless the
        experiment was invalidated meanwhile."""
        this = asyncio.current_task()
        now = time.monotonic()
        try:
            async with self.uow.transaction() as uow:
                if snap is not None and await uow.experiments.revision(snap.id) == snap.experiment.revision:
                    snap.checked = now
                    return snap
                exp = await uow.experiments.get(name)
            if exp is None:
                raise NotFound(f"experiment {name} does not exist", reason="EXPERIMENT_NOT_FOUND", metadata={"experiment": name})
            plan = AssignmentPlan(exp.hash_seed, exp.weights, exp.coverage)
            classes = BucketClasses(exp.weights_history or [exp.weights], exp.coverage).table(exp.epoch)
            fresh = Snapshot(exp.key, exp, plan, now, classes=classes)
            if self._loading.get(name) is this:
                self._snapshots[name] = fresh
            return fresh
        finally:
            if self._loading.get(name) is this:
                del self._loading[name]

    async def assign_many(self, snap: Snapshot, units: list[str]) -> list[Assignment]:
        """Sticky-or-hash assignment of each unit, persisting first exposures of in-coverage units."""
        exp = snap.experiment
        ids = exp.variant_ids
        index = {v: i for i, v in enumerate(ids)}
        known = self.cache.known(snap.id)
        results: list[Assignment | None] = [None] * len(units)
        todo: list[tuple[int, str, Assignment]] = []
        for i, unit in enumerate(units):
            if not unit or len(unit) > 256:
                field = "unit_id" if len(units) == 1 else f"unit_ids[{i}]"
                raise InvalidArgument("unit_id must be 1-256 characters", field=field, reason="INVALID_UNIT_ID")
            fresh = snap.plan.assign(unit)
            stored = known.get(unit)
            if stored is not None and stored in index:
                results[i] = Assignment(index[stored], fresh.bucket, sticky=True)
            elif not fresh.in_experiment and unit in snap.outside:
                results[i] = fresh
            else:
                todo.append((i, unit, fresh))
        if todo:
            items: list[tuple[str, str | None, int, int, int]] = []
            for _, unit, a in todo:
                klass = snap.classes[a.bucket]  # None exactly where a.variant is None: same plan
                variant = None if a.variant is None else ids[a.variant]
                items.append((unit, variant, a.bucket, exp.epoch, UNRECORDED_CLASS if klass is None else klass))
            stored_variants = await self.writer.resolve(snap.id, items)
            for (i, unit, fresh), stored in zip(todo, stored_variants, strict=True):
                if stored is not None and stored in index:
                    results[i] = Assignment(index[stored], fresh.bucket, sticky=True)
                else:
                    if len(snap.outside) > MAX_CACHED_UNITS:
                        snap.outside.clear()
                    snap.outside.add(unit)
                    results[i] = fresh
        return [r for r in results if r is not None]
