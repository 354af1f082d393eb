"""Server spans of the OpenAI HTTP API: the caller's W3C trace context comes in the `traceparent` / `tracestate`
headers (as in gRPC metadata), so a chat completion belongs to the trace of whoever asked for it, through the
deployer's router too (it passes the headers on). Probes (`/healthz`) are never traced, like gRPC health."""

from __future__ import annotations

from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from neuroweaver_runtime import telemetry
from neuroweaver_runtime.logs import trace_id_var

_tracer = trace.get_tracer("neuroweaver.http")


def tracing_middleware(open_paths: frozenset[str]):
    @web.middleware
    async def trace_request(request: web.Request, handler) -> web.StreamResponse:
        if request.path in open_paths:
            return await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else request.path
        span = telemetry.server_span(
            _tracer,
            f"{request.method} {route}",
            request.headers,
            {"http.request.method": request.method, "http.route": route, "url.path": request.path},
            record=telemetry.spans_are_recorded(),
        )
        trace_id_var.set(format(span.get_span_context().trace_id, "032x"))
        status = 500
        try:
            with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
                response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()

    return trace_request
