"""The interceptor without a span exporter: trace context still propagates, metrics are still counted."""

from __future__ import annotations

from opentelemetry import trace

from neuroweaver_runtime import telemetry
from neuroweaver_runtime.interceptors import _MethodMetrics

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
_TRACER = trace.get_tracer("test")


def _propagating_span(carrier):
    return telemetry.server_span(_TRACER, "test.Service/Cost", carrier, {}, record=False)


def test_non_recording_span_continues_the_callers_trace():
    metadata = (("traceparent", TRACEPARENT), ("x-request-id", "r1"))
    span = _propagating_span(dict(metadata))
    ctx = span.get_span_context()
    assert format(ctx.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert ctx.span_id != 0x00F067AA0BA902B7 and ctx.is_valid and not span.is_recording()
    # children (and outgoing calls via inject_metadata) carry the same trace id
    with trace.use_span(span, end_on_exit=False):
        carrier = dict(telemetry.inject_metadata([]))
    assert carrier["traceparent"].split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_trace_context_is_read_from_any_header_case():
    """HTTP headers (the model server's OpenAI front) may come capitalized; gRPC metadata is lowercase."""
    span = _propagating_span({"Traceparent": TRACEPARENT, "User-Agent": "x"})
    assert format(span.get_span_context().trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_non_recording_span_without_caller_trace_starts_a_new_one():
    a, b = _propagating_span({}), _propagating_span({})
    assert a.get_span_context().is_valid and a.get_span_context().trace_id != b.get_span_context().trace_id


def test_method_metrics_are_the_labelled_children():
    import grpc

    m = _MethodMetrics("unary", "test.Service", "Cost")
    before = telemetry.GRPC_HANDLED.labels("unary", "test.Service", "Cost", "NotFound")._value.get()
    m.handled(grpc.StatusCode.NOT_FOUND).inc()
    assert m.handled(grpc.StatusCode.NOT_FOUND) is m.handled(grpc.StatusCode.NOT_FOUND)  # cached per code
    m.handled(grpc.StatusCode.NOT_FOUND).inc()
    assert telemetry.GRPC_HANDLED.labels("unary", "test.Service", "Cost", "NotFound")._value.get() == before + 2
    assert m.started is telemetry.GRPC_STARTED.labels("unary", "test.Service", "Cost")
    assert m.received is telemetry.GRPC_MSG_RECEIVED.labels("unary", "test.Service", "Cost")
    assert m.sent is telemetry.GRPC_MSG_SENT.labels("unary", "test.Service", "Cost")


def test_grpc_code_labels_are_go_grpc_prometheus_names():
    """go-grpc-prometheus writes Go's codes.Code.String(): community alerts match `NotFound`, not `NOT_FOUND`."""
    import grpc

    assert set(telemetry.GRPC_CODE_LABELS) == set(grpc.StatusCode)
    assert [telemetry.grpc_code_label(c) for c in grpc.StatusCode] == [
        "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
        "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented",
        "Internal", "Unavailable", "DataLoss", "Unauthenticated",
    ]  # fmt: skip


def test_spans_are_recorded_unless_configured_without_exporter(monkeypatch):
    monkeypatch.setattr(telemetry, "_configured", False)
    assert telemetry.spans_are_recorded()
    monkeypatch.setattr(telemetry, "_configured", True)
    monkeypatch.setattr(telemetry, "_exporting", False)
    assert not telemetry.spans_are_recorded()
    monkeypatch.setattr(telemetry, "_exporting", True)
    assert telemetry.spans_are_recorded()
