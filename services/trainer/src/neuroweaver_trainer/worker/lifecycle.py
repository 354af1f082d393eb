"""The worker process: flags, logging and tracing, signals, dying with the trainer, and the attempt's lease.

SIGTERM (and SIGINT) set `stop`: training ends after the current step. With --die-with-parent (local
executor) the kernel kills the worker when the trainer dies. The job is worked on only while this attempt
holds it: the row must be RUNNING or CANCELLING at this attempt, and a watcher stops training on a cancel or
when another attempt took the job over (Kubernetes workers get no signal for either).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from neuroweaver_runtime import telemetry
from neuroweaver_runtime.client import ClientTLS
from neuroweaver_runtime.config import load_config
from neuroweaver_runtime.db import Database
from neuroweaver_runtime.logs import configure_logging, trace_id_var
from neuroweaver_runtime.process import die_with_parent

from ..adapters.repository import SqlJobRepository
from ..domain.job import JobState
from .attempt import run_attempt
from .config import WorkerConfig
from .journal import Fenced, Journal

log = logging.getLogger("neuroweaver.trainer.worker")

_tracer = trace.get_tracer("neuroweaver.trainer.worker")


async def run(cfg: WorkerConfig, stop: threading.Event, tls: ClientTLS) -> int:
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
        if job.attempts != attempt or job.state not in (JobState.RUNNING, JobState.CANCELLING):
            log.warning(
                "job %s is %s at attempt %s; this is attempt %s: nothing to do", job.name, job.state.value, job.attempts, attempt
            )
            return 0
        journal = Journal(db, job.key, attempt, stop, cfg.notify_fd)
        parent = TraceContextTextMapPropagator().extract({"traceparent": job.trace_parent}) if job.trace_parent else None
        with _tracer.start_as_current_span(
            "TrainingJob/run", context=parent, kind=SpanKind.INTERNAL,
            attributes={"neuroweaver.training_job": job.name, "neuroweaver.attempt": attempt},
        ) as span:  # fmt: skip
            trace_id_var.set(format(span.get_span_context().trace_id, "032x"))
            log.info(
                "attempt %s of %s starts (%s on %s)", attempt, job.name, job.method.value if job.method else "?", job.base_model
            )
            watcher = asyncio.create_task(journal.watch_cancel(cfg.stop_poll_seconds))
            try:
                return await run_attempt(cfg, tls, job, journal, stop)
            finally:
                watcher.cancel()
    except Fenced:
        log.warning("attempt %s of %s lost its lease; stopping without writing", attempt, cfg.job)
        return 0
    finally:
        await db.dispose()


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(WorkerConfig, "trainer", argv)
    configure_logging("trainer-worker", cfg.log_level)
    telemetry.configure_tracing("trainer-worker", cfg.trace_file)
    if cfg.die_with_parent:
        die_with_parent(signal.SIGKILL)
    if not cfg.job or not cfg.database_url:
        raise SystemExit("--job and --database-url are required (or NW_TRAINER_JOB / NW_TRAINER_DATABASE_URL)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # checked before any training: unreadable certificates would otherwise fail only at registration
    tls = ClientTLS.from_config(cfg)
    try:
        code = asyncio.run(run(cfg, stop, tls))
    finally:
        telemetry.shutdown_tracing()  # the job's last spans reach the file / collector before the process ends
    sys.exit(code)
