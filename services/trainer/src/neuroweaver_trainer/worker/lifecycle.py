"""The worker process: flags, logging and tracing, signals, dying with the trainer, and the attempt's lease.

SIGTERM (and SIGINT) set `stop`: training ends after the current step. With --die-with-parent (local
executor) the kernel kills the worker when the trainer dies. The job is worked on only while this attempt
holds it: the row must be active (running, cancelling, pausing) at this attempt, and a watcher of the row stops
training on a cancel, pause or preemption, asks for checkpoints on request, and stops when another attempt took
the job over (Kubernetes workers get no signal for any of these).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import NoReturn

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from neuroweaver_ml.control import StopSignal, is_main_process
from neuroweaver_runtime import telemetry
from neuroweaver_runtime.client import ClientTLS
from neuroweaver_runtime.config import load_config
from neuroweaver_runtime.db import Database
from neuroweaver_runtime.logs import configure_logging, trace_id_var
from neuroweaver_runtime.process import die_with_parent

from ..adapters.repository import SqlJobRepository
from .attempt import follow_attempt, run_attempt
from .config import WorkerConfig
from .journal import Fenced, FollowerJournal, Journal

log = logging.getLogger("neuroweaver.trainer.worker")

_tracer = trace.get_tracer("neuroweaver.trainer.worker")


async def run(cfg: WorkerConfig, stop: StopSignal, tls: ClientTLS) -> int:
    """Runs the job's attempt under a span whose parent is the traceparent stored at CreateTrainingJob."""
    db = Database(cfg.database_url)
    attempt = cfg.attempt
    try:
        async with db.transaction() as s:
            job = await SqlJobRepository(s).get(cfg.job)
        if job is None:
            log.error("training job %s does not exist", cfg.job)
            return 2
        attempt = cfg.attempt or job.attempts
        if job.attempts != attempt or not job.state.active:
            log.warning(
                "job %s is %s at attempt %s; this is attempt %s: nothing to do", job.name, job.state.value, job.attempts, attempt
            )
            return 0
        if not is_main_process():
            return await follow_attempt(cfg, job, FollowerJournal(db, job.key, attempt, stop), stop)
        journal = Journal(db, job.key, attempt, stop, cfg.notify_fd)
        parent = TraceContextTextMapPropagator().extract({"traceparent": job.trace_parent}) if job.trace_parent else None
        with _tracer.start_as_current_span(
            "TrainingJob/run", context=parent, kind=SpanKind.INTERNAL,
            attributes={"neuroweaver.training_job": job.name, "neuroweaver.attempt": attempt},
        ) as span:  # fmt: skip
            trace_id_var.set(format(span.get_span_context().trace_id, "032x"))
            log.info(
                "attempt %s of %s starts (%s on %s; GPUs: %s)", attempt, job.name, job.method.value if job.method else "?",
                job.base_model, os.environ.get("CUDA_VISIBLE_DEVICES") or "none",
            )  # fmt: skip
            watcher = asyncio.create_task(journal.watch_controls(cfg.stop_poll_seconds, job.checkpoint_requests))
            try:
                return await run_attempt(cfg, tls, job, journal, stop)
            finally:
                watcher.cancel()
    except Fenced:
        log.warning("attempt %s of %s lost its lease; stopping without writing", attempt, cfg.job)
        return 0
    finally:
        await db.dispose()


def launch_ranks(processes: int, argv: list[str]) -> NoReturn:
    """Replaces this process by torch.distributed.run starting `processes` ranks of this worker (the same flags, less
    --processes and --notify-fd: the pipe's descriptor is not inherited by the ranks, so watchers poll instead)."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--processes", "--notify-fd"):
            skip = True
        elif not arg.startswith(("--processes=", "--notify-fd=")):
            rest.append(arg)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    sys.stdout.flush()
    os.execv(sys.executable, [*launcher, "-m", "neuroweaver_trainer.worker", *rest])


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(WorkerConfig, "trainer", argv)
    configure_logging("trainer-worker", cfg.log_level)
    telemetry.configure_tracing("trainer-worker", cfg.trace_file)
    if cfg.die_with_parent:
        die_with_parent(signal.SIGKILL)  # kept across the exec below: the launcher dies with the trainer too
    if cfg.processes > 1 and "RANK" not in os.environ:
        launch_ranks(cfg.processes, sys.argv[1:] if argv is None else argv)
    if not cfg.job or not cfg.database_url:
        raise SystemExit("--job and --database-url are required (or NW_TRAINER_JOB / NW_TRAINER_DATABASE_URL)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stop = StopSignal()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # checked before any training: unreadable certificates would otherwise fail only at registration
    tls = ClientTLS.from_config(cfg)
    try:
        code = asyncio.run(run(cfg, stop, tls))
    finally:
        telemetry.shutdown_tracing()  # the job's last spans reach the file / collector before the process ends
    sys.exit(code)
