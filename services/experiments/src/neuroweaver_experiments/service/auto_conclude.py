"""The auto-conclude monitor: RUNNING sequential experiments with `auto_conclude` are concluded when their test
decides, whether or not anyone reads their results (GetExperimentResults only looks; it never concludes).

Every `interval` seconds each replica lists those experiments and looks at each one
(`ExperimentsService.auto_conclude`: the analysis GetExperimentResults runs, its sequential state recorded as any
look's). When the test decides (ship a variant, stop for harm, no detectable difference) the experiment is concluded
in the look's transaction, and a shipped winner is promoted to the experiment's `promote_alias` in the registry.

Exactly once across replicas: a look runs under the experiment's claim (a PostgreSQL advisory lock held by the look's
transaction; a replica that finds it taken skips the experiment until its next tick) and concludes under the
experiment's row lock, which ConcludeExperiment takes too: only the first conclusion finds it RUNNING.

The registry sees the promotion as an operator of the experiment's project named `auto-conclude` (the actor of the
alias move; its reason names the experiment): setting `auto_conclude` on an experiment already takes that role.
A conclusion that fails (registry unreachable, promotion refused) leaves the experiment RUNNING; it is logged,
counted, and tried again at the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import Counter

from neuroweaver_runtime.auth import Principal, Role, acting_as
from neuroweaver_runtime.errors import DomainError

from ..domain.experiment import EXPERIMENT
from .experiments import ExperimentsService

log = logging.getLogger(__name__)

ACTOR = "auto-conclude"
CLOSE_WAIT = 30.0  # seconds a stopping process waits for the look in progress (its registry call has a deadline)
CONCLUSIONS = Counter(
    "nw_experiments_auto_conclusions", "Experiments concluded by the auto-conclude monitor, by decision", ["decision"]
)
FAILURES = Counter(
    "nw_experiments_auto_conclude_failures",
    "Looks of the auto-conclude monitor that failed, by reason (the experiment keeps running; tried again at the next tick)",
    ["reason"],
)


class AutoConcludeMonitor:
    def __init__(self, service: ExperimentsService, interval: float) -> None:
        self.service = service
        self.interval = interval  # seconds between ticks; 0 = no monitor (only ConcludeExperiment concludes)
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        if self.interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="auto-conclude")

    async def close(self) -> None:
        """Stops after the look in progress, if any: a look cancelled during its registry call could leave the alias
        moved and the experiment RUNNING (promoted a second time later). Cancelled after `CLOSE_WAIT` seconds."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._task, CLOSE_WAIT)
            self._task = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            if self._stopping.is_set():
                return
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the monitor outlives a database hiccup; the next tick retries
                FAILURES.labels("LIST_FAILED").inc()
                log.warning("auto-conclude tick failed; retrying in %g s", self.interval, exc_info=True)

    async def tick(self) -> int:
        """One look at every auto-concluding experiment; returns how many this replica concluded."""
        concluded = 0
        for exp in await self.service.auto_concluding():
            if self._stopping.is_set():
                break
            project = EXPERIMENT.parse(exp.name)["project"]
            try:
                with acting_as(Principal(ACTOR, project, Role.OPERATOR)):
                    done = await self.service.auto_conclude(exp)
            except asyncio.CancelledError:
                raise
            except DomainError as exc:
                FAILURES.labels(exc.reason).inc()
                log.warning(
                    "auto-conclude of %s failed, it keeps running (next try in %g s): %s [%s %s]",
                    exp.name, self.interval, exc.message, exc.reason, exc.metadata.get("remote_reason", ""),
                )  # fmt: skip
                continue
            except Exception:  # noqa: BLE001 - one experiment's failure must not stop the others' looks
                FAILURES.labels("INTERNAL").inc()
                log.warning("auto-conclude of %s failed, it keeps running", exp.name, exc_info=True)
                continue
            if done is not None:
                concluded += 1
                CONCLUSIONS.labels(done.decision.value).inc()
                log.info("auto-concluded %s (%s): %s", exp.name, done.decision.value, done.experiment.conclusion)
        return concluded
