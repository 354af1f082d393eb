"""Where a claimed job's worker runs: a local subprocess or a Kubernetes batch/v1 Job.

Both run the same entry point, `python -m neuroweaver_trainer.worker --job <name>`, which reads the job
from the database, trains through neuroweaver_ml, writes its events and final state itself, and registers
the result. The scheduler only starts, watches and stops workers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from urllib3.exceptions import HTTPError

from neuroweaver_kube import KubeClient, KubeNotFound, TrainingJobSpec, training_job
from neuroweaver_kube.client import KubeApiError, KubeConflict
from neuroweaver_kube.manifests import Resources as KubeResources
from neuroweaver_runtime import telemetry
from neuroweaver_runtime.client import ClientTLS
from neuroweaver_runtime.errors import Unavailable
from neuroweaver_runtime.process import Child, spawn

from ..domain.job import TrainingJob
from ..service.ports import EXIT_INTERRUPTED, LogChunk, LogQuery, LogUnavailable
from .logs import parse_pod_log, pod_log_params, read_log_file

__all__ = ["EXIT_INTERRUPTED", "KubernetesExecutor", "LocalExecutor"]


@dataclass
class WorkerSettings:
    """Flags every worker gets (the rest it reads from the database)."""

    database_url: str
    data_dir: str
    artifacts_dir: str
    registry_target: str
    registry_token: str = ""
    registry_retry_seconds: float = 120.0
    model_cache_dir: str = ""
    log_level: str = "INFO"
    trace_file: str = ""  # the trainer's --trace-file: the worker's spans go there too
    client_tls: ClientTLS = ClientTLS()  # the trainer's own --client-tls-*: the worker registers with them

    def args(self) -> list[str]:
        out = [
            "--database-url", self.database_url, "--data-dir", self.data_dir, "--artifacts-dir", self.artifacts_dir,
            "--registry-target", self.registry_target, "--registry-retry-seconds", str(self.registry_retry_seconds),
            "--log-level", self.log_level,
        ]  # fmt: skip
        if self.model_cache_dir:
            out += ["--model-cache-dir", self.model_cache_dir]
        if self.trace_file:
            out += ["--trace-file", self.trace_file]
        for flag, path in (("ca", self.client_tls.ca), ("cert", self.client_tls.cert), ("key", self.client_tls.key)):
            if path:
                out += [f"--client-tls-{flag}", path]
        return out


class LocalExecutor:
    """One worker process per job. Workers die with the server (PR_SET_PDEATHSIG), so a SIGKILLed trainer
    leaves no orphan training on; the job's lease then expires and it is resumed from its last checkpoint."""

    def __init__(self, settings: WorkerSettings, python: str = sys.executable) -> None:
        self.settings = settings
        self.python = python
        self._forwarders: set[asyncio.Task] = set()

    def log_path(self, job_id: str, attempt: int) -> Path:
        return Path(self.settings.data_dir) / "jobs" / job_id / f"worker-{attempt}.log"

    async def read_log(self, job_id: str, attempt: int, query: LogQuery) -> LogChunk | None:
        return await asyncio.to_thread(read_log_file, self.log_path(job_id, attempt), query)

    async def start(self, job: TrainingJob, attempt: int, on_event: Callable[[str], None], devices: list[str]) -> Child:
        """Starts the worker on the GPUs `devices` (CUDA_VISIBLE_DEVICES; empty = CPU only, never another job's GPU). The worker also writes each committed event's notify payload (`<job key>:<sequence>`)
        to a pipe and `on_event` gets it at once: watchers on this replica then see events without polling the
        database (SQLite has no NOTIFY; on PostgreSQL it saves the round trip)."""
        log_path = self.log_path(job.job_id, attempt)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        args = [
            self.python, "-m", "neuroweaver_trainer.worker", "--job", job.name, "--attempt", str(attempt),
            "--die-with-parent", *self.settings.args(), "--notify-fd", str(write_fd),
        ]  # fmt: skip
        if job.resources.world_size > 1:  # the worker re-runs itself under torch.distributed.run, one rank each
            args += ["--processes", str(job.resources.world_size)]
        env = telemetry.child_environment(
            {
                **os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false",
                "CUDA_VISIBLE_DEVICES": ",".join(devices),
            }
        )  # the worker exports where the trainer does  # fmt: skip
        if self.settings.registry_token:
            env["NW_TRAINER_REGISTRY_TOKEN"] = self.settings.registry_token
        try:
            with open(log_path, "ab") as log_file:
                proc = spawn(args, log=log_file, env=env, pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # the worker holds the only write end: EOF when it exits
        task = asyncio.create_task(_forward_lines(read_fd, on_event))
        self._forwarders.add(task)
        task.add_done_callback(self._forwarders.discard)
        return proc

    @staticmethod
    def signal(proc: Child, sig: int = signal.SIGTERM) -> None:
        if proc.returncode is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass


async def _forward_lines(fd: int, on_line: Callable[[str], None]) -> None:
    """Calls `on_line` for each line read from the pipe `fd` until EOF; closes it."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    try:
        while line := await reader.readline():
            on_line(line.decode(errors="replace").strip())
    finally:
        transport.close()


@dataclass
class KubeSettings:
    namespace: str = "neuroweaver"
    image: str = "neuroweaver/trainer:latest"
    checkpoint_pvc: str = ""
    secret_name: str = "neuroweaver-trainer"
    backoff_limit: int = 3
    tls_secret: str = ""  # ca.crt, tls.crt, tls.key: the worker's client TLS towards the registry


@dataclass(frozen=True)
class KubeJobState:
    phase: str  # Pending, Running, Succeeded, Failed, Missing
    reason: str = ""


class KubernetesExecutor:
    """A batch/v1 Job per training job, through neuroweaver_kube's client (created, polled, deleted)."""

    def __init__(self, client: KubeClient, settings: KubeSettings, worker: WorkerSettings) -> None:
        self.client = client
        self.settings = settings
        self.worker = worker

    def manifest(self, job: TrainingJob) -> dict:
        r = job.resources
        resources = KubeResources(cpu_request=r.cpu or "2", memory_request=r.memory or "8Gi", memory_limit=r.memory or "16Gi")
        spec = TrainingJobSpec(
            job=job.name,
            namespace=self.settings.namespace,
            image=r.image or self.settings.image,
            gpus=r.gpus,
            processes=r.world_size,
            resources=resources,
            node_selector=dict(r.node_selector),
            tolerations=[{k: v for k, v in t.items() if v} for t in r.tolerations],
            labels={"neuroweaver.ai/project": job.name.split("/")[1]},
            env={
                "NW_TRAINER_REGISTRY_TARGET": self.worker.registry_target,
                "NW_TRAINER_REGISTRY_RETRY_SECONDS": str(self.worker.registry_retry_seconds),
                # Worker pods have a read-only root filesystem: with the shared claim mounted the Job writes
                # adapters to <mount>/artifacts (the path the deployer and model servers mount it at).
                **({} if self.settings.checkpoint_pvc else {"NW_TRAINER_ARTIFACTS_DIR": self.worker.artifacts_dir}),
                "HF_HUB_OFFLINE": "1",
            },
            secret_name=self.settings.secret_name or None,
            tls_secret=self.settings.tls_secret or None,
            checkpoint_pvc=self.settings.checkpoint_pvc or None,
            backoff_limit=self.settings.backoff_limit,
            tracing=telemetry.child_environment(os.environ),  # the worker exports traces where the trainer does
        )
        return training_job(spec)

    async def start(self, job: TrainingJob) -> str:
        """Creates the Job (or adopts it when a previous owner of the lease already did); returns `ns/name`."""
        manifest = self.manifest(job)
        try:
            await self.client.create_job(manifest)
        except KubeConflict:
            pass  # created by an earlier claim of this job: adopt it
        return f"{manifest['metadata']['namespace']}/{manifest['metadata']['name']}"

    async def state(self, ref: str) -> KubeJobState:
        namespace, name = ref.split("/", 1)
        try:
            status = await self.client.read_job_status(namespace, name)
        except KubeNotFound:
            return KubeJobState("Missing")
        return KubeJobState(status.phase, status.failure_reason or "")

    async def delete(self, ref: str) -> bool:
        namespace, name = ref.split("/", 1)
        return await self.client.delete_job(namespace, name)

    async def read_log(self, job: TrainingJob, query: LogQuery) -> LogChunk:
        """The worker container's log in the newest pod of the job's Kubernetes Job (a Job retried by its backoff has
        several), by the pods' `app.kubernetes.io/instance` label, which names the Job."""
        meta = self.manifest(job)["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        where = f"Kubernetes Job {namespace}/{name}"
        try:
            pods = await self.client.list_pods(namespace, f"app.kubernetes.io/instance={name}")
            if not pods:
                raise LogUnavailable(f"{where} has no pod")
            pod = max(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))
            where = f"pod {pod['metadata']['name']} of {where}"
            data = await self.client.read_pod_log(namespace, pod["metadata"]["name"], container="worker", **pod_log_params(query))
        except KubeApiError as exc:
            if exc.code in (400, 404):  # gone meanwhile, or its container has not started ("waiting to start")
                raise LogUnavailable(f"{where}: {exc.message or exc.reason}") from None
            raise _kube_unavailable(where, exc) from None
        except (HTTPError, OSError) as exc:
            raise _kube_unavailable(where, exc) from None
        return parse_pod_log(data, query)


def _kube_unavailable(where: str, exc: Exception) -> Unavailable:
    return Unavailable(
        f"the Kubernetes API did not give the log of {where} ({type(exc).__name__}); retry", reason="KUBERNETES_UNAVAILABLE"
    )
