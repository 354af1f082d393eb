"""GetDeploymentMetrics' Prometheus source and histogram_quantile against a real Prometheus (the Debian package
`prometheus`, 2.42 here): two "pods" export the model server's metric names (prometheus_client), Prometheus scrapes
them every second with the target labels a ServiceMonitor gives (namespace, service, pod), and
- our histogram_quantile gives what Prometheus' histogram_quantile gives on the same buckets;
- PrometheusMetrics' PromQL answers per pod and in total: request counts, error rates, latency quantiles equal to
  ours on the bucket increases (ratios are untouched by Prometheus' extrapolation), queue depth, tokens/s.
Skipped (with the reason) where no prometheus binary is installed; on CI (.ci/run installs it) a missing one fails."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import subprocess

import aiohttp
import pytest
from aiohttp import web
from helpers import start_http_app
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from neuroweaver_deployer.adapters.prometheus import PrometheusMetrics
from neuroweaver_deployer.domain.metrics import histogram_quantile
from neuroweaver_deployer.domain.model import Backend, Deployment
from neuroweaver_kube.manifests import dns1123_name
from neuroweaver_runtime.testing import free_port

PROMETHEUS = shutil.which("prometheus")
if PROMETHEUS is None and os.environ.get("CI") == "true":
    raise RuntimeError("prometheus is missing on CI: .ci/run installs the Debian package prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")
DEPLOYED = "projects/default/deployments/advisor-prom"  # a deployment of the stack: its pod's series
DEPLOYED_POD = "advisor-prom-5d8b9-x2x7q"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 120)


class Pod:
    """What one model-server pod exports, under the model server's names and labels."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("nw_inference_requests", "", ["method", "code"], registry=r)
        self.latency = Histogram("nw_inference_request_duration_seconds", "", ["method", "code"], buckets=BUCKETS, registry=r)
        self.ttft = Histogram("nw_inference_time_to_first_token_seconds", "", ["method"], buckets=BUCKETS, registry=r)
        self.tokens = Counter("nw_inference_completion_tokens", "", registry=r)
        self.queue = Gauge("nw_inference_queue_depth", "", registry=r)
        Gauge("nw_inference_inflight_requests", "", registry=r)
        for code in ("OK", "InvalidArgument", "Unavailable"):  # every series exists from the first scrape
            self.requests.labels("Generate", code)
            self.latency.labels("Generate", code)
        self.ttft.labels("Generate")

    def serve(self, ok_latencies: list[float], invalid: int, unavailable: int, tokens: int) -> None:
        for x in ok_latencies:
            self.requests.labels("Generate", "OK").inc()
            self.latency.labels("Generate", "OK").observe(x)
            self.ttft.labels("Generate").observe(x / 4)
        self.requests.labels("Generate", "InvalidArgument").inc(invalid)
        self.requests.labels("Generate", "Unavailable").inc(unavailable)
        self.tokens.inc(tokens)

    def ok_buckets(self) -> list[tuple[float, float]]:
        return [
            (float(s.labels["le"]), s.value)
            for f in self.registry.collect()
            for s in f.samples
            if s.name.endswith("duration_seconds_bucket") and s.labels["code"] == "OK"
        ]


@pytest.fixture
async def prometheus(tmp_path):
    pods, runners, targets = {"advisor-a": Pod(), "advisor-b": Pod(), DEPLOYED_POD: Pod()}, [], []
    for name, pod in pods.items():
        namespace, service = ("serving", "advisor") if name != DEPLOYED_POD else ("neuroweaver", dns1123_name(DEPLOYED))
        app = web.Application()

        async def metrics(_request, pod=pod):
            return web.Response(body=generate_latest(pod.registry), content_type="text/plain")

        app.router.add_get("/metrics", metrics)
        runner, port = await start_http_app(app)
        runners.append(runner)
        targets.append(
            f"      - targets: ['127.0.0.1:{port}']\n        labels: {{namespace: {namespace}, service: {service}, pod: {name}}}\n"
        )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\nscrape_configs:\n  - job_name: model-server\n"
        "    static_configs:\n" + "".join(targets)
    )
    port = free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            await until(http, url, lambda: True, "/-/ready")
            yield url, pods, http
    finally:
        proc.terminate()
        proc.wait(20)
        for runner in runners:
            await runner.cleanup()


