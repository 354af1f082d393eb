"""Where GetDeploymentMetrics' numbers come from.

- `ReplicaScraper`: a bounded ring of scrapes per replica (`domain.metrics.SampleRing`) of the model server's
  `/metrics` (ops port), fed by a background sampler every `interval` seconds and by each query (a fresh scrape).
  A replica's ring starts with an implicit zero sample at its start time (counters count from 0 in a new process),
  so a replica younger than the window covers its whole life. Rings of replicas that went away are dropped.
- `LocalMetrics`: the local backend's replicas, read by the deployer replica that runs them, plus a row `router` for
  calls the deployment's router answered itself because no replica could take them (counted in the router).
- `PodMetrics` (Kubernetes without Prometheus): the deployment's running pods, listed through the API server
  (label selector of the manifests) and scraped on their metrics port by pod IP, with the same rings.
- Prometheus (`adapters/prometheus.py`) answers Kubernetes deployments when `--prometheus-url` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from neuroweaver_runtime.client import ClientTLS
from neuroweaver_runtime.errors import FailedPrecondition, Unavailable
from neuroweaver_runtime.tls import client_ssl_context

from ..domain.metrics import (
    MAX_WINDOW_SECONDS,
    SUCCESS_CODES,
    DeploymentPerformance,
    Sample,
    SampleRing,
    is_server_error,
    performance_from_rings,
)
from ..domain.model import Deployment

log = logging.getLogger("neuroweaver.deployer.metrics")

# What the model server exports (services/model-server/src/neuroweaver_model_server/metrics.py); every engine feeds
# them through the model server's InferenceService (requests, latency, TTFT, tokens) and its queue (gauges).
REQUESTS = "nw_inference_requests"  # counter; exposed as nw_inference_requests_total {method, code}
LATENCY = "nw_inference_request_duration_seconds"  # histogram {method, code}
TTFT = "nw_inference_time_to_first_token_seconds"  # histogram {method}
OUTPUT_TOKENS = "nw_inference_completion_tokens"  # counter; exposed as nw_inference_completion_tokens_total
QUEUE_DEPTH = "nw_inference_queue_depth"  # gauge
INFLIGHT = "nw_inference_inflight_requests"  # gauge


def parse_exposition(text: str, at: float) -> Sample:
    """A model server's Prometheus text exposition → a Sample (ValueError on text that is not an exposition).
    Latency counts successful requests only (a refused request's few microseconds say nothing about serving)."""
    requests = errors = server_errors = tokens = queue = inflight = 0.0
    latency: dict[float, float] = {}
    ttft: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == REQUESTS + "_total":
                code = s.labels.get("code", "")
                requests += s.value
                if code not in SUCCESS_CODES:
                    errors += s.value
                    if is_server_error(code):
                        server_errors += s.value
            elif s.name == LATENCY + "_bucket" and s.labels.get("code", "") in SUCCESS_CODES:
                upper = float(s.labels["le"])
                latency[upper] = latency.get(upper, 0.0) + s.value
            elif s.name == TTFT + "_bucket":
                upper = float(s.labels["le"])
                ttft[upper] = ttft.get(upper, 0.0) + s.value
            elif s.name == OUTPUT_TOKENS + "_total":
                tokens += s.value
            elif s.name == QUEUE_DEPTH:
                queue += s.value
            elif s.name == INFLIGHT:
                inflight += s.value
    return Sample(
        at, requests, errors, server_errors, tokens, tuple(sorted(latency.items())), tuple(sorted(ttft.items())),
        queue, inflight,
    )  # fmt: skip


@dataclass(frozen=True)
class ScrapeTarget:
    replica: str  # the row's name: a replica's gRPC address, a pod's name
    metrics_url: str
    started_at: float = 0.0  # wall-clock start of the process (counters were 0 then); 0 = unknown
    server_name: str = ""  # the name checked on its certificate when not the address dialled (a pod's IP)
    # In-process instead of HTTP: a count of calls that failed with a server error before reaching any replica
    # (the local router's `refused`); excluded from equality so targets stay comparable keys.
    count: Callable[[], float] | None = field(default=None, compare=False)


class ReplicaScraper:
    """Rings of scrapes per replica. Memory is bounded: one ring per live replica, each at most
    `MAX_WINDOW_SECONDS / interval + 2` samples spaced at least `interval` apart (about 3 KB each: some 2 MB
    per replica with an hour of history at the default 5 s)."""

    def __init__(self, *, interval: float = 5.0, client_tls: ClientTLS | None = None, timeout: float = 5.0) -> None:
        self.interval = interval
        self.client_tls = client_tls or ClientTLS()
        self.timeout = timeout
        self.rings: dict[tuple[str, str, float], SampleRing] = {}
        self._session: aiohttp.ClientSession | None = None

    def _capacity(self) -> int:
        return int(MAX_WINDOW_SECONDS / max(self.interval, 1.0)) + 2

    def _ring(self, t: ScrapeTarget) -> SampleRing:
        key = (t.replica, t.metrics_url, t.started_at)
        ring = self.rings.get(key)
        if ring is None:
            ring = self.rings[key] = SampleRing(self._capacity(), min_spacing=self.interval)
            if t.started_at:
                ring.add(Sample.zero(t.started_at))
        return ring

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=client_ssl_context(self.client_tls) or True)
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def _scrape_one(self, t: ScrapeTarget) -> None:
        if t.count is not None:
            refused = t.count()
            self._ring(t).add(Sample(time.time(), requests=refused, errors=refused, server_errors=refused))
            return
        server_name = t.server_name or self.client_tls.server_name
        extra: dict[str, Any] = {"server_hostname": server_name} if server_name else {}
        try:
            async with self._http().get(t.metrics_url, headers={"Accept": "text/plain;version=0.0.4"}, **extra) as resp:
                if resp.status != 200:
                    log.info("replica %s answered /metrics with %s", t.metrics_url, resp.status)
                    return
                text = await resp.text()
            at = time.time()
            self._ring(t).add(parse_exposition(text, at))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.info("replica %s /metrics: %s", t.metrics_url, exc)

    async def scrape(self, targets: list[ScrapeTarget]) -> None:
        await asyncio.gather(*(self._scrape_one(t) for t in targets))

    def forget_except(self, live: set[tuple[str, str, float]]) -> None:
        for key in [k for k in self.rings if k not in live]:
            del self.rings[key]

    async def performance(self, name: str, window: float, source: str, targets: list[ScrapeTarget]) -> DeploymentPerformance:
        await self.scrape(targets)  # a fresh sample now: the window ends at the call
        rows = []
        for t in sorted(targets, key=lambda t: t.replica):
            ring = self.rings.get((t.replica, t.metrics_url, t.started_at))
            samples = ring.window(window) if ring is not None else []
            if samples:
                rows.append((t.replica, samples))
        p = performance_from_rings(name, window, source, rows)
        # the router's row only when it refused calls in the window (it is no replica)
        routers = {t.replica for t in targets if t.count is not None}
        p.replicas = [r for r in p.replicas if r.replica not in routers or r.stats.requests > 0]
        return p

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Sampler:
    """Scrapes every target of every deployment `deployments()` names each `interval` seconds, and forgets rings of
    replicas that no longer exist."""

    def __init__(self, scraper: ReplicaScraper, targets: Callable[[], Any]) -> None:
        self.scraper, self._targets = scraper, targets
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.scraper.interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="deployment-metrics-sampler")

    async def _run(self) -> None:
        while True:
            try:
                targets = await self._targets()
                await self.scraper.scrape(targets)
                self.scraper.forget_except({(t.replica, t.metrics_url, t.started_at) for t in targets})
            except Exception:  # noqa: BLE001 - a failed round must not end sampling
                log.exception("sampling deployment metrics failed")
            await asyncio.sleep(self.scraper.interval)  # sampling period

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class LocalMetrics:
    """Local deployments: the replicas this deployer process runs (`LocalBackend.deployments`)."""

    source = "replicas"

    def __init__(self, backend: Any, owns: Callable[[str], bool], scraper: ReplicaScraper) -> None:
        self.backend, self.owns, self.scraper = backend, owns, scraper
        self._sampler = _Sampler(scraper, self._all_targets)

    def targets(self, name: str) -> list[ScrapeTarget]:
        dep = self.backend.deployments.get(name)
        if dep is None:
            return []
        replicas = [
            ScrapeTarget(r.upstream.grpc_address, r.upstream.metrics_url, getattr(r, "started_at", 0.0))
            for r in dep.replicas
            if r.state == "ready" and r.upstream is not None
        ]
        router = dep.router
        if not router.started_at:
            return replicas
        return [*replicas, ScrapeTarget("router", f"router:{name}", router.started_at, count=lambda: router.refused)]

    async def _all_targets(self) -> list[ScrapeTarget]:
        return [t for name in list(self.backend.deployments) for t in self.targets(name)]

    async def performance(self, d: Deployment, window: float) -> DeploymentPerformance:
        if not self.owns(d.name) and d.name not in self.backend.deployments:
            raise FailedPrecondition(
                f"{d.name} runs its local replicas in another deployer replica; ask again (calls are balanced over "
                "the replicas) or reach the one that holds it",
                reason="METRICS_ELSEWHERE",
                metadata={"deployment": d.name},
            )
        return await self.scraper.performance(d.name, window, self.source, self.targets(d.name))

    def start(self) -> None:
        self._sampler.start()

    async def close(self) -> None:
        await self._sampler.close()


