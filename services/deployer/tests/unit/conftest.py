"""In-memory fakes of the deployer's ports (service/ports.py): the deployment repository inside a unit of work, the
registry and a backend. The use-case tests run on the fake storage and, as contract tests of the SQL repository and
unit of work, on SQLite and PostgreSQL.

A transaction works on a deep copy of the store and swaps it in on a clean exit, so a failed use case leaves
nothing behind, as a rolled-back database transaction would; a read view sees the committed store. Objects handed
out are copies: a use case changes stored state only through the repository. The real controller runs on top, so
its convergence (apply, then status written back through `on_status`) is part of what these tests see.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import pytest

from neuroweaver_deployer.domain.model import (
    VERSION,
    Backend,
    BackendStatus,
    Deployment,
    ResolvedVersion,
    Revision,
    State,
    Target,
)
from neuroweaver_deployer.service.controller import Controller
from neuroweaver_deployer.service.deployer import DeployerService
from neuroweaver_deployer.service.ports import Fence, HeldLease, LeaseLost
from neuroweaver_runtime.errors import NotFound
from neuroweaver_runtime.notify import Notifier
from neuroweaver_runtime.pagination import PageTokens
from neuroweaver_runtime.testing import Duplicate, FakeUnitOfWorkBase

FIELDS = {f.name for f in dataclasses.fields(Deployment)}


@dataclass
class Store:
    last_key: int = 0
    deployments: dict[str, Deployment] = field(default_factory=dict)  # name → deployment
    revisions: dict[int, list[Revision]] = field(default_factory=dict)  # deployment key → revisions
    requests: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # request_id → (method, fingerprint, name)
    leases: dict[str, tuple[str, float, int]] = field(default_factory=dict)  # name → (owner, expiry (monotonic), epoch)

    def by_key(self, key: int) -> Deployment:
        return next(d for d in self.deployments.values() if d.key == key)


class FakeDeployments:
    def __init__(self, store: Store) -> None:
        self.store = store

    def _holds(self, name: str, fence: Fence | None) -> bool:
        if fence is None:
            return True
        owner, _, epoch = self.store.leases.get(name, ("", 0.0, 0))
        return (owner, epoch) == (fence.owner, fence.epoch)

    async def get(self, name: str, *, lock: bool = False, fence: Fence | None = None) -> Deployment | None:
        return copy.deepcopy(self.store.deployments.get(name)) if self._holds(name, fence) else None

    async def add(self, d: Deployment) -> None:
        assert d.target is not None
        if d.name in self.store.deployments:
            raise Duplicate(d.name)
        self.store.last_key += 1
        d.key = self.store.last_key
        self.store.deployments[d.name] = dataclasses.replace(
            copy.deepcopy(d),
            served_version=d.target.name,
            endpoint="",
            openai_base_url="",
            ready_replicas=0,
            conditions=[],
            generation=1,
        )
        self.store.revisions[d.key] = []

    async def update(self, key: int, *, bump: bool = True, fence: Fence | None = None, **values: Any) -> None:
        stored = self.store.by_key(key)
        if not self._holds(stored.name, fence):
            raise LeaseLost(stored.name)
        for name, value in values.items():
            assert name in FIELDS, name
            setattr(stored, name, copy.deepcopy(value))
        if bump:
            stored.generation += 1

    async def delete(self, key: int, *, fence: Fence | None = None) -> None:
        name = self.store.by_key(key).name
        if not self._holds(name, fence):
            raise LeaseLost(name)
        del self.store.deployments[name]
        del self.store.revisions[key]
        self.store.leases.pop(name, None)

    def _held(self, owner: str) -> list[HeldLease]:
        return [
            HeldLease(name, epoch, d.generation, d.state is State.DELETING)
            for name, (o, _, epoch) in self.store.leases.items()
            if o == owner and (d := self.store.deployments.get(name)) is not None
        ]

    async def claim_leases(self, owner, lease_seconds, backends, name=None) -> list[HeldLease]:
        now, taken = time.monotonic(), []
        for d in self.store.deployments.values():
            o, expires, epoch = self.store.leases.get(d.name, ("", 0.0, 0))
            if d.backend in backends and name in (None, d.name) and o != owner and (not o or expires < now):
                self.store.leases[d.name] = (owner, now + lease_seconds, epoch + 1)
                taken.append(d.name)
        return [h for h in self._held(owner) if h.name in taken]

    async def renew_leases(self, owner: str, lease_seconds: float) -> list[HeldLease]:
        for name, (o, _, epoch) in list(self.store.leases.items()):
            if o == owner:
                self.store.leases[name] = (owner, time.monotonic() + lease_seconds, epoch)
        return self._held(owner)

    async def release_leases(self, owner: str) -> list[str]:
        released = [name for name, (o, _, _) in self.store.leases.items() if o == owner]
        for name in released:
            self.store.leases[name] = ("", 0.0, self.store.leases[name][2])
        return released

    async def page(self, project, state, backend, order_field, desc, cursor, limit) -> list[Deployment]:
        def position(d: Deployment) -> tuple:
            assert d.create_time is not None
            return (d.name,) if order_field == "name" else (d.create_time, d.name)

        found = [
            d
            for d in self.store.deployments.values()
            if d.project == project and state in (None, d.state) and backend in (None, d.backend)
        ]
        found.sort(key=position, reverse=desc)
        if cursor is not None:
            after = tuple(cursor) if order_field == "name" else (datetime.fromisoformat(cursor[0]), cursor[1])
            found = [d for d in found if (position(d) < after if desc else position(d) > after)]
        return copy.deepcopy(found[:limit])

    async def all(self) -> list[Deployment]:
        return copy.deepcopy(list(self.store.deployments.values()))

    async def add_revision(self, key: int, revision: Revision) -> None:
        assert all(r.revision != revision.revision for r in self.store.revisions[key]), "uq_deployment_revision"
        self.store.revisions[key].append(copy.deepcopy(revision))

    async def revisions(self, key: int, deployment: str, before: int | None, limit: int) -> list[Revision]:
        newest_first = sorted(self.store.revisions.get(key, []), key=lambda r: -r.revision)
        return copy.deepcopy([r for r in newest_first if before is None or r.revision < before][:limit])

    async def revision(self, key: int, deployment: str, number: int) -> Revision | None:
        return copy.deepcopy(next((r for r in self.store.revisions.get(key, []) if r.revision == number), None))


class FakeUnitOfWork(FakeUnitOfWorkBase):
    def __init__(self, store: Store) -> None:
        super().__init__(store.requests)
        self.deployments = FakeDeployments(store)
        self.store = store


class FakeUnitOfWorkFactory:
    def __init__(self) -> None:
        self.store = Store()
        self.transactions = 0

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[FakeUnitOfWork]:
        self.transactions += 1
        work = copy.deepcopy(self.store)
        yield FakeUnitOfWork(work)
        self.store = work

    @asynccontextmanager
    async def read(self) -> AsyncIterator[SimpleNamespace]:
        yield SimpleNamespace(deployments=FakeDeployments(self.store))


def version(model: str, number: str, project: str = "default") -> ResolvedVersion:
    name = VERSION.format(project=project, model=model, version=number)
    digest = f"{model}{number}".encode().hex().ljust(64, "0")[:64]
    return ResolvedVersion(name, number, f"file:///artifacts/{model}/{number}", digest, "file:///models/base")


class FakeRegistry:
    """Versions by name; aliases resolve through `.../versions/<alias>` as the registry does. `before_resolve` runs
    inside every look-up (to let something happen between a use case's read and its write)."""

    def __init__(self) -> None:
        self.versions: dict[str, ResolvedVersion] = {}
        self.aliases: dict[str, str] = {}  # .../versions/<alias> → version name
        self.before_resolve: Any = None

    def add(self, v: ResolvedVersion) -> ResolvedVersion:
        self.versions[v.name] = v
        return v

    async def resolve(self, version_name: str, field: str = "model_version") -> ResolvedVersion:
        if self.before_resolve is not None:
            await self.before_resolve()
        found = self.versions.get(self.aliases.get(version_name, version_name))
        if found is None:
            raise NotFound(f"{version_name} was not found in the registry", reason="MODEL_VERSION_NOT_FOUND")
        return found

    async def alias_events(self, project: str, model: str, after: int) -> AsyncIterator[Any]:
        await asyncio.Event().wait()  # a stream with no moves: the tests call follow_alias directly
        yield

    async def latest_sequence(self, project: str, model: str) -> int:
        return 0


class FakeBackend:
    """Runs every target at once: applies are recorded and reported ready through the controller's `on_status`."""

    def __init__(self) -> None:
        self.applied: list[Target] = []
        self.removed: list[str] = []
        self.controller: Controller | None = None

    async def apply(self, target: Target) -> None:
        self.applied.append(target)
        assert self.controller is not None
        ready = BackendStatus(
            desired=target.replicas, ready=target.replicas, observed=target.rollout_key(), endpoint=f"local:{target.deployment}"
        )
        await self.controller.on_status(target.deployment, ready)

    async def remove(self, name: str, target: Target | None = None) -> None:
        self.removed.append(name)

    async def release(self, name: str) -> None:
        pass

    async def close(self) -> None:
        pass


class RecordingNotifier(Notifier):
    def __init__(self) -> None:
        super().__init__()
        self.woken: list[str] = []

    def wake(self, key: str) -> None:
        self.woken.append(key)
        super().wake(key)


@asynccontextmanager
async def _storage(kind: str, tmp_path) -> AsyncIterator[Any]:
    """The unit of work the use cases run on: the in-memory fake, or the SQL one on a fresh SQLite or PostgreSQL
    database (the same tests are the SQL repository's contract tests)."""
    if kind == "memory":
        yield FakeUnitOfWorkFactory()
        return
    from neuroweaver_deployer.adapters.tables import metadata
    from neuroweaver_deployer.adapters.unit_of_work import SqlUnitOfWorkFactory
    from neuroweaver_runtime.db import Database
    from neuroweaver_runtime.testing import create_postgres_database

    drop = None
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'deployer.db'}"
    else:
        try:
            url, drop = await create_postgres_database("nwdeployerunit")
        except OSError as exc:
            pytest.fail(f"PostgreSQL is not reachable at NW_TEST_POSTGRES_URL: {exc}")
    db = Database(url)
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        yield SqlUnitOfWorkFactory(db)
    finally:
        await db.dispose()
        if drop is not None:
            await drop()


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def fakes(request, tmp_path):
    async with _storage(request.param, tmp_path) as uow:
        registry, backend, notifier = FakeRegistry(), FakeBackend(), RecordingNotifier()
        controller = Controller(uow, notifier, {Backend.LOCAL: backend}, lease_seconds=3.0, renew_seconds=1.0)
        backend.controller = controller
        await controller.start()
        service = DeployerService(
            uow,
            notifier,
            PageTokens(b"k" * 32),
            registry,
            controller,
            render_manifests=lambda target: (f"name: {target.deployment}\n", [f"Deployment/{target.served_model_name}"]),
        )
        alias_syncs: list[int] = []
        service.on_alias_change = lambda: alias_syncs.append(1)
        try:
            yield SimpleNamespace(
                service=service,
                uow=uow,
                registry=registry,
                backend=backend,
                notifier=notifier,
                alias_syncs=alias_syncs,
                v1=registry.add(version("m", "1.0.0")),
                v2=registry.add(version("m", "1.1.0")),
                v3=registry.add(version("m", "2.0.0")),
            )
        finally:
            await controller.close()
