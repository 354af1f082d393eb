"""Tracing settings: resource precedence, OTLP endpoint/protocol mapping, what a child process inherits."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from neuroweaver_runtime import telemetry


def test_resource_defaults_and_the_standard_variables_override_them(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    a, b = telemetry._resource("registry", ""), telemetry._resource("registry", "")
    assert a.attributes["service.name"] == "neuroweaver-registry" and a.attributes["service.version"] == "0.1.0"
    assert a.attributes["service.instance.id"] != b.attributes["service.instance.id"]  # one per process start
    monkeypatch.setenv("OTEL_SERVICE_NAME", "registry-eu")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=pod-7,deployment.environment=prod")
    r = telemetry._resource("registry", "")
    assert r.attributes["service.name"] == "registry-eu" and r.attributes["service.instance.id"] == "pod-7"
    assert r.attributes["deployment.environment"] == "prod"


def test_flag_endpoint_means_what_otel_exporter_otlp_endpoint_means(monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", *telemetry._ENDPOINT_VARS):
        monkeypatch.delenv(var, raising=False)
    assert not telemetry.otlp_endpoint_configured("")
    assert telemetry.otlp_endpoint_configured("http://127.0.0.1:4317")
    grpc_exporter = telemetry._otlp_exporter("http://127.0.0.1:4317")
    assert grpc_exporter._endpoint == "127.0.0.1:4317" and grpc_exporter._insecure  # http:// = plaintext
    grpc_exporter.shutdown()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    http_exporter = telemetry._otlp_exporter("http://127.0.0.1:4318/")
    assert http_exporter._endpoint == "http://127.0.0.1:4318/v1/traces"  # the signal path, as for the variable
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317")
    assert telemetry.otlp_endpoint_configured("")


def test_child_environment_keeps_the_exporter_but_not_the_identity_and_hands_over_the_trace(monkeypatch):
    monkeypatch.setattr(telemetry, "_otlp_endpoint", "http://collector:4317")
    base = {
        "PATH": "/bin", "OTEL_SERVICE_NAME": "neuroweaver-deployer", "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://other:4317", "TRACEPARENT": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=x,service.instance.id=pod-1,deployment.environment=prod",
    }  # fmt: skip
    tracer = TracerProvider().get_tracer("test")
    with trace.use_span(tracer.start_span("start replica"), end_on_exit=True) as span:
        env = telemetry.child_environment(base)
        own = format(span.get_span_context().trace_id, "032x")
    assert env["PATH"] == "/bin" and env["OTEL_BSP_SCHEDULE_DELAY"] == "200" and "OTEL_SERVICE_NAME" not in env
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4317" and "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" not in env
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == "deployment.environment=prod"
    assert env["TRACEPARENT"].split("-")[1] == own  # the current span, not the parent's inherited TRACEPARENT
    parent = trace.get_current_span(telemetry.context_from_environment(env)).get_span_context()
    assert format(parent.trace_id, "032x") == own and parent.is_remote
    assert not trace.get_current_span(telemetry.context_from_environment({})).get_span_context().is_valid
