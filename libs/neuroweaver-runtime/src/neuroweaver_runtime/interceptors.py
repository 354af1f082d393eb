"""The server interceptor every service installs: tracing → metrics → auth → error mapping.

One wrapper per RPC does all four so a call pays for a single extra frame. Handlers of
`grpc.health.v1` and server reflection pass through untouched (always open, never traced).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping

import grpc
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import telemetry
from .auth import Principal, Role, TokenAuthenticator, authorize, principal_var
from .errors import DomainError, internal_status, to_rpc_status
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

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_OPEN_PREFIXES):
            return handler
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

    def _begin(self, context, kind: str, service: str, name: str):
        metadata = context.invocation_metadata() or ()
        md = {k: v for k, v in metadata}
        request_id_var.set(str(md.get("x-request-id") or uuid.uuid4().hex[:16]))
        telemetry.GRPC_STARTED.labels(kind, service, name).inc()
        span = self._tracer.start_span(
            f"{service}/{name}",
            context=telemetry.extract_context(metadata),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        trace_id_var.set(format(span.get_span_context().trace_id, "032x"))
        return md, span

    def _check_auth(self, md, request, required: Role) -> Principal:
        principal = self._auth.authenticate(md.get("authorization"))
        projects = projects_in_request(request) if request is not None else set()
        authorize(principal, required, projects)
        principal_var.set(principal)
        return principal

    async def _fail(self, context, exc: BaseException, span, service: str, name: str):
        if isinstance(exc, DomainError):
            status = to_rpc_status(exc, self._domain)
            span.set_status(Status(StatusCode.ERROR, exc.reason))
        else:
            log.exception("unhandled error in %s/%s", service, name)
            status = internal_status(self._domain)
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, "INTERNAL"))
        await context.abort_with_status(rpc_status.to_status(status))

    def _finish(self, context, span, kind, service, name, started, code: grpc.StatusCode | None = None):
        final = code or _code_of(context)
        telemetry.GRPC_HANDLED.labels(kind, service, name, final.name).inc()
        telemetry.GRPC_HANDLING_SECONDS.labels(kind, service, name).observe(time.perf_counter() - started)
        span.set_attribute("rpc.grpc.status_code", final.value[0])
        span.end()

    def _wrap_unary(self, behavior: Callable, kind: str, service: str, name: str, required: Role):
        async def wrapper(request, context):
            started = time.perf_counter()
            md, span = self._begin(context, kind, service, name)
            code = None
            try:
                with trace.use_span(span, end_on_exit=False):
                    self._check_auth(md, request if kind == "unary" else None, required)
                    return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                code = exc.code if isinstance(exc, DomainError) else grpc.StatusCode.INTERNAL
                await self._fail(context, exc, span, service, name)
            finally:
                self._finish(context, span, kind, service, name, started, code)

        return wrapper

    def _wrap_stream(self, behavior: Callable, kind: str, service: str, name: str, required: Role):
        async def wrapper(request, context):
            started = time.perf_counter()
            md, span = self._begin(context, kind, service, name)
            code = None
            try:
                with trace.use_span(span, end_on_exit=False):
                    self._check_auth(md, request if kind == "server_stream" else None, required)
                    async for response in behavior(request, context):
                        yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001
                code = exc.code if isinstance(exc, DomainError) else grpc.StatusCode.INTERNAL
                await self._fail(context, exc, span, service, name)
            finally:
                self._finish(context, span, kind, service, name, started, code)

        return wrapper


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
