"""The server interceptor every service installs: tracing → metrics → auth → error mapping.

One wrapper per RPC does all four so a call pays for a single extra frame. Handlers of
`grpc.health.v1` and server reflection pass through untouched (always open, never traced).

Per-call cost is kept small: wrapped handlers and the labelled Prometheus children are built once per
method, and when no span exporter is configured (`telemetry.spans_are_recorded()` is false) no SDK span is
recorded: the call runs under a non-recording span that carries the incoming W3C trace context (or a fresh
trace id), so log lines still get a trace id and outgoing calls still propagate it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping

import grpc
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from . import telemetry
from .auth import Principal, Role, TokenAuthenticator, authorize, principal_var
from .errors import DomainError, internal_status, to_rpc_status, unavailable_from_db_error
from .logs import request_id_var, trace_id_var
from .names import project_of

log = logging.getLogger("neuroweaver.rpc")

_OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def projects_in_request(request) -> set[str]:
    """Projects named by the request's resource-name fields (top level and one level down)."""
    projects: set[str] = set()
    for desc, value in request.ListFields():
        if desc.type == desc.TYPE_STRING and not desc.is_repeated:
            if (p := project_of(value)) is not None:
                projects.add(p)
        elif desc.type == desc.TYPE_MESSAGE and not desc.is_repeated:
            name = getattr(value, "name", None)
            if isinstance(name, str) and (p := project_of(name)) is not None:
                projects.add(p)
    return projects


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        *,
        error_domain: str,
        method_roles: Mapping[str, Role],
        authenticator: TokenAuthenticator,
    ) -> None:
        self._domain = error_domain
        self._roles = dict(method_roles)
        self._auth = authenticator
        self._tracer = trace.get_tracer("neuroweaver.grpc")
        self._record_spans = telemetry.spans_are_recorded()
        self._wrapped: dict[str, tuple[object, object]] = {}  # method -> (original handler, wrapped handler)
        # Tasks of open streaming calls: watches never end by themselves, so shutdown cancels them
        # (clients resume from their cursor on another replica) instead of waiting out the grace period.
        self.streams: set[asyncio.Task] = set()

    def cancel_streams(self) -> int:
        tasks = [t for t in self.streams if not t.done()]
        for task in tasks:
            task.cancel()
        return len(tasks)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_OPEN_PREFIXES):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap_handler(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap_handler(self, handler, method: str):
        _, service, name = method.split("/")
        required = self._roles.get(name, Role.ADMIN)  # undeclared RPCs need the highest role
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, "unary", service, name, required),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, "server_stream", service, name, required),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, "client_stream", service, name, required),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(handler.stream_stream, "bidi_stream", service, name, required),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    # -- shared pieces ---------------------------------------------------------------------------

    def _begin(self, context, metrics: _MethodMetrics, service: str, name: str):
        metadata = context.invocation_metadata() or ()
        md = {k: v for k, v in metadata}
        request_id_var.set(str(md.get("x-request-id") or uuid.uuid4().hex[:16]))
        metrics.started.inc()
        if self._record_spans:
            span = self._tracer.start_span(
                f"{service}/{name}",
                context=telemetry.extract_context(metadata),
                kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
            )
        else:
            span = _propagating_span(metadata, md)
        trace_id_var.set(format(span.get_span_context().trace_id, "032x"))
        return md, span

    def _check_auth(self, md, request, required: Role) -> Principal:
        principal = self._auth.authenticate(md.get("authorization"))
        projects = projects_in_request(request) if request is not None else set()
        authorize(principal, required, projects)
        principal_var.set(principal)
        return principal

    async def _fail(self, context, exc: BaseException, span, service: str, name: str) -> None:
        """Aborts the call with the status for `exc` (raises grpc.aio.AbortError)."""
        if not isinstance(exc, DomainError) and (mapped := unavailable_from_db_error(exc)) is not None:
            log.warning("database unavailable in %s/%s: %s", service, name, exc)
            exc = mapped  # a lost database is UNAVAILABLE (retryable), not INTERNAL
        if isinstance(exc, DomainError):
            status = to_rpc_status(exc, self._domain)
            span.set_status(Status(StatusCode.ERROR, exc.reason))
        else:
            log.exception("unhandled error in %s/%s", service, name)
            status = internal_status(self._domain)
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, "INTERNAL"))
        await context.abort_with_status(rpc_status.to_status(status))

    def _finish(self, context, span, metrics: _MethodMetrics, started, code: grpc.StatusCode | None = None):
        final = code or _code_of(context)
        metrics.handled(final).inc()
        metrics.seconds.observe(time.perf_counter() - started)
        if self._record_spans:
            span.set_attribute("rpc.grpc.status_code", final.value[0])
            span.end()

    def _wrap_unary(self, behavior: Callable, kind: str, service: str, name: str, required: Role):
        metrics = _MethodMetrics(kind, service, name)

        async def wrapper(request, context):
            started = time.perf_counter()
            md, span = self._begin(context, metrics, service, name)
            code = None
            try:
                with trace.use_span(span, end_on_exit=False):
                    self._check_auth(md, request if kind == "unary" else None, required)
                    return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:  # the client went away (or shutdown): the call reports no status of its own
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                code = _code_for(exc)
                await self._fail(context, exc, span, service, name)
            finally:
                self._finish(context, span, metrics, started, code)

        return wrapper

    def _wrap_stream(self, behavior: Callable, kind: str, service: str, name: str, required: Role):
        metrics = _MethodMetrics(kind, service, name)

        async def wrapper(request, context):
            started = time.perf_counter()
            md, span = self._begin(context, metrics, service, name)
            code = None
            task = asyncio.current_task()
            self.streams.add(task)
            try:
                with trace.use_span(span, end_on_exit=False):
                    self._check_auth(md, request if kind == "server_stream" else None, required)
                    responses = aiter(behavior(request, context))
                # The span is current while the handler runs, never across `yield`: when the client goes away
                # while this generator waits at a `yield`, grpc.aio drops it and the event loop closes it later
                # from another task, where detaching a context attached here fails (OpenTelemetry logs an ERROR).
                while True:
                    with trace.use_span(span, end_on_exit=False):
                        try:
                            response = await anext(responses)
                        except StopAsyncIteration:
                            break
                    yield response
            except grpc.aio.AbortError:
                raise
            except (asyncio.CancelledError, GeneratorExit):  # cancelled, or dropped by grpc.aio when the client left
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001
                code = _code_for(exc)
                await self._fail(context, exc, span, service, name)
            finally:
                self.streams.discard(task)
                self._finish(context, span, metrics, started, code)

        return wrapper


