"""Prometheus metrics (grpc-ecosystem names) and OpenTelemetry tracing with W3C context in gRPC metadata."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence

import grpc
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import Counter, Histogram, start_http_server

GRPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", ["grpc_type", "grpc_service", "grpc_method"])
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, regardless of success or failure.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
GRPC_MSG_RECEIVED = Counter(
    "grpc_server_msg_received_total",
    "Messages received by the server (1 per unary request; each message of a client stream).",
    ["grpc_type", "grpc_service", "grpc_method"],
)
GRPC_MSG_SENT = Counter(
    "grpc_server_msg_sent_total",
    "Messages sent by the server (1 per successful unary response; each message of a server stream).",
    ["grpc_type", "grpc_service", "grpc_method"],
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Response latency of RPCs handled by the server (for streams: until the stream ends).",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

# `grpc_code` values as go-grpc-prometheus writes them (Go's codes.Code.String()), so community dashboards and
# alerts (e.g. `grpc_code!="OK"`, `grpc_code=~"Unknown|Internal|Unavailable|DeadlineExceeded|DataLoss"`) match.
GRPC_CODE_LABELS: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}


def grpc_code_label(code: grpc.StatusCode) -> str:
    """The `grpc_code` label value of a status code (`NotFound`, not `NOT_FOUND`)."""
    return GRPC_CODE_LABELS[code]


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serves /metrics on its own port; returns the bound port (useful with port 0)."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans to a file as JSON lines (a real exporter for demos and tests without a collector)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            parent = span.parent
            if ctx is None:
                continue
            lines.append(
                json.dumps(
                    {
                        "name": span.name,
                        "trace_id": format(ctx.trace_id, "032x"),
                        "span_id": format(ctx.span_id, "016x"),
                        "parent_span_id": format(parent.span_id, "016x") if parent else None,
                        "service": span.resource.attributes.get("service.name"),
                        "start_ns": span.start_time,
                        "end_ns": span.end_time,
                        "status": span.status.status_code.name,
                        "attributes": dict(span.attributes or {}),
                    }
                )
            )
        with self._lock, open(self._path, "a") as fh:
            fh.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:  # nothing buffered
        return None


_configured = False
_exporting = False


def configure_tracing(service: str, trace_file: str = "") -> None:
    """Installs a tracer provider once per process; spans go to `trace_file` when set."""
    global _configured, _exporting
    if _configured:
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"neuroweaver-{service}"}))
    if trace_file:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(trace_file)))
        _exporting = True
    trace.set_tracer_provider(provider)
    _configured = True


def spans_are_recorded() -> bool:
    """False only when `configure_tracing` installed the process's provider without an exporter.

    Then recording spans is pure overhead and the server interceptor only propagates trace context.
    A provider installed by anyone else (an embedding application, a test) is assumed to want spans.
    """
    if _configured:
        return _exporting
    return True


def extract_context(metadata: Sequence[tuple[str, str | bytes]] | None):
    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    return propagate.extract(carrier)


def inject_metadata(metadata: list[tuple[str, str]]) -> list[tuple[str, str]]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return metadata + list(carrier.items())
