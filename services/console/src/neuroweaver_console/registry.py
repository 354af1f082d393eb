"""Registry screens: models, a model's versions, aliases and their history, comparing two versions, and moving an
alias (a confirmation page, then a compare-and-set)."""

from __future__ import annotations

from urllib.parse import quote

from aiohttp import web

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc

from .web import _enum, _gateway, _render, project_key


def _model_name(request: web.Request) -> str:
    return f"projects/{request.app[project_key]}/models/{request.match_info['model']}"


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



def routes(app: web.Application) -> None:
    app.router.add_get("/models", models)
    app.router.add_get("/models/{model}", model)
    app.router.add_get("/models/{model}/compare", compare)
    app.router.add_get("/models/{model}/alias", alias_confirm)
    app.router.add_post("/models/{model}/alias", alias_set)
