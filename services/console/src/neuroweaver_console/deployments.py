"""Deployment screens: the deployments list and a deployment's page (state, replicas, revisions, live performance),
its live state (server-sent events from WatchDeployment) and its actions (scale, roll back) behind a confirmation."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import duration_pb2

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb

from .gateway import Gateway
from .web import SECURITY_HEADERS, Event, _enum, _gateway, _render, _ts, project_key, rpc_error, sse

METRICS_WINDOW_SECONDS = 60
MAX_REPLICAS_FIELD = 1000  # the form's bound only; the deployer decides what it accepts


def version_ref(name: str) -> dict[str, str]:
    """`projects/p/models/m/versions/v` (or `.../aliases/a`) → the model id and the version (or alias) for links."""
    parts = name.split("/")
    if len(parts) == 6 and parts[2] == "models" and parts[4] in ("versions", "aliases"):
        separator = " " if parts[4] == "versions" else "@"
        return {"name": name, "model": parts[3], "label": f"{parts[3]}{separator}{parts[5]}"}
    return {"name": name, "model": "", "label": name}


def served_versions(d: dpb.Deployment) -> list[dict[str, str]]:
    """Every version the deployment's servers answer with, its own first (a single-version deployment: served_version)."""
    names = [v.model_version for v in d.served_versions] or ([d.served_version] if d.served_version else [])
    return [version_ref(n) for n in names]


def deployment_summary(d: dpb.Deployment) -> dict[str, Any]:
    """A deployment as the list's row, the page's facts and the live updates show it."""
    return {
        "id": d.name.rsplit("/", 1)[-1],
        "name": d.name,
        "display_name": d.display_name,
        "state": _enum(dpb.Deployment.State.Name(d.state)),
        "replicas": d.replicas,
        "ready": d.ready_replicas,
        "revision": d.revision,
        "versions": served_versions(d),
        "follows": version_ref(d.model_alias or d.model_version),
        "following_alias": bool(d.model_alias),
        "backend": _enum(dpb.Backend.Name(d.backend).replace("BACKEND_", "")),
        "endpoint": d.endpoint,
        "updated": _ts(d.update_time),
        "conditions": [
            {"type": c.type, "status": c.status, "reason": c.reason, "message": c.message, "since": _ts(c.last_transition_time)}
            for c in d.conditions
        ],
    }


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _pct(share: float | None) -> str:
    return "–" if share is None else f"{share * 100:.1f} %"


def stats_cells(s: dsvc.PerformanceStats) -> list[str]:
    present = {field.name: value for field, value in s.ListFields()}  # quantiles and rates unset: no request finished
    opt = present.get
    return [
        f"{s.requests_per_second:.2f}",
        _ms(opt("latency_p50_seconds")),
        _ms(opt("latency_p95_seconds")),
        _ms(opt("latency_p99_seconds")),
        _ms(opt("time_to_first_token_p50_seconds")),
        f"{s.output_tokens_per_second:.1f}",
        _pct(opt("error_rate")),
        _pct(opt("server_error_rate")),
        f"{s.queue_depth:g}",
        f"{s.inflight_requests:g}",
    ]


METRIC_COLUMNS = [
    "Requests/s", "Latency p50", "Latency p95", "Latency p99", "First token p50", "Tokens/s", "Errors", "Server errors",
    "Queue", "In flight",
]  # fmt: skip


