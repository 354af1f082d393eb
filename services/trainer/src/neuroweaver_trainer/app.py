"""Composition root: configuration → database → use cases, scheduler, executors → servicer → shared server."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from neuroweaver.trainer.v1 import trainer_service_pb2_grpc as svc_grpc
from neuroweaver_runtime.app import database_service
from neuroweaver_runtime.client import ClientTLS
from neuroweaver_runtime.config import ServiceConfig
from neuroweaver_runtime.db import Database
from neuroweaver_runtime.errors import Violations
from neuroweaver_runtime.notify import Notifier, PostgresListener
from neuroweaver_runtime.pagination import PageTokens
from neuroweaver_runtime.server import GrpcService

from .adapters.executors import KubernetesExecutor, KubeSettings, LocalExecutor, WorkerSettings
from .adapters.gpus import detect_devices, parse_devices
from .adapters.inputs import check_inputs, default_dataset_roots, default_model_roots, parse_roots, preview_dataset
from .adapters.registry_lookups import RegistryClientLookups
from .adapters.repository import EVENT_CHANNEL
from .adapters.unit_of_work import SqlUnitOfWorkFactory
from .api.servicer import METHOD_ROLES, TrainerServicer
from .domain.job import Executor
from .domain.judge_endpoints import JudgeEndpoints
from .domain.scheduling import Quotas
from .domain.tracking import TrackingServers, TrackingSettings, validate_tracking
from .service.feeds import FeedHub
from .service.jobs import JobPolicy, TrainerService
from .service.scheduler import Scheduler, SchedulerSettings

SERVICE_NAME = "neuroweaver.trainer.v1.TrainerService"
DEFAULT_PORT = 50052
DEFAULT_METRICS_PORT = 9452
MIGRATIONS = str(Path(__file__).parent / "migrations")


class _JobNotifier(Notifier):
    """NOTIFY payloads are `<job key>:<sequence>`; watchers wait on the job key."""

    def wake(self, key: str) -> None:
        super().wake(key.split(":", 1)[0])


@dataclass
class TrainerConfig(ServiceConfig):
    migrate: bool = field(default=True, metadata={"help": "run Alembic migrations to head at start"})
    dataset_roots: str = field(
        default="",
        metadata={
            "help": "comma-separated directories datasets may be read from; default <data dir>/datasets and the repo's data/"
        },
    )
    model_roots: str = field(
        default="",
        metadata={
            "help": "comma-separated directories base models (paths, file:// URIs) may be read from; default the model "
            "cache dir and the artifact store. builtin:<name> and hub ids are names, not paths"
        },
    )
    artifacts_dir: str = field(default="", metadata={"help": "file:// artifact store; default <data dir>/artifacts"})
    model_cache_dir: str = field(default="", metadata={"help": "cache of converted builtin models; default <data dir>/models"})
    registry_target: str = field(default="127.0.0.1:50051", metadata={"help": "registry gRPC address"})
    registry_token: str = field(default="", metadata={"help": "bearer token for the registry"})
    judge_endpoints: str = field(
        default="",
        metadata={
            "help": "URL prefixes RLAIF judges may call, each with the key variables allowed to go there: "
            "`https://api.openai.com/v1=OPENAI_API_KEY,http://judge:8080/v1`; empty = any with auth off, none with auth on"
        },
    )
    registry_retry_seconds: float = field(
        default=120.0, metadata={"help": "how long a worker retries an unreachable registry before failing the job"}
    )
    mlflow_tracking_uri: str = field(
        default="",
        metadata={"help": "MLflow tracking server every job logs to unless it names its own (http://host:5000); empty = none"},
    )
    mlflow_tracking_uris: str = field(
        default="",
        metadata={
            "help": "URI prefixes of the MLflow servers a job may name (comma-separated); --mlflow-tracking-uri is always "
            "allowed; empty = any http(s) server with auth off, none with auth on; a file:// store only when listed"
        },
    )
    mlflow_experiment: str = field(
        default="", metadata={"help": "MLflow experiment of jobs that name none; empty = the job's target model"}
    )
    tensorboard: bool = field(
        default=False, metadata={"help": "every job writes TensorBoard event files (stored with its artifacts)"}
    )
    run_jobs: bool = field(default=True, metadata={"help": "claim and run queued jobs (off: API only)"})
    max_concurrent_jobs: int = field(default=1, metadata={"help": "jobs this replica runs at once"})
    gpu_devices: str = field(
        default="",
        metadata={
            "help": "GPU indices this replica gives to local jobs, each job its own (`0,1,2,3`; `none`); empty = "
            "CUDA_VISIBLE_DEVICES, else what nvidia-smi lists"
        },
    )
    project_quotas: str = field(
        default="",
        metadata={
            "help": "per-project caps over all replicas: `team-a=jobs:2,gpus:4,priority:50;*=jobs:8,priority:0` (`*` = "
            "every other project; priority = the highest a job may ask for); empty = none"
        },
    )
    preemption_grace_seconds: float = field(
        default=10.0,
        metadata={
            "help": "a queued job waiting this long for room on this replica preempts lower-priority jobs here; < 0 = never"
        },
    )
    max_attempts: int = field(default=3, metadata={"help": "failed worker starts per job before it fails"})
    lease_seconds: float = field(
        default=30.0, metadata={"help": "a job whose lease is not renewed for this long is picked up again"}
    )
    heartbeat_seconds: float = field(default=5.0, metadata={"help": "lease renewal interval"})
    queue_poll_seconds: float = field(
        default=2.0, metadata={"help": "queue scan interval (other replicas' jobs, expired leases)"}
    )
    cancel_grace_seconds: float = field(
        default=15.0, metadata={"help": "SIGKILL a cancelled worker that has not stopped after this long"}
    )
    watch_poll_seconds: float = field(
        default=0.0,
        metadata={
            "help": "safety-net event poll of watchers; 0 = 1 s on SQLite, 2 s on PostgreSQL (local workers' pipes and NOTIFY wake them at once)"
        },
    )
    kube_api: str = field(
        default="", metadata={"help": "Kubernetes API URL for the KUBERNETES executor; `in-cluster`; empty = off"}
    )
    kube_token: str = field(default="", metadata={"help": "bearer token for the Kubernetes API"})
    kube_namespace: str = field(default="neuroweaver", metadata={"help": "namespace of training Jobs"})
    kube_image: str = field(default="neuroweaver/trainer:latest", metadata={"help": "default worker image"})
    kube_checkpoint_pvc: str = field(default="", metadata={"help": "PVC mounted for checkpoints so retried pods resume"})
    kube_secret: str = field(
        default="neuroweaver-trainer", metadata={"help": "Secret with database-url (and tokens) for worker pods"}
    )
    kube_tls_secret: str = field(
        default="",
        metadata={"help": "Secret (ca.crt, tls.crt, tls.key) mounted into worker pods for client TLS to the registry"},
    )


def build(config: TrainerConfig) -> GrpcService:
    database_url = config.database_url or config.sqlite_default("trainer")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub while validating
    db = Database(database_url)
    notifier = _JobNotifier()
    secret = config.page_token_key("trainer")
    poll = config.watch_poll_seconds or (2.0 if db.is_postgres else 1.0)
    uow = SqlUnitOfWorkFactory(db, notifier)
    hub = FeedHub(uow, notifier, poll)
    client_tls = ClientTLS.from_config(config)
    worker = WorkerSettings(
        database_url=db.url,
        data_dir=config.data_dir,
        artifacts_dir=config.artifacts_dir or str(Path(config.data_dir) / "artifacts"),
        registry_target=config.registry_target,
        registry_token=config.registry_token,
        registry_retry_seconds=config.registry_retry_seconds,
        model_cache_dir=config.model_cache_dir,
        log_level=config.log_level,
        trace_file=config.trace_file,
        client_tls=client_tls,
    )
    kube = None
    if config.kube_api:
        if client_tls.enabled and not config.kube_tls_secret:
            raise SystemExit("configuration error: client TLS is on, so worker pods need certificates too: set kube_tls_secret")
        from neuroweaver_kube import KubeClient

        client = (
            KubeClient.from_config()
            if config.kube_api == "in-cluster"
            else KubeClient.from_config(host=config.kube_api, token=config.kube_token or None)
        )
        kube = KubernetesExecutor(
            client,
            KubeSettings(
                namespace=config.kube_namespace,
                image=config.kube_image,
                checkpoint_pvc=config.kube_checkpoint_pvc,
                secret_name=config.kube_secret,
                tls_secret=config.kube_tls_secret,
            ),
            worker,
        )
    try:
        gpu_devices = parse_devices(config.gpu_devices) if config.gpu_devices else detect_devices()
        quotas = Quotas.parse(config.project_quotas)
    except ValueError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    local = LocalExecutor(worker)
    scheduler = Scheduler(
        uow,
        notifier,
        SchedulerSettings(
            max_concurrent_jobs=config.max_concurrent_jobs, lease_seconds=config.lease_seconds, heartbeat_seconds=config.heartbeat_seconds,
            poll_seconds=config.queue_poll_seconds, max_attempts=config.max_attempts, cancel_grace_seconds=config.cancel_grace_seconds,
            gpu_devices=gpu_devices, quotas=quotas, preemption_grace_seconds=config.preemption_grace_seconds,
        ),
        local,
        kube,
    )  # fmt: skip
    model_cache_dir = config.model_cache_dir or str(Path(config.data_dir) / "models")
    policy = JobPolicy(
        dataset_roots=parse_roots(config.dataset_roots, default_dataset_roots(config.data_dir)),
        check_inputs=check_inputs,
        preview_dataset=preview_dataset,
        model_roots=parse_roots(
            config.model_roots,
            default_model_roots(model_cache_dir, config.artifacts_dir or str(Path(config.data_dir) / "artifacts")),
        ),
        model_cache_dir=model_cache_dir,
        executors={Executor.LOCAL} | ({Executor.KUBERNETES} if kube else set()),
        registry=RegistryClientLookups(config.registry_target, config.registry_token, client_tls)
        if config.registry_target
        else None,
        judge_endpoints=_judge_endpoints(config),
        tracking=_tracking_defaults(config),
        tracking_servers=_tracking_servers(config),
        quotas=quotas,
        replica_slots=config.max_concurrent_jobs,
        replica_gpus=len(gpu_devices),
    )
    service = TrainerService(
        uow, PageTokens(secret), policy, hub,
        on_queued=scheduler.wake, on_cancel=scheduler.cancel, local=local, cluster=kube, replica=scheduler.s.owner,
    )  # fmt: skip
    listener = PostgresListener(db.url, EVENT_CHANNEL, notifier) if db.is_postgres else None

    async def start_work() -> None:
        if listener:
            await listener.start()
        if config.run_jobs:
            scheduler.start()

    async def stop_work() -> None:
        await scheduler.stop(config.shutdown_grace_seconds)
        await hub.close()
        if listener:
            await listener.stop()
        if kube is not None:
            kube.client.close()

    grpc_service = database_service(
        config,
        db,
        name="trainer",
        full_name=SERVICE_NAME,
        method_roles=METHOD_ROLES,
        add_servicers=lambda server: svc_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(service), server),
        migrations_dir=MIGRATIONS,
        migrate=config.migrate,
        default_port=DEFAULT_PORT,
        default_metrics_port=DEFAULT_METRICS_PORT,
        on_ready=[start_work],
        on_stop=[stop_work],
    )
    grpc_service.trainer = service  # type: ignore[attr-defined]  # handy for in-process tests
    grpc_service.db = db  # type: ignore[attr-defined]
    grpc_service.scheduler = scheduler  # type: ignore[attr-defined]
    return grpc_service


def _judge_endpoints(config: TrainerConfig) -> JudgeEndpoints:
    try:
        return JudgeEndpoints.from_setting(
            config.judge_endpoints, auth_enabled=bool(config.auth_tokens or config.cert_identities)
        )
    except ValueError as exc:
        raise SystemExit(f"configuration error: {exc}") from None


def _tracking_servers(config: TrainerConfig) -> TrackingServers:
    try:
        return TrackingServers.from_setting(
            config.mlflow_tracking_uris, config.mlflow_tracking_uri,
            auth_enabled=bool(config.auth_tokens or config.cert_identities),
        )  # fmt: skip
    except ValueError as exc:
        raise SystemExit(f"configuration error: {exc}") from None


def _tracking_defaults(config: TrainerConfig) -> TrackingSettings:
    """The trainer-wide tracker defaults, checked by the rules a job's own settings follow."""
    defaults = TrackingSettings(config.mlflow_tracking_uri, config.mlflow_experiment, config.tensorboard)
    v = Violations()
    validate_tracking(defaults, v, prefix="")
    if v.items:
        raise SystemExit(f"configuration error: {v.items[0].field}: {v.items[0].description}")
    return defaults
