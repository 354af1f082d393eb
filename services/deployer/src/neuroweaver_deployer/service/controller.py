"""The controller: converges each deployment's backend onto its stored target and writes observed status back.

One worker task per deployment runs `backend.apply(target)`; a `kick` while it runs marks it dirty, so the
latest stored target always wins and applies never interleave. Backends report status through
`on_status`, which derives the state and conditions (domain rule), stores them when they changed and
wakes watchers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from neuroweaver_runtime.notify import Notifier
from neuroweaver_runtime.timestamps import utcnow

from ..domain.model import Backend, BackendStatus, Deployment, ResolvedVersion, State, Target, derive_state, merge_conditions
from .ports import DeploymentBackend, UnitOfWorkFactory

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
    def __init__(self, uow: UnitOfWorkFactory, notifier: Notifier, backends: dict[Backend, DeploymentBackend]) -> None:
        self.uow = uow
        self.notifier = notifier
        self.backends = backends
        self._workers: dict[str, asyncio.Task] = {}
        self._dirty: dict[str, asyncio.Event] = {}
        self._deleting: set[str] = set()

    def kick(self, name: str) -> None:
        event = self._dirty.setdefault(name, asyncio.Event())
        event.set()
        if name not in self._workers or self._workers[name].done():
            self._workers[name] = asyncio.create_task(self._work(name), name=f"converge-{name}")

    async def _load(self, name: str) -> tuple[Deployment, ResolvedVersion] | None:
        async with self.uow.read() as view:
            d = await view.deployments.get(name)
        if d is None or d.target is None:  # None until it has a target
            return None
        return d, d.target

    async def _work(self, name: str) -> None:
        event = self._dirty[name]
        while event.is_set():
            event.clear()
            loaded = await self._load(name)
            if loaded is None or name in self._deleting:
                return
            d, version = loaded
            try:
                await self.backends[d.backend].apply(target_of(d, version))
            except Exception as exc:  # noqa: BLE001 - a failed apply becomes a FAILED/DEGRADED status, not a crash
                log.exception("applying %s failed", name)
                await self.on_status(
                    name, BackendStatus(desired=d.replicas, ready=d.ready_replicas, failed=True, message=str(exc)[:500])
                )

    async def on_status(self, name: str, status: BackendStatus) -> None:
        if name in self._deleting:
            return
        async with self.uow.transaction() as uow:
            d = await uow.deployments.get(name, lock=True)
            if d is None:
                return
            state, conditions = derive_state(status)
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
            await uow.deployments.update(d.key, bump=False, conditions=conditions, update_time=utcnow(), **values)
        self.notifier.wake(name)

    async def remove(self, d: Deployment, version: ResolvedVersion | None) -> None:
        """Stops converging and tears everything down; returns when nothing is left running."""
        self._deleting.add(d.name)
        worker = self._workers.pop(d.name, None)
        backend = self.backends[d.backend]
        if worker is not None:
            # Local applies can be interrupted (every started replica is tracked and stopped by remove); a
            # Kubernetes apply runs in a thread that cancellation would not stop, so let it finish first.
            if getattr(backend, "interruptible", False):
                worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker
        self._dirty.pop(d.name, None)
        try:
            await backend.remove(d.name, target_of(d, version) if version else None)
        finally:
            self._deleting.discard(d.name)

    async def resume_all(self) -> None:
        """At start: converge every stored deployment again (local replicas do not survive a deployer restart)."""
        async with self.uow.read() as view:
            stored = await view.deployments.all()
        for d in stored:
            if d.state is not State.DELETING and d.target is not None:
                self.kick(d.name)

    async def close(self) -> None:
        for task in self._workers.values():
            task.cancel()
        for task in self._workers.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for backend in self.backends.values():
            await backend.close()
