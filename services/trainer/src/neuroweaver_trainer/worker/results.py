"""A finished job's results: stored in the artifact store (digest checked), then registered as one version."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from neuroweaver_runtime.client import ClientTLS

from ..adapters.registry import NewVersion, RegistrationFailed, register_version
from ..domain.job import EventType, JobEvent, TrainingJob
from .config import WorkerConfig
from .journal import Journal
from .training import JobFailed, Outcome


@dataclass(frozen=True)
class Stored:
    output_uri: str  # the job's folder in the store
    adapter_uri: str
    sha256: str
    size_bytes: int


def store(cfg: WorkerConfig, job: TrainingJob, outcome: Outcome) -> Stored:
    """Adapter (+ tokenizer + model card), training report and RLAIF outputs (preference pairs, evaluation)
    into the artifact store; idempotent. The stored adapter must have the digest training computed."""
    from neuroweaver_ml import path_to_uri, store_artifact

    root = Path(cfg.artifacts_dir or Path(cfg.data_dir) / "artifacts")
    project = job.name.split("/")[1]
    # the creation time tells apart a job re-created under a deleted job's name
    uid = hashlib.sha256(f"{job.name}@{job.create_time.isoformat() if job.create_time else ''}".encode()).hexdigest()[:8]
    prefix = f"training-jobs/{project}/{job.job_id}-{uid}"
    try:
        uri, sha, size = store_artifact(outcome.adapter_dir, root, f"{prefix}/adapter")
        if outcome.report_path:
            store_artifact(outcome.report_path, root, f"{prefix}/training_report.json")
        for path, name in outcome.extra_artifacts:
            store_artifact(path, root, f"{prefix}/{name}")
    except (OSError, FileExistsError) as exc:
        raise JobFailed(f"could not store the artifacts in {root}: {exc}") from None
    if sha != outcome.adapter_sha256:
        raise JobFailed(f"stored adapter digest {sha} differs from the trained one {outcome.adapter_sha256}")
    return Stored(path_to_uri(root / prefix), uri, sha, size)


async def register(
    cfg: WorkerConfig, tls: ClientTLS, job: TrainingJob, outcome: Outcome, stored: Stored, journal: Journal
) -> str:
    """The stored adapter as the next version of the job's target model; each retry is a LOG event of the job."""
    new = NewVersion(
        uri=stored.adapter_uri, sha256=stored.sha256, size_bytes=stored.size_bytes, summary=outcome.message,
        metrics=outcome.metrics, dataset_uri=outcome.dataset_uri, dataset_digest=outcome.dataset_digest,
        parent_version=outcome.parent_version, judge_version=outcome.judge_version,
    )  # fmt: skip

    async def log_retry(message: str) -> None:
        await journal.write(JobEvent(EventType.LOG, stage="register", message=message))

    try:
        return await register_version(
            cfg.registry_target, cfg.registry_token, job, new,
            tls=tls, retry_seconds=cfg.registry_retry_seconds, on_retry=log_retry,
        )  # fmt: skip
    except RegistrationFailed as exc:
        raise JobFailed(str(exc)) from None
