"""Training screens: the jobs list, a job's page with its live events (server-sent events from WatchTrainingJob) and
its actions (cancel, pause, resume, checkpoint)."""

from __future__ import annotations

import json
import math
import time
from datetime import UTC
from typing import Any

import grpc
from aiohttp import web

from neuroweaver.trainer.v1 import training_job_pb2 as tpb

from .web import SECURITY_HEADERS, SSE_EVENTS, _duration, _enum, _gateway, _render, _ts, project_key

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



def routes(app: web.Application) -> None:
    app.router.add_get("/jobs", jobs)
    app.router.add_get("/jobs/{job}", job)
    app.router.add_get("/jobs/{job}/events", job_events)
    app.router.add_post("/jobs/{job}/{action}", job_action)
