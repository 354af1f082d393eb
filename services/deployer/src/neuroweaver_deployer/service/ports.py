"""What the use cases, the controller and the alias follower need from outside: storage (repositories inside a unit
of work), the registry, the backends that run model servers and the manifest renderer.

`adapters/` implements these (SQLAlchemy on SQLite and PostgreSQL, the registry client, the local and Kubernetes
backends, the kube library's manifests); the unit tests implement storage and the registry in memory. Deployments
are addressed by `Deployment.key` once stored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from neuroweaver_runtime.errors import DomainError

from ..domain.model import Backend, Deployment, ResolvedVersion, Revision, State, Target


@dataclass(frozen=True)
class Fence:
    """A replica's claim on one deployment: its instance id and the lease epoch it got when it took the lease. A
    fenced write or apply happens only while the stored lease still carries both (service/leases.py)."""

    owner: str
    epoch: int


@dataclass(frozen=True)
class HeldLease:
    """A lease a replica holds, with what it needs to tell whether the deployment changed since it last looked."""

    name: str
    epoch: int
    generation: int
    deleting: bool


class LeaseLost(Exception):
    """A fenced write found the lease in other hands (a takeover bumped the epoch) or the deployment gone."""


class DeploymentReads(Protocol):
    """The reads every view of storage offers."""

    async def get(self, name: str, *, fence: Fence | None = None) -> Deployment | None:
        """`fence`: None unless the stored lease is still `fence`."""

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
    async def get(self, name: str, *, lock: bool = False, fence: Fence | None = None) -> Deployment | None:
        """`lock`: hold the deployment's row lock until the end of the transaction (serialises its writers). `fence`:
        None unless the stored lease is still `fence` (checked in the same statement as the lock)."""

    async def add(self, d: Deployment) -> None:
        """Stores a new deployment serving `d.target` (generation 1, no status yet) and sets its `key`; raises the
        unit of work's duplicate error when the name exists."""

    async def update(self, key: int, *, bump: bool = True, fence: Fence | None = None, **values: Any) -> None:
        """Sets the named `Deployment` fields (domain values; `target` is a ResolvedVersion). `bump` increments the
        generation, so the etag changes: spec changes do, status reports and deletion marks do not. `fence`: only
        while the stored lease is still `fence` (`UPDATE ... WHERE lease_owner AND lease_epoch`), else LeaseLost."""

    async def delete(self, key: int, *, fence: Fence | None = None) -> None:
        """The deployment and its revisions; with `fence`, only while the lease is still `fence`, else LeaseLost."""

    async def claim_leases(
        self, owner: str, lease_seconds: float, backends: list[Backend], name: str | None = None
    ) -> list[HeldLease]:
        """Takes the lease of every deployment on `backends` that nobody holds or whose lease expired by the
        database's clock (only `name`, when given), bumping each one's epoch; returns those taken. Rows another
        transaction has locked are skipped (PostgreSQL), never waited for."""

    async def renew_leases(self, owner: str, lease_seconds: float) -> list[HeldLease]:
        """Extends every lease `owner` holds to `lease_seconds` from the database's now; returns them all."""

    async def release_leases(self, owner: str) -> list[str]:
        """Frees every lease `owner` holds (graceful shutdown), so another replica can take them over at once."""

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
    """Runs targets. Optional class attributes the controller reads: `interruptible` (a cancelled apply leaves
    nothing behind) and `fenced_apply` (its state is shared, e.g. a cluster: every apply runs inside the fenced
    transaction that holds the deployment's row lock, so no apply can follow a takeover or a delete mark)."""

    async def apply(self, target: Target) -> None: ...
    async def remove(self, name: str, target: Target | None = None) -> None:
        """Tears the deployment down wherever it runs (undeploy)."""

    async def release(self, name: str) -> None:
        """Stops acting on the deployment from this replica (lease lost or handed over): local replicas stop (the
        new owner starts its own); cluster objects stay, only status polling ends."""

    async def close(self) -> None: ...


# The Kubernetes manifests of a target: (YAML, ["Kind/name", ...]); ValueError when the spec cannot be rendered.
RenderManifests = Callable[[Target], tuple[str, list[str]]]
