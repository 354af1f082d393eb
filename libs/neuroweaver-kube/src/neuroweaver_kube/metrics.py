"""Prometheus metric names the model server exports, in one place.

The model server (``neuroweaver_model_server``) must register its metrics under these
names, and the PrometheusRule built by :mod:`neuroweaver_kube.manifests` only refers to these names,
so a test can check that every alert queries a series the server really exports.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Histogram of request latency in seconds (labels: ``method``, ``code``). Exposes
#: ``<name>_bucket``, ``<name>_sum`` and ``<name>_count``.
INFERENCE_REQUEST_DURATION_SECONDS = "nw_inference_request_duration_seconds"
#: Counter of finished requests (labels: ``method``, ``code``). With prometheus_client register it as
#: ``Counter("nw_inference_requests", ...)``: the client appends ``_total`` on exposition.
INFERENCE_REQUESTS_TOTAL = "nw_inference_requests_total"
#: Label carrying the outcome: the gRPC code as go-grpc-prometheus names it (``OK``, ``NotFound``, ``Internal``...)
#: for gRPC calls and the HTTP status (``200``, ``503``...) for the OpenAI-compatible HTTP endpoint.
CODE_LABEL = "code"
#: Outcomes counted as server errors by the error-rate alert (a regex on ``CODE_LABEL``). Client
#: errors (InvalidArgument, 4xx) are not the server's fault and are left out.
SERVER_ERROR_CODES_REGEX = "Unknown|Internal|Unavailable|DeadlineExceeded|DataLoss|ResourceExhausted|5.."
#: Gauges of requests being decoded and of requests waiting for the generation worker (no labels).
INFERENCE_INFLIGHT_REQUESTS = "nw_inference_inflight_requests"
INFERENCE_QUEUE_DEPTH = "nw_inference_queue_depth"
#: Custom metric (custom.metrics.k8s.io, per pod) the model-server HPA scales on: decoding + waiting requests.
#: prometheus-adapter serves it from the two gauges above (:func:`neuroweaver_kube.manifests.prometheus_adapter_rule`).
CUSTOM_INFLIGHT_METRIC = "neuroweaver_model_server_inflight_requests"


@dataclass(frozen=True)
class ModelServerMetrics:
    """Metric names and label conventions the alert rules are written against."""

    request_duration_seconds: str = INFERENCE_REQUEST_DURATION_SECONDS
    requests_total: str = INFERENCE_REQUESTS_TOTAL
    code_label: str = CODE_LABEL
    server_error_codes_regex: str = SERVER_ERROR_CODES_REGEX
    inflight_requests: str = INFERENCE_INFLIGHT_REQUESTS
    queue_depth: str = INFERENCE_QUEUE_DEPTH
    custom_inflight_metric: str = CUSTOM_INFLIGHT_METRIC

    def exported_series(self) -> frozenset[str]:
        """Every series name a Prometheus scrape of the model server yields for these metrics."""
        h = self.request_duration_seconds
        return frozenset(
            {f"{h}_bucket", f"{h}_sum", f"{h}_count", self.requests_total, self.inflight_requests, self.queue_depth}
        )


DEFAULT_METRICS = ModelServerMetrics()
