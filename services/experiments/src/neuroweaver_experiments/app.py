"""Composition root: configuration → database → clients → use cases → servicer → shared server."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as svc_grpc
from neuroweaver_runtime.app import database_service
from neuroweaver_runtime.client import ClientTLS
from neuroweaver_runtime.config import ServiceConfig
from neuroweaver_runtime.db import Database
from neuroweaver_runtime.pagination import PageTokens
from neuroweaver_runtime.server import GrpcService

from .adapters.clients import DeployerClient, RegistryClient
from .adapters.judges import RegistryJudges
from .adapters.unit_of_work import SqlUnitOfWorkFactory
from .api.servicer import METHOD_ROLES, ExperimentsServicer
from .domain.judging import JudgeEndpoints
from .service.auto_conclude import AutoConcludeMonitor
from .service.experiments import ExperimentsService
from .service.judging import JudgingSettings

SERVICE_NAME = "neuroweaver.experiments.v1.ExperimentsService"
DEFAULT_PORT = 50054
DEFAULT_METRICS_PORT = 9454
MIGRATIONS = str(Path(__file__).parent / "migrations")


@dataclass
class ExperimentsConfig(ServiceConfig):
    migrate: bool = field(default=True, metadata={"help": "run Alembic migrations to head at start"})
    deployer_target: str = field(default="127.0.0.1:50053", metadata={"help": "deployer gRPC address (variant endpoints)"})
    registry_target: str = field(
        default="127.0.0.1:50051", metadata={"help": "registry gRPC address (promotion, judge versions)"}
    )
    service_token: str = field(default="", metadata={"help": "bearer token for calls to the deployer and registry"})
    remote_deadline_seconds: float = field(default=10.0, metadata={"help": "deadline of calls to other services"})
    judge_concurrency: int = field(
        default=8,
        metadata={"help": "judge calls in flight for recorded answers, all experiments together (0 = this replica judges none)"},
    )
    judge_endpoints: str = field(
        default="",
        metadata={
            "help": "URL prefixes LLM judges may call, each with the key variables allowed to go there: "
            "`https://api.openai.com/v1=OPENAI_API_KEY,http://judge:8080/v1`; empty = any with auth off, none with auth on"
        },
    )
    judge_attempts: int = field(default=3, metadata={"help": "tries of an answer whose judge is unreachable before it fails"})
    judge_retry_seconds: float = field(
        default=5.0, metadata={"help": "wait before an unreachable judge is tried again (doubling)"}
    )
    judge_lease_seconds: float = field(
        default=300.0, metadata={"help": "how long a claimed answer stays with a replica that stopped answering"}
    )
    auto_conclude_interval_seconds: float = field(
        default=30.0,
        metadata={
            "help": "how often RUNNING sequential experiments with auto_conclude are looked at and concluded (their winner "
            "promoted) once their test decides (0 = never: only ConcludeExperiment concludes)"
        },
    )
    snapshot_ttl_seconds: float = field(
        default=1.0,
        metadata={"help": "how stale a cached experiment may be before re-checking its revision (other replicas' writes)"},
    )


def build(config: ExperimentsConfig) -> GrpcService:
    database_url = config.database_url or config.sqlite_default("experiments")
    db = Database(database_url)
    secret = config.page_token_key("experiments")
    tls = ClientTLS.from_config(config)
    deployer = DeployerClient(config.deployer_target, config.service_token, config.remote_deadline_seconds, tls)
    registry = RegistryClient(config.registry_target, config.service_token, config.remote_deadline_seconds, tls)
    judging = JudgingSettings(
        concurrency=config.judge_concurrency,
        lease_seconds=config.judge_lease_seconds,
        attempts=max(1, config.judge_attempts),
        retry_seconds=config.judge_retry_seconds,
    )
    service = ExperimentsService(
        SqlUnitOfWorkFactory(db),
        PageTokens(secret),
        deployer,
        registry,
        snapshot_ttl=config.snapshot_ttl_seconds,
        judges=RegistryJudges(
            registry,
            endpoints=JudgeEndpoints.from_setting(
                config.judge_endpoints, auth_enabled=bool(config.auth_tokens or config.cert_identities)
            ),
        ),
        judging_settings=judging,
    )
    auto_conclude = AutoConcludeMonitor(service, config.auto_conclude_interval_seconds)

    grpc_service = database_service(
        config,
        db,
        name="experiments",
        full_name=SERVICE_NAME,
        method_roles=METHOD_ROLES,
        add_servicers=lambda server: svc_grpc.add_ExperimentsServiceServicer_to_server(ExperimentsServicer(service), server),
        migrations_dir=MIGRATIONS,
        migrate=config.migrate,
        default_port=DEFAULT_PORT,
        default_metrics_port=DEFAULT_METRICS_PORT,
        on_ready=[auto_conclude.start] + ([service.judging.start] if service.judging is not None else []),
        on_stop=[auto_conclude.close, service.close, deployer.close, registry.close],
    )
    grpc_service.experiments = service  # type: ignore[attr-defined]  # handy for in-process tests
    grpc_service.auto_conclude = auto_conclude  # type: ignore[attr-defined]
    grpc_service.db = db  # type: ignore[attr-defined]
    return grpc_service