class _MethodMetrics:
    """The labelled Prometheus children of one method, looked up once instead of on every call."""

    __slots__ = ("_labels", "started", "seconds", "_handled")

    def __init__(self, kind: str, service: str, name: str) -> None:
        self._labels = (kind, service, name)
        self.started = telemetry.GRPC_STARTED.labels(kind, service, name)
        self.seconds = telemetry.GRPC_HANDLING_SECONDS.labels(kind, service, name)
        self._handled: dict[grpc.StatusCode, object] = {}

    def handled(self, code: grpc.StatusCode):
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = telemetry.GRPC_HANDLED.labels(*self._labels, code.name)
        return child


def _propagating_span(metadata, md: dict) -> NonRecordingSpan:
    """A span that records nothing but continues the caller's trace (W3C traceparent) or starts a new one."""
    parent = None
    if "traceparent" in md:
        parent = trace.get_current_span(telemetry.extract_context(metadata)).get_span_context()
    span_id = random.getrandbits(64) or 1
    if parent is not None and parent.is_valid:
        ctx = SpanContext(
            parent.trace_id, span_id, is_remote=False, trace_flags=parent.trace_flags, trace_state=parent.trace_state
        )
    else:
        ctx = SpanContext(random.getrandbits(128) or 1, span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return NonRecordingSpan(ctx)


def _code_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, DomainError):
        return exc.code
    mapped = unavailable_from_db_error(exc)
    return mapped.code if mapped is not None else grpc.StatusCode.INTERNAL


def _code_of(context) -> grpc.StatusCode:
    code = context.code()
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    for candidate in grpc.StatusCode:
        if candidate.value[0] == code:
            return candidate
    return grpc.StatusCode.UNKNOWN
