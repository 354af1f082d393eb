"""GetDeploymentMetrics and `nw deployments top` on a real local deployment: two model-server replicas of a tiny
model behind the router, a little real traffic (gRPC unary and streaming, requests that fail on gRPC and HTTP), then
the deployer's numbers checked against what the clients saw."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from asyncio.subprocess import PIPE
from dataclasses import dataclass

import aiohttp
import grpc
import pytest
from google.protobuf import duration_pb2
from helpers import watch_until

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.inference.v1 import inference_pb2 as ipb
from neuroweaver.inference.v1 import inference_service_pb2 as isvc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as igrpc

pytestmark = pytest.mark.slow  # model-server processes

NAME = "projects/default/deployments/advisor-metrics"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 120)  # the model server's latency buckets


def floor_bound(x: float) -> float:
    """The highest bucket bound at or below x (0 below the first): no interpolated quantile of observations >= x
    can lie below it."""
    return max((b for b in BUCKETS if b <= x), default=0.0)


def ceil_bound(x: float) -> float:
    return min(b for b in BUCKETS if b >= x)


def gen(max_tokens: int) -> isvc.GenerateRequest:
    return isvc.GenerateRequest(
        messages=[ipb.ChatMessage(role="user", content="Hello there!")], sampling=ipb.SamplingParams(max_tokens=max_tokens)
    )


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def nw(env: dict, *args: str) -> Ran:
    """The CLI as a process, awaited (the deployer serves it from this test's event loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "neuroweaver_sdk.cli", *args, env=env, stdout=PIPE, stderr=PIPE
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    return Ran(proc.returncode or 0, out.decode(), err.decode())


async def metrics(dep, window: int) -> dsvc.DeploymentMetrics:
    return await dep.GetDeploymentMetrics(
        dsvc.GetDeploymentMetricsRequest(name=NAME, window=duration_pb2.Duration(seconds=window))
    )


async def test_live_metrics_of_a_local_deployment_match_the_traffic(stack):
    dep = stack.dep
    await dep.CreateDeployment(
        dsvc.CreateDeploymentRequest(
            parent="projects/default", deployment_id="advisor-metrics",
            deployment=dpb.Deployment(model_version=stack.versions[0], replicas=2, backend=dpb.BACKEND_LOCAL,
                                      serving=dpb.ServingConfig(max_new_tokens_limit=64)),
        )
    )  # fmt: skip
    d = await watch_until(dep, NAME, lambda d: d.state == dpb.Deployment.STATE_AVAILABLE and d.ready_replicas == 2)
    try:
        idle = await metrics(dep, 3600)  # nothing served yet: rows for both replicas, zero rates, no quantiles
        assert len(idle.replicas) == 2 and idle.total.requests == 0 and idle.source == dsvc.DeploymentMetrics.SOURCE_REPLICAS
        assert not idle.total.HasField("latency_p50_seconds") and not idle.total.HasField("error_rate")

        walls, latencies, ttfts, tokens = [], [], [], 0
        async with grpc.aio.insecure_channel(d.endpoint) as channel:
            inference = igrpc.InferenceServiceStub(channel)

            async def unary():
                started = time.monotonic()
                reply = await inference.Generate(gen(8), timeout=60)
                walls.append(time.monotonic() - started)
                latencies.append(reply.latency.ToTimedelta().total_seconds())
                ttfts.append(reply.time_to_first_token.ToTimedelta().total_seconds())
                return reply.usage.completion_tokens

            async def stream():
                started = time.monotonic()
                last = None
                async for last in inference.GenerateStream(gen(6), timeout=60):  # noqa: B007 - the final message counts
                    pass
                walls.append(time.monotonic() - started)
                latencies.append(last.latency.ToTimedelta().total_seconds())
                ttfts.append(last.time_to_first_token.ToTimedelta().total_seconds())
                return last.usage.completion_tokens

            for _ in range(3):  # 4 at a time: the replicas batch and queue
                tokens += sum(await asyncio.gather(unary(), unary(), unary(), stream()))
            failed = 0
            for _ in range(2):  # over the deployment's max_new_tokens_limit: refused by the replica
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await inference.Generate(gen(1000), timeout=60)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                failed += 1
        async with aiohttp.ClientSession() as http:  # and one refused on the OpenAI API (not JSON)
            async with http.post(d.openai_base_url + "/chat/completions", data=b"{nope") as resp:
                assert resp.status == 400
                failed += 1
        served = len(walls)

        m = await metrics(dep, 3600)  # both replicas are younger than the window: every request is in it
        t = m.total
        assert m.name == NAME and m.window.seconds == 3600 and m.sample_time.seconds > 0
        assert t.requests == served + failed
        assert t.requests_per_second > 0 and t.output_tokens_per_second > 0
        assert t.error_rate == pytest.approx(failed / (served + failed)) and t.server_error_rate == 0
        # every request finished: nothing waits or decodes now
        assert t.queue_depth == 0 and t.inflight_requests == 0

        lo, hi = floor_bound(min(latencies)), ceil_bound(max(walls))
        quantiles = [t.latency_p50_seconds, t.latency_p95_seconds, t.latency_p99_seconds]
        assert all(lo <= q <= hi for q in quantiles), (quantiles, lo, hi)
        assert quantiles == sorted(quantiles)
        lo_ttft = floor_bound(min(ttfts))
        ttft = [t.time_to_first_token_p50_seconds, t.time_to_first_token_p95_seconds, t.time_to_first_token_p99_seconds]
        assert all(lo_ttft <= q <= hi for q in ttft) and ttft == sorted(ttft), (ttft, lo_ttft, hi)
        assert t.time_to_first_token_p50_seconds <= t.latency_p99_seconds

        # per replica: both served (round robin), their counts add up to the total, rates times span = counts
        rows = m.replicas
        assert len(rows) == 2 and len({r.replica for r in rows}) == 2
        assert all(r.stats.requests > 0 for r in rows)
        assert sum(r.stats.requests for r in rows) == t.requests
        covered = [r.covered.ToTimedelta().total_seconds() for r in rows]
        assert all(0 < c <= 3600 for c in covered)
        assert sum(r.stats.output_tokens_per_second * c for r, c in zip(rows, covered, strict=True)) == pytest.approx(tokens)
        assert sum(r.stats.requests_per_second for r in rows) == pytest.approx(t.requests_per_second)

        # `nw deployments top`: --json is one sample; the live table shows a row per replica and the total
        env = {**os.environ, "COLUMNS": "250", "NW_DEPLOYER_TARGET": f"127.0.0.1:{stack.deployer.port}"}
        out = await nw(env, "--json", "deployments", "top", "advisor-metrics", "--window", "3600")
        assert out.returncode == 0, out.stderr
        sample = json.loads(out.stdout)
        assert sample["name"] == NAME and len(sample["replicas"]) == 2 and sample["source"] == "SOURCE_REPLICAS"
        assert sample["total"]["requests"] == served + failed and sample["total"]["output_tokens_per_second"] > 0
        out = await nw(env, "deployments", "top", "advisor-metrics", "--count", "2", "--interval", "0.1")
        assert out.returncode == 0, out.stderr
        assert "total" in out.stdout and all(r.replica in out.stdout for r in rows) and "req/s" in out.stdout
        out = await nw(env, "deployments", "top", "advisor-metrics", "--window", "0")
        assert out.returncode == 1 and "INVALID_WINDOW" in out.stderr and "window" in out.stderr

        # no replica left: the router answers calls itself; they count as server errors in a row "router"
        await dep.ScaleDeployment(dsvc.ScaleDeploymentRequest(name=NAME, replicas=0))
        d = await watch_until(dep, NAME, lambda d: d.replicas == 0 and d.ready_replicas == 0)
        async with grpc.aio.insecure_channel(d.endpoint) as channel:
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await igrpc.InferenceServiceStub(channel).Generate(gen(4), timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        async with aiohttp.ClientSession() as http:
            body = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            async with http.post(d.openai_base_url + "/chat/completions", json=body) as resp:
                assert resp.status == 503
        down = await metrics(dep, 3600)
        assert [r.replica for r in down.replicas] == ["router"]
        assert down.total.requests == 3 and down.total.error_rate == 1 and down.total.server_error_rate == 1
    finally:
        await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=NAME))


