"""An EXPORT job's attempt: export the version's adapter (neuroweaver_ml.export), store it, add it to the version.

Stage `export`: the adapter (verified against its registered sha256) and the base are merged through the
unquantized base and converted with llama.cpp's tools into the job's work dir, then copied into the artifact store
at `exports/<project>/<model>/<version>/<job id>-<uid>/<file>`. Stage `register`: AddModelVersionArtifact on behalf of
the job's creator (retried while the registry is unreachable; the same bytes again are a success there). A later
attempt of the same job reuses an export already stored by an earlier one instead of exporting again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
from pathlib import Path

from neuroweaver_ml.control import StopSignal
from neuroweaver_runtime.client import ClientTLS

from ..adapters.registry import NewExport, RegistrationFailed, add_export_artifact
from ..domain.job import EventType, JobEvent, JobState, TrainingJob
from .config import WorkerConfig
from .journal import Fenced, Journal
from .training import JobFailed, Training

log = logging.getLogger("neuroweaver.trainer.worker")

_FILE = {"gguf": "model-{q}.gguf", "gguf-lora": "adapter-{q}.gguf", "merged": "merged-{q}"}


def _store_prefix(cfg: WorkerConfig, job: TrainingJob) -> tuple[Path, str]:
    root = Path(cfg.artifacts_dir or Path(cfg.data_dir) / "artifacts")
    parts = job.export.model_version.split("/")  # projects/{p}/models/{m}/versions/{v}
    uid = hashlib.sha256(f"{job.name}@{job.create_time.isoformat() if job.create_time else ''}".encode()).hexdigest()[:8]
    name = _FILE[job.export.format].format(q=job.export.quantization)
    return root, f"exports/{parts[1]}/{parts[3]}/{parts[5]}/{job.job_id}-{uid}/{name}"


async def run_export_attempt(cfg: WorkerConfig, tls: ClientTLS, job: TrainingJob, journal: Journal, stop: StopSignal) -> int:
    """The process's exit code (0 once the job is in a final state)."""
    try:
        new = await _export(cfg, job, journal, stop)
    except JobFailed as exc:
        await journal.finish(JobState.FAILED, str(exc), job.stage)
        return 0
    except Fenced:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure ends as FAILED with its reason
        log.exception("export %s failed", job.name)
        await journal.finish(JobState.FAILED, f"export failed: {type(exc).__name__}: {exc}", job.stage)
        return 0
    if new is None:  # stopped before the export began
        return await journal.settle_stop("stopped before the export", job.stage)
    metrics = {"size_bytes": float(new.size_bytes)}
    job.stage = "register"
    await journal.write(
        JobEvent(EventType.STAGE_STARTED, stage="register", message=f"adding the export to {job.export.model_version}"),
        stage="register",
    )

    async def log_retry(message: str) -> None:
        await journal.write(JobEvent(EventType.LOG, stage="register", message=message))

    try:
        version = await add_export_artifact(
            cfg.registry_target, cfg.registry_token, job, new, tls=tls, retry_seconds=cfg.registry_retry_seconds,
            on_retry=log_retry,
        )  # fmt: skip
    except RegistrationFailed as exc:
        await journal.finish(JobState.FAILED, str(exc), job.stage, output_uri=new.uri)
        return 0
    await journal.write(
        JobEvent(EventType.REGISTERED, stage="register", message=f"{version}: {new.format} {new.quantization}", metrics=metrics),
        model_version=version,
        output_uri=new.uri,
        metrics=metrics,
    )
    await journal.finish(JobState.SUCCEEDED, f"exported {version} as {new.format} {new.quantization}", job.stage)
    return 0


async def _export(cfg: WorkerConfig, job: TrainingJob, journal: Journal, stop: StopSignal) -> NewExport | None:
    from neuroweaver_ml import digest_path, path_to_uri, store_artifact, uri_to_path, verify_digest
    from neuroweaver_ml.errors import DigestMismatch
    from neuroweaver_ml.export import ExportFailed, export

    e = job.export
    training = Training(cfg, job, journal, stop)
    await training.start_stage("export", f"{e.model_version} as {e.format} {e.quantization}")
    root, name = _store_prefix(cfg, job)
    dest = root / name
    produced_by = f"{job.name} (neuroweaver_ml.export {e.format} {e.quantization})"
    if dest.exists():  # stored by an earlier attempt (the store renames complete copies into place)
        sha, size = await asyncio.to_thread(digest_path, dest)
        await journal.write(JobEvent(EventType.LOG, stage="export", message="reusing the export an earlier attempt stored"))
        return NewExport(path_to_uri(dest), sha, size, e.format, e.quantization, produced_by)
    if stop.is_set():
        return None
    adapter = uri_to_path(e.artifact_uri)
    try:
        await asyncio.to_thread(verify_digest, adapter, e.artifact_sha256)
    except DigestMismatch as exc:
        raise JobFailed(f"the adapter of {e.model_version} does not match its registered sha256: {exc}") from None
    except OSError as exc:
        raise JobFailed(f"the adapter of {e.model_version} cannot be read at {e.artifact_uri}: {exc}") from None
    base = await training.base_dir()
    work = training.job_dir() / f"export-{journal.attempt}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    card = {"version": e.model_version, "base model": job.base_model, "export job": job.name}
    try:
        result = await asyncio.to_thread(export, e.format, e.quantization, base, str(adapter), work / "out", card=card)
    except ExportFailed as exc:
        raise JobFailed(str(exc)) from None
    try:
        uri, sha, size = await asyncio.to_thread(store_artifact, result.path, root, name)
    except (OSError, FileExistsError) as exc:
        raise JobFailed(f"could not store the export in {root}: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    metrics = {"export_seconds": round(result.seconds, 3), "size_bytes": float(size)}
    await journal.write(
        JobEvent(EventType.STAGE_COMPLETED, stage="export", metrics=metrics, message=f"{result.tool}; sha256 {sha[:12]}…"),
        metrics=metrics,
    )
    return NewExport(uri, sha, size, e.format, e.quantization, f"{job.name} ({result.tool})")
