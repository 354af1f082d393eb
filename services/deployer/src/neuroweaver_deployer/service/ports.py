"""What the use cases, the controller and the alias follower need from outside: storage (repositories inside a unit
of work), the registry, the backends that run model servers and the manifest renderer.

`adapters/` implements these (SQLAlchemy on SQLite and PostgreSQL, the registry client, the local and Kubernetes
backends, the kube library's manifests); the unit tests implement storage and the registry in memory. Deployments
are addressed by `Deployment.key` once stored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, Protocol

from neuroweaver_runtime.errors import DomainError

from ..domain.model import Backend, Deployment, ResolvedVersion, Revision, State, Target


class DeploymentReads(Protocol):
    """The reads every view of storage offers."""

    async def get(self, name: str) -> Deployment | None: ...
    async def page(
        self,
        project: str,
        state: State | None,
        backend: Backend | None,
        order_field: str,
        desc: bool,
        cursor: list | None,
        limit: int,
    ) -> list[Deployment]:
        """Up to `limit` deployments of `project` after the keyset `cursor` ([name] or [create_time ISO, name]),
        ordered by `order_field` ("name" or "create_time") and then name."""

    async def all(self) -> list[Deployment]: ...
    async def revisions(self, key: int, deployment: str, before: int | None, limit: int) -> list[Revision]:
        """Newest first, those below `before` when set."""

    async def revision(self, key: int, deployment: str, number: int) -> Revision | None: ...


class DeploymentRepository(DeploymentReads, Protocol):
    async def get(self, name: str, *, lock: bool = False) -> Deployment | None:
        """`lock`: hold the deployment's row lock until the end of the transaction (serialises its writers)."""

    async def add(self, d: Deployment) -> None:
        """Stores a new deployment serving `d.target` (generation 1, no status yet) and sets its `key`; raises the
        unit of work's duplicate error when the name exists."""

    async def update(self, key: int, *, bump: bool = True, **values: Any) -> None:
        """Sets the named `Deployment` fields (domain values; `target` is a ResolvedVersion). `bump` increments the
        generation, so the etag changes: spec changes do, status reports and deletion marks do not."""

    async def delete(self, key: int) -> None:
        """The deployment and its revisions."""

    async def add_revision(self, key: int, revision: Revision) -> None: ...


class ReadView(Protocol):
    """A consistent view for reads only: it takes no write lock (on SQLite a write transaction would hold the
    database's single write lock, and a cancelled watch must never keep it)."""

    @property  # read-only: a mutable protocol attribute would be invariant and refuse the SQL repository
    def deployments(self) -> DeploymentReads: ...


class UnitOfWork(Protocol):
    """One transaction: the deployments, idempotency keys and the mapping of integrity errors. It commits when its
    block ends without an exception and rolls back otherwise."""

    @property
    def deployments(self) -> DeploymentRepository: ...

    async def find_request(self, request_id: str, method: str, fingerprint: str) -> str | None:
        """The resource an earlier call with this request_id created (AIP-155), or None; REQUEST_ID_REUSED when the
        id came with another method or body."""

    async def remember_request(self, request_id: str, method: str, fingerprint: str, resource: str) -> None: ...
    def duplicate(self, error: DomainError) -> AbstractContextManager[None]:
        """Raises `error` instead of a unique-constraint violation from the block."""


class UnitOfWorkFactory(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[UnitOfWork, bool | None]: ...
    def read(self) -> AbstractAsyncContextManager[ReadView, bool | None]: ...


class AliasMove(Protocol):
    @property
    def alias_name(self) -> str: ...  # projects/p/models/m/aliases/a


class Registry(Protocol):
    """The registry (NOT_FOUND / FAILED_PRECONDITION / UNAVAILABLE ... as domain errors)."""

    async def resolve(self, version_name: str, field: str = "model_version") -> ResolvedVersion:
        """A version name (`.../versions/1.2.0` or `.../versions/<alias>`) → the version and its artifact."""

    def alias_events(self, project: str, model: str, after: int) -> AsyncIterator[AliasMove]:
        """Alias moves of `model` after the cursor, then live; runs until cancelled or the stream breaks."""

    async def latest_sequence(self, project: str, model: str) -> int:
        """The newest event sequence of a model (the cursor to start following from)."""


class DeploymentBackend(Protocol):
    async def apply(self, target: Target) -> None: ...
    async def remove(self, name: str, target: Target | None = None) -> None: ...
    async def close(self) -> None: ...


# The Kubernetes manifests of a target: (YAML, ["Kind/name", ...]); ValueError when the spec cannot be rendered.
RenderManifests = Callable[[Target], tuple[str, list[str]]]
