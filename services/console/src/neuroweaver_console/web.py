"""HTTP handlers: server-rendered pages (Jinja2, autoescaped), the job's live events as server-sent events, and the
actions (POST, then redirect back). Handlers only translate between HTTP and one or two gRPC calls (gateway.py)."""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import jinja2
from aiohttp import web
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Histogram

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.trainer.v1 import training_job_pb2 as tpb
from neuroweaver_runtime.logs import request_id_var

from .gateway import Gateway, Gateways

log = logging.getLogger("neuroweaver.console")
TOKEN_COOKIE = "nw_token"
ACTIONS = ("cancel", "pause", "resume", "checkpoint")
TERMINAL = {tpb.TrainingJob.STATE_SUCCEEDED, tpb.TrainingJob.STATE_FAILED, tpb.TrainingJob.STATE_CANCELLED}
# The console's own request metrics (the services export grpc_server_*; these are what the browser sees).
REQUESTS = Counter("console_http_requests_total", "HTTP requests served by the console", ["route", "code"])
LATENCY = Histogram("console_http_request_seconds", "HTTP request latency (SSE streams: until the stream ends)", ["route"])
SSE_EVENTS = Counter("console_sse_events_total", "training-job events forwarded to browsers")

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


def job_summary(job: tpb.TrainingJob, now: float | None = None) -> dict[str, Any]:
    """The list's row: progress and an ETA estimated from the rate so far (the trainer reports an ETA only in its
    step events; the job page shows that one, live)."""
    progress = job.current_step / job.total_steps if job.total_steps else 0.0
    eta: float | None = None
    if job.state == tpb.TrainingJob.STATE_RUNNING and job.start_time.seconds and 0 < job.current_step < job.total_steps:
        elapsed = (now or time.time()) - job.start_time.ToDatetime(tzinfo=UTC).timestamp()
        eta = elapsed / job.current_step * (job.total_steps - job.current_step)
    return {
        "job": job,
        "id": job.name.rsplit("/", 1)[-1],
        "state": _enum(tpb.TrainingJob.State.Name(job.state)),
        "method": _enum(tpb.TrainingMethod.Name(job.method)),
        "percent": round(progress * 100),
        "eta": _duration(eta) if eta is not None else "–",
    }


def event_json(event: tpb.TrainingJobEvent) -> dict[str, Any]:
    """One training-job event as the browser's chart and event list use it."""
    out: dict[str, Any] = {
        "seq": event.sequence,
        "type": _enum(tpb.EventType.Name(event.type)),
        "stage": event.stage,
        "time": _ts(event.create_time),
        "message": event.message,
    }
    if event.type == tpb.EVENT_TYPE_STATE_CHANGED:
        out["state"] = _enum(tpb.TrainingJob.State.Name(event.state))
    if event.HasField("step"):
        step = event.step
        out["step"] = {
            "step": step.step,
            "total": step.total_steps,
            "loss": step.loss if math.isfinite(step.loss) else None,
            "lr": step.learning_rate,
            "eta": _duration(step.eta.seconds) if step.HasField("eta") else "",
        }
    if event.metrics:
        out["metrics"] = {k: (v if math.isfinite(v) else None) for k, v in event.metrics.items()}
    return out


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


def _job_name(request: web.Request) -> str:
    return f"projects/{request.app[project_key]}/trainingJobs/{request.match_info['job']}"


def _model_name(request: web.Request) -> str:
    return f"projects/{request.app[project_key]}/models/{request.match_info['model']}"