class PodMetrics:
    """Kubernetes deployments without Prometheus: the deployment's ready pods (listed through the API server with the
    manifests' selector labels) scraped on their `metrics` container port by pod IP. A container's start time
    (`state.running.startedAt`) is its zero sample; deployments asked about within the last hour are sampled in the
    background, so a first call covers the pods' lives so far and later calls the window asked for."""

    source = "pods"
    SELECTOR = "app.kubernetes.io/name=neuroweaver-model-server,app.kubernetes.io/instance={instance}"

    def __init__(
        self, client: Any, locate: Callable[[Deployment], tuple[str, str]], scraper: ReplicaScraper, *, tls: bool = False
    ) -> None:
        """`locate`: a deployment → (namespace, object name). `tls`: the pods serve their ops port over HTTPS (their
        certificate names the Service, `<object>.<namespace>.svc`, which is checked instead of the pod IP)."""
        self.client, self.locate, self.scraper, self.tls = client, locate, scraper, tls
        self._asked: dict[str, tuple[str, str, float]] = {}
        self._sampler = _Sampler(scraper, self._all_targets)

    async def _list(self, namespace: str, instance: str) -> list[ScrapeTarget]:
        from functools import partial

        import urllib3

        from neuroweaver_kube.client import KubeApiError

        request = partial(
            self.client.request, "GET", f"/api/v1/namespaces/{namespace}/pods",
            query=[("labelSelector", self.SELECTOR.format(instance=instance))],
        )  # fmt: skip
        try:
            pods = await asyncio.get_running_loop().run_in_executor(None, request)
        except (KubeApiError, OSError, urllib3.exceptions.HTTPError) as exc:
            raise Unavailable(
                f"the Kubernetes API did not list the deployment's pods: {str(exc)[:200]}", reason="KUBERNETES_UNAVAILABLE"
            ) from exc
        return [t for pod in pods.get("items") or () if (t := self._target(pod, namespace, instance)) is not None]

    def _target(self, pod: dict[str, Any], namespace: str, instance: str) -> ScrapeTarget | None:
        status, spec = pod.get("status") or {}, pod.get("spec") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())
        ip = status.get("podIP")
        if status.get("phase") != "Running" or not ready or not ip:
            return None
        for container in spec.get("containers") or ():
            port = next((p.get("containerPort") for p in container.get("ports") or () if p.get("name") == "metrics"), None)
            if port is None:
                continue
            started = 0.0
            for cs in status.get("containerStatuses") or ():
                at = ((cs.get("state") or {}).get("running") or {}).get("startedAt")
                if cs.get("name") == container.get("name") and at:
                    started = datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
            host = f"[{ip}]" if ":" in ip else ip
            scheme = "https" if self.tls else "http"
            return ScrapeTarget(
                pod.get("metadata", {}).get("name", ip), f"{scheme}://{host}:{port}/metrics", started,
                f"{instance}.{namespace}.svc" if self.tls else "",
            )  # fmt: skip
        return None

    async def _all_targets(self) -> list[ScrapeTarget]:
        now = time.time()
        for name in [n for n, (_, _, at) in self._asked.items() if now - at > MAX_WINDOW_SECONDS]:
            del self._asked[name]
        targets: list[ScrapeTarget] = []
        for namespace, instance, _ in list(self._asked.values()):
            with contextlib.suppress(Unavailable):
                targets += await self._list(namespace, instance)
        return targets

    async def performance(self, d: Deployment, window: float) -> DeploymentPerformance:
        namespace, instance = self.locate(d)
        self._asked[d.name] = (namespace, instance, time.time())
        self._sampler.start()
        return await self.scraper.performance(d.name, window, self.source, await self._list(namespace, instance))

    async def close(self) -> None:
        await self._sampler.close()
