"""Variant endpoints follow the deployer, not the row written at StartExperiment: when a deployment's front door
moves (a restarted deployer's router listens on new ports), AssignVariant and GetExperiment answer with the new
endpoint, memoised replies included; while the deployer is unreachable, the last known (else the stored) one."""

from __future__ import annotations

import asyncio
import time

from neuroweaver_experiments.adapters.clients import DeploymentEndpoint
from neuroweaver_experiments.domain.experiment import Experiment, Variant
from neuroweaver_experiments.domain.statistics import MetricSpec
from neuroweaver_runtime.errors import Unavailable

P = "projects/default"
DEP = f"{P}/deployments/d"


def _ep(port: int) -> DeploymentEndpoint:
    return DeploymentEndpoint(f"127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}/v1")


def _exp() -> Experiment:
    return Experiment(
        name="",
        variants=[
            Variant("control", f"{P}/models/m/versions/1.0.0", deployment=DEP, weight=0.5),
            Variant("treatment", f"{P}/models/m/versions/1.1.0", weight=0.5),
        ],
        primary_metric=MetricSpec("score"),
    )


async def _until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


async def test_assignments_carry_the_endpoint_the_deployer_reports_now(fakes):
    svc = fakes.service
    svc.endpoints.max_backoff = 0.05  # reconnects at once after the outage below
    svc.assigner.ttl = 3600.0  # snapshots (and the replies memoised with them) stay cached unless dropped
    fakes.deployer.endpoints[DEP] = _ep(1000)
    name = (await svc.create(P, "e1", _exp(), "", "fp")).name
    await svc.start(name)

    async def endpoint_of(unit: str = "u1") -> str:
        snap, _ = await svc.assign_snapshot(name, [unit])
        return snap.experiment.variants[0].endpoint

    assert await endpoint_of() == "127.0.0.1:1000"

    # The deployer restarts: its watch fails meanwhile (the last known endpoint stays), then its router's new ports.
    fakes.deployer.fail(Unavailable("deployer restarting", reason="DEPLOYER_UNAVAILABLE"))
    assert await endpoint_of() == "127.0.0.1:1000"
    fakes.deployer.endpoints[DEP] = _ep(2000)
    fakes.deployer.fail(None)

    async def moved() -> bool:
        return await endpoint_of() == "127.0.0.1:2000"

    await _until(moved, "assignments carry the new endpoint")
    got = await svc.get(name)
    assert (got.variants[0].endpoint, got.variants[0].openai_base_url) == ("127.0.0.1:2000", "http://127.0.0.1:2001/v1")
    assert (await svc.assigner.snapshot(name)).experiment.variants[1].endpoint == ""  # no deployment: nothing to follow

    # A move drops the cached snapshot (with the replies memoised from it): the next answer carries the new one.
    assert svc.assigner.fresh(name) is not None
    fakes.deployer.move(DEP, _ep(3000))

    async def dropped() -> bool:
        return svc.assigner.fresh(name) is None

    await _until(dropped, "the snapshot is dropped")
    assert await endpoint_of("u1") == await endpoint_of("u2") == "127.0.0.1:3000"


async def test_first_use_waits_for_the_watch_and_an_unreachable_deployer_leaves_the_stored_endpoint(fakes):
    svc = fakes.service
    fakes.deployer.endpoints[DEP] = _ep(1000)
    name = (await svc.create(P, "e2", _exp(), "", "fp")).name
    await svc.start(name)  # stores 127.0.0.1:1000 (and starts following the deployment)
    await svc.endpoints.close()  # as in a process started later, which has never watched it

    fakes.deployer.endpoints[DEP] = _ep(4000)  # moved meanwhile: the stored endpoint is stale
    assert (await svc.get(name)).variants[0].endpoint == "127.0.0.1:4000"  # the first use waited for the watch

    await svc.endpoints.close()
    fakes.deployer.fail(Unavailable("deployer down", reason="DEPLOYER_UNAVAILABLE"))
    assert (await svc.get(name)).variants[0].endpoint == "127.0.0.1:1000"  # the stored one
