"""GetDeploymentMetrics for Kubernetes deployments from Prometheus (`--prometheus-url`): PromQL instant queries over
its HTTP API (`GET /api/v1/query`), one per figure, by pod and in total, all at the same evaluation time.

The series are the model server's, as the deployment's ServiceMonitor has Prometheus scrape them: target labels
`namespace`, `service` (the model-server Service, named like the Deployment) and `pod` — the selector the
PrometheusRule's alerts use (`neuroweaver_kube.manifests.alert_expressions`). Rates are `rate()`/`increase()` over
the window; quantiles `histogram_quantile(q, sum by (le) (rate(<histogram>_bucket[window])))`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from neuroweaver_kube.metrics import SERVER_ERROR_CODES_REGEX
from neuroweaver_runtime.errors import Unavailable

from ..domain.metrics import QUANTILES, DeploymentPerformance, ReplicaStats, Stats
from ..domain.model import Deployment
from .metrics import INFLIGHT, LATENCY, OUTPUT_TOKENS, QUEUE_DEPTH, REQUESTS, TTFT

SUCCESS_REGEX = "OK|200"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def queries(namespace: str, service: str, window: float) -> dict[str, str]:
    """figure → PromQL, grouped by pod; `total_queries` gives the same without the pod."""
    sel = f"namespace={_quote(namespace)},service={_quote(service)}"
    w = f"[{int(window)}s]"
    req = f"{REQUESTS}_total"
    out = {
        "requests": f"increase({req}{{{sel}}}{w})",
        "errors": f'increase({req}{{{sel},code!~"{SUCCESS_REGEX}"}}{w})',
        "server_errors": f'increase({req}{{{sel},code=~"{SERVER_ERROR_CODES_REGEX}"}}{w})',
        "requests_per_second": f"rate({req}{{{sel}}}{w})",
        "output_tokens_per_second": f"rate({OUTPUT_TOKENS}_total{{{sel}}}{w})",
        "queue_depth": f"{QUEUE_DEPTH}{{{sel}}}",
        "inflight_requests": f"{INFLIGHT}{{{sel}}}",
    }
    grouped = {k: f"sum by (pod) ({v})" for k, v in out.items()}
    for q in QUANTILES:
        grouped[f"latency:{q}"] = (
            f'histogram_quantile({q:g}, sum by (pod, le) (rate({LATENCY}_bucket{{{sel},code=~"{SUCCESS_REGEX}"}}{w})))'
        )
        grouped[f"ttft:{q}"] = f"histogram_quantile({q:g}, sum by (pod, le) (rate({TTFT}_bucket{{{sel}}}{w})))"
    return grouped


def total_queries(by_pod: dict[str, str]) -> dict[str, str]:
    return {k: v.replace("sum by (pod) (", "sum (").replace("sum by (pod, le) (", "sum by (le) (") for k, v in by_pod.items()}


def parse_vector(body: Any) -> dict[str, float | None]:
    """An instant-query answer (`resultType` vector) → {pod or "": value}; NaN/Inf → None. ValueError on an error
    answer or another shape."""
    if not isinstance(body, dict) or body.get("status") != "success":
        error = body.get("error") if isinstance(body, dict) else None
        raise ValueError(f"Prometheus answered {error or 'an error'}")
    data = body.get("data") or {}
    if data.get("resultType") != "vector":
        raise ValueError(f"expected a vector, got {data.get('resultType')!r}")
    out: dict[str, float | None] = {}
    for item in data.get("result") or []:
        value = float(item["value"][1])
        out[item.get("metric", {}).get("pod", "")] = None if math.isnan(value) or math.isinf(value) else value
    return out


def stats_from(values: dict[str, float | None]) -> Stats:
    """One pod's (or the total's) figures → Stats; error rates from the increases."""

    def num(key: str) -> float:
        return values.get(key) or 0.0

    s = Stats(
        requests_per_second=num("requests_per_second"),
        requests=num("requests"),
        output_tokens_per_second=num("output_tokens_per_second"),
        queue_depth=num("queue_depth"),
        inflight_requests=num("inflight_requests"),
    )
    if s.requests > 0:
        s.error_rate = min(1.0, num("errors") / s.requests)
        s.server_error_rate = min(1.0, num("server_errors") / s.requests)
    s.latency = {q: values.get(f"latency:{q}") for q in QUANTILES}
    s.ttft = {q: values.get(f"ttft:{q}") for q in QUANTILES}
    return s


class PrometheusMetrics:
    source = "prometheus"

    def __init__(self, url: str, locate: Callable[[Deployment], tuple[str, str]], *, timeout: float = 10.0) -> None:
        """`locate`: a deployment → (namespace, Service name) of its model-server pods."""
        self.url = url.rstrip("/")
        self.locate = locate
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def _query(self, promql: str, at: float) -> dict[str, float | None]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.get(f"{self.url}/api/v1/query", params={"query": promql, "time": f"{at:.3f}"}) as resp:
                body = await resp.json(content_type=None)
            return parse_vector(body)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise Unavailable(
                f"Prometheus at {self.url} did not answer the metrics query: {str(exc)[:200]}",
                reason="PROMETHEUS_UNAVAILABLE",
                metadata={"prometheus_url": self.url[:200]},
            ) from exc

    async def performance(self, d: Deployment, window: float) -> DeploymentPerformance:
        namespace, service = self.locate(d)
        by_pod = queries(namespace, service, window)
        total = total_queries(by_pod)
        at = time.time()
        keys = list(by_pod)
        answers = await asyncio.gather(*(self._query(by_pod[k], at) for k in keys), *(self._query(total[k], at) for k in keys))
        pods: dict[str, dict[str, float | None]] = {}
        for key, answer in zip(keys, answers[: len(keys)], strict=True):
            for pod, value in answer.items():
                pods.setdefault(pod, {})[key] = value
        totals = {key: answer.get("") for key, answer in zip(keys, answers[len(keys) :], strict=True)}
        rows = [ReplicaStats(pod, stats_from(values), window) for pod, values in sorted(pods.items()) if pod]
        return DeploymentPerformance(d.name, window, at, stats_from(totals), rows, self.source)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