@pytest.fixture
async def kube_pods_stack(tmp_path, tiny_base, adapters):
    """The deployer on the Kubernetes API stand-in whose pod runner really starts model-server pods (bubblewrap
    sandboxes; see test_kube_pods.py); no Prometheus, so the deployer scrapes the pods."""
    import shutil

    from helpers import Stack

    from neuroweaver_kube.testing import KubeApiStandIn
    from neuroweaver_kube.testing.pods import PodRunner, bwrap_path

    if bwrap_path() is None:
        pytest.skip("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
    runner = PodRunner(state_dir=tmp_path / "standin")
    with KubeApiStandIn(pods=runner) as standin:
        standin.put({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "neuroweaver-artifacts", "namespace": "serving"},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
        })  # fmt: skip
        store = runner.claim_dir("serving", "neuroweaver-artifacts")
        base = shutil.copytree(tiny_base, store / "models" / "tiny-llama")
        adapter = shutil.copytree(adapters[0][0], store / "adapters" / "advisor-1")
        (tmp_path / "stack").mkdir()
        stack = Stack(tmp_path / "stack", base, [(adapter, adapters[0][1])], standin.url,
                      deployer_extra={"kube_artifacts_mount_path": str(store), "kube_namespace": "serving"})  # fmt: skip
        await stack.start()
        try:
            yield stack, standin
        finally:
            await stack.stop()


