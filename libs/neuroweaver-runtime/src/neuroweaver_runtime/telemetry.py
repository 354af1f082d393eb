"""Prometheus metrics (grpc-ecosystem names) and OpenTelemetry tracing with W3C context in gRPC metadata, exported
to an OTLP collector and/or a JSON-lines file."""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import threading
import uuid
from collections.abc import Mapping, Sequence

import grpc
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
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
                        "kind": span.kind.name,
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
        if lines:
            with self._lock, open(self._path, "a") as fh:
                fh.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:  # nothing buffered
        return None


_configured = False
_exporting = False
_provider: TracerProvider | None = None
_otlp_endpoint = ""  # what --otlp-endpoint gave this process (children get it as OTEL_EXPORTER_OTLP_ENDPOINT)

# The endpoint variables of the OpenTelemetry SDK specification; either one turns OTLP export on.
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def otlp_endpoint_configured(otlp_endpoint: str = "", environ: Mapping[str, str] = os.environ) -> bool:
    return bool(otlp_endpoint or any(environ.get(v) for v in _ENDPOINT_VARS))


def _otlp_exporter(otlp_endpoint: str) -> SpanExporter:
    """The OTLP span exporter for `otlp_endpoint` (the `--otlp-endpoint` flag) or, when empty, the standard variables.

    The exporters read every other OTEL_EXPORTER_OTLP_* setting themselves: TLS (`https://`, or
    OTEL_EXPORTER_OTLP_CERTIFICATE / _CLIENT_KEY / _CLIENT_CERTIFICATE; `http://` is plaintext, and so is
    OTEL_EXPORTER_OTLP_INSECURE=true), headers, timeout, compression. The flag means what
    OTEL_EXPORTER_OTLP_ENDPOINT means: for http/protobuf the signal path `/v1/traces` is appended to it.
    """
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=otlp_endpoint or None)
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter(endpoint=otlp_endpoint.rstrip("/") + "/v1/traces" if otlp_endpoint else None)
    raise SystemExit(f"configuration error: OTLP protocol {protocol!r} is not supported (grpc or http/protobuf)")


def _resource(service: str, package: str) -> Resource:
    """service.name `neuroweaver-<service>`, service.version (the installed package), a fresh service.instance.id
    per process; OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override them (the SDK's usual precedence)."""
    try:
        version = importlib.metadata.version(package or f"neuroweaver-{service}")
    except importlib.metadata.PackageNotFoundError:
        version = importlib.metadata.version("neuroweaver-runtime")
    ours = Resource.create(
        {"service.name": f"neuroweaver-{service}", "service.version": version, "service.instance.id": str(uuid.uuid4())}
    )
    return ours.merge(OTELResourceDetector().detect())


def configure_tracing(service: str, trace_file: str = "", otlp_endpoint: str = "", *, package: str = "") -> None:
    """Installs this process's tracer provider (once): spans go to an OTLP collector when an endpoint is set
    (`otlp_endpoint`, else OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT) and to the JSON-lines `trace_file` when set; both
    through batch processors (OTEL_BSP_* tune them), flushed by `shutdown_tracing`. The sampler is the SDK's:
    OTEL_TRACES_SAMPLER, by default parentbased_always_on (a caller's sampling decision is kept)."""
    global _configured, _exporting, _provider, _otlp_endpoint
    if _configured:
        return
    provider = TracerProvider(resource=_resource(service, package))
    if otlp_endpoint_configured(otlp_endpoint):
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(otlp_endpoint)))
        _exporting = True
    if trace_file:
        provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(trace_file)))
        _exporting = True
    trace.set_tracer_provider(provider)
    _provider, _otlp_endpoint, _configured = provider, otlp_endpoint, True


def flush_tracing(timeout_millis: int = 10_000) -> None:
    """Exports every span ended so far (blocking: call it off the event loop)."""
    if _provider is not None:
        _provider.force_flush(timeout_millis)


def shutdown_tracing() -> None:
    """Flushes and closes the exporters; the last thing a process does before it exits (blocking)."""
    if _provider is not None:
        _provider.shutdown()


