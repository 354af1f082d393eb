"""Training screens: the jobs list; the new-job form (CreateTrainingJob, its refusals shown next to the fields, the
same request as an `nw` command and a grpcurl call, a dataset preview); a job's page with its live events
(server-sent events from WatchTrainingJob: curves, stage timeline, filterable events), its worker's log
(ReadTrainingJobLogs, polled while the job runs), its dataset's first rows (PreviewDataset) and its actions (cancel,
pause, resume, checkpoint)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncGenerator
from datetime import UTC
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format

from neuroweaver.trainer.v1 import trainer_service_pb2 as tsvc
from neuroweaver.trainer.v1 import training_job_pb2 as tpb
from neuroweaver_runtime.grpc_errors import error_info, field_violations

from . import job_form
from .gateway import Gateway
from .web import (
    _HTTP_STATUS,
    TOKEN_COOKIE,
    Event,
    _duration,
    _enum,
    _gateway,
    _render,
    _ts,
    default_token_key,
    project_key,
    sse,
    templates_key,
)

ACTIONS = ("cancel", "pause", "resume", "checkpoint")
TERMINAL = {tpb.TrainingJob.STATE_SUCCEEDED, tpb.TrainingJob.STATE_FAILED, tpb.TrainingJob.STATE_CANCELLED}


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
        "ts": event.create_time.seconds + event.create_time.nanos / 1e9,  # for the stage timeline's durations
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


def _job_name(request: web.Request) -> str:
    return f"projects/{request.app[project_key]}/trainingJobs/{request.match_info['job']}"


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

    async def events() -> AsyncGenerator[Event, None]:
        watch = gw.watch_job(name, after)
        try:
            async for event in watch:
                yield Event("job", event_json(event), event.sequence)
            yield Event("end", {})
        finally:
            await watch.aclose()  # now, not at garbage collection: cancels the WatchTrainingJob call on the trainer

    return await sse(request, "training-job", events())


# --- worker logs ----------------------------------------------------------------------------------------------------

LOG_TAIL = 500  # lines a page shows first


async def job_logs(request: web.Request) -> web.Response:
    """The job page's log section (polled by job.js every 2 s while the job runs): `?attempt=N` (0 = the latest) and
    `offset` (the `next_offset` of the previous answer; none: the tail). JSON, so that the page inserts the lines as
    text. A refusal (a viewer, no log yet, another replica's disk) is an `error` object with the trainer's words, said in
    the section: the page around it works on."""
    gw = await _gateway(request)
    try:
        attempt = int(request.query.get("attempt", "0"))
        offset = int(request.query["offset"]) if "offset" in request.query else None
    except ValueError:
        raise web.HTTPBadRequest(text="attempt and offset are integers") from None
    try:
        resp = await gw.trainer.ReadTrainingJobLogs(
            tsvc.ReadTrainingJobLogsRequest(
                name=_job_name(request), attempt=attempt, offset=offset, tail_lines=LOG_TAIL if offset is None else 0
            )
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise
        info = error_info(exc)
        body = {"code": exc.code().name, "reason": info.reason if info else "", "message": exc.details() or ""}
        return web.json_response({"error": body})  # said in the section, as the dataset preview does
    return web.json_response(
        {
            "lines": list(resp.lines), "attempt": resp.attempt, "attempts": resp.attempts,
            "executor": tpb.Executor.Name(resp.executor).removeprefix("EXECUTOR_").lower(), "truncated": resp.truncated,
            "next_offset": str(resp.next_offset),  # a pod log's offset is in nanoseconds: past JavaScript's exact integers
            "state": _enum(tpb.TrainingJob.State.Name(resp.state)), "terminal": resp.state in TERMINAL,
        }
    )  # fmt: skip


# --- dataset preview ------------------------------------------------------------------------------------------------

PREVIEW_ROWS = 5


def row_parts(row: dict[str, Any]) -> list[tuple[str, str]]:
    """A dataset row as (label, text) pairs: each chat message under its role, other fields under their names."""
    parts: list[tuple[str, str]] = []
    for key, value in row.items():
        if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
            parts += [(str(m["role"]), m["content"] if isinstance(m.get("content"), str) else json.dumps(m)) for m in value]
        else:
            parts.append((key, value if isinstance(value, str) else json.dumps(value)))
    return parts


async def preview(gw: Gateway, uri: str, method: tpb.TrainingMethod.ValueType) -> tsvc.PreviewDatasetResponse:
    return await gw.trainer.PreviewDataset(
        tsvc.PreviewDatasetRequest(parent=f"projects/{gw.project}", dataset_uri=uri, method=method, max_rows=PREVIEW_ROWS)
    )


def preview_view(resp: tsvc.PreviewDatasetResponse, recorded_digest: str = "") -> dict[str, Any]:
    return {
        "rows": [
            {"line": r.line, "parts": row_parts(json_format.MessageToDict(r.content)), "truncated": r.truncated}
            for r in resp.rows
        ],
        "count": resp.row_count,
        "format": resp.format.replace("_", "/") or "unknown",
        "sha256": resp.sha256,
        "size": resp.size_bytes,
        "changed": bool(recorded_digest and resp.sha256 and resp.sha256 != recorded_digest),
        "matches": bool(recorded_digest and resp.sha256 == recorded_digest),
        "problems": [(p.line or None, p.message) for p in resp.problems],
        "more_problems": resp.problems_truncated,
    }


async def job_dataset(request: web.Request) -> web.Response:
    """The job page's dataset section (fetched by job.js): the first rows of the job's dataset as the trainer reads
    it now, and whether the file still has the digest recorded at submission. An error is said in the section."""
    gw = await _gateway(request)
    job = await gw.get_job(_job_name(request))
    context: dict[str, Any] = {"preview": None, "preview_error": ""}
    try:
        context["preview"] = preview_view(await preview(gw, job.dataset_uri, job.method), job.dataset_digest)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise
        context["preview_error"] = f"{exc.code().name}: {exc.details() or ''}"
    page = request.app[templates_key].get_template("_dataset_preview.html").render(**context)
    return web.Response(text=page, content_type="text/html")


# --- new job --------------------------------------------------------------------------------------------------------


def _form_page(request: web.Request, form: job_form.Form, status: int = 200, **extra: Any) -> web.Response:
    context: dict[str, Any] = {"checked": None, "preview": None, "preview_error": "", "commands": None}
    context.update(extra)
    return _render(
        request, "new_job.html", status=status, form=form, fields=job_form.BY_NAME, options=job_form.OPTIONS,
        rlaif_only=job_form.RLAIF_ONLY, **context,
    )  # fmt: skip


async def new_job_form(request: web.Request) -> web.Response:
    return _form_page(request, job_form.Form.blank())


def _refusal(form: job_form.Form, exc: grpc.aio.AioRpcError) -> None:
    """The trainer's refusal on the form: each field violation next to its field, the rest in the summary."""
    violations = field_violations(exc)
    for v in violations:
        form.error(v.field, v.description)
    info = error_info(exc)
    field = job_form.REASON_FIELDS.get(info.reason if info else "")
    if field:
        form.errors.setdefault(field, []).append(exc.details() or "")
    elif not violations:
        form.other_errors.append(f"{exc.code().name}: {exc.details() or ''}")


async def new_job_submit(request: web.Request) -> web.Response:
    """`action=create` (the default, also Enter in a field) creates the job and opens its page; `action=check` asks
    the trainer to validate it (validate_only), previews its dataset and shows the same request as commands."""
    data = await request.post()
    form = job_form.Form.parse(data)
    project = request.app[project_key]
    gw = await _gateway(request)
    create = job_form.build_request(form, project)
    if str(data.get("action", "create")) == "check":
        return await _check(request, gw, form, create)
    if form.failed:
        return _form_page(request, form, status=400)
    try:
        created = await gw.trainer.CreateTrainingJob(create)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise
        _refusal(form, exc)
        return _form_page(request, form, status=_HTTP_STATUS.get(exc.code(), 502))
    raise web.HTTPSeeOther(f"/jobs/{created.name.rsplit('/', 1)[-1]}")


async def _check(request: web.Request, gw: Gateway, form: job_form.Form, create: tsvc.CreateTrainingJobRequest) -> web.Response:
    checked = None
    if not form.failed:
        validate = tsvc.CreateTrainingJobRequest()
        validate.CopyFrom(create)
        validate.validate_only = True
        try:
            checked = await gw.trainer.CreateTrainingJob(validate)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise
            _refusal(form, exc)
    dataset, preview_error = None, ""
    if form.values["dataset_uri"]:
        try:
            dataset = preview_view(await preview(gw, form.values["dataset_uri"], create.training_job.method))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise
            preview_error = f"{exc.code().name}: {exc.details() or ''}"
    target = gw.trainer_target
    tls = gw.tls.enabled
    token = bool(request.cookies.get(TOKEN_COOKIE) or request.app[default_token_key])
    commands = {
        "nw": job_form.nw_command(form, request.app[project_key], target),
        "grpcurl": job_form.grpcurl_command(create, target, tls=tls, token=token),
    }
    return _form_page(
        request, form, status=400 if form.failed else 200, checked=checked, preview=dataset, preview_error=preview_error,
        commands=commands,
    )  # fmt: skip


def routes(app: web.Application) -> None:
    app.router.add_get("/jobs", jobs)
    app.router.add_get("/jobs/new", new_job_form)  # before /jobs/{job}: `new` is not a job id
    app.router.add_post("/jobs/new", new_job_submit)
    app.router.add_get("/jobs/{job}", job)
    app.router.add_get("/jobs/{job}/dataset", job_dataset)
    app.router.add_get("/jobs/{job}/events", job_events)
    app.router.add_get("/jobs/{job}/logs", job_logs)
    app.router.add_post("/jobs/{job}/{action}", job_action)
