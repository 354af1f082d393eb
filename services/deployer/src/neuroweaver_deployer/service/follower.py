"""Alias following: one registry WatchModelEvents stream per followed model.

On start (and after every reconnect) each following deployment re-resolves its alias, so moves made while
the stream was down are not lost; then every alias event of the model makes the affected deployments
re-resolve and, when the alias points elsewhere, roll to the new version with a revision
`alias:<from>-><to>` (see `DeployerService.follow_alias`).

With several deployer replicas, each follows the aliases of the deployments it holds the lease of (`owns`), so one
alias move makes one rollout; the controller re-syncs the follower whenever its leases change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from neuroweaver_runtime.auth import Principal, Role, acting_as
from neuroweaver_runtime.errors import DomainError

from ..domain.model import State, alias_model
from .deployer import DeployerService
from .ports import Registry, UnitOfWorkFactory

log = logging.getLogger("neuroweaver.deployer.follower")


class AliasFollower:
    def __init__(
        self, uow: UnitOfWorkFactory, registry: Registry, deployer: DeployerService, owns: Callable[[str], bool]
    ) -> None:
        self.uow, self.registry, self.deployer, self.owns = uow, registry, deployer, owns
        self._tasks: dict[str, asyncio.Task] = {}
        self._sync_task: asyncio.Task | None = None

    def request_sync(self) -> None:
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.create_task(self.sync())

    async def _followers(self) -> dict[str, list[tuple[str, str]]]:
        """model → [(deployment, alias name)] of every deployment this replica owns that follows an alias."""
        async with self.uow.read() as view:
            stored = await view.deployments.all()
        out: dict[str, list[tuple[str, str]]] = {}
        for d in stored:
            if d.model_alias and d.state is not State.DELETING and self.owns(d.name):
                out.setdefault(alias_model(d.model_alias)[0], []).append((d.name, d.model_alias))
        return out

    async def sync(self) -> None:
        """Starts a watcher for every followed model and stops those nobody follows any more."""
        models = await self._followers()
        for model in list(self._tasks):
            if model not in models:
                self._tasks.pop(model).cancel()
        for model in models:
            if model not in self._tasks or self._tasks[model].done():
                self._tasks[model] = asyncio.create_task(self._follow(model), name=f"follow-{model}")

    async def _catch_up(self, model: str, alias: str | None = None) -> None:
        for deployment, followed in (await self._followers()).get(model, []):
            if alias is None or followed == alias:
                try:
                    await self.deployer.follow_alias(deployment)
                except DomainError as exc:
                    log.warning("cannot follow %s for %s: %s", followed, deployment, exc.message)

    async def _follow(self, model: str) -> None:
        project = model.split("/")[1]
        # The registry sees this watcher as what it is: a reader of one project, never an all-projects identity.
        with acting_as(Principal("alias-follower", project, Role.VIEWER)):
            await self._follow_as(project, model)

    async def _follow_as(self, project: str, model: str) -> None:
        backoff = 0.2
        while True:
            try:
                cursor = await self.registry.latest_sequence(project, model)
                await self._catch_up(model)
                backoff = 0.2
                async for event in self.registry.alias_events(project, model, cursor):
                    await self._catch_up(model, event.alias_name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - registry down or stream broken: reconnect with backoff
                log.warning("following aliases of %s: %s; reconnecting", model, exc)
            await asyncio.sleep(backoff)  # reconnect backoff
            backoff = min(backoff * 2, 5.0)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
