"""One attempt at a job, from training to its final state: train → store → register → SUCCEEDED.

A failure with a reason (`JobFailed`) or any other error ends the job FAILED with that reason; a stop ends as the
job's row asks (Journal.settle_stop: cancelled, paused, preempted, or EXIT_INTERRUPTED at a trainer shutdown). A lost lease (`Fenced`) propagates: nothing more is written.
"""

from __future__ import annotations

import asyncio
import logging
import os

from neuroweaver_ml.control import StopSignal, world_size
from neuroweaver_runtime.client import ClientTLS

from ..domain.job import EventType, JobEvent, JobState, Method, TrainingJob
from .config import WorkerConfig
from .journal import Fenced, Journal
from .results import register, store
from .training import JobFailed, Training

log = logging.getLogger("neuroweaver.trainer.worker")


async def follow_attempt(cfg: WorkerConfig, job: TrainingJob, journal: Journal, stop: StopSignal) -> int:
    """Ranks 1..N-1 of a multi-process job: train alongside rank 0 (which decides when to stop and save, and writes
    every event and result); an error exits non-zero and the launcher stops the whole attempt."""
    outcome = await Training.for_job(cfg, job, journal, stop).train()
    log.info("rank %s of %s finished its share (%s)", os.environ.get("RANK"), world_size(), outcome.status)
    return 0


async def run_attempt(cfg: WorkerConfig, tls: ClientTLS, job: TrainingJob, journal: Journal, stop: StopSignal) -> int:
    """The process's exit code: 0 once the job is in a final state, EXIT_INTERRUPTED when it is to be resumed."""
    if job.method is Method.EXPORT:
        from .export import run_export_attempt

        return await run_export_attempt(cfg, tls, job, journal, stop)
    try:
        outcome = await Training.for_job(cfg, job, journal, stop).train()
    except JobFailed as exc:
        await journal.finish(JobState.FAILED, str(exc), job.stage)
        return 0
    except Fenced:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure ends as FAILED with its reason
        log.exception("training %s failed", job.name)
        if world_size() > 1:
            # Across processes an error is often a peer's death surfacing in a collective: the launcher stops the
            # other ranks and exits non-zero, and the trainer retries the job from its checkpoint (up to max_attempts).
            return 1
        await journal.finish(JobState.FAILED, f"training failed: {type(exc).__name__}: {exc}", job.stage)
        return 0
    if journal.fenced:
        raise Fenced()
    if outcome.status == "cancelled":
        return await journal.settle_stop(outcome.message, job.stage)
    metrics = outcome.metrics
    job.stage = "register"
    await journal.write(
        JobEvent(EventType.STAGE_STARTED, stage="register", message="storing artifacts and registering the version"),
        stage="register",
        metrics=metrics,
    )
    output_uri = ""
    try:
        stored = await asyncio.to_thread(store, cfg, job, outcome)
        output_uri = stored.output_uri
        version = await register(cfg, tls, job, outcome, stored, journal)
    except JobFailed as exc:
        await journal.finish(JobState.FAILED, str(exc), job.stage, output_uri=output_uri)
        return 0
    await journal.write(
        JobEvent(EventType.REGISTERED, stage="register", message=version, metrics=metrics),
        model_version=version,
        output_uri=output_uri,
    )
    await journal.finish(JobState.SUCCEEDED, f"registered {version}", job.stage)
    return 0
