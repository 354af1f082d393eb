"""In-memory fakes of the experiments' repositories and unit of work (the use cases' ports, service/ports.py).

A transaction works on a deep copy of the store and swaps it in on a clean exit, so a failed use case leaves
nothing behind, as a rolled-back database transaction would. Objects handed out are copies: a use case changes
stored state only through the repositories. Ingestion takes the step-wise path (`set_based` is False), as on
SQLite. The API tests run the same use cases on the SQL repositories (SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

import pytest

from neuroweaver_experiments.domain.cuped import PairDelta, PairedStats
from neuroweaver_experiments.domain.experiment import Experiment, ExperimentState
from neuroweaver_experiments.domain.statistics import DecisionOutcome, SequentialState, SufficientStats
from neuroweaver_experiments.service.experiments import ExperimentsService
from neuroweaver_runtime.errors import DomainError
from neuroweaver_runtime.pagination import PageTokens
from neuroweaver_runtime.testing import Duplicate, FakeUnitOfWorkBase


@dataclass
class Store:
    last_key: int = 0
    experiments: dict[str, tuple[str, Experiment]] = field(default_factory=dict)  # name → (project, experiment)
    assignments: dict[tuple[int, str], str] = field(default_factory=dict)  # (experiment key, unit) → variant
    exposures: dict[tuple[int, int, int, str], int] = field(default_factory=dict)  # (key, epoch, class, variant) → units
    events: list[tuple[int, str, str, float, datetime, str | None]] = field(default_factory=list)
    unit_metrics: dict[tuple[int, str, str], list] = field(default_factory=dict)  # (key, metric, unit) → [n, Σ, positives]
    variant_stats: dict[tuple[int, str, str], PairedStats] = field(default_factory=dict)
    sequential: dict[tuple[int, str, str], SequentialState] = field(default_factory=dict)
    horizon: dict[int, DecisionOutcome] = field(default_factory=dict)
    requests: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # request_id → (method, fingerprint, name)

    def by_key(self, key: int) -> Experiment | None:
        return next((e for _, e in self.experiments.values() if e.key == key), None)


class _Repo:
    def __init__(self, store: Store) -> None:
        self.store = store


class FakeExperiments(_Repo):
    async def get(self, name: str, *, lock: bool = False) -> Experiment | None:
        found = self.store.experiments.get(name)
        return copy.deepcopy(found[1]) if found else None

    async def current(self, known: Experiment, *, share: bool = False) -> Experiment | None:
        stored = self.store.by_key(known.key)
        if stored is None:
            return None
        return known if stored.revision == known.revision else copy.deepcopy(stored)

    async def revision(self, key: int) -> int | None:
        stored = self.store.by_key(key)
        return stored.revision if stored else None

    async def project_version(self, project: str) -> int:
        return sum(e.revision for p, e in self.store.experiments.values() if p == project)

    async def running(self, project: str) -> list[Experiment]:
        found = [e for p, e in self.store.experiments.values() if p == project and e.state is ExperimentState.RUNNING]
        return [copy.deepcopy(e) for e in sorted(found, key=lambda e: e.name)]

    async def add(self, experiment: Experiment, project: str) -> None:
        if experiment.name in self.store.experiments:
            raise Duplicate(experiment.name)
        self.store.last_key += 1
        experiment.key, experiment.revision = self.store.last_key, 1
        self.store.experiments[experiment.name] = (project, copy.deepcopy(experiment))

    async def save(self, experiment: Experiment) -> None:
        project, stored = self.store.experiments[experiment.name]
        saved = copy.deepcopy(experiment)
        saved.revision = stored.revision + 1
        self.store.experiments[experiment.name] = (project, saved)

    async def page(self, project, filters, order_field, desc, cursor, limit):
        assert not filters and order_field == "name", "the fake lists by name only"
        names = sorted((n for n, (p, _) in self.store.experiments.items() if p == project), reverse=desc)
        if cursor is not None:
            names = [n for n in names if (n < cursor[1] if desc else n > cursor[1])]
        page = [await self.get(n) for n in names[: limit + 1]]
        last = page[limit - 1] if len(page) > limit else None
        return page[:limit], ([last.name, last.name] if last else None)


class FakeAssignments(_Repo):
    async def stored(self, key: int, units: Sequence[str]) -> dict[str, str]:
        return {u: self.store.assignments[(key, u)] for u in units if (key, u) in self.store.assignments}

    async def add(self, key: int, rows: Sequence[tuple[str, str, int, int, int]], now: datetime) -> set[str]:
        inserted = set()
        for unit, variant, _, epoch, klass in rows:
            if (key, unit) not in self.store.assignments:
                self.store.assignments[(key, unit)] = variant
                cell = (key, epoch, klass, variant)
                self.store.exposures[cell] = self.store.exposures.get(cell, 0) + 1
                inserted.add(unit)
        return inserted

    async def exposures(self, key: int) -> dict[tuple[int, int], dict[str, int]]:
        out: dict[tuple[int, int], dict[str, int]] = {}
        for (k, epoch, klass, variant), n in self.store.exposures.items():
            if k == key:
                out.setdefault((epoch, klass), {})[variant] = n
        return out


class FakeMetrics(_Repo):
    set_based = False

    async def ingest(self, key, events, variant_of, proportion_metrics, now) -> int:
        raise AssertionError("not set-based: the use case folds batches step by step")

    async def add_events(
        self, key: int, events: Sequence[tuple[str, str, float, datetime, str | None, float | None]]
    ) -> set[str]:
        stored = {e[5] for e in self.store.events if e[0] == key and e[5] is not None}
        new = set()
        for unit, metric, value, time, idem, _covariate in events:
            if idem is not None and idem in stored:
                continue
            self.store.events.append((key, unit, metric, value, time, idem))
            if idem is not None:
                new.add(idem)
        return new

    async def add_unit_metrics(self, key: int, rows: Sequence[tuple[str, str, str, int, float, int, float | None]]):
        out = []
        for metric, unit, _variant, n, total, positives, covariate in rows:
            agg = self.store.unit_metrics.setdefault((key, metric, unit), [0, 0.0, 0, None, None])
            agg[0], agg[1], agg[2] = agg[0] + n, agg[1] + total, agg[2] + positives
            if agg[3] is None and covariate is not None:
                agg[3], agg[4] = covariate, agg[0]
            out.append((metric, unit, agg[0], agg[1], agg[2], agg[3], agg[4]))
        return out

    async def add_variant_stats(self, key: int, deltas: dict[tuple[str, str], PairDelta]) -> None:
        for (metric, variant), delta in deltas.items():
            old = self.store.variant_stats.get((key, metric, variant), PairedStats())
            self.store.variant_stats[(key, metric, variant)] = delta.apply(old)

    async def variant_stats(self, key: int) -> dict[str, dict[str, SufficientStats]]:
        out: dict[str, dict[str, SufficientStats]] = {}
        for (k, metric, variant), stats in self.store.variant_stats.items():
            if k == key:
                out.setdefault(metric, {})[variant] = stats.y
        return out

    async def covariate_stats(self, key: int) -> dict[str, dict[str, PairedStats | None]]:
        out: dict[str, dict[str, PairedStats | None]] = {}
        for (k, metric, variant), stats in self.store.variant_stats.items():
            if k == key:
                out.setdefault(metric, {})[variant] = stats
        return out

    async def sequential_states(self, key: int) -> dict[str, dict[str, SequentialState]]:
        out: dict[str, dict[str, SequentialState]] = {}
        for (k, metric, variant), state in self.store.sequential.items():
            if k == key:
                out.setdefault(metric, {})[variant] = state
        return out

    async def save_sequential_states(self, key: int, states: dict[tuple[str, str], SequentialState]) -> None:
        for (metric, variant), state in states.items():
            self.store.sequential[(key, metric, variant)] = state

    async def horizon_decision(self, key: int) -> DecisionOutcome | None:
        return self.store.horizon.get(key)

    async def save_horizon_decision(self, key: int, outcome: DecisionOutcome, now: datetime) -> None:
        self.store.horizon.setdefault(key, outcome)


class FakeUnitOfWork(FakeUnitOfWorkBase):
    def __init__(self, store: Store) -> None:
        super().__init__(store.requests)
        self.store = store
        self.experiments, self.assignments, self.metrics = FakeExperiments(store), FakeAssignments(store), FakeMetrics(store)


class FakeUnitOfWorkFactory:
    def __init__(self) -> None:
        self.store = Store()
        self.commits = self.rollbacks = 0

    @asynccontextmanager
    async def transaction(self):
        work = copy.deepcopy(self.store)
        try:
            yield FakeUnitOfWork(work)
        except BaseException:
            self.rollbacks += 1
            raise
        self.store = work
        self.commits += 1


class FakeDeployer:
    """Endpoints from a dict; `move` changes one (as a deployer restart does) and wakes the watches; while `outage`
    is set, watches fail with it (the deployer is unreachable)."""

    def __init__(self) -> None:
        self.endpoints: dict[str, object] = {}
        self.outage: DomainError | None = None
        self._watches: set[asyncio.Event] = set()

    async def endpoint(self, deployment: str) -> object:
        return self.endpoints[deployment]

    def move(self, deployment: str, endpoint: object) -> None:
        self.endpoints[deployment] = endpoint
        for woken in self._watches:
            woken.set()

    def fail(self, outage: DomainError | None) -> None:
        self.outage = outage
        for woken in self._watches:
            woken.set()

    async def watch(self, deployment: str) -> AsyncIterator[object]:
        woken = asyncio.Event()
        self._watches.add(woken)
        try:
            while True:
                if self.outage is not None:
                    raise self.outage
                yield self.endpoints[deployment]
                woken.clear()
                await woken.wait()
        finally:
            self._watches.discard(woken)


class FakeRegistry:
    """Records alias moves; `refuse` makes the next one fail with that error."""

    def __init__(self) -> None:
        self.moves: list[tuple[str, str, str, str]] = []
        self.refuse: DomainError | None = None

    async def set_alias(self, model: str, alias: str, version: str, expected_version: str, reason: str) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.moves.append((model, alias, version, expected_version))


@dataclass
class Fakes:
    service: ExperimentsService
    uow: FakeUnitOfWorkFactory
    deployer: FakeDeployer
    registry: FakeRegistry

    @property
    def store(self) -> Store:
        return self.uow.store


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    uow, deployer, registry = FakeUnitOfWorkFactory(), FakeDeployer(), FakeRegistry()
    # snapshot_ttl 0: every call revalidates its snapshot against the store (as another replica's writes would need)
    service = ExperimentsService(uow, PageTokens("unit-test-secret"), deployer, registry, snapshot_ttl=0.0)
    yield Fakes(service, uow, deployer, registry)
    await service.close()  # the endpoint watches
