"""WatchExperimentConfigs' use case: an endpoint move reported by the deployer is a config change of the experiments
using that deployment, with a higher version; resuming from the last version sends nothing until the next change."""

from __future__ import annotations

import asyncio

from neuroweaver_experiments.adapters.clients import DeploymentEndpoint
from neuroweaver_experiments.domain.experiment import Experiment, Variant
from neuroweaver_experiments.domain.statistics import MetricSpec

P = "projects/default"
DEP = f"{P}/deployments/d"


def _ep(port: int) -> DeploymentEndpoint:
    return DeploymentEndpoint(f"127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}/v1")


async def test_endpoint_move_is_a_config_change(fakes):
    svc = fakes.service
    svc.local.poll = 0.05
    fakes.deployer.endpoints[DEP] = _ep(1000)
    exp = Experiment(
        name="",
        variants=[
            Variant("control", f"{P}/models/m/versions/1.0.0", deployment=DEP, weight=0.5),
            Variant("treatment", f"{P}/models/m/versions/1.1.0", weight=0.5),
        ],
        primary_metric=MetricSpec("score"),
    )
    name = (await svc.create(P, "w1", exp, "", "fp")).name
    await svc.start(name)
    watch = svc.local.watch(P, 0)
    first = await asyncio.wait_for(anext(watch), 10)
    assert first.snapshot and [e.name for e in first.configs] == [name]
    assert first.configs[0].variants[0].endpoint == "127.0.0.1:1000"

    fakes.deployer.move(DEP, _ep(3000))
    change = await asyncio.wait_for(anext(watch), 10)
    assert not change.snapshot and change.version > first.version
    assert [(e.name, e.variants[0].endpoint) for e in change.configs] == [(name, "127.0.0.1:3000")]
    await watch.aclose()

    # resumed from the last version: nothing to send until the next change (a stop: removed)
    resumed = svc.local.watch(P, change.version)
    pending = asyncio.ensure_future(anext(resumed))
    await asyncio.sleep(0.2)
    assert not pending.done()
    await svc.stop(name, "")
    gone = await asyncio.wait_for(pending, 10)
    assert not gone.snapshot and gone.removed == [name] and gone.version > change.version
    await resumed.aclose()


async def test_watches_of_a_project_share_one_version_read(fakes, monkeypatch):
    svc = fakes.service
    svc.local.poll = 3600.0  # the cached version stays fresh for the whole test
    reads = 0
    from neuroweaver_experiments.service import local_eval

    real = local_eval.LocalEvaluation._read_version

    async def counting(self, project):
        nonlocal reads
        reads += 1
        return await real(self, project)

    monkeypatch.setattr(local_eval.LocalEvaluation, "_read_version", counting)
    versions = await asyncio.gather(*(svc.local._stored_version("default") for _ in range(50)))
    assert reads == 1 and len(set(versions)) == 1
    await svc.local._stored_version("default")
    assert reads == 1  # cached
    await svc.create(P, "w2", Experiment(name="", variants=[Variant("a", f"{P}/models/m/versions/1", weight=0.5),
                                                            Variant("b", f"{P}/models/m/versions/2", weight=0.5)],
                                         primary_metric=MetricSpec("score")), "", "fp")  # fmt: skip
    await svc.start(f"{P}/experiments/w2")  # a local write: the next look reads the store again
    assert await svc.local._stored_version("default") > versions[0] and reads == 2