async def test_kubernetes_pods_are_scraped_without_prometheus(kube_pods_stack):
    from neuroweaver_kube.manifests import dns1123_name

    stack, standin = kube_pods_stack
    name = "projects/default/deployments/advisor-pods"
    spec = dpb.Deployment(model_version=stack.versions[0], backend=dpb.BACKEND_KUBERNETES, replicas=1, namespace="serving")
    await stack.dep.CreateDeployment(
        dsvc.CreateDeploymentRequest(parent="projects/default", deployment_id="advisor-pods", deployment=spec)
    )
    await watch_until(stack.dep, name, lambda d: d.state == dpb.Deployment.STATE_AVAILABLE and d.ready_replicas == 1)
    obj = dns1123_name(name)
    (pod,) = [p["metadata"]["name"] for p in standin.objects("Pod", "serving") if p["metadata"]["name"].startswith(obj)]
    tokens = 0
    async with grpc.aio.insecure_channel(f"{standin.pods.service_ip('serving', obj)}:50051") as channel:
        inference = igrpc.InferenceServiceStub(channel)
        for _ in range(3):
            tokens += (await inference.Generate(gen(4), timeout=60)).usage.completion_tokens
        with pytest.raises(grpc.aio.AioRpcError):
            await inference.Generate(gen(100000), timeout=60)
    request = dsvc.GetDeploymentMetricsRequest(name=name, window=duration_pb2.Duration(seconds=3600))
    m = await stack.dep.GetDeploymentMetrics(request)
    assert m.source == dsvc.DeploymentMetrics.SOURCE_PODS
    assert [r.replica for r in m.replicas] == [pod]
    assert m.total.requests == 4 and m.total.error_rate == pytest.approx(1 / 4) and m.total.requests_per_second > 0
    covered = m.replicas[0].covered.ToTimedelta().total_seconds()
    assert m.replicas[0].stats.output_tokens_per_second * covered == pytest.approx(tokens)
    assert m.total.HasField("latency_p50_seconds") and m.total.HasField("time_to_first_token_p99_seconds")
    await stack.dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=name))
