"""What the use cases need from storage: repositories of domain objects inside a unit of work.

`adapters/` implements these on SQLAlchemy (SQLite and PostgreSQL; the hot paths go straight to asyncpg); the unit
tests implement them in memory. Experiments are addressed by `Experiment.key` once stored. Lists take and return
an opaque keyset cursor (a list of JSON values) that the use cases sign into page tokens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from datetime import datetime
from typing import Protocol

from neuroweaver_runtime.errors import DomainError
from neuroweaver_runtime.filtering import Comparison

from ..domain.cuped import PairDelta, PairedStats
from ..domain.experiment import Experiment
from ..domain.statistics import DecisionOutcome, SequentialState, SufficientStats

# One ingest batch as columns: units, metrics, values, event times (None = the batch's time), keys ("" = none).
EventColumns = tuple[list[str], list[str], list[float], list[datetime | None], list[str], list[float | None]]


class ExperimentRepository(Protocol):
    async def get(self, name: str, *, lock: bool = False) -> Experiment | None:
        """`lock`: hold the experiment's row lock until the end of the transaction (serialises its writers)."""

    async def current(self, known: Experiment, *, share: bool = False) -> Experiment | None:
        """The stored experiment `known.key` in one read: `known` itself while its revision is current, else the
        stored one; None once deleted. `share`: hold a shared row lock until the end of the transaction, so a
        writer holding `lock` orders strictly before or after."""

    async def revision(self, key: int) -> int | None: ...
    async def project_version(self, project: str) -> int:
        """The sum of the revisions of the project's experiments: grows with every write to any of them (experiments
        are never deleted), so a watch sees any change, through any replica, as a new version."""

    async def running(self, project: str) -> list[Experiment]:
        """The project's RUNNING experiments, by name."""

    async def auto_concluding(self) -> list[Experiment]:
        """The RUNNING SEQUENTIAL experiments with `auto_conclude`, of every project, by name."""

    async def claim_look(self, key: int) -> bool:
        """Claims experiment `key`'s auto-conclude look for this transaction; False when another transaction holds
        the claim (PostgreSQL: a transaction-scoped advisory lock, so replicas skip an experiment another one is
        looking at; SQLite: always True, its write transactions already run one at a time)."""

    async def add(self, experiment: Experiment, project: str) -> None:
        """Raises the unit of work's duplicate error when the name exists (see `UnitOfWork.duplicate`)."""

    async def save(self, experiment: Experiment) -> None:
        """Writes every mutable field and bumps the revision (so the etag changes)."""

    async def page(
        self, project: str, filters: list[Comparison], order_field: str, desc: bool, cursor: list | None, limit: int
    ) -> tuple[list[Experiment], list | None]:
        """Up to `limit` experiments after `cursor`, and the cursor after the last one if more follow."""


class AssignmentRepository(Protocol):
    async def stored(self, key: int, units: Sequence[str]) -> dict[str, str]:
        """unit → variant for the units that have a sticky assignment."""

    async def add(self, key: int, rows: Sequence[tuple[str, str, int, int, int]], now: datetime) -> set[str]:
        """Inserts the (unit, variant, bucket, epoch, bucket class) rows whose unit has no assignment yet and counts
        the inserted ones as first exposures of their (epoch, bucket class, variant); returns the units actually
        inserted. Rows sorted by unit (lock order)."""

    async def exposures(self, key: int) -> dict[tuple[int, int], dict[str, int]]:
        """(epoch, bucket class) → variant → first exposures."""