async def until(http, url, check, path="/-/ready", timeout=60.0):
    async with asyncio.timeout(timeout):
        while True:
            try:
                async with http.get(url + path) as resp:
                    if resp.status == 200 and check():
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)  # polling interval while Prometheus starts


async def instant(http, url: str, promql: str) -> dict[str, float]:
    async with http.get(url + "/api/v1/query", params={"query": promql}) as resp:
        body = await resp.json()
    assert body["status"] == "success", body
    return {r["metric"].get("pod", ""): float(r["value"][1]) for r in body["data"]["result"]}


async def scraped(http, url: str, pods: dict[str, Pod]) -> None:
    """Until Prometheus holds every pod's current OK count (the last change was scraped)."""
    want = {name: pod.requests.labels("Generate", "OK")._value.get() for name, pod in pods.items()}
    async with asyncio.timeout(60):
        while await instant(http, url, 'sum by (pod) (nw_inference_requests_total{code="OK"})') != want:
            await asyncio.sleep(0.2)  # polling interval until the next scrape lands


async def test_histogram_quantile_matches_prometheus(prometheus):
    url, pods, http = prometheus
    pods["advisor-a"].serve([0.003, 0.02, 0.02, 0.07, 0.07, 0.07, 0.3, 0.3, 0.9, 1.5, 3.0, 50.0, 200.0], 0, 0, 0)
    await scraped(http, url, pods)
    buckets = pods["advisor-a"].ok_buckets()
    for q in (0.0, 0.01, 0.1, 0.25, 0.5, 0.66, 0.9, 0.95, 0.99, 1.0):
        theirs = await instant(
            http, url,
            f'histogram_quantile({q}, sum by (le) (nw_inference_request_duration_seconds_bucket{{pod="advisor-a",code="OK"}}))',
        )  # fmt: skip
        assert histogram_quantile(q, buckets) == pytest.approx(theirs[""], rel=1e-9), q


async def test_prometheus_source_per_pod_and_total(prometheus):
    url, pods, http = prometheus
    a, b = pods["advisor-a"], pods["advisor-b"]
    # Before the window: every series (each bucket included) well above 0, and more history than the window, so
    # Prometheus extrapolates every series of a pod alike and ratios (error rates, quantiles) come out exact.
    for pod in (a, b):
        pod.serve([0.001] * 20, 10, 10, 500)
    await scraped(http, url, pods)
    async with asyncio.timeout(60):
        while min((await instant(http, url, "count_over_time(nw_inference_requests_total[12s])")).values()) < 12:
            await asyncio.sleep(0.5)  # polling interval until Prometheus holds more history than the window
    a_before, b_before = a.ok_buckets(), b.ok_buckets()
    a.serve([0.04, 0.2, 0.2, 0.7, 3.0, 3.0], 2, 2, 60)  # 6 OK, 2 invalid, 2 unavailable
    b.serve([0.08, 0.08, 0.3], 1, 0, 30)  # 3 OK, 1 invalid
    a.queue.set(3)
    b.queue.set(1)
    await scraped(http, url, pods)

    source = PrometheusMetrics(url, lambda d: ("serving", "advisor"))
    try:
        p = await source.performance(Deployment(name="projects/p/deployments/advisor", backend=Backend.KUBERNETES), 10)
    finally:
        await source.close()
    assert p.source == "prometheus" and [r.replica for r in p.replicas] == ["advisor-a", "advisor-b"]  # not DEPLOYED_POD
    ra, rb = p.replicas[0].stats, p.replicas[1].stats
    assert ra.error_rate == pytest.approx(4 / 10) and ra.server_error_rate == pytest.approx(2 / 10)
    assert rb.error_rate == pytest.approx(1 / 4) and rb.server_error_rate == 0
    assert ra.requests > 0 and rb.requests > 0 and ra.requests_per_second > 0 and ra.output_tokens_per_second > 0
    assert (ra.queue_depth, rb.queue_depth, p.total.queue_depth) == (3, 1, 4)
    assert p.total.requests == pytest.approx(ra.requests + rb.requests)
    assert p.total.requests_per_second == pytest.approx(ra.requests_per_second + rb.requests_per_second)

    def increase(before, after):
        return [(le, n - dict(before)[le]) for le, n in after]

    a_inc, b_inc = increase(a_before, a.ok_buckets()), increase(b_before, b.ok_buckets())
    for q in (0.5, 0.95, 0.99):
        assert ra.latency[q] == pytest.approx(histogram_quantile(q, a_inc), rel=1e-6)
        assert rb.latency[q] == pytest.approx(histogram_quantile(q, b_inc), rel=1e-6)
        assert ra.ttft[q] is not None and not math.isnan(ra.ttft[q])
    # The total's quantiles are over the merged rates: equal to ours on merged increases only when both pods'
    # increases are extrapolated alike, so check the bounds instead: within the pods' own range.
    for q in (0.5, 0.95):
        assert min(ra.latency[q], rb.latency[q]) <= p.total.latency[q] <= max(ra.latency[q], rb.latency[q])


