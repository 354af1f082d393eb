"""End-to-end on the LOCAL backend: a real registry, the deployer over gRPC, real model-server processes."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import grpc
import openai
import pytest
from google.protobuf import field_mask_pb2
from helpers import model_server_processes, watch_until
from prometheus_client.parser import text_string_to_metric_families

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.inference.v1 import inference_pb2 as ipb
from neuroweaver.inference.v1 import inference_service_pb2 as isvc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as igrpc
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver_deployer.domain.model import Backend
from neuroweaver_runtime.grpc_errors import error_info

pytestmark = pytest.mark.slow  # model-server processes

AVAILABLE = dpb.Deployment.STATE_AVAILABLE
DEGRADED = dpb.Deployment.STATE_DEGRADED


def gen(max_tokens=4):
    return isvc.GenerateRequest(
        messages=[ipb.ChatMessage(role="user", content="Hello!")], sampling=ipb.SamplingParams(max_tokens=max_tokens)
    )


async def test_deploy_scale_update_kill_rollback_undeploy(stack):
    dep = stack.dep
    name = "projects/default/deployments/advisor-local"
    created = await dep.CreateDeployment(
        dsvc.CreateDeploymentRequest(
            parent="projects/default",
            deployment_id="advisor-local",
            deployment=dpb.Deployment(
                model_version=stack.versions[0],
                replicas=1,
                backend=dpb.BACKEND_LOCAL,
                serving=dpb.ServingConfig(max_new_tokens_limit=64),
            ),
        )  # fmt: skip
    )
    assert created.revision == 1 and created.served_model_name.startswith("advisor-1-0-0-")
    d = await watch_until(dep, name, lambda d: d.state == AVAILABLE and d.ready_replicas == 1)
    assert d.endpoint and d.openai_base_url.endswith("/v1")

    with pytest.raises(grpc.aio.AioRpcError) as err:  # nothing to roll back to yet
        await dep.RollbackDeployment(dsvc.RollbackDeploymentRequest(name=name))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and error_info(err.value).reason == "NO_PREVIOUS_REVISION"

    async with grpc.aio.insecure_channel(d.endpoint) as channel:
        inference = igrpc.InferenceServiceStub(channel)
        reply = await inference.Generate(gen())  # no model named: the default, the deployment's name
        assert (reply.model, reply.served_model, reply.model_version) == (name, d.served_model_name, stack.versions[0])
        assert reply.usage.completion_tokens > 0
        client = openai.AsyncOpenAI(base_url=d.openai_base_url, api_key="unused", max_retries=0)
        chat = await client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hello!"}], max_tokens=4)
        assert chat.model == name and chat.usage.completion_tokens > 0
        assert list(d.model_names) == [name, "advisor-local"]
        assert [m.id for m in (await client.models.list()).data] == [*d.model_names, d.served_model_name]

        # scale to 2
        await dep.ScaleDeployment(dsvc.ScaleDeploymentRequest(name=name, replicas=2))
        d = await watch_until(dep, name, lambda d: d.state == AVAILABLE and d.ready_replicas == 2 and d.replicas == 2)
        assert len(model_server_processes()) == 2
        # one scrape of the deployment's endpoint sees both replicas, each sample labelled with its replica
        router = stack.deployer.controller.backends[Backend.LOCAL].deployments[name].router
        async with aiohttp.ClientSession() as http, http.get(router.metrics_url) as resp:
            assert resp.status == 200
            families = list(text_string_to_metric_families(await resp.text()))
        replicas = {s.labels["replica"] for f in families for s in f.samples}
        assert len(replicas) == 2 and len({f.name for f in families}) == len(families)

        # update to a new version while a client keeps calling: not one failed request
        counts = {"ok": 0, "failed": 0, "versions": set()}
        stop = asyncio.Event()

        async def client_loop():
            request = gen(2)
            request.model = "advisor-local"  # a stable name: it keeps working across the version change
            while not stop.is_set():
                try:
                    r = await inference.Generate(request, timeout=30)
                    counts["ok"] += 1
                    counts["versions"].add(r.model_version)
                except grpc.aio.AioRpcError as exc:
                    counts["failed"] += 1
                    counts.setdefault("errors", []).append(exc.code())

        loops = [asyncio.create_task(client_loop())]
        await wait_for_count(counts, 2)
        old_pids = {p.pid for p in model_server_processes()}
        updated = await dep.UpdateDeployment(
            dsvc.UpdateDeploymentRequest(
                deployment=dpb.Deployment(name=name, model_version=stack.versions[1]),
                update_mask=field_mask_pb2.FieldMask(paths=["model_version"]),
            )
        )
        assert updated.revision == 2
        d = await watch_until(dep, name, lambda d: d.state == AVAILABLE and d.served_version == stack.versions[1] and d.ready_replicas == 2
                              and not (old_pids & {p.pid for p in model_server_processes()}))  # fmt: skip
        ok_before = counts["ok"]
        await wait_for_count(counts, ok_before + 2)  # the new version serves through the same endpoint
        stop.set()
        await asyncio.gather(*loops)
        assert counts["failed"] == 0, counts
        assert counts["versions"] == {stack.versions[0], stack.versions[1]}
        assert d.served_model_name.startswith("advisor-1-1-0-")

        # SIGKILL a replica: degraded while it restarts, then available again
        seen: list = []
        watcher = asyncio.create_task(
            watch_until(dep, name, lambda d: DEGRADED in seen and d.state == AVAILABLE and d.ready_replicas == 2, seen=seen)
        )
        await watch_until(dep, name, lambda d: d.state == AVAILABLE)  # the watcher is subscribed by now
        victim = model_server_processes()[0]
        os.kill(victim.pid, signal.SIGKILL)
        await watcher
        assert DEGRADED in seen
        assert victim.pid not in {p.pid for p in model_server_processes()} and len(model_server_processes()) == 2
        assert (await inference.Generate(gen())).served_model == d.served_model_name

    # scale down (stops one replica at once), then roll back to revision 1
    await dep.ScaleDeployment(dsvc.ScaleDeploymentRequest(name=name, replicas=1))
    await watch_until(dep, name, lambda d: d.replicas == 1 and d.ready_replicas == 1 and d.state == AVAILABLE)
    assert len(model_server_processes()) == 1
    rolled = await dep.RollbackDeployment(dsvc.RollbackDeploymentRequest(name=name))
    assert rolled.revision == 3 and rolled.model_version == stack.versions[0]
    d = await watch_until(
        dep, name, lambda d: d.state == AVAILABLE and d.served_version == stack.versions[0] and d.ready_replicas == 1
    )
    revisions = await dep.ListDeploymentRevisions(dsvc.ListDeploymentRevisionsRequest(parent=name))
    assert [(r.revision, r.cause) for r in revisions.revisions] == [(3, "rollback"), (2, "update"), (1, "create")]
    assert revisions.revisions[0].model_version == stack.versions[0]

    listed = await dep.ListDeployments(dsvc.ListDeploymentsRequest(parent="projects/default", filter='backend = "LOCAL"'))
    assert name in [x.name for x in listed.deployments]

    # undeploy: nothing left running
    await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=name))
    assert model_server_processes() == []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await dep.GetDeployment(dsvc.GetDeploymentRequest(name=name))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert name not in stack.deployer.controller.backends[Backend.LOCAL].deployments


async def wait_for_count(counts, n: int, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while counts["ok"] < n:
            await asyncio.sleep(0.01)


async def test_follows_a_registry_alias(stack):
    dep, reg = stack.dep, stack.reg
    await reg.SetModelAlias(rsvc.SetModelAliasRequest(model=stack.MODEL, alias="production", version="1.0.0"))
    name = "projects/default/deployments/advisor-prod"
    await dep.CreateDeployment(
        dsvc.CreateDeploymentRequest(
            parent="projects/default",
            deployment_id="advisor-prod",
            deployment=dpb.Deployment(model_alias=f"{stack.MODEL}/aliases/production", replicas=1),
        )  # fmt: skip
    )
    d = await watch_until(dep, name, lambda d: d.state == AVAILABLE)
    assert d.served_version == stack.versions[0]
    await reg.SetModelAlias(
        rsvc.SetModelAliasRequest(model=stack.MODEL, alias="production", version="1.2.0", reason="won the A/B test")
    )
    d = await watch_until(dep, name, lambda d: d.state == AVAILABLE and d.served_version == stack.versions[2])
    assert d.revision == 2 and d.model_alias.endswith("/aliases/production")
    revisions = await dep.ListDeploymentRevisions(dsvc.ListDeploymentRevisionsRequest(parent=name))
    assert revisions.revisions[0].cause == "alias:1.0.0->1.2.0"
    async with grpc.aio.insecure_channel(d.endpoint) as channel:
        request = gen()
        request.model = "advisor@production"
        reply = await igrpc.InferenceServiceStub(channel).Generate(request)
        assert reply.model_version == stack.versions[2] and reply.served_model.startswith("advisor-1-2-0-")
    await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=name))
    assert model_server_processes() == []