def child_environment(base: Mapping[str, str]) -> dict[str, str]:
    """`base` (the environment a child process of this one gets: a local model-server replica, a training worker)
    with this process's tracing settings.

    The child exports where this process does (`--otlp-endpoint` travels as OTEL_EXPORTER_OTLP_ENDPOINT; the
    other OTEL_* variables are inherited), but under its own service name and instance id; TRACEPARENT (the
    environment carrier of the OpenTelemetry specification) is the current span, so what the child does at start
    belongs to the trace that started it (`context_from_environment`).
    """
    env = {k: v for k, v in base.items() if k not in ("OTEL_SERVICE_NAME", "TRACEPARENT", "TRACESTATE")}
    if _otlp_endpoint:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = _otlp_endpoint
        env.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
    if "OTEL_RESOURCE_ATTRIBUTES" in env:
        env["OTEL_RESOURCE_ATTRIBUTES"] = ",".join(
            item
            for item in env["OTEL_RESOURCE_ATTRIBUTES"].split(",")
            if item.strip() and item.split("=", 1)[0].strip() not in ("service.name", "service.instance.id")
        )
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if "traceparent" in carrier:
        env["TRACEPARENT"] = carrier["traceparent"]
        if carrier.get("tracestate"):
            env["TRACESTATE"] = carrier["tracestate"]
    return env


def context_from_environment(environ: Mapping[str, str] = os.environ) -> Context:
    """The trace context a parent process handed over in TRACEPARENT / TRACESTATE (empty: a new trace)."""
    carrier = {"traceparent": environ.get("TRACEPARENT", ""), "tracestate": environ.get("TRACESTATE", "")}
    return propagate.extract({k: v for k, v in carrier.items() if v})


def spans_are_recorded() -> bool:
    """False only when `configure_tracing` installed the process's provider without an exporter.

    Then recording spans is pure overhead and the server interceptor only propagates trace context.
    A provider installed by anyone else (an embedding application, a test) is assumed to want spans.
    """
    if _configured:
        return _exporting
    return True


_fields_of: tuple[object, frozenset[str]] = (None, frozenset())


def _propagation_fields() -> frozenset[str]:
    """The header names the global propagator reads (W3C: traceparent, tracestate, baggage), cached per propagator."""
    global _fields_of
    textmap = propagate.get_global_textmap()
    if _fields_of[0] is not textmap:
        _fields_of = (textmap, frozenset(f.lower() for f in textmap.fields))
    return _fields_of[1]


def server_span(
    tracer: trace.Tracer, name: str, carrier: Mapping[str, str | bytes], attributes: Mapping[str, str], *, record: bool
) -> trace.Span:
    """The span a server handles one call under, continuing the caller's W3C trace context in `carrier` (gRPC
    metadata or HTTP headers). With `record` a SERVER span (to be ended by the caller); without, a span that
    records nothing yet carries the caller's trace id (or a fresh one), so log lines and outgoing calls have it."""
    if record:
        parent_context = propagate.extract({k.lower(): v for k, v in carrier.items() if isinstance(v, str)})
        return tracer.start_span(name, context=parent_context, kind=trace.SpanKind.SERVER, attributes=attributes)
    span_id = random.getrandbits(64) or 1
    # Most calls carry no trace context: skip the propagators' parsing then.
    fields = _propagation_fields()
    if any(key.lower() in fields for key in carrier):
        parent_context = propagate.extract({k.lower(): v for k, v in carrier.items() if isinstance(v, str)})
        parent = trace.get_current_span(parent_context).get_span_context()
    else:
        parent = trace.INVALID_SPAN_CONTEXT
    if parent.is_valid:
        ctx = trace.SpanContext(
            parent.trace_id, span_id, is_remote=False, trace_flags=parent.trace_flags, trace_state=parent.trace_state
        )
    else:
        ctx = trace.SpanContext(
            random.getrandbits(128) or 1, span_id, is_remote=False, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED)
        )
    return trace.NonRecordingSpan(ctx)


def extract_context(metadata: Sequence[tuple[str, str | bytes]] | None):
    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    return propagate.extract(carrier)


def inject_metadata(metadata: list[tuple[str, str]]) -> list[tuple[str, str]]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return metadata + list(carrier.items())
