"""Status written while a rollout is under way: a spec change (update, alias move, rollback, scale) accepted before
the backend finished the rollout of the previous one must not be reported AVAILABLE on the strength of the previous
spec's replicas. The backend here holds each rollout until the test releases it and, after every status report it
makes, records what is stored beside what it really runs, so every status written is checked (on the in-memory
store, SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from neuroweaver_deployer.domain.model import Backend, BackendStatus, Deployment, State, Target
from neuroweaver_deployer.service.controller import target_of

P = "projects/default"
NAME = f"{P}/deployments/d1"
ALIAS = f"{P}/models/m/aliases/prod"


@dataclass
class Record:
    stored: Deployment
    running: Target | None  # the target whose replicas are ready and serve; None while none is


class HeldBackend:
    """Like the local backend: a rollout reports itself under way, starts the target's replicas (here: waits until
    the test releases it) and then reports them ready; `running` is what serves meanwhile."""

    interruptible = True

    def __init__(self, fakes) -> None:
        self.fakes = fakes
        self.controller = fakes.service.controller
        self.running: dict[str, Target] = {}
        self.records: list[Record] = []
        self.applies: asyncio.Queue[tuple[Target, asyncio.Event]] = asyncio.Queue()
        self.refused: set[str] = set()  # versions whose apply fails

    async def apply(self, target: Target) -> None:
        gate = asyncio.Event()
        self.applies.put_nowait((target, gate))
        if target.version.name in self.refused:
            raise RuntimeError(f"cannot serve {target.version.name}")
        before = self.running.get(target.deployment)
        await self._report(
            target.deployment, self._status(before or target, ready=before.replicas if before else 0, rolling=True)
        )
        await gate.wait()  # the replicas start
        self.running[target.deployment] = target
        await self._report(target.deployment, self._status(target, ready=target.replicas))

    @staticmethod
    def _status(observed: Target, *, ready: int, rolling: bool = False) -> BackendStatus:
        return BackendStatus(
            desired=observed.replicas,
            ready=ready,
            rolling_out=rolling,
            observed=observed.rollout_key(),
            endpoint=f"local:{observed.deployment}",
        )

    async def _report(self, name: str, status: BackendStatus) -> None:
        await self.controller.on_status(name, status)
        stored = await self.fakes.service.get(name)  # what a watch or a Get sees right after this report
        self.records.append(Record(stored, self.running.get(name)))

    async def next_apply(self) -> tuple[Target, asyncio.Event]:
        return await asyncio.wait_for(self.applies.get(), 5)

    async def remove(self, name: str, target: Target | None = None) -> None:
        self.running.pop(name, None)

    async def release(self, name: str) -> None:
        pass

    async def close(self) -> None:
        pass


def check_invariant(records: list[Record]) -> None:
    """Whenever a deployment is stored AVAILABLE at revision R serving V, every replica the deployment asks for is
    ready on R's spec: the backend runs V, with R's serving settings and replica count."""
    for i, r in enumerate(records):
        d = r.stored
        if d.state is not State.AVAILABLE:
            continue
        assert d.target is not None
        expected = target_of(d, d.target)
        assert r.running is not None and r.running.version.name == d.served_version, (i, d.revision, d.served_version, r.running)
        assert r.running.fingerprint() == expected.fingerprint() and r.running.replicas == d.replicas == d.ready_replicas, (
            i,
            d.revision,
            d.replicas,
            d.ready_replicas,
        )


async def available(fakes, *, revision: int) -> Deployment:
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        d = await fakes.service.get(NAME)
        if d.state is State.AVAILABLE and d.revision == revision:
            return d
        assert asyncio.get_running_loop().time() < deadline, (d.state, d.revision)
        await asyncio.sleep(0.01)


async def change_mid_rollout(fakes, backend: HeldBackend, change: str) -> tuple[Target, Deployment]:
    """Starts a rollout, holds it, makes `change` meanwhile; returns the held rollout's target and what the change
    stored."""
    svc = fakes.service
    if change == "alias":
        fakes.registry.aliases[f"{P}/models/m/versions/prod"] = fakes.v1.name
        await svc.create(P, "d1", Deployment("", model_alias=ALIAS), "", "fp")
        held, gate = await backend.next_apply()
        fakes.registry.aliases[f"{P}/models/m/versions/prod"] = fakes.v2.name
        assert await svc.follow_alias(NAME)
    elif change in ("update", "scale"):
        await svc.create(P, "d1", Deployment("", model_version=fakes.v1.name), "", "fp")
        held, gate = await backend.next_apply()
        if change == "update":
            await svc.update(Deployment(NAME, model_version=fakes.v2.name), {"model_version"}, "")
        else:
            await svc.scale(NAME, 2)
    else:  # rollback while the rollout of revision 2 runs
        await svc.create(P, "d1", Deployment("", model_version=fakes.v1.name), "", "fp")
        _, first = await backend.next_apply()
        first.set()
        await available(fakes, revision=1)
        await svc.update(Deployment(NAME, model_version=fakes.v2.name), {"model_version"}, "")
        held, gate = await backend.next_apply()
        await svc.rollback(NAME, 0)
    changed = await svc.get(NAME)
    assert changed.state is not State.AVAILABLE
    gate.set()  # the held rollout ends: its replicas are ready, but for the spec before the change
    return held, changed


@pytest.mark.parametrize("change", ["update", "alias", "scale", "rollback"])
async def test_a_change_accepted_mid_rollout_is_available_only_once_its_own_replicas_are(fakes, change):
    backend = HeldBackend(fakes)
    fakes.service.controller.backends[Backend.LOCAL] = backend

    held, changed = await change_mid_rollout(fakes, backend, change)
    target, gate = await backend.next_apply()  # the controller goes on with the changed spec
    assert target != held and (target.version.name, target.replicas) == (changed.served_version, changed.replicas)
    stale = next(r for r in backend.records if r.running is held)  # the held rollout's last report
    assert stale.stored.state is State.PROGRESSING and stale.stored.revision == changed.revision
    assert {c.type: (c.status, c.reason) for c in stale.stored.conditions}["Progressing"] == ("True", "RolloutInProgress")
    check_invariant(backend.records)

    gate.set()
    done = await available(fakes, revision=changed.revision)
    assert (done.served_version, done.ready_replicas) == (changed.served_version, changed.replicas)
    async with asyncio.timeout(5):  # the report that made it AVAILABLE is recorded once its read returns
        while backend.records[-1].stored.state is not State.AVAILABLE:
            await asyncio.sleep(0.01)
    check_invariant(backend.records)


async def test_a_failed_apply_is_not_hidden_by_reports_of_what_still_runs(fakes):
    """The backend cannot apply revision 2 and goes on running (and reporting) revision 1, as the Kubernetes poller
    does: the deployment stays DEGRADED with the failure, neither AVAILABLE nor rolling out, until a spec applies."""
    svc = fakes.service
    backend = HeldBackend(fakes)
    backend.refused = {fakes.v2.name}
    svc.controller.backends[Backend.LOCAL] = backend
    await svc.create(P, "d1", Deployment("", model_version=fakes.v1.name), "", "fp")
    (first, gate) = await backend.next_apply()
    gate.set()
    await available(fakes, revision=1)
    await svc.update(Deployment(NAME, model_version=fakes.v2.name), {"model_version"}, "")
    await backend.next_apply()  # refused

    async def degraded() -> Deployment:
        deadline = asyncio.get_running_loop().time() + 5
        while (d := await svc.get(NAME)).state is not State.DEGRADED:
            assert asyncio.get_running_loop().time() < deadline, d.state
            await asyncio.sleep(0.01)
        return d

    await degraded()
    await backend._report(NAME, backend._status(first, ready=1))  # revision 1's replica, still serving
    d = await svc.get(NAME)
    assert (d.state, d.revision, d.ready_replicas) == (State.DEGRADED, 2, 1)
    conditions = {c.type: (c.status, c.reason, c.message) for c in d.conditions}
    assert conditions["Progressing"] == ("False", "RolloutFailed", f"cannot serve {fakes.v2.name}")
    check_invariant(backend.records)

    await svc.update(Deployment(NAME, model_version=fakes.v3.name), {"model_version"}, "")
    _, gate = await backend.next_apply()
    gate.set()
    assert (await available(fakes, revision=3)).served_version == fakes.v3.name
    check_invariant(backend.records)
