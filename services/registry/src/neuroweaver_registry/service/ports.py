"""What the use cases need from storage: repositories of domain objects inside a unit of work.

`adapters/` implements these on SQLAlchemy (SQLite and PostgreSQL); the unit tests implement them in memory.
Lists take and return an opaque keyset cursor (a list of JSON values) that the use cases sign into page tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from neuroweaver_runtime.errors import DomainError
from neuroweaver_runtime.filtering import Comparison

from ..domain.model import AliasHistoryEntry, Judge, JudgeVersion, Metric, Model, ModelAlias, ModelEvent, ModelVersion


@dataclass
class Resolved:
    """GetModelVersion's one-statement read of `model ⟕ [alias] ⟕ version`."""

    model_exists: bool
    latest_version: str = ""  # the model's highest version ("" = none yet)
    alias_target: str | None = None  # for an alias reference: the version it points at (None = no such alias)
    version: ModelVersion | None = None


class ModelRepository(Protocol):
    async def get(self, name: str, *, lock: bool = False, aliases: bool = False) -> Model | None:
        """`lock`: hold the model's row lock until the end of the transaction (serialises writes per model).
        `aliases`: fill `Model.aliases` (left empty otherwise)."""

    async def add(self, model: Model) -> None: ...
    async def update(self, model: Model, **values: Any) -> None:
        """Sets the named fields, bumps the revision."""

    async def delete(self, model: Model) -> None:
        """The model with its versions, metrics, aliases and alias history."""

    async def page(
        self, project: str, filters: list[Comparison], order_field: str, desc: bool, cursor: list | None, limit: int
    ) -> tuple[list[Model], list | None]:
        """Up to `limit` models (with aliases) after `cursor`, and the cursor after the last one if more follow."""


class VersionRepository(Protocol):
    async def get(self, model: Model, version: str, *, details: bool = True) -> ModelVersion | None:
        """`details`: with metrics and the aliases pointing at it (left empty otherwise)."""

    async def resolve(self, kind: str, model_name: str, ref: str) -> Resolved:
        """`kind`: semver (ref = normalised version), latest, or alias (ref = alias id)."""

    async def highest(self, model: Model) -> str | None: ...
    async def highest_and_taken(self, model: Model, sort_key: str) -> tuple[str | None, bool]: ...
    async def add(self, model: Model, version: ModelVersion, sort_key: str) -> None:
        """Raises the unit of work's duplicate error when (model, sort_key) exists (see `UnitOfWork.duplicate`)."""

    async def add_metrics(self, version: ModelVersion, metrics: Sequence[Metric]) -> None: ...
    async def set_artifacts(self, version: ModelVersion) -> None:
        """Stores `version.artifacts` (the exports) and `version.update_time`, bumps the revision."""

    async def update(self, version: ModelVersion, **values: Any) -> None:
        """Sets the named fields, bumps the revision."""

    async def count(self, model: Model) -> int: ...
    async def page(
        self, model: Model, filters: list[Comparison], order_field: str, desc: bool, cursor: list | None, limit: int
    ) -> tuple[list[ModelVersion], list | None]: ...


class AliasRepository(Protocol):
    async def get(self, model: Model, alias: str) -> ModelAlias | None: ...
    async def all(self, model: Model) -> list[ModelAlias]: ...
    async def set(self, model: Model, alias: str, target: ModelAlias) -> None: ...
    async def delete(self, model: Model, alias: str) -> None: ...
    async def append_history(self, model: Model, entry: AliasHistoryEntry) -> None: ...
    async def history(self, model: Model, alias: str, before: int | None, limit: int) -> list[AliasHistoryEntry]:
        """Newest first, before the entry with sequence `before`."""

    async def last_move(self, model: Model, alias: str) -> AliasHistoryEntry | None: ...


class EventRepository(Protocol):
    async def append(self, project: str, event: ModelEvent) -> int: ...
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
        """Events with after < sequence (< before), of `model` when set, matching every filter (fields: type, actor,
        resource), oldest first or newest first."""

    async def newest(self, project: str) -> int:
        """The project's largest sequence, 0 for none."""


class JudgeRepository(Protocol):
    async def get(self, name: str, *, lock: bool = False) -> Judge | None: ...
    async def add(self, judge: Judge) -> None: ...
    async def add_version(self, judge: Judge, version: JudgeVersion) -> None:
        """Stores the version and makes it the judge's latest."""

    async def get_version(self, judge: Judge, number: int) -> JudgeVersion | None: ...
    async def page(self, project: str, after_name: str | None, limit: int) -> list[Judge]: ...
    async def list_versions(self, judge: Judge, before: int | None, limit: int) -> list[JudgeVersion]: ...


class UnitOfWork(Protocol):
    """One transaction (or one read): the repositories, idempotency keys and the mapping of integrity errors.

    A transaction commits when its block ends without an exception and rolls back otherwise; after a commit, the
    projects whose events it appended are woken (watchers, caches).
    """

    # Read-only members: a unit of work may hold any implementation of each repository (mutable protocol
    # attributes would be invariant and refuse the SQL repositories).
    @property
    def models(self) -> ModelRepository: ...
    @property
    def versions(self) -> VersionRepository: ...
    @property
    def aliases(self) -> AliasRepository: ...
    @property
    def events(self) -> EventRepository: ...
    @property
    def judges(self) -> JudgeRepository: ...

    async def find_request(self, request_id: str, method: str, fingerprint: str) -> str | None:
        """The resource an earlier call with this request_id created (AIP-155), or None; REQUEST_ID_REUSED when the
        id came with another method or body."""

    async def remember_request(self, request_id: str, method: str, fingerprint: str, resource: str) -> None: ...
    def duplicate(self, error: DomainError) -> AbstractContextManager[None]:
        """Raises `error` instead of a unique-constraint violation from the block."""

    async def append_event(self, project: str, event: ModelEvent) -> None:
        """Appends the audit event and wakes the project's watchers once the transaction commits."""


class UnitOfWorkFactory(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[UnitOfWork, bool | None]: ...
    def read(self) -> AbstractAsyncContextManager[UnitOfWork, bool | None]:
        """For reads only: no write lock on SQLite, no BEGIN/COMMIT on PostgreSQL."""
