"""Variants served by one shared model server (issue 17 §3): a deployment serving several versions on one base
(serving.additional_versions) answers to `<deployment>/<version>` for each (Deployment.served_versions). Two variants
naming that deployment get its endpoint and each the name selecting its own version: in StartExperiment's answer,
assignments and the config watch's configs (the SDKs' local evaluation); followed live when the deployment changes
what it serves. A deployment serving one version keeps its own name (stable across rollovers); a version the shared
server no longer serves gets `<deployment>/<version>` (NOT_FOUND there, never another version's answers)."""

from __future__ import annotations

import asyncio
import time

from neuroweaver_experiments.adapters.clients import DeploymentEndpoint
from neuroweaver_experiments.api.convert import experiment_to_pb
from neuroweaver_experiments.domain.experiment import Experiment, Variant
from neuroweaver_experiments.domain.statistics import MetricSpec

P = "projects/default"
DEP = f"{P}/deployments/advisor-ab"
BASE, TUNED, OTHER = (f"{P}/models/m/versions/{v}" for v in ("1.0.0", "1.1.0", "1.2.0"))


def shared(port: int, *versions: str) -> DeploymentEndpoint:
    return DeploymentEndpoint(
        f"127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}/v1", tuple((v, f"{DEP}/{v.rsplit('/', 1)[-1]}") for v in versions)
    )


async def models(svc, name: str) -> dict[str, tuple[str, str]]:
    snap, _ = await svc.assign_snapshot(name, ["u1"])
    return {v.id: (v.endpoint, v.model) for v in snap.experiment.variants}


async def test_two_variants_on_one_shared_server_each_select_their_version(fakes):
    svc = fakes.service
    svc.endpoints.max_backoff = 0.05
    fakes.deployer.endpoints[DEP] = shared(1000, BASE, TUNED)
    exp = Experiment(
        name="",
        variants=[Variant("control", BASE, deployment=DEP, weight=0.5), Variant("tuned", TUNED, deployment=DEP, weight=0.5)],
        primary_metric=MetricSpec("score"),
    )
    name = (await svc.create(P, "ab", exp, "", "fp")).name
    started = await svc.start(name)
    assert [(v.endpoint, v.model) for v in started.variants] == [
        ("127.0.0.1:1000", f"{DEP}/1.0.0"),
        ("127.0.0.1:1000", f"{DEP}/1.1.0"),
    ]
    assert await models(svc, name) == {"control": ("127.0.0.1:1000", f"{DEP}/1.0.0"), "tuned": ("127.0.0.1:1000", f"{DEP}/1.1.0")}
    assert [v.model for v in experiment_to_pb(await svc.get(name)).variants] == [f"{DEP}/1.0.0", f"{DEP}/1.1.0"]
    # the config watch (SDK local evaluation) sends the same names, and again when they change
    svc.local.poll = 0.05
    watch = svc.local.watch(P, 0)
    first = await asyncio.wait_for(anext(watch), 10)
    assert [v.model for v in first.configs[0].variants] == [f"{DEP}/1.0.0", f"{DEP}/1.1.0"]

    # it serves one version again (its alias moved onto the candidate): the deployment's own name, as for any deployment
    fakes.deployer.move(DEP, shared(1000))
    deadline = time.monotonic() + 10
    while await models(svc, name) != {"control": ("127.0.0.1:1000", DEP), "tuned": ("127.0.0.1:1000", DEP)}:
        assert time.monotonic() < deadline, "timed out waiting for the single-version names"
        await asyncio.sleep(0.01)
    change = await asyncio.wait_for(anext(watch), 10)
    assert change.version > first.version and [v.model for v in change.configs[0].variants] == [DEP, DEP]
    await watch.aclose()


def test_a_version_the_shared_server_no_longer_serves_is_named_not_replaced():
    v = Variant("control", BASE, deployment=DEP)
    assert v.follow("127.0.0.1:1000", "http://127.0.0.1:1001/v1", shared(1000, TUNED, OTHER).version_models)
    assert v.model == f"{DEP}/1.0.0"  # NOT_FOUND on that server: never 1.1.0's or 1.2.0's answers
    assert not v.follow("127.0.0.1:1000", "http://127.0.0.1:1001/v1", shared(1000, TUNED, OTHER).version_models)


def test_the_deployers_served_versions_give_the_names():
    from neuroweaver.deployer.v1 import deployment_pb2 as dpb

    d = dpb.Deployment(name=DEP, endpoint="h:1", openai_base_url="http://h:2/v1")
    d.served_versions.add(model_version=BASE, model_names=[DEP, "advisor-ab", f"{DEP}/1.0.0", "advisor-ab/1.0.0"])
    d.served_versions.add(model_version=TUNED, model_names=[f"{DEP}/1.1.0", "advisor-ab/1.1.0"])
    assert DeploymentEndpoint.of(d).version_models == ((BASE, f"{DEP}/1.0.0"), (TUNED, f"{DEP}/1.1.0"))
    del d.served_versions[1]
    assert DeploymentEndpoint.of(d) == DeploymentEndpoint("h:1", "http://h:2/v1")  # one version: its own names