async def test_the_deployer_answers_kubernetes_deployments_from_prometheus(
    prometheus, tmp_path, tiny_base, adapters, kube_standin
):
    """--prometheus-url wired end to end: GetDeploymentMetrics over gRPC for a Kubernetes deployment (API stand-in)
    answers from Prometheus with the series of the deployment's Service."""
    from google.protobuf import duration_pb2
    from helpers import Stack, watch_until

    from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
    from neuroweaver.deployer.v1 import deployment_pb2 as dpb

    url, pods, http = prometheus
    pods[DEPLOYED_POD].serve([0.2, 0.3], 1, 0, 20)
    stack = Stack(tmp_path, tiny_base, adapters[:1], kube_standin.url, deployer_extra={"prometheus_url": url})
    await stack.start()
    try:
        spec = dpb.Deployment(model_version=stack.versions[0], backend=dpb.BACKEND_KUBERNETES, replicas=1)
        await stack.dep.CreateDeployment(
            dsvc.CreateDeploymentRequest(parent="projects/default", deployment_id="advisor-prom", deployment=spec)
        )
        await watch_until(stack.dep, DEPLOYED, lambda d: d.state == dpb.Deployment.STATE_AVAILABLE)
        await scraped(http, url, pods)
        pods[DEPLOYED_POD].serve([0.2, 0.3, 0.3], 1, 0, 30)  # within the window, after a scraped sample
        await scraped(http, url, pods)
        m = await stack.dep.GetDeploymentMetrics(
            dsvc.GetDeploymentMetricsRequest(name=DEPLOYED, window=duration_pb2.Duration(seconds=120))
        )
        assert m.source == dsvc.DeploymentMetrics.SOURCE_PROMETHEUS
        assert [r.replica for r in m.replicas] == [DEPLOYED_POD] and m.replicas[0].covered.seconds == 120
        t = m.total  # Prometheus extrapolates the increases, so bounds rather than exact counts
        assert t.requests > 0 and t.requests_per_second > 0 and t.output_tokens_per_second > 0
        assert 0 < t.error_rate < 1 and t.server_error_rate == 0
        assert 0.1 < t.latency_p50_seconds <= 0.5 and t.latency_p50_seconds <= t.latency_p99_seconds <= 0.5
        await stack.dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=DEPLOYED))
    finally:
        await stack.stop()
