"""The controller: converges the deployments this replica holds the lease of (service/leases.py) onto their stored
targets, tears down the ones marked DELETING, and writes observed status back.

One worker task per owned deployment runs `backend.apply(target)`; a `kick` while it runs marks it dirty, so the
latest stored target always wins and applies never interleave. A kick for a deployment this replica does not own
wakes the lease keeper instead (it may be free to claim); the owner learns of changes stored elsewhere from a
PostgreSQL NOTIFY (app.py) or, at the latest, from its next lease renewal, which reports each deployment's generation
and deletion mark. Backends report status through `on_status`, which derives the state and conditions (domain rule)
and stores them when they changed, fenced by the lease, and wakes watchers.

Status is about the stored spec: a backend says which target its replicas run (`BackendStatus.observed`), and a
report for another one (computed before a change stored mid-rollout, or before the backend applied it) cannot make
the stored revision AVAILABLE (`derive_state`). An apply that failed is remembered until the next apply, so such
reports keep saying the stored spec's rollout failed instead of hiding it.

Fencing: status writes and the final row delete carry `(owner, epoch)`; an apply on a backend with shared state
(`fenced_apply`: Kubernetes) runs inside the transaction that locked the row under that fence and saw it is not
DELETING, so a takeover (which must update the row) and a delete mark (which locks it) wait for the apply to end, and
every later apply by the stale owner finds its fence gone. Local backend applies (minutes of model loading) run
outside any transaction: their replicas live in this process only, and the lease loss stops them.

Deletion is the owner's job like any convergence: the use case marks the row DELETING and waits for it to disappear;
the owner interrupts an interruptible apply, removes everything the backend runs, then deletes the row (fenced). A
deleted or DELETING deployment is never applied again: the check is part of the fenced apply, and the Kubernetes
poller that finds its objects missing asks the controller (`reapply`) instead of re-applying by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable

from neuroweaver_runtime.notify import Notifier
from neuroweaver_runtime.timestamps import utcnow

from ..domain.model import Backend, BackendStatus, Deployment, ResolvedVersion, State, Target, derive_state, merge_conditions
from .leases import LeaseKeeper, instance_id
from .ports import DeploymentBackend, HeldLease, LeaseLost, UnitOfWorkFactory

log = logging.getLogger("neuroweaver.deployer.controller")


def target_of(d: Deployment, version: ResolvedVersion) -> Target:
    return Target(
        deployment=d.name,
        version=version,
        served_model_name=d.served_model_name,
        model_names=d.model_names,
        replicas=d.replicas,
        serving=d.serving,
        resources=d.resources,
        autoscaling=d.autoscaling,
        namespace=d.namespace,
        labels=dict(d.labels),
    )


class Controller:
    def __init__(
        self,
        uow: UnitOfWorkFactory,
        notifier: Notifier,
        backends: dict[Backend, DeploymentBackend],
        *,
        owner: str | None = None,
        lease_seconds: float = 15.0,
        renew_seconds: float = 5.0,
    ) -> None:
        self.uow = uow
        self.notifier = notifier
        self.backends = backends
        self.owner = owner or instance_id()
        self.leases = LeaseKeeper(
            uow, self.owner, [], lease_seconds=lease_seconds, renew_seconds=renew_seconds,
            on_gained=self._gained, on_held=self._held, on_lost=self._lost,
        )  # fmt: skip
        self.on_ownership_change: list[Callable[[], None]] = []  # e.g. the alias follower re-syncs
        self._workers: dict[str, asyncio.Task] = {}
        self._dirty: dict[str, asyncio.Event] = {}
        self._seen: dict[str, tuple[int, bool]] = {}  # name → (generation, deleting) the worker last acted on
        self._applying: set[str] = set()  # names whose worker is inside an interruptible apply
        self._apply_failed: dict[str, tuple[str, str]] = {}  # name → (rollout key of the target, why its apply failed)
        self._background: set[asyncio.Task] = set()

    # -- ownership ---------------------------------------------------------------------------------

    def owns(self, name: str) -> bool:
        return name in self.leases.held

    async def start(self) -> None:
        """Claims what this replica can act on (every configured backend) and converges it."""
        self.leases.backends = list(self.backends)
        await self.leases.start()

    def _gained(self, lease: HeldLease) -> None:
        self._seen.pop(lease.name, None)  # a new owner converges once whatever was stored
        self.kick(lease.name)
        self._ownership_changed()

    def _held(self, lease: HeldLease) -> None:
        if self._seen.get(lease.name) != (lease.generation, lease.deleting):
            self.kick(lease.name)  # changed by another replica (a NOTIFY would have said so sooner on PostgreSQL)

    def _lost(self, name: str) -> None:
        self._spawn(self._stop_acting(name), f"release-{name}")
        self._ownership_changed()

    def _ownership_changed(self) -> None:
        for callback in self.on_ownership_change:
            callback()

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _stop_worker(self, name: str) -> None:
        worker = self._workers.pop(name, None)
        self._dirty.pop(name, None)
        if worker is not None and worker is not asyncio.current_task():
            # Local applies can be interrupted (every started replica is tracked and stopped); a Kubernetes apply
            # runs in a thread that cancellation would not stop, and inside its fenced transaction: let it finish.
            if name in self._applying:
                worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker

    async def _stop_acting(self, name: str) -> None:
        """The lease is gone (taken over, or the deployment deleted elsewhere): stop converging and polling it here."""
        await self._stop_worker(name)
        self._seen.pop(name, None)
        self._apply_failed.pop(name, None)
        for backend in self.backends.values():
            try:
                await backend.release(name)
            except Exception:  # noqa: BLE001 - best effort: a local replica also dies with this process
                log.exception("releasing %s failed", name)

    # -- convergence -------------------------------------------------------------------------------

    def kick(self, name: str) -> None:
        """Something about `name` may have changed: converge it if this replica owns it, else look for free leases."""
        if not self.owns(name):
            self.leases.wake()
            return
        event = self._dirty.setdefault(name, asyncio.Event())
        event.set()
        worker = self._workers.get(name)
        if worker is None or worker.done():
            self._workers[name] = asyncio.create_task(self._work(name), name=f"converge-{name}")
        elif name in self._applying:
            self._spawn(self._interrupt_if_deleting(name), f"interrupt-{name}")

    def reapply(self, name: str) -> None:
        """The backend lost what it ran (e.g. the cluster's objects are missing): apply again, if still ours and not
        being deleted (the fenced apply checks both)."""
        self._seen.pop(name, None)
        self.kick(name)

    def on_notified(self, key: str) -> None:
        """A wake-up from the notifier (a commit here, or a NOTIFY from another replica; `*` after reconnecting)."""
        if key == "*":
            self.leases.wake()
            for name in list(self.leases.held):
                self.kick(name)
        elif key.startswith("projects/"):
            self.kick(key)

    async def _interrupt_if_deleting(self, name: str) -> None:
        """A long (local) apply is running: a delete must not wait for it, so cancel it and tear down instead."""
        async with self.uow.read() as view:
            d = await view.deployments.get(name)
        worker = self._workers.get(name)
        if (d is None or d.state is State.DELETING) and worker is not None and name in self._applying:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker
            self.kick(name)

    async def _work(self, name: str) -> None:
        event = self._dirty[name]
        while event.is_set():
            event.clear()
            fence = self.leases.fence(name)
            if fence is None:
                return
            async with self.uow.read() as view:
                d = await view.deployments.get(name, fence=fence)
            if d is None:  # deleted, or no longer ours
                self.leases.drop(name)
                return
            if d.state is State.DELETING:
                await self._tear_down(d)
                return
            seen = (d.generation, False)
            if self._seen.get(name) == seen or d.target is None:
                continue  # nothing new since the last apply (a status write or a stray NOTIFY woke it)
            self._seen[name] = seen
            self._apply_failed.pop(name, None)
            backend = self.backends[d.backend]
            target = target_of(d, d.target)
            try:
                if getattr(backend, "fenced_apply", False):
                    async with self.uow.transaction() as uow:
                        locked = await uow.deployments.get(name, lock=True, fence=fence)
                        if locked is None:
                            self.leases.drop(name)
                            return
                        if locked.state is State.DELETING or locked.target is None:
                            event.set()  # go round again: tear down
                            continue
                        target = target_of(locked, locked.target)
                        await backend.apply(target)
                else:
                    self._applying.add(name)
                    try:
                        await backend.apply(target)
                    finally:
                        self._applying.discard(name)
            except Exception as exc:  # noqa: BLE001 - a failed apply becomes a FAILED/DEGRADED status, not a crash
                log.exception("applying %s failed", name)
                message = str(exc)[:500]
                self._apply_failed[name] = (target.rollout_key(), message)
                await self.on_status(
                    name, BackendStatus(desired=d.replicas, ready=d.ready_replicas, failed=True, message=message)
                )

    async def _tear_down(self, d: Deployment) -> None:
        """Undeploy (this replica owns the DELETING deployment): remove what runs, then the row, fenced."""
        fence = self.leases.fence(d.name)
        if fence is None:
            return
        await self.backends[d.backend].remove(d.name, target_of(d, d.target) if d.target else None)
        try:
            async with self.uow.transaction() as uow:
                stored = await uow.deployments.get(d.name, lock=True, fence=fence)
                if stored is not None:
                    await uow.deployments.delete(stored.key, fence=fence)
        except LeaseLost:
            pass  # the new owner tears down (idempotently) and deletes it
        self.leases.held.pop(d.name, None)
        self._seen.pop(d.name, None)
        self._apply_failed.pop(d.name, None)
        self._workers.pop(d.name, None)
        self._dirty.pop(d.name, None)
        self.notifier.wake(d.name)
        self._ownership_changed()

    async def on_status(self, name: str, status: BackendStatus) -> None:
        fence = self.leases.fence(name)
        if fence is None:
            return  # not ours (any more): the owner reports
        try:
            async with self.uow.transaction() as uow:
                d = await uow.deployments.get(name, lock=True, fence=fence)
                if d is None:
                    raise LeaseLost(name)
                if d.state is State.DELETING:
                    return  # being torn down: DELETING stays until the row goes
                target = target_of(d, d.target) if d.target is not None else None
                failed = self._apply_failed.get(name)
                if target is not None and failed is not None and failed[0] == target.rollout_key() != status.observed:
                    status = dataclasses.replace(status, failed=True, message=failed[1])  # what still runs is older
                state, conditions = derive_state(status, target=target)
                conditions = merge_conditions(d.conditions, conditions, utcnow())
                values = {
                    "state": state,
                    "ready_replicas": status.ready,
                    "endpoint": status.endpoint or d.endpoint,
                    "openai_base_url": status.openai_base_url or d.openai_base_url,
                }
                same = all(getattr(d, k) == v for k, v in values.items()) and [
                    (c.type, c.status, c.reason, c.message) for c in d.conditions
                ] == [(c.type, c.status, c.reason, c.message) for c in conditions]
                if same:
                    return
                await uow.deployments.update(
                    d.key, bump=False, fence=fence, conditions=conditions, update_time=utcnow(), **values
                )
        except LeaseLost:
            self.leases.drop(name)
            return
        self.notifier.wake(name)

    async def close(self) -> None:
        """Stops every worker and backend (local replicas stop), then releases the leases for the other replicas."""
        for name in list(self._workers):
            await self._stop_worker(name)
        for task in list(self._background):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for backend in self.backends.values():
            await backend.close()
        await self.leases.stop()
