"""Which deployer replica acts on which deployment: per-deployment ownership leases in the deployer's database.

Every deployment row carries a lease: `lease_owner` (a replica's instance id, see `instance_id`), `lease_expires_at`
(on the database's clock) and `lease_epoch`, a fencing token incremented on every takeover. A `LeaseKeeper` per
replica, every `renew_seconds`:

1. renews every lease it holds (one UPDATE by owner) and learns each one's epoch, generation and deletion mark; a
   lease that is no longer its own (taken over after it expired: this replica was paused or cut off) is dropped and
   the controller stops acting on it;
2. claims every deployment of a backend configured here that nobody holds or whose lease expired, bumping its epoch
   (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so a row a writer holds is skipped, never waited for).

A `wake()` (a deployment created or changed here, a NOTIFY from another replica, a lease released elsewhere) runs a
cycle at once. Only the lease holder converges a deployment, polls its status, follows its alias and writes its
status; each of those writes, and every Kubernetes apply, runs in a transaction that re-checks `(owner, epoch)` under
the row lock (`Fence`), so a replica that lost its lease cannot write or apply after a takeover. Expiry is decided
by the database's clock only; this replica's own clock is used only to fence itself: when it could not renew for
`lease_seconds` (database unreachable), it drops every lease before anyone else may have taken one over.

At a graceful stop the keeper releases its leases, so the others take over at once instead of after the expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable

from ..domain.model import Backend
from .ports import Fence, HeldLease, UnitOfWorkFactory

log = logging.getLogger("neuroweaver.deployer.leases")


def instance_id() -> str:
    """This replica's identity as a lease owner: host name (the pod's, on Kubernetes), pid and a random suffix, so a
    restarted process never mistakes its predecessor's leases for its own."""
    return f"{socket.gethostname()[:80]}-{os.getpid()}-{secrets.token_hex(4)}"


class LeaseKeeper:
    def __init__(
        self,
        uow: UnitOfWorkFactory,
        owner: str,
        backends: list[Backend],
        *,
        lease_seconds: float,
        renew_seconds: float,
        on_gained: Callable[[HeldLease], None],
        on_held: Callable[[HeldLease], None],
        on_lost: Callable[[str], None],
    ) -> None:
        if not 0 < renew_seconds < lease_seconds:
            raise ValueError(f"the lease renewal period ({renew_seconds}s) must be shorter than the lease ({lease_seconds}s)")
        self.uow, self.owner, self.backends = uow, owner, backends
        self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds
        self.on_gained, self.on_held, self.on_lost = on_gained, on_held, on_lost
        self.held: dict[str, HeldLease] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._renewed_at: float | None = None  # loop time when the last successful renewal started

    def fence(self, name: str) -> Fence | None:
        held = self.held.get(name)
        return Fence(self.owner, held.epoch) if held is not None else None

    def wake(self) -> None:
        """Runs a cycle soon (claims what became free, notices what changed)."""
        self._wake.set()

    def drop(self, name: str) -> None:
        """A fenced write found the lease gone: stop acting on it now rather than at the next renewal."""
        if self.held.pop(name, None) is not None:
            log.warning("lost the lease of %s", name, extra={"fields": {"deployment": name, "owner": self.owner}})
            self.on_lost(name)

    async def start(self) -> None:
        """One cycle (so what this replica can take is taken before it reports SERVING), then the loop."""
        log.info(
            "deployer replica %s keeps leases of %ss", self.owner, self.lease_seconds, extra={"fields": {"owner": self.owner}}
        )
        await self.cycle()
        self._task = asyncio.create_task(self._loop(), name="deployer-leases")

    async def _loop(self) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that arrives as the
        # awaited event is set, and this loop would then never stop.
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.renew_seconds):
                    await self._wake.wait()
            self._wake.clear()
            try:
                async with asyncio.timeout(self.lease_seconds):  # a hung database counts as a failure
                    await self.cycle()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - database hiccup: try again next period; _self_fence bounds the risk
                log.exception("lease cycle failed")
                self._self_fence()

    def _self_fence(self) -> None:
        now = asyncio.get_running_loop().time()
        if self.held and (self._renewed_at is None or now - self._renewed_at >= self.lease_seconds):
            log.warning("could not renew leases for %ss; stopping work on %d deployments", self.lease_seconds, len(self.held))
            for name in list(self.held):
                self.drop(name)

    async def cycle(self) -> None:
        started = asyncio.get_running_loop().time()
        async with self.uow.transaction() as uow:
            renewed = {h.name: h for h in await uow.deployments.renew_leases(self.owner, self.lease_seconds)}
        self._renewed_at = started
        for name in [n for n in self.held if n not in renewed or renewed[n].epoch != self.held[n].epoch]:
            self.drop(name)
        for name, lease in renewed.items():
            if name not in self.held:  # a claim whose commit we never heard back from: ours all the same
                self.held[name] = lease
                self.on_gained(lease)
            else:
                self.held[name] = lease
                self.on_held(lease)
        async with self.uow.transaction() as uow:
            claimed = await uow.deployments.claim_leases(self.owner, self.lease_seconds, self.backends)
        for lease in claimed:
            log.info("took the lease of %s (epoch %d)", lease.name, lease.epoch, extra={"fields": {"deployment": lease.name}})
            self.held[lease.name] = lease
            self.on_gained(lease)

    async def stop(self) -> None:
        """Stops renewing and frees every lease held (call once the work on them has stopped)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.held.clear()
        try:
            async with self.uow.transaction() as uow:
                released = await uow.deployments.release_leases(self.owner)
        except Exception:  # noqa: BLE001 - the leases then expire on their own
            log.exception("releasing leases failed")
            return
        if released:
            log.info("released %d leases", len(released), extra={"fields": {"owner": self.owner}})