@web.middleware
async def observe(request: web.Request, handler):
    """Request id, JSON access log, Prometheus metrics, and gRPC errors as pages a person can act on."""
    request_id_var.set(request.headers.get("x-request-id") or uuid.uuid4().hex)
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    start = time.perf_counter()
    status = 500
    try:
        try:
            response = await handler(request)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise web.HTTPSeeOther(f"/login?next={quote(request.path)}&reason=unauthenticated") from None
            response = _render(
                request,
                "error.html",
                status=_HTTP_STATUS.get(code, 502),
                code=code.name,
                message=exc.details() or "",
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


# --- pages -----------------------------------------------------------------------------------------------------


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
        # HttpOnly: scripts never read it; SameSite=Strict: other sites cannot post actions with it.
        response.set_cookie(
            TOKEN_COOKIE, token, httponly=True, samesite="Strict", secure=request.app[secure_cookie_key], path="/"
        )
    else:
        response.del_cookie(TOKEN_COOKIE, path="/")
    raise response


async def logout(request: web.Request) -> web.Response:
    response = web.HTTPSeeOther("/login")
    response.del_cookie(TOKEN_COOKIE, path="/")
    raise response


async def jobs(request: web.Request) -> web.Response:
    gw = await _gateway(request)
    resp = await gw.list_jobs(request.query.get("page_token", ""))
    now = time.time()
    return _render(request, "jobs.html", jobs=[job_summary(j, now) for j in resp.training_jobs], next_page=resp.next_page_token)


async def job(request: web.Request) -> web.Response:
    gw = await _gateway(request)
    job = await gw.get_job(_job_name(request))
    hp = {
        field.name: value
        for field, value in job.hyperparameters.ListFields()  # set fields only: what the job asked for
    }
    lora = {field.name: value for field, value in job.lora.ListFields()}
    return _render(
        request,
        "job.html",
        s=job_summary(job),
        hyperparameters=hp,
        lora=lora,
        terminal=job.state in TERMINAL,
        actions=_allowed_actions(job.state),
    )


def _allowed_actions(state: int) -> list[str]:
    S = tpb.TrainingJob
    if state == S.STATE_RUNNING:
        return ["checkpoint", "pause", "cancel"]
    if state in (S.STATE_QUEUED, S.STATE_PAUSING):
        return ["cancel"]
    if state == S.STATE_PAUSED:
        return ["resume", "cancel"]
    return []


async def job_action(request: web.Request) -> web.Response:
    action = request.match_info["action"]
    if action not in ACTIONS:
        raise web.HTTPNotFound()
    gw = await _gateway(request)
    await gw.job_action(_job_name(request), action)
    raise web.HTTPSeeOther(f"/jobs/{request.match_info['job']}?done={action}")


async def job_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events from WatchTrainingJob: the replay after `Last-Event-ID` (the browser's reconnect) or 0,
    then live events; `end` when the job reaches a terminal state (the trainer ends the stream there)."""
    gw = await _gateway(request)
    name = _job_name(request)
    try:
        after = int(request.headers.get("Last-Event-ID") or request.query.get("after", "0"))
    except ValueError:
        after = 0
    await gw.get_job(name)  # NOT_FOUND / PERMISSION_DENIED as an HTTP error before the stream starts
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **SECURITY_HEADERS})
    await response.prepare(request)
    events = gw.watch_job(name, after)
    try:
        async for event in events:
            data = json.dumps(event_json(event), separators=(",", ":"))
            await response.write(f"id: {event.sequence}\nevent: job\ndata: {data}\n\n".encode())
            SSE_EVENTS.inc()
        await response.write(b"event: end\ndata: {}\n\n")
    except grpc.aio.AioRpcError as exc:
        detail = json.dumps({"code": exc.code().name, "message": exc.details() or ""})
        await response.write(f"event: failure\ndata: {detail}\n\n".encode())
    except ConnectionResetError:
        pass  # the browser left
    finally:
        await events.aclose()  # now, not at garbage collection: cancels the WatchTrainingJob call on the trainer
    return response


async def models(request: web.Request) -> web.Response:
    gw = await _gateway(request)
    resp = await gw.list_models(request.query.get("page_token", ""))
    return _render(request, "models.html", models=resp.models, next_page=resp.next_page_token)


def _version_id(name: str) -> str:
    return name.rsplit("/", 1)[-1]


async def model(request: web.Request) -> web.Response:
    gw = await _gateway(request)
    name = _model_name(request)
    model = await gw.get_model(name)
    versions = await gw.list_versions(name)
    aliases = await gw.list_aliases(name)
    history = {a.name.rsplit("/", 1)[-1]: await gw.alias_history(a.name) for a in aliases}
    return _render(
        request,
        "model.html",
        model=model,
        model_id=request.match_info["model"],
        versions=versions,
        aliases=aliases,
        history=history,
        version_state=lambda v: _enum(rpb.ModelVersion.State.Name(v.state)),
        action_name=lambda e: _enum(rpb.AliasHistoryEntry.Action.Name(e.action)),
        vid=_version_id,
    )


async def compare(request: web.Request) -> web.Response:
    gw = await _gateway(request)
    name = _model_name(request)
    base, candidate = request.query.get("base", ""), request.query.get("candidate", "")
    if not base or not candidate:
        raise web.HTTPSeeOther(f"/models/{request.match_info['model']}")
    result = await gw.compare(f"{name}/versions/{base}", f"{name}/versions/{candidate}")
    deltas = [
        {
            "name": d.name,
            "direction": _enum(cpb.MetricDirection.Name(d.direction)),
            "base": d.base_value if d.HasField("base_value") else None,
            "candidate": d.candidate_value if d.HasField("candidate_value") else None,
            "delta": d.delta if d.HasField("delta") else None,
            "relative": d.relative_delta if d.HasField("relative_delta") else None,
            "verdict": "improved" if d.improved else "regressed" if d.regressed else "unchanged",
        }
        for d in result.metric_deltas
    ]
    return _render(
        request,
        "compare.html",
        model_id=request.match_info["model"],
        base=base,
        candidate=candidate,
        result=result,
        deltas=deltas,
        recommendation=_enum(rsvc.Recommendation.Name(result.recommendation)),
        relation=_enum(rsvc.SemverRelation.Name(result.semver_relation).replace("SEMVER_RELATION_", "")),
    )


async def alias_confirm(request: web.Request) -> web.Response:
    """Step 1 of moving an alias: a page that says what will change. The version it showed (`-` for none) goes to the
    registry as expected_version, so a move made meanwhile by someone else is refused instead of overwritten."""
    gw = await _gateway(request)
    name = _model_name(request)
    alias, version = request.query.get("alias", "").strip(), request.query.get("version", "").strip()
    if not alias or not version:
        raise web.HTTPSeeOther(f"/models/{request.match_info['model']}")
    current = {a.name.rsplit("/", 1)[-1]: _version_id(a.version) for a in await gw.list_aliases(name)}
    return _render(
        request,
        "alias_confirm.html",
        model_id=request.match_info["model"],
        alias=alias,
        version=version,
        current=current.get(alias, ""),
    )


async def alias_set(request: web.Request) -> web.Response:
    gw = await _gateway(request)
    name = _model_name(request)
    form = await request.post()
    alias, version = str(form.get("alias", "")), str(form.get("version", ""))
    expected = str(form.get("expected", ""))
    await gw.set_alias(
        name,
        alias,
        version,
        expected,
        str(form.get("reason", "")),
    )
    raise web.HTTPSeeOther(f"/models/{request.match_info['model']}?moved={quote(alias)}#aliases")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "time": datetime.now(UTC).isoformat()})


def routes(app: web.Application, static_dir: Path, assets: dict[str, Path]) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/jobs", jobs)
    app.router.add_get("/jobs/{job}", job)
    app.router.add_get("/jobs/{job}/events", job_events)
    app.router.add_post("/jobs/{job}/{action}", job_action)
    app.router.add_get("/models", models)
    app.router.add_get("/models/{model}", model)
    app.router.add_get("/models/{model}/compare", compare)
    app.router.add_get("/models/{model}/alias", alias_confirm)
    app.router.add_post("/models/{model}/alias", alias_set)
    app.router.add_static("/static", static_dir)
    for url, path in assets.items():

        async def asset(request: web.Request, path: Path = path) -> web.FileResponse:
            return web.FileResponse(path, headers={"Cache-Control": "max-age=3600"})

        app.router.add_get(url, asset)
