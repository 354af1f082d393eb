"""Protobuf ⇄ domain conversions of GetDeploymentMetrics."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import duration_pb2, timestamp_pb2

from neuroweaver.deployer.v1 import deployer_service_pb2 as svc

from ..domain.metrics import DeploymentPerformance, Stats

SOURCE_TO_PB = {
    "replicas": svc.DeploymentMetrics.SOURCE_REPLICAS,
    "prometheus": svc.DeploymentMetrics.SOURCE_PROMETHEUS,
    "pods": svc.DeploymentMetrics.SOURCE_PODS,
}


def window_from_pb(request: svc.GetDeploymentMetricsRequest) -> float | None:
    """The window asked for in seconds (None: not set, the default applies)."""
    if not request.HasField("window"):
        return None
    return request.window.seconds + request.window.nanos / 1e9


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def stats_to_pb(s: Stats) -> svc.PerformanceStats:
    m = svc.PerformanceStats(
        requests_per_second=s.requests_per_second,
        requests=s.requests,
        output_tokens_per_second=s.output_tokens_per_second,
        queue_depth=s.queue_depth,
        inflight_requests=s.inflight_requests,
    )
    for field, value in (
        ("latency_p50_seconds", s.latency.get(0.5)), ("latency_p95_seconds", s.latency.get(0.95)),
        ("latency_p99_seconds", s.latency.get(0.99)), ("time_to_first_token_p50_seconds", s.ttft.get(0.5)),
        ("time_to_first_token_p95_seconds", s.ttft.get(0.95)), ("time_to_first_token_p99_seconds", s.ttft.get(0.99)),
        ("error_rate", s.error_rate), ("server_error_rate", s.server_error_rate),
    ):  # fmt: skip
        if value is not None:
            setattr(m, field, value)
    return m


def performance_to_pb(p: DeploymentPerformance) -> svc.DeploymentMetrics:
    sample_time = timestamp_pb2.Timestamp()
    if p.sample_time:
        sample_time.FromDatetime(datetime.fromtimestamp(p.sample_time, UTC))
    return svc.DeploymentMetrics(
        name=p.name,
        window=_duration(p.window_seconds),
        sample_time=sample_time,
        total=stats_to_pb(p.total),
        replicas=[
            svc.ReplicaPerformance(replica=r.replica, stats=stats_to_pb(r.stats), covered=_duration(r.covered_seconds))
            for r in p.replicas
        ],
        source=SOURCE_TO_PB.get(p.source, svc.DeploymentMetrics.SOURCE_UNSPECIFIED),
    )
