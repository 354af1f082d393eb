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
from collections.abc import Callable, Collection, Mapping

import grpc
from grpc_status import rpc_status
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from . import telemetry
from .auth import NO_GRANTS, ON_BEHALF_OF_HEADER, Principal, ProjectGrants, Role, TokenAuthenticator, authorize, principal_var
from .errors import DomainError, ResourceExhausted, Unavailable, unavailable_from_db_error
from .grpc_errors import internal_status, status_code, to_rpc_status
from .inspection import Incoming, Undecodable, inspect, lenient_deserializer, refuse_undecodable
from .logs import request_id_var, trace_id_var

log = logging.getLogger("neuroweaver.rpc")

_OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        *,
        error_domain: str,
        method_roles: Mapping[str, Role],
        authenticator: TokenAuthenticator,
        grants: ProjectGrants = NO_GRANTS,
        max_streams_per_principal: int = 256,
    ) -> None:
        self._domain = error_domain
        self._roles = dict(method_roles)
        self._auth = authenticator
        self._grants = grants
        self._max_streams = max_streams_per_principal
        self._open_streams: dict[str, int] = {}  # principal subject -> open streaming calls
        self._tracer = trace.get_tracer("neuroweaver.grpc")
        self._record_spans = telemetry.spans_are_recorded()
        self._wrapped: dict[str, tuple[object, object]] = {}  # method -> (original handler, wrapped handler)
        # Open streaming calls (their handler tasks): watches never end by themselves, so shutdown ends them
        # (`end_streams`) instead of waiting out the grace period.
        self.streams: dict[asyncio.Task, _OpenStream] = {}
        self._kept: frozenset[str] | None = None  # set by end_streams: the methods whose streams may go on

    def end_streams(self, keep: Collection[str] = ()) -> int:
        """Ends open streaming calls with UNAVAILABLE (reason SHUTTING_DOWN), except those of the methods in `keep`
        (full names, `/pkg.Service/Method`: streams that end by themselves, e.g. a generation, which shutdown lets
        finish); streams that start from now on end at once too. Returns how many were open.

        A watch's client resumes from its cursor, on another replica, as soon as it sees the status. Only a handler
        waiting for its next message is cancelled (the interceptor turns that cancellation into the status); one
        whose message grpc is writing ends when the write is done. A cancelled handler must not be left to grpc.aio:
        it sends no status then, and the call would stay open until the server stops after the grace period.
        """
        self._kept = frozenset(keep)
        ended = 0
        for task, stream in self.streams.items():
            if task.done() or stream.method in self._kept:
                continue
            stream.ending = True
            ended += 1
            if stream.waiting:
                task.cancel()
        return ended

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
        request_type = getattr(getattr(handler.request_deserializer, "__self__", None), "DESCRIPTOR", None)
        # Bad bytes become an INVALID_ARGUMENT after authentication instead of grpc's UNKNOWN before it.
        deserializer = lenient_deserializer(
            handler.request_deserializer, request_type.full_name if request_type is not None else "request"
        )
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, "unary", service, name, required),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, "server_stream", service, name, required),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, "client_stream", service, name, required),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(handler.stream_stream, "bidi_stream", service, name, required),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )

    # -- shared pieces ---------------------------------------------------------------------------

    def _begin(self, context, metrics: _MethodMetrics):
        md = dict(context.invocation_metadata() or ())
        # A request id only correlates log lines: a random 64-bit value, not a uuid4 (which reads os.urandom).
        request_id_var.set(str(md.get("x-request-id") or f"{random.getrandbits(64):016x}"))
        metrics.started.inc()
        span = telemetry.server_span(self._tracer, metrics.span_name, md, metrics.span_attributes, record=self._record_spans)
        trace_id_var.set(format(span.get_span_context().trace_id, "032x"))
        return md, span

    def _check_auth(self, md, request, required: Role, context) -> Principal:
        """Authenticates the caller and authorizes it for every resource name in `request` (None: streamed)."""
        peer = None
        if self._auth.uses_certificates and "authorization" not in md:
            names = context.auth_context().get("x509_common_name") or ()
            peer = names[0].decode(errors="replace") if names else None
        principal = self._auth.authenticate(md.get("authorization"), md.get(ON_BEHALF_OF_HEADER), peer)
        authorize(principal, required, set())
        principal_var.set(principal)
        if request is not None:
            self._check_message(principal, request, required)
        return principal

    def _check_message(self, principal: Principal, request: Incoming | Undecodable, required: Role, prefix: str = ""):
        if isinstance(request, Undecodable):
            refuse_undecodable(request)
        found = inspect(request, prefix)
        if required == Role.VIEWER:  # a read: every name it touches may be a granted one
            authorize(principal, required, set(), references=found.targets | found.references, grants=self._grants)
        else:
            targets = {n[len("projects/") :].split("/", 1)[0] for n in found.targets}
            authorize(principal, required, targets, references=found.references, grants=self._grants)
        return request.message

    async def _checked_stream(self, requests, principal: Principal, required: Role, received):
        """A client stream whose every message passes the same checks as a unary request (and is counted)."""
        index = 0
        async for request in requests:
            received.inc()
            yield self._check_message(principal, request, required, prefix=f"message[{index}].")
            index += 1

    def _enter_stream(self, principal: Principal) -> None:
        open_now = self._open_streams.get(principal.subject, 0)
        if open_now >= self._max_streams:
            raise ResourceExhausted(
                f"too many open streams for this caller (limit {self._max_streams}); close some first",
                reason="TOO_MANY_STREAMS",
                metadata={"limit": str(self._max_streams)},
            )
        self._open_streams[principal.subject] = open_now + 1

    def _leave_stream(self, principal: Principal) -> None:
        left = self._open_streams.get(principal.subject, 1) - 1
        if left > 0:
            self._open_streams[principal.subject] = left
        else:
            self._open_streams.pop(principal.subject, None)

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
            md, span = self._begin(context, metrics)
            code = None
            try:
                # The span is current while the handler runs (attach/detach: the cheap form of trace.use_span;
                # failures reach the span through _fail).
                current = otel_context.attach(trace.set_span_in_context(span))
                try:
                    if kind == "unary":
                        metrics.received.inc()  # as go-grpc-prometheus: the request counts before auth
                        self._check_auth(md, request, required, context)
                        response = await behavior(request.message, context)
                    else:
                        principal = self._check_auth(md, None, required, context)
                        response = await behavior(self._checked_stream(request, principal, required, metrics.received), context)
                finally:
                    otel_context.detach(current)
                metrics.sent.inc()  # the single response; not counted when the call fails
                return response
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
        sent = metrics.sent
        full_method = f"/{service}/{name}"

        async def wrapper(request, context):
            started = time.perf_counter()
            md, span = self._begin(context, metrics)
            code = None
            task = asyncio.current_task()
            assert task is not None  # handlers always run in a task
            stream = self.streams[task] = _OpenStream(full_method, self._kept)
            principal = None
            try:
                with trace.use_span(span, end_on_exit=False):
                    if kind == "server_stream":
                        metrics.received.inc()  # the single request, counted before auth like a unary one
                    caller = self._check_auth(md, request if kind == "server_stream" else None, required, context)
                    self._enter_stream(caller)
                    principal = caller
                    if kind == "server_stream":
                        responses = aiter(behavior(request.message, context))
                    else:
                        responses = aiter(behavior(self._checked_stream(request, caller, required, metrics.received), context))
                # The span is current while the handler runs, never across `yield`: when the client goes away
                # while this generator waits at a `yield`, grpc.aio drops it and the event loop closes it later
                # from another task, where detaching a context attached here fails (OpenTelemetry logs an ERROR).
                while not stream.ending:
                    stream.waiting = True
                    with trace.use_span(span, end_on_exit=False):
                        try:
                            response = await anext(responses)
                        except StopAsyncIteration:
                            break
                        finally:
                            stream.waiting = False
                    yield response
                    sent.inc()  # grpc.aio resumes the generator once the message is written
                else:  # shutdown: the handler stops at its `yield` (its `finally` blocks run here, in this task)
                    await _close(responses)
                    code = grpc.StatusCode.UNAVAILABLE
                    await self._fail(context, _shutting_down(), span, service, name)
            except grpc.aio.AbortError:
                raise
            except (asyncio.CancelledError, GeneratorExit) as exc:  # cancelled, or dropped by grpc.aio when the client left
                if stream.ending and isinstance(exc, asyncio.CancelledError):  # end_streams cancelled the handler
                    task.uncancel()
                    code = grpc.StatusCode.UNAVAILABLE
                    await self._fail(context, _shutting_down(), span, service, name)
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001
                code = _code_for(exc)
                await self._fail(context, exc, span, service, name)
            finally:
                self.streams.pop(task, None)
                if principal is not None:
                    self._leave_stream(principal)
                self._finish(context, span, metrics, started, code)

        return wrapper


