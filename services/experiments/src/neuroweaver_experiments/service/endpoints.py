"""Where each variant's deployment serves now: the deployer's current endpoint per deployment, followed live.

StartExperiment stores the endpoints it resolved, but a deployment's front door can move: a local deployment's
router listens on new ports after the deployer restarts, and nothing updates the experiment's row. So answers that
carry a variant's endpoint (AssignVariant, BatchAssignVariants, GetExperiment) take it from here: one
WatchDeployment per deployment in use (the deployer sends the current state, then every change), opened again with
backoff when it breaks (the deployer restarting: UNAVAILABLE), so a new address is known as soon as the deployer
reports it. The first use of a deployment waits briefly for the watch's first answer; until a watch has answered,
and while the deployer is unreachable, the last known (else the stored) endpoint is used. A change calls
`on_change(experiment)` for every experiment that used the deployment, which drops its cached snapshot and the
replies memoised with the old endpoint.

The watch runs as a viewer of the deployment's project (`acting_as`), never as the caller that happened to use it
first, in a context of its own (no caller's trace or identity leaks into it).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from neuroweaver_runtime.auth import Principal, Role, acting_as
from neuroweaver_runtime.errors import DomainError
from neuroweaver_runtime.names import project_of

from ..domain.experiment import Experiment
from .ports import Endpoint, VariantEndpoints

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Followed:
    current: Endpoint | None = None
    answered: asyncio.Event = field(default_factory=asyncio.Event)  # first answer, first failure or first wait over
    users: set[str] = field(default_factory=set)  # experiments whose answers carry this deployment's endpoint
    task: asyncio.Task | None = None


class LiveEndpoints:
    def __init__(
        self,
        deployer: VariantEndpoints,
        on_change: Callable[[str], None],
        *,
        first_wait: float = 2.0,
        max_backoff: float = 5.0,
    ) -> None:
        self.deployer = deployer
        self.on_change = on_change
        self.first_wait = first_wait
        self.max_backoff = max_backoff
        self._followed: dict[str, _Followed] = {}

    async def apply(self, exp: Experiment) -> bool:
        """Sets each variant's endpoint to where its deployment serves now; True when one changed."""
        changed = False
        for v in exp.variants:
            if not v.deployment:
                continue
            followed = self._follow(v.deployment)
            followed.users.add(exp.name)
            if not followed.answered.is_set():  # the deployment's first use: its watch is just starting
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(followed.answered.wait(), self.first_wait)
                followed.answered.set()  # answered or not: later uses do not wait
            ep = followed.current
            if ep is not None and v.follow(ep.endpoint, ep.openai_base_url, ep.version_models):
                changed = True
        return changed

    def _follow(self, deployment: str) -> _Followed:
        followed = self._followed.get(deployment)
        if followed is None:
            followed = self._followed[deployment] = _Followed()
            followed.task = asyncio.get_running_loop().create_task(
                self._watch(deployment, followed), name=f"endpoint-watch-{deployment}", context=contextvars.Context()
            )
        return followed

    async def _watch(self, deployment: str, followed: _Followed) -> None:
        backoff, failing = 0.2, False
        with acting_as(Principal("endpoint-watcher", project_of(deployment) or "default", Role.VIEWER)):
            while True:
                try:
                    async for ep in self.deployer.watch(deployment):
                        backoff, failing = 0.2, False
                        self._update(deployment, followed, ep)
                    log.info("watch of %s ended (deployment deleted?); watching again", deployment)
                except DomainError as exc:  # unreachable (UNAVAILABLE) or refused (deleted, not allowed)
                    if not failing:
                        log.warning("watching %s: %s; keeping %s", deployment, exc.message, followed.current)
                    failing = True
                except Exception:  # noqa: BLE001 - the watch must outlive any surprise
                    log.exception("watching %s failed", deployment)
                followed.answered.set()
                await asyncio.sleep(backoff)  # retry backoff
                backoff = min(backoff * 2, self.max_backoff)

    def _update(self, deployment: str, followed: _Followed, ep: Endpoint) -> None:
        before = followed.current
        if ep.endpoint and (before is None or _seen(before) != _seen(ep)):
            followed.current = ep
            if before is not None:
                log.info("deployment %s now serves at %s (was %s)", deployment, ep.endpoint, before.endpoint)
            for name in list(followed.users):
                self.on_change(name)
        followed.answered.set()

    async def close(self) -> None:
        tasks = [f.task for f in self._followed.values() if f.task is not None]
        self._followed.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _seen(ep: Endpoint) -> tuple:
    """What the variants take from a deployment: its front door and the versions it serves beside each other."""
    return ep.endpoint, ep.openai_base_url, tuple(ep.version_models)