async def metrics_view(gw: Gateway, name: str) -> dict[str, Any]:
    """GetDeploymentMetrics formatted for the page (and its refreshes), or why the deployer cannot say."""
    try:
        m = await gw.deployer.GetDeploymentMetrics(
            dsvc.GetDeploymentMetricsRequest(name=name, window=duration_pb2.Duration(seconds=METRICS_WINDOW_SECONDS))
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise
        return {"available": False, **rpc_error(exc)}
    total = m.total
    return {
        "available": True,
        "window": m.window.seconds,
        "sample_time": _ts(m.sample_time),
        "source": _enum(dsvc.DeploymentMetrics.Source.Name(m.source).replace("SOURCE_", "")),
        "rows": [["all replicas", *stats_cells(total)]] + [[r.replica, *stats_cells(r.stats)] for r in m.replicas],
        "chart": {
            "rps": total.requests_per_second,
            "tokens": total.output_tokens_per_second,
            "p95_ms": total.latency_p95_seconds * 1000 if total.HasField("latency_p95_seconds") else None,
        },
    }


def _deployment_name(request: web.Request) -> str:
    return f"projects/{request.app[project_key]}/deployments/{request.match_info['deployment']}"


async def list_deployments(gw: Gateway, page_token: str = "", page_size: int = 100) -> dsvc.ListDeploymentsResponse:
    return await gw.deployer.ListDeployments(
        dsvc.ListDeploymentsRequest(parent=f"projects/{gw.project}", page_size=page_size, page_token=page_token)
    )


async def deployments(request: web.Request) -> web.Response:
    gw = await _gateway(request)
    resp = await list_deployments(gw, request.query.get("page_token", ""))
    return _render(
        request,
        "deployments.html",
        deployments=[deployment_summary(d) for d in resp.deployments],
        next_page=resp.next_page_token,
    )


async def deployment(request: web.Request) -> web.Response:
    gw = await _gateway(request)
    name = _deployment_name(request)
    d = await gw.deployer.GetDeployment(dsvc.GetDeploymentRequest(name=name))
    revisions = await gw.deployer.ListDeploymentRevisions(dsvc.ListDeploymentRevisionsRequest(parent=name, page_size=50))
    return _render(
        request,
        "deployment.html",
        d=deployment_summary(d),
        deployment=d,
        revisions=[
            {
                "revision": r.revision,
                "version": version_ref(r.model_version),
                "cause": r.cause,
                "actor": r.actor,
                "created": _ts(r.create_time),
            }
            for r in revisions.revisions
        ],  # fmt: skip
        more_revisions=bool(revisions.next_page_token),
        metrics=await metrics_view(gw, name),
        metric_columns=METRIC_COLUMNS,
        max_replicas=MAX_REPLICAS_FIELD,
        done=request.query.get("done", ""),
    )


async def deployment_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events from WatchDeployment: the current state first, then every status change; `end` when the
    deployment is deleted (the deployer ends the stream there)."""
    gw = await _gateway(request)
    name = _deployment_name(request)
    await gw.deployer.GetDeployment(dsvc.GetDeploymentRequest(name=name))  # NOT_FOUND etc. as an HTTP error first

    async def states() -> AsyncGenerator[Event, None]:
        call = gw.deployer.WatchDeployment(dsvc.WatchDeploymentRequest(name=name))
        try:
            async for msg in call:
                yield Event("deployment", deployment_summary(msg.deployment))
            yield Event("end", {})
        finally:
            call.cancel()

    return await sse(request, "deployment", states())


async def deployment_metrics(request: web.Request) -> web.Response:
    """The performance table's refresh (the page's script asks every few seconds; the deployer samples as often)."""
    gw = await _gateway(request)
    return web.json_response(await metrics_view(gw, _deployment_name(request)), headers={"Cache-Control": "no-store"})


async def action_confirm(request: web.Request) -> web.Response:
    """Step 1 of scaling or rolling back: a page that says what will change; step 2 posts it."""
    action = request.match_info["action"]
    gw = await _gateway(request)
    d = await gw.deployer.GetDeployment(dsvc.GetDeploymentRequest(name=_deployment_name(request)))
    context: dict[str, Any] = {"action": action, "d": deployment_summary(d)}
    if action == "scale":
        context["replicas"] = _int_param(request, request.query.get("replicas", ""), "replicas")
    else:
        revision = _int_param(request, request.query.get("revision", ""), "revision")
        revisions = await gw.deployer.ListDeploymentRevisions(dsvc.ListDeploymentRevisionsRequest(parent=d.name, page_size=200))
        target = next((r for r in revisions.revisions if r.revision == revision), None)
        context["revision"] = revision
        context["target"] = version_ref(target.model_version) if target else None
    return _render(request, "deployment_confirm.html", **context)


async def action(request: web.Request) -> web.Response:
    action = request.match_info["action"]
    gw = await _gateway(request)
    name = _deployment_name(request)
    form = await request.post()
    if action == "scale":
        replicas = _int_param(request, str(form.get("replicas", "")), "replicas")
        await gw.deployer.ScaleDeployment(dsvc.ScaleDeploymentRequest(name=name, replicas=replicas))
    else:
        revision = _int_param(request, str(form.get("revision", "")), "revision")
        await gw.deployer.RollbackDeployment(dsvc.RollbackDeploymentRequest(name=name, to_revision=revision))
    raise web.HTTPSeeOther(f"/deployments/{request.match_info['deployment']}?done={action}")


def _int_param(request: web.Request, value: str, field: str) -> int:
    """A whole number from the form; its range is the deployer's to judge (its INVALID_ARGUMENT is shown as a page)."""
    try:
        number = int(value.strip())
    except ValueError:
        number = None
    if number is None or not -(2**31) <= number < 2**31:
        message = f"{field} must be a whole number"
        page = _render(request, "error.html", status=400, code="INVALID_ARGUMENT", reason="", message=message, violations=[])
        raise web.HTTPBadRequest(text=page.text, content_type="text/html", headers=SECURITY_HEADERS)
    return number


def routes(app: web.Application) -> None:
    app.router.add_get("/deployments", deployments)
    app.router.add_get("/deployments/{deployment}", deployment)
    app.router.add_get("/deployments/{deployment}/events", deployment_events)
    app.router.add_get("/deployments/{deployment}/metrics", deployment_metrics)
    app.router.add_get("/deployments/{deployment}/{action:scale|rollback}", action_confirm)
    app.router.add_post("/deployments/{deployment}/{action:scale|rollback}", action)