class _OpenStream:
    """An open streaming call as `end_streams` sees it."""

    __slots__ = ("method", "waiting", "ending")

    def __init__(self, method: str, kept: frozenset[str] | None) -> None:
        self.method = method
        self.waiting = False  # the handler is computing its next message (cancelling it is safe)
        self.ending = kept is not None and method not in kept  # started after end_streams: ends at once


SHUTDOWN_MESSAGE = "server shutting down; reconnect"


def _shutting_down() -> Unavailable:
    return Unavailable(SHUTDOWN_MESSAGE, reason="SHUTTING_DOWN")


async def _close(responses) -> None:
    aclose = getattr(responses, "aclose", None)
    if aclose is not None:
        await aclose()


class _MethodMetrics:
    """What every call of one method shares (its labelled Prometheus children, span name and attributes), built once
    instead of on every call."""

    __slots__ = ("_labels", "started", "seconds", "received", "sent", "_handled", "span_name", "span_attributes")

    def __init__(self, kind: str, service: str, name: str) -> None:
        self._labels = (kind, service, name)
        self.span_name = f"{service}/{name}"
        self.span_attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        self.started = telemetry.GRPC_STARTED.labels(kind, service, name)
        self.seconds = telemetry.GRPC_HANDLING_SECONDS.labels(kind, service, name)
        self.received = telemetry.GRPC_MSG_RECEIVED.labels(kind, service, name)
        self.sent = telemetry.GRPC_MSG_SENT.labels(kind, service, name)
        self._handled: dict[grpc.StatusCode, object] = {}

    def handled(self, code: grpc.StatusCode):
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = telemetry.GRPC_HANDLED.labels(*self._labels, telemetry.grpc_code_label(code))
        return child


def _code_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, DomainError):
        return status_code(exc.kind)
    mapped = unavailable_from_db_error(exc)
    return status_code(mapped.kind) if mapped is not None else grpc.StatusCode.INTERNAL


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