class MetricRepository(Protocol):
    @property
    def set_based(self) -> bool:
        """True when `ingest` folds a whole batch in the store (PostgreSQL: one statement); otherwise the use case
        folds it step by step with `add_events`, `add_unit_metrics` and `add_variant_stats`."""

    async def ingest(
        self, key: int, events: EventColumns, variant_of: dict[str, str], proportion_metrics: Sequence[str], now: datetime
    ) -> int:
        """Only when `set_based`: appends the events whose key is not stored yet (keys unique within the batch),
        folds them into per-unit aggregates and per-variant statistics; returns the number appended."""

    async def add_events(
        self, key: int, events: Sequence[tuple[str, str, float, datetime, str | None, float | None]]
    ) -> set[str]:
        """Appends (unit, metric, value, time, key or None, covariate or None) events whose key is not stored yet; returns the keys
        that were new. Keys unique within `events`."""

    async def add_unit_metrics(
        self, key: int, rows: Sequence[tuple[str, str, str, int, float, int, float | None]]
    ) -> list[tuple[str, str, int, float, int, float | None, int | None]]:
        """Adds (metric, unit, variant, count, total, positives, covariate or None) to the per-unit aggregates (a
        unit keeps its first covariate); returns the updated (metric, unit, count, total, positives, covariate,
        covariate_since), covariate_since being the unit's count after the batch that set its covariate. Rows
        unique per (metric, unit) and sorted (lock order)."""

    async def add_variant_stats(self, key: int, deltas: dict[tuple[str, str], PairDelta]) -> None:
        """Merges each (metric, variant)'s batch delta into its stored statistics and co-moments
        (`PairDelta.apply`; co-moments stay NULL on rows written before they were tracked), in key order. Runs after this transaction's other writes (SQLite: it already holds the write lock)."""

    async def variant_stats(self, key: int) -> dict[str, dict[str, SufficientStats]]:
        """metric → variant → sufficient statistics."""

    async def covariate_stats(self, key: int) -> dict[str, dict[str, PairedStats | None]]:
        """metric → variant → CUPED co-moments (None: the row predates covariate tracking)."""

    async def sequential_states(self, key: int) -> dict[str, dict[str, SequentialState]]: ...
    async def save_sequential_states(self, key: int, states: dict[tuple[str, str], SequentialState]) -> None: ...
    async def horizon_decision(self, key: int) -> DecisionOutcome | None:
        """The stored decision of a fixed-horizon experiment (taken at its planned sample size), if any."""

    async def save_horizon_decision(self, key: int, outcome: DecisionOutcome, now: datetime) -> None:
        """Stores it once (a later save for the same experiment changes nothing)."""


class UnitOfWork(Protocol):
    """One transaction: the repositories, idempotency keys and the mapping of integrity errors. It commits when its
    block ends without an exception and rolls back otherwise."""

    # Read-only members: mutable protocol attributes would be invariant and refuse the SQL repositories.
    @property
    def experiments(self) -> ExperimentRepository: ...
    @property
    def assignments(self) -> AssignmentRepository: ...
    @property
    def metrics(self) -> MetricRepository: ...

    async def find_request(self, request_id: str, method: str, fingerprint: str) -> str | None:
        """The resource an earlier call with this request_id created (AIP-155), or None; REQUEST_ID_REUSED when the
        id came with another method or body."""

    async def remember_request(self, request_id: str, method: str, fingerprint: str, resource: str) -> None: ...
    def duplicate(self, error: DomainError) -> AbstractContextManager[None]:
        """Raises `error` instead of a unique-constraint violation from the block."""


class Endpoint(Protocol):
    # Read-only, so that frozen dataclasses match.
    @property
    def endpoint(self) -> str: ...
    @property
    def openai_base_url(self) -> str: ...
    @property
    def version_models(self) -> tuple[tuple[str, str], ...]:
        """(model version, the model name selecting it) of every version the deployment serves when it serves several
        on one base (Deployment.served_versions); () when it serves one."""
        ...


class VariantEndpoints(Protocol):
    """The deployer: where a variant's deployment serves (UNAVAILABLE / FAILED_PRECONDITION as domain errors)."""

    async def endpoint(self, deployment: str) -> Endpoint: ...

    def watch(self, deployment: str) -> AsyncIterator[Endpoint]:
        """The deployment's endpoint now, then again whenever the deployment changes; ends when it is deleted."""
        ...


class VersionAliases(Protocol):
    """The registry: moves a model alias (compare-and-set on `expected_version`) when a winner is promoted."""

    async def set_alias(self, model: str, alias: str, version: str, expected_version: str, reason: str) -> None: ...


class UnitOfWorkFactory(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[UnitOfWork, bool | None]: ...
