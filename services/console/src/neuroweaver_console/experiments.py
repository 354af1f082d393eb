"""Experiment screens: the list (state, variants and their model versions, sample so far) and a results page from
GetExperimentResults (per metric and variant: mean, CI, lift with its interval, p-values; power and progress toward
the planned sample; guardrails; the sample-ratio check; the decision in words), start/stop, and concluding with the
winner promoted to a registry alias behind a confirmation page (compare-and-set, as the registry's alias move).

A sample-ratio mismatch blocks concluding here: the service reports SRM as "no winner can be called", so the console
offers neither ship nor conclude while it holds, and says why."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote, urlencode

import grpc
from aiohttp import web

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.experiments.v1 import experiment_pb2 as epb
from neuroweaver.experiments.v1 import experiments_service_pb2 as esvc

from .gateway import Gateway
from .web import _enum, _gateway, _num, _render, project_key

E = epb.Experiment
ACTIONS = ("start", "stop")
STATE_FILTERS = ("draft", "running", "stopped", "concluded")
PAGE_SIZE = 25  # each row costs a GetExperimentResults call (the sample so far)


def _name(request: web.Request) -> str:
    return f"projects/{request.app[project_key]}/experiments/{request.match_info['experiment']}"


def _words(enum_name: str, prefix: str) -> str:
    return _enum(enum_name.removeprefix(prefix))


def state_word(state: E.State.ValueType) -> str:
    return _enum(E.State.Name(state))


def allowed_actions(state: E.State.ValueType) -> list[str]:
    """Start/stop buttons the state allows (the service's transitions: draft|stopped → running → stopped)."""
    if state in (E.STATE_DRAFT, E.STATE_STOPPED):
        return ["start"]
    if state == E.STATE_RUNNING:
        return ["stop"]
    return []


def can_conclude(state: E.State.ValueType) -> bool:
    return state in (E.STATE_RUNNING, E.STATE_STOPPED)


def srm_block(results: epb.ExperimentResults) -> str:
    """Why concluding is refused here, in words; empty when the sample-ratio check passed."""
    if not results.srm_detected:
        return ""
    return (
        f"The exposed units do not match the planned traffic split (sample-ratio mismatch, chi-square "
        f"p = {_num(results.srm_p_value, 3)} < 0.001). Assignment or exposure logging is broken, so these results "
        "cannot be trusted and no winner can be shipped or concluded from them. Fix the assignment and start a new "
        "experiment, or stop this one."
    )


def ship_variant(exp: epb.Experiment, results: epb.ExperimentResults) -> str:
    """The variant the ship button offers: the service's recommendation, when it says ship and SRM does not block."""
    if results.decision != epb.DECISION_SHIP_VARIANT or results.srm_detected or not can_conclude(exp.state):
        return ""
    return results.recommended_variant


def model_version_label(model_version: str, project: str) -> dict[str, str]:
    """`projects/p/models/m/versions/v` → `m v`, linked to the model page when it is in the console's project."""
    parts = model_version.split("/")
    if len(parts) == 6 and parts[0] == "projects" and parts[2] == "models" and parts[4] == "versions":
        href = f"/models/{quote(parts[3], safe='')}" if parts[1] == project else ""
        return {"text": f"{parts[3]} {parts[5]}", "href": href, "full": model_version}
    return {"text": model_version, "href": "", "full": model_version}


def _pct(x: float) -> str:
    return f"{x * 100:+.2f}%"


def _interval(lo: float, hi: float, fmt) -> str | None:
    """The service reports an undefined interval as (0, 0)."""
    if lo == 0.0 and hi == 0.0:
        return None
    return f"[{fmt(lo)}, {fmt(hi)}]"


def metric_table(mr: epb.MetricResult, variants: list[epb.Variant], project: str, sequential: bool) -> dict[str, Any]:
    """One metric's rows, in the experiment's variant order (the first is the control), with every number formatted
    for the page, and the lift plot's data (treatments whose lift interval is defined)."""
    stats = {v.variant: v for v in mr.variants}
    comparisons = {c.variant: c for c in mr.comparisons}
    control = stats.get(variants[0].id) if variants else None
    lift_defined = bool(control and control.units and control.mean != 0.0)  # relative to a zero mean: undefined
    rows: list[dict[str, Any]] = []
    chart: dict[str, list] = {"labels": [], "lift": [], "lower": [], "upper": []}
    for v in variants:
        s, c = stats.get(v.id), comparisons.get(v.id)
        units = s.units if s else 0
        row: dict[str, Any] = {
            "variant": v.id,
            "model": model_version_label(v.model_version, project),
            "units": units,
            "mean": _num(s.mean, 4) if s and units else "–",
            "ci": (_interval(s.ci_lower, s.ci_upper, lambda x: _num(x, 4)) if s and units > 1 else None) or "–",
            "difference": "–", "lift": "–", "lift_ci": "–", "p": "–", "seq_p": "–",
            "verdict": "baseline" if c is None else "",
        }  # fmt: skip
        if c is not None:
            both = bool(units and control and control.units)
            lift_ci = _interval(c.lift_ci_lower, c.lift_ci_upper, _pct) if lift_defined else None
            row.update(
                difference=f"{c.difference:+.4g}" if both else "–",
                lift=_pct(c.relative_lift) if lift_defined and both else "–",
                lift_ci=lift_ci or "–",
                p=_num(c.p_value, 3),
                seq_p=_num(c.sequential_p_value, 3) if sequential else "–",
                verdict=("better" if c.improvement else "worse") if c.significant else "not significant",
            )
            if lift_ci and both:
                chart["labels"].append(v.id)
                for key, x in (("lift", c.relative_lift), ("lower", c.lift_ci_lower), ("upper", c.lift_ci_upper)):
                    chart[key].append(round(x * 100, 4))
        rows.append(row)
    m = mr.metric
    return {
        "name": m.name,
        "kind": _words(epb.MetricKind.Name(m.kind), "METRIC_KIND_"),
        "direction": "lower is better" if m.direction == cpb.METRIC_DIRECTION_LOWER_IS_BETTER else "higher is better",
        "tolerance": m.tolerance,
        "violated": mr.guardrail_violated,
        "cuped": (
            f"CUPED-adjusted: variance reduced by {mr.variance_reduction * 100:.0f}% "
            f"({mr.covariate_coverage * 100:.0f}% of units have a pre-experiment value)"
            if mr.cuped_applied
            else ""
        ),
        "rows": rows,
        "chart": json.dumps(chart, separators=(",", ":")) if chart["labels"] else "",
    }


def sample_summary(results: epb.ExperimentResults, exp: epb.Experiment) -> dict[str, Any]:
    units = [v.units for v in results.primary.variants]
    return {
        "per_variant": [(v.variant, v.units) for v in results.primary.variants],
        "smallest": min(units) if units else 0,
        "planned": exp.min_sample_size,
        "percent": round(results.progress * 100),
    }


async def _results_or_none(gw: Gateway, exp: epb.Experiment) -> epb.ExperimentResults | None:
    """Results for a list row; a draft has none yet, and an experiment without a primary metric none at all."""
    if exp.state == E.STATE_DRAFT:
        return None
    try:
        return await gw.experiments.GetExperimentResults(esvc.GetExperimentResultsRequest(name=exp.name))
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
            return None
        raise


# --- pages ---------------------------------------------------------------------------------------------------------


async def experiments(request: web.Request) -> web.Response:
    gw = await _gateway(request)
    state = request.query.get("state", "")
    if state not in STATE_FILTERS:
        state = ""
    resp = await gw.experiments.ListExperiments(
        esvc.ListExperimentsRequest(
            parent=f"projects/{request.app[project_key]}",
            page_size=PAGE_SIZE,
            page_token=request.query.get("page_token", ""),
            filter=f"state = {state.upper()}" if state else "",
            order_by="create_time desc",
        )
    )
    results = await asyncio.gather(*(_results_or_none(gw, e) for e in resp.experiments))
    project = request.app[project_key]
    rows = [
        {
            "exp": e,
            "id": e.name.rsplit("/", 1)[-1],
            "state": state_word(e.state),
            "draft": e.state == E.STATE_DRAFT,
            "variants": [(v.id, model_version_label(v.model_version, project), v.weight) for v in e.variants],
            "sample": sample_summary(r, e) if r is not None else None,
            "decision": _words(epb.Decision.Name(r.decision), "DECISION_") if r is not None else "",
            "srm": bool(r is not None and r.srm_detected),
        }
        for e, r in zip(resp.experiments, results, strict=True)
    ]
    next_page = (
        "/experiments?" + urlencode({k: v for k, v in (("state", state), ("page_token", resp.next_page_token)) if v})
        if resp.next_page_token
        else ""
    )
    return _render(request, "experiments.html", rows=rows, state=state, states=STATE_FILTERS, next_page=next_page)


async def experiment(request: web.Request) -> web.Response:
    gw = await _gateway(request)
    name = _name(request)
    exp = await gw.experiments.GetExperiment(esvc.GetExperimentRequest(name=name))  # NOT_FOUND before anything else
    results = await gw.experiments.GetExperimentResults(esvc.GetExperimentResultsRequest(name=name))  # concludes nothing
    project = request.app[project_key]
    sequential = exp.analysis == epb.ANALYSIS_METHOD_SEQUENTIAL
    variants = list(exp.variants)

    def table(mr: epb.MetricResult) -> dict[str, Any]:
        return metric_table(mr, variants, project, sequential)

    alpha = exp.significance_level or 0.05
    return _render(
        request,
        "experiment.html",
        exp=exp,
        exp_id=request.match_info["experiment"],
        state=state_word(exp.state),
        analysis=_words(epb.AnalysisMethod.Name(exp.analysis), "ANALYSIS_METHOD_"),
        sequential=sequential,
        level=f"{(1 - alpha) * 100:g}%",
        results=results,
        decision=_words(epb.Decision.Name(results.decision), "DECISION_"),
        sample=sample_summary(results, exp),
        power=f"{results.power * 100:.0f}%" if results.power else "–",  # 0 = undefined (no effect or no data)
        primary=table(results.primary),
        guardrails=[table(g) for g in results.guardrails],
        secondary=[table(s) for s in results.secondary],
        treatments=len(variants) - 1,
        actions=allowed_actions(exp.state),
        can_conclude=can_conclude(exp.state),
        concluded=exp.state == E.STATE_CONCLUDED,
        ship=ship_variant(exp, results),
        blocked=srm_block(results),
        srm_p=_num(results.srm_p_value, 3),
        done=request.query.get("done", ""),
    )


async def _conclusion(request: web.Request, winner: str) -> tuple[Gateway, epb.Experiment, epb.ExperimentResults | None, str]:
    """The experiment, its current results, and why concluding it with this winner is refused (empty when it is not).
    Checked again when the confirmation is posted: the results may have changed since the page was shown."""
    gw = await _gateway(request)
    name = _name(request)
    exp = await gw.experiments.GetExperiment(esvc.GetExperimentRequest(name=name))
    if not can_conclude(exp.state):
        return gw, exp, None, f"The experiment is {state_word(exp.state)}: only a running or stopped one can be concluded."
    if winner and winner not in {v.id for v in exp.variants}:
        return gw, exp, None, f"{winner!r} is not a variant of this experiment."
    results = await gw.experiments.GetExperimentResults(esvc.GetExperimentResultsRequest(name=name))
    return gw, exp, results, srm_block(results)


async def _promotion(gw: Gateway, exp: epb.Experiment, winner: str, alias: str) -> dict[str, str]:
    """What promoting `winner` to `alias` changes: the winner's model and version, and the version the alias points at
    now (empty for none), which the confirmation sends back as the compare-and-set's expected version."""
    variant = next(v for v in exp.variants if v.id == winner)
    model, _, version = variant.model_version.rpartition("/versions/")
    current = {a.name.rsplit("/", 1)[-1]: a.version.rsplit("/", 1)[-1] for a in await gw.list_aliases(model)}
    return {"model": model, "model_id": model.rsplit("/", 1)[-1], "version": version, "current": current.get(alias, "")}


def _confirm_page(request, exp, winner, alias, results, blocked, promotion) -> web.Response:
    return _render(
        request,
        "experiment_confirm.html",
        status=409 if blocked else 200,
        exp=exp,
        exp_id=request.match_info["experiment"],
        winner=winner,
        alias=alias,
        promotion=promotion,
        results=results,
        decision=_words(epb.Decision.Name(results.decision), "DECISION_") if results else "",
        blocked=blocked,
    )


async def conclude_confirm(request: web.Request) -> web.Response:
    """Step 1 of concluding: a page that says what will change (the winner, and the alias move when promoting)."""
    winner = request.query.get("winner", "").strip()
    gw, exp, results, blocked = await _conclusion(request, winner)
    alias = request.query.get("alias", exp.promote_alias).strip() if winner else ""
    promotion = await _promotion(gw, exp, winner, alias) if winner and alias and not blocked else {}
    return _confirm_page(request, exp, winner, alias, results, blocked, promotion)


async def conclude(request: web.Request) -> web.Response:
    """Step 2: ConcludeExperiment; promoting moves the alias only if it still points where the page said (`-`: none)."""
    form = await request.post()
    winner, alias = str(form.get("winner", "")), str(form.get("alias", ""))
    gw, exp, results, blocked = await _conclusion(request, winner)
    if blocked:
        return _confirm_page(request, exp, winner, alias, results, blocked, {})
    promote = bool(winner and alias)
    await gw.experiments.ConcludeExperiment(
        esvc.ConcludeExperimentRequest(
            name=exp.name,
            winner=winner,
            promote=promote,
            alias=alias if promote else "",
            expected_current_version=str(form.get("expected", "-")) if promote else "",
            reason=str(form.get("reason", "")),
        )
    )
    raise web.HTTPSeeOther(f"/experiments/{quote(request.match_info['experiment'], safe='')}?done=concluded")


async def experiment_action(request: web.Request) -> web.Response:
    action = request.match_info["action"]
    if action not in ACTIONS:
        raise web.HTTPNotFound()
    gw = await _gateway(request)
    name = _name(request)
    if action == "start":
        await gw.experiments.StartExperiment(esvc.StartExperimentRequest(name=name))
    else:
        form = await request.post()
        await gw.experiments.StopExperiment(esvc.StopExperimentRequest(name=name, reason=str(form.get("reason", ""))))
    raise web.HTTPSeeOther(f"/experiments/{quote(request.match_info['experiment'], safe='')}?done={action}")


def routes(app: web.Application) -> None:
    app.router.add_get("/experiments", experiments)
    app.router.add_get("/experiments/{experiment}", experiment)
    app.router.add_get("/experiments/{experiment}/conclude", conclude_confirm)
    app.router.add_post("/experiments/{experiment}/conclude", conclude)
    app.router.add_post("/experiments/{experiment}/{action}", experiment_action)
