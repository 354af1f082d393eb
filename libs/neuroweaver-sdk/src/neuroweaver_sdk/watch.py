"""Live progress from the gRPC streams, resuming after a dropped connection.

A server stream is not retried by gRPC once headers arrived, so the watcher keeps the last event
sequence it saw and reconnects with `after_sequence` — no event is shown twice or missed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.trainer.v1 import trainer_service_pb2 as tsvc
from neuroweaver.trainer.v1 import training_job_pb2 as tpb
from neuroweaver_runtime.grpc_errors import error_info

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED}
_TERMINAL = {tpb.TrainingJob.STATE_SUCCEEDED, tpb.TrainingJob.STATE_FAILED, tpb.TrainingJob.STATE_CANCELLED}


async def follow_training_job(clients, name: str, after_sequence: int = 0, max_reconnects: int = 30):
    """Yields every event after the cursor, reconnecting on transient failures; ends at a terminal state."""
    cursor, reconnects = after_sequence, 0
    while True:
        try:
            async for resp in clients.trainer.WatchTrainingJob(tsvc.WatchTrainingJobRequest(name=name, after_sequence=cursor)):
                cursor = resp.event.sequence
                reconnects = 0
                yield resp.event
            return  # the server ends the stream after the terminal event
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _RETRYABLE or reconnects >= max_reconnects:
                raise
            reconnects += 1
            await asyncio.sleep(min(0.2 * 2**reconnects, 5.0))


async def follow_training_job_logs(
    clients, name: str, *, attempt: int = 0, tail_lines: int = 0, interval: float = 1.0,
    on_waiting: Callable[[str], None] = lambda message: None,
):  # fmt: skip
    """Yields ReadTrainingJobLogs answers: the tail of the attempt's log (0 = the latest attempt), then what each read
    from the last `next_offset` adds, every `interval` seconds (at once while an answer says more is left). Following
    the latest attempt moves on to the next one when the job starts it (a resume, a retry). Ends once the job is in a
    terminal state and its log is read to the end. Until the job has a log (queued, its worker or pod starting),
    `on_waiting` gets the trainer's explanation once and the reads are retried."""
    pinned = attempt
    offset: int | None = None
    waiting_said = ended = False
    while True:
        try:
            resp = await clients.trainer.ReadTrainingJobLogs(
                tsvc.ReadTrainingJobLogsRequest(name=name, attempt=attempt, tail_lines=tail_lines if offset is None else 0,
                                                offset=offset)
            )  # fmt: skip
        except grpc.aio.AioRpcError as exc:
            info = error_info(exc)
            if exc.code() != grpc.StatusCode.NOT_FOUND or info is None or info.reason != "LOGS_NOT_FOUND":
                raise
            if not waiting_said:
                on_waiting(exc.details() or "")
                waiting_said = True
            job = await clients.trainer.GetTrainingJob(tsvc.GetTrainingJobRequest(name=name))
            if job.state in _TERMINAL and (attempt or job.attempts) >= job.attempts:
                return  # it ended without a log (cancelled while queued, a pod that never ran)
            await asyncio.sleep(interval)
            continue
        yield resp
        attempt, offset = resp.attempt, resp.next_offset
        if resp.truncated:
            continue  # more is there already
        if not pinned and resp.attempts > attempt:
            attempt, offset = attempt + 1, 0  # the job started another attempt: its log from the start
            continue
        if resp.state in _TERMINAL or (pinned and pinned < resp.attempts):
            if ended:
                return  # nothing more will be written to this attempt's log
            ended = True  # one more read: the worker may still print its last lines as it exits
        await asyncio.sleep(interval)


async def watch_training_job(clients, name: str, *, console: Console, after_sequence: int = 0):
    """Renders a live progress bar per stage; returns the final job."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    )
    tasks: dict[str, TaskID] = {}
    with Progress(*columns, console=console, transient=False) as progress:
        async for event in follow_training_job(clients, name, after_sequence):
            stage = event.stage or "job"
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=None, info="")
            task = tasks[stage]
            if event.type == tpb.EVENT_TYPE_STEP:
                s = event.step
                info = f"loss {s.loss:.4f}  lr {s.learning_rate:.2e}  {s.tokens_per_second:.0f} tok/s"
                progress.update(task, total=s.total_steps or None, completed=s.step, info=info)
            elif event.type == tpb.EVENT_TYPE_EVAL:
                progress.console.print(
                    f"  [cyan]eval[/cyan] {stage}: " + ", ".join(f"{k}={v:.4g}" for k, v in event.metrics.items())
                )
            elif event.type in (
                tpb.EVENT_TYPE_STATE_CHANGED,
                tpb.EVENT_TYPE_RESUMED,
                tpb.EVENT_TYPE_REGISTERED,
                tpb.EVENT_TYPE_STAGE_COMPLETED,
            ):
                progress.console.print(
                    f"  [{tpb.EventType.Name(event.type).removeprefix('EVENT_TYPE_').lower()}] {event.message}"
                )
            elif event.type == tpb.EVENT_TYPE_STAGE_STARTED:
                progress.console.print(f"  stage [bold]{stage}[/bold] started {event.message}")
    job = await clients.trainer.GetTrainingJob(tsvc.GetTrainingJobRequest(name=name))
    state = tpb.TrainingJob.State.Name(job.state).removeprefix("STATE_")
    console.print(f"{name}: [bold]{state}[/bold] {job.model_version or job.error}")
    return job


async def watch_deployment(
    clients, name: str, *, console: Console, until_available: bool, emit: Callable[[dpb.Deployment], None] | None = None
):
    """Prints each status change (or hands the deployment to `emit`); with until_available, returns once the deployment
    is AVAILABLE."""
    last = None
    reconnects = 0
    while True:
        try:
            async for resp in clients.deployer.WatchDeployment(dsvc.WatchDeploymentRequest(name=name)):
                d = resp.deployment
                state = dpb.Deployment.State.Name(d.state).removeprefix("STATE_")
                line = f"{state} version={d.served_version} ready={d.ready_replicas}/{d.replicas} endpoint={d.endpoint}"
                if line != last:
                    if emit is None:
                        console.print(line, markup=False)
                    else:
                        emit(d)
                    last = line
                if until_available and d.state == dpb.Deployment.STATE_AVAILABLE:
                    return d
                if d.state == dpb.Deployment.STATE_FAILED and until_available:
                    raise SystemExit(f"deployment failed: {[c.message for c in d.conditions]}")
            return None
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _RETRYABLE or reconnects >= 30:
                raise
            reconnects += 1
            await asyncio.sleep(min(0.2 * 2**reconnects, 5.0))
