"""Registry screens: models, a model's versions with their lineage graph, one version (metrics, artifacts, lineage,
aliases), aliases and their history, comparing two versions, and moving an alias (a confirmation page, then a
compare-and-set)."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import grpc
from aiohttp import web

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc

from .gateway import Gateway
from .lineage import lineage_graph, version_href, version_label
from .web import _enum, _gateway, _render, project_key

# The model page draws the lineage of its newest versions; each version's page draws its own ancestry.
GRAPH_VERSIONS = 30
ANCESTORS = 5


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
    drawn = versions[:GRAPH_VERSIONS]  # newest first: the graph reads oldest first
    return _render(
        request,
        "model.html",
        model=model,
        model_id=request.match_info["model"],
        versions=versions,
        aliases=aliases,
        history=history,
        graph=lineage_graph(drawn[::-1], request.app[project_key], name),
        graph_partial=len(drawn) < len(versions),
        version_state=_version_state,
        action_name=lambda e: _enum(rpb.AliasHistoryEntry.Action.Name(e.action)),
        vid=_version_id,
    )


def _version_state(v: rpb.ModelVersion) -> str:
    return _enum(rpb.ModelVersion.State.Name(v.state))


def latest_metrics(metrics: list[rpb.Metric]) -> list[rpb.Metric]:
    """The newest value of each name (what CompareModelVersions compares), by name."""
    latest: dict[str, rpb.Metric] = {}
    for m in metrics:  # appended oldest first; a later record of a name wins
        seen = latest.get(m.name)
        if seen is None or m.record_time.ToNanoseconds() >= seen.record_time.ToNanoseconds():
            latest[m.name] = m
    return [latest[k] for k in sorted(latest)]


def artifact_format(artifact: rpb.Artifact) -> str:
    return _enum(rpb.ArtifactFormat.Name(artifact.format).removeprefix("ARTIFACT_FORMAT_"))


def size(n: int) -> str:
    """Bytes as a person reads them; 0 means not recorded."""
    if n <= 0:
        return "–"
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


async def _ancestors(gw: Gateway, version: rpb.ModelVersion, known: dict[str, rpb.ModelVersion]) -> list[rpb.ModelVersion]:
    """Up to ANCESTORS parents, oldest first; one the caller may not read (another project's) ends the line there
    and is drawn as a bare name."""
    chain: list[rpb.ModelVersion] = []
    parent = version.lineage.parent_version
    while parent and len(chain) < ANCESTORS and all(parent != v.name for v in [version, *chain]):
        found = known.get(parent)
        if found is None:
            try:
                found = await gw.registry.GetModelVersion(rsvc.GetModelVersionRequest(name=parent))
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE):
                    raise
                break  # not found, not allowed, not a version name: the graph shows the name
        chain.append(found)
        parent = found.lineage.parent_version
    return chain[::-1]


async def version(request: web.Request) -> web.Response:
    """One version: its facts, metrics, artifacts, lineage (ancestors, itself, its children in this model) and the
    comparisons worth making (with its parent, with each alias)."""
    gw = await _gateway(request)
    name = _model_name(request)
    model_id = request.match_info["model"]
    v = await gw.registry.GetModelVersion(rsvc.GetModelVersionRequest(name=f"{name}/versions/{request.match_info['version']}"))
    model, versions = await asyncio.gather(gw.get_model(name), gw.list_versions(name))
    ancestors = await _ancestors(gw, v, {x.name: x for x in versions})
    children = [c for c in reversed(versions) if c.lineage.parent_version == v.name]
    parent = v.lineage.parent_version
    compare_with: list[dict[str, Any]] = []
    if parent.startswith(f"{name}/versions/"):
        compare_with.append({"label": f"parent {_version_id(parent)}", "base": _version_id(parent)})
    for alias, target in sorted(model.aliases.items()):
        if target != v.version:
            compare_with.append({"label": f"{alias} ({target})", "base": target})
    return _render(
        request,
        "version.html",
        model=model,
        model_id=model_id,
        v=v,
        state=_version_state(v),
        metrics=latest_metrics(list(v.metrics)),
        direction=lambda m: _enum(cpb.MetricDirection.Name(m.direction)),
        artifacts=[v.artifact, *v.artifacts] if v.HasField("artifact") else list(v.artifacts),
        artifact_format=artifact_format,
        size=size,
        graph=lineage_graph([*ancestors, v, *children], request.app[project_key], name, focus=v.name),
        parent_label=version_label(parent, name) if parent else "",
        parent_href=version_href(parent, request.app[project_key]),
        compare_with=compare_with,
        others=[x.version for x in versions if x.version != v.version],
    )


def metric_verdict(d: rsvc.MetricDelta) -> str:
    """The registry's verdict on one metric, or why it has none."""
    if d.improved:
        return "improved"
    if d.regressed:
        return "regressed"
    if not d.HasField("base_value"):
        return "only in candidate"
    if not d.HasField("candidate_value"):
        return "only in base"
    if d.delta == 0:
        return "unchanged"
    # A change the registry did not judge: the metric declares no direction (or the two sides disagree on it), or the
    # change is within the metric's tolerance.
    return "no direction" if d.direction == cpb.METRIC_DIRECTION_UNSPECIFIED else "within tolerance"


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
            "verdict": metric_verdict(d),
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
        version_state=_version_state,
        relation=_enum(rsvc.SemverRelation.Name(result.semver_relation).replace("SEMVER_RELATION_", "")),
    )


