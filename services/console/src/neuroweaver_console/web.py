"""What every screen shares: rendering (Jinja2, autoescaped), the middleware (request id, access log, metrics, gRPC
errors as pages), login, health and static files. The screens (training.py, registry.py, ...) are HTTP handlers that
only translate between HTTP and one or two gRPC calls; live views are server-sent events from the gRPC streams."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

import grpc
import jinja2
from aiohttp import web
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Histogram

from neuroweaver_runtime.grpc_errors import error_info, field_violations
from neuroweaver_runtime.logs import request_id_var

from .gateway import Gateway, Gateways

log = logging.getLogger("neuroweaver.console")
TOKEN_COOKIE = "nw_token"
# The console's own request metrics (the services export grpc_server_*; these are what the browser sees).
REQUESTS = Counter("console_http_requests_total", "HTTP requests served by the console", ["route", "code"])
LATENCY = Histogram("console_http_request_seconds", "HTTP request latency (SSE streams: until the stream ends)", ["route"])
SSE_EVENTS = Counter("console_sse_events_total", "events forwarded to browsers as server-sent events", ["stream"])
# An SSE comment this often on a quiet stream: proxies keep it open, and a browser that left is noticed by the write.
KEEPALIVE_SECONDS = 15.0

# gRPC status -> HTTP status of the page that shows the error.
_HTTP_STATUS = {
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# Scripts and styles only from the console itself (no inline script), and no framing: the action buttons and the alias
# confirmation cannot be clickjacked from another site.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

gateways_key = web.AppKey("gateways", Gateways)
templates_key = web.AppKey("templates", jinja2.Environment)
default_token_key = web.AppKey("default_token", str)
project_key = web.AppKey("project", str)
secure_cookie_key = web.AppKey("secure_cookie", bool)


def _ts(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _enum(value: str) -> str:
    """`STATE_RUNNING` -> `running`, `RECOMMENDATION_KEEP_BASE` -> `keep base`."""
    for prefix in ("STATE_", "TRAINING_METHOD_", "RECOMMENDATION_", "METRIC_DIRECTION_", "EVENT_TYPE_", "ACTION_"):
        if value.startswith(prefix):
            value = value[len(prefix) :]
    return value.lower().replace("_", " ")


def _num(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}g}"


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "–"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("neuroweaver_console", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(ts=_ts, enum=_enum, num=_num, duration=_duration, urlq=lambda s: quote(str(s), safe=""))
    return env


class Event(NamedTuple):
    """One server-sent event: its name, its JSON data, and an id the browser sends back as Last-Event-ID when it
    reconnects (for streams that can resume)."""

    name: str
    data: dict[str, Any]
    id: int | None = None


def rpc_error(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    """A failed call as the browser shows it: the gRPC code, the ErrorInfo reason when there is one, the message."""
    info = error_info(exc)
    return {"code": exc.code().name, "reason": info.reason if info else "", "message": exc.details() or ""}


async def sse(request: web.Request, stream: str, source: AsyncGenerator[Event, None]) -> web.StreamResponse:
    """The one way a gRPC stream reaches the browser: `source`'s events as server-sent events. A gRPC error from the
    source ends the stream with a `failure` event (the page shows it); the source is closed when it ends, fails or the
    browser leaves, which cancels its upstream call at once. `stream` labels the events in the console's metrics."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **SECURITY_HEADERS})
    await response.prepare(request)
    counter = SSE_EVENTS.labels(stream)

    async def send(event: Event) -> None:
        head = f"id: {event.id}\n" if event.id is not None else ""
        await response.write(f"{head}event: {event.name}\ndata: {json.dumps(event.data, separators=(',', ':'))}\n\n".encode())
        counter.inc()

    async def pump() -> None:
        try:
            async for event in source:
                await send(event)
        except grpc.aio.AioRpcError as exc:
            await send(Event("failure", rpc_error(exc)))

    async def keepalive() -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_SECONDS)
            await response.write(b": keepalive\n\n")

    tasks = [asyncio.create_task(pump()), asyncio.create_task(keepalive())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await source.aclose()
    for result in results:
        if isinstance(result, Exception) and not isinstance(result, ConnectionResetError):  # reset: the browser left
            log.error("event stream failed", exc_info=result)
    return response


def _token(request: web.Request) -> str:
    return request.cookies.get(TOKEN_COOKIE) or request.app[default_token_key]


async def _gateway(request: web.Request) -> Gateway:
    return await request.app[gateways_key].for_token(_token(request))


def _render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    env = request.app[templates_key]
    page = env.get_template(template).render(
        logged_in=bool(request.cookies.get(TOKEN_COOKIE)),
        project=request.app[project_key],
        path=request.path,
        **context,
    )
    return web.Response(text=page, status=status, content_type="text/html")


def _refuse_cross_site(request: web.Request) -> None:
    """Actions (POST) only from the console's own pages. The SameSite cookie is not enough: without a login the console
    acts with its default --token, which a form on another site could otherwise use."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        if fetch_site not in ("same-origin", "none"):  # none: the user typed or bookmarked it
            raise web.HTTPForbidden(text="cross-site request refused")
        return
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:  # browsers without Sec-Fetch-* headers
        raise web.HTTPForbidden(text="cross-site request refused")


@web.middleware
async def observe(request: web.Request, handler):
    """Request id, JSON access log, Prometheus metrics, and gRPC errors as pages a person can act on."""
    request_id_var.set(request.headers.get("x-request-id") or uuid.uuid4().hex)
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    start = time.perf_counter()
    status = 500
    try:
        _refuse_cross_site(request)
        try:
            response = await handler(request)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise web.HTTPSeeOther(f"/login?next={quote(request.path)}&reason=unauthenticated") from None
            info = error_info(exc)
            response = _render(
                request,
                "error.html",
                status=_HTTP_STATUS.get(code, 502),
                code=code.name,
                reason=info.reason if info else "",
                message=exc.details() or "",
                violations=[(v.field, v.description) for v in field_violations(exc)],
            )
        status = response.status
        if not response.prepared:  # a finished SSE stream sent its headers long ago
            response.headers.update(SECURITY_HEADERS)
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        elapsed = time.perf_counter() - start
        REQUESTS.labels(route, str(status)).inc()
        LATENCY.labels(route).observe(elapsed)
        log.info(
            "http request",
            extra={"fields": {"method": request.method, "path": request.path, "status": status, "ms": round(elapsed * 1000, 1)}},
        )


# --- pages ---------------------------------------------------------------------------------------------------------


async def index(request: web.Request) -> web.Response:
    raise web.HTTPFound("/jobs")


async def login_form(request: web.Request) -> web.Response:
    reason = request.query.get("reason", "")
    message = "The services asked for a token: log in with yours." if reason == "unauthenticated" else ""
    return _render(request, "login.html", next=request.query.get("next", "/jobs"), message=message)


async def login(request: web.Request) -> web.Response:
    form = await request.post()
    token = str(form.get("token", "")).strip()
    target = str(form.get("next", "/jobs"))
    if not target.startswith("/") or target.startswith("//"):
        target = "/jobs"  # no open redirects
    response = web.HTTPSeeOther(target)
    if token:
        # HttpOnly: scripts never read it; SameSite=Strict: other sites cannot post actions with it; Secure when the
        # browser speaks HTTPS, to the console or to the Ingress in front of it (X-Forwarded-Proto can only tighten).
        https = request.app[secure_cookie_key] or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", secure=https, path="/")
    else:
        response.del_cookie(TOKEN_COOKIE, path="/")
    raise response


async def logout(request: web.Request) -> web.Response:
    response = web.HTTPSeeOther("/login")
    response.del_cookie(TOKEN_COOKIE, path="/")
    raise response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "time": datetime.now(UTC).isoformat()})


def routes(app: web.Application, static_dir: Path, assets: dict[str, Path]) -> None:
    """The pages every screen shares (login, health, static files); each screen module adds its own."""
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_static("/static", static_dir)
    for url, path in assets.items():

        async def asset(request: web.Request, path: Path = path) -> web.FileResponse:
            return web.FileResponse(path, headers={"Cache-Control": "max-age=3600"})

        app.router.add_get(url, asset)