async def alias_confirm(request: web.Request) -> web.Response:
    """Step 1 of moving an alias: a page that says what will change. The version it showed (`-` for none) goes to the
    registry as expected_version, so a move made meanwhile by someone else is refused instead of overwritten."""
    gw = await _gateway(request)
    name = _model_name(request)
    alias, version = request.query.get("alias", "").strip(), request.query.get("version", "").strip()
    rollback = request.query.get("rollback") == "1"
    if not alias or not (version or rollback):
        raise web.HTTPSeeOther(f"/models/{request.match_info['model']}")
    current = {a.name.rsplit("/", 1)[-1]: _version_id(a.version) for a in await gw.list_aliases(name)}
    if rollback:
        # Back to the version before the latest move (what RollbackModelAlias picks when given none), named on the
        # page and sent explicitly: a move made meanwhile fails the compare-and-set instead of changing the target.
        history = await gw.alias_history(f"{name}/aliases/{alias}")
        previous = _version_id(history[0].from_version) if history and history[0].from_version else ""
        if not previous:
            return _render(
                request,
                "error.html",
                status=409,
                code="FAILED_PRECONDITION",
                message=f"alias {alias} has no earlier version to roll back to",
            )
        version = previous
    return _render(
        request,
        "alias_confirm.html",
        model_id=request.match_info["model"],
        alias=alias,
        version=version,
        current=current.get(alias, ""),
        rollback=rollback,
    )


async def alias_set(request: web.Request) -> web.Response:
    gw = await _gateway(request)
    name = _model_name(request)
    form = await request.post()
    alias, version = str(form.get("alias", "")), str(form.get("version", ""))
    expected, reason = str(form.get("expected", "")), str(form.get("reason", ""))
    if form.get("rollback") == "1":  # recorded as a rollback in the alias history
        await gw.rollback_alias(f"{name}/aliases/{alias}", version, expected, reason)
    else:
        await gw.set_alias(name, alias, version, expected, reason)
    raise web.HTTPSeeOther(f"/models/{request.match_info['model']}?moved={quote(alias)}#aliases")


def routes(app: web.Application) -> None:
    app.router.add_get("/models", models)
    app.router.add_get("/models/{model}", model)
    app.router.add_get("/models/{model}/versions/{version}", version)
    app.router.add_get("/models/{model}/compare", compare)
    app.router.add_get("/models/{model}/alias", alias_confirm)
    app.router.add_post("/models/{model}/alias", alias_set)
