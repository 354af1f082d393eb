"""Composition root: configuration → database → registry client → backends → controller → use cases → servicer."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as svc_grpc
from neuroweaver_kube.manifests import dns1123_name
from neuroweaver_runtime.app import database_service
from neuroweaver_runtime.client import ClientTLS
from neuroweaver_runtime.config import ServiceConfig
from neuroweaver_runtime.db import Database
from neuroweaver_runtime.notify import Notifier, PostgresListener
from neuroweaver_runtime.pagination import PageTokens
from neuroweaver_runtime.server import GrpcService
from neuroweaver_runtime.tls import ServerTLS

from .adapters.kube import KubeDefaults, render_manifests
from .adapters.local import LocalBackend
from .adapters.metrics import LocalMetrics, PodMetrics, ReplicaScraper
from .adapters.registry import RegistryGateway
from .adapters.repository import CHANGES_CHANNEL
from .adapters.router import PortRange
from .adapters.unit_of_work import SqlUnitOfWorkFactory
from .api.servicer import METHOD_ROLES, DeployerServicer
from .domain.model import Backend
from .service.controller import Controller
from .service.deployer import DeployerService
from .service.follower import AliasFollower
from .service.leases import instance_id
from .service.metrics import DeploymentMetrics

SERVICE_NAME = "neuroweaver.deployer.v1.DeployerService"
DEFAULT_PORT = 50053
DEFAULT_METRICS_PORT = 9453
MIGRATIONS = str(Path(__file__).parent / "migrations")


@dataclass
class DeployerConfig(ServiceConfig):
    migrate: bool = field(default=True, metadata={"help": "run Alembic migrations to head at start"})
    registry_target: str = field(default="127.0.0.1:50051", metadata={"help": "registry gRPC address"})
    registry_token: str = field(default="", metadata={"help": "bearer token for the registry"})
    local_host: str = field(default="127.0.0.1", metadata={"help": "address local replicas (and routers) bind"})
    local_router_host: str = field(
        default="",
        metadata={
            "help": "address the routers of local deployments (their endpoints) bind; empty = --local-host. 0.0.0.0 in "
            "a container, so other containers reach them (needs --local-advertise-host)"
        },
    )
    local_advertise_host: str = field(
        default="",
        metadata={
            "help": "host name local deployments report in endpoint/openai_base_url (what callers dial, e.g. the "
            "compose service name); empty = the routers' bind address"
        },
    )
    local_router_ports: str = field(
        default="",
        metadata={"help": "lo-hi: fixed ports routers listen on, 3 per deployment (publish them); empty = any free port"},
    )
    replica_startup_timeout: float = field(default=600.0, metadata={"help": "seconds a local replica may take to load"})
    replica_grace_seconds: float = field(
        default=30.0,
        metadata={
            "help": "drain timeout of a retiring local replica (rollover, scale-down, delete): its calls and streams "
            "get this long to finish before it stops"
        },
    )
    kubernetes: bool = field(default=False, metadata={"help": "enable the kubernetes backend"})
    kube_api_url: str = field(default="", metadata={"help": "API server URL; empty = in-cluster config or kubeconfig"})
    kube_token: str = field(default="", metadata={"help": "bearer token for kube_api_url"})
    kube_namespace: str = field(default="neuroweaver", metadata={"help": "default namespace of deployments"})
    model_server_image: str = field(
        default="ghcr.io/neuroweaver/model-server:0.1.0", metadata={"help": "default model-server image"}
    )
    kube_poll_seconds: float = field(default=2.0, metadata={"help": "how often Deployment status is read back"})
    lease_seconds: float = field(
        default=15.0,
        metadata={
            "help": "ownership lease of a deployment (database clock): another replica takes over this long after its "
            "owner stopped renewing (at once after a graceful stop)"
        },
    )
    lease_renew_seconds: float = field(
        default=5.0, metadata={"help": "how often a replica renews its leases and claims free ones; below --lease-seconds"}
    )
    local_replica_threads: int = field(
        default=0,
        metadata={
            "help": "CPU threads per local model-server replica (OMP/MKL); 0 = torch's default. Set it when several "
            "replicas share a small host: oversubscribed OpenMP threads slow generation many times over"
        },
    )
    artifact_roots: str = field(
        default="",
        metadata={
            "help": "comma-separated directories a version's local artifact (and its lineage base model, when that is "
            "a path) may be served from; empty = no restriction (embedded mode)"
        },
    )
    local_tls_server_name: str = field(
        default="",
        metadata={
            "help": "name checked on local replicas' certificate (they serve with --tls-cert) when --local-host is not "
            "one of its names; empty = the address dialled"
        },
    )
    kube_model_server_auth_secret: str = field(
        default="neuroweaver-auth",
        metadata={
            "help": "Secret in a deployment's namespace whose key auth-tokens.json (the token table) model-server pods "
            "mount when auth is on"
        },
    )
    kube_artifacts_claim: str = field(
        default="neuroweaver-artifacts",
        metadata={
            "help": "PVC holding the trainer's artifact store, mounted read-only into model-server pods at "
            "--kube-artifacts-mount-path; empty = none (then only hub/builtin models can be served)"
        },
    )
    kube_artifacts_mount_path: str = field(
        default="/var/lib/neuroweaver",
        metadata={"help": "where model-server pods mount --kube-artifacts-claim: the path the trainer writes under"},
    )
    kube_models_claim: str = field(
        default="",
        metadata={"help": "PVC of base models given as paths, when not on --kube-artifacts-claim; empty = none"},
    )
    kube_models_mount_path: str = field(
        default="/var/lib/neuroweaver/models", metadata={"help": "where model-server pods mount --kube-models-claim"}
    )
    kube_otlp_headers_secret: str = field(
        default="",
        metadata={
            "help": "Secret whose key otlp-headers holds OTEL_EXPORTER_OTLP_HEADERS (collector credentials) for "
            "model-server pods that export traces; empty = none (headers are never copied into a manifest)"
        },
    )
    kube_model_server_tls_secret: str = field(
        default="",
        metadata={
            "help": "Secret (tls.crt, tls.key, ca.crt) model-server pods serve TLS with; empty = plaintext. With "
            "--tls-client-ca set they also require client certificates (mTLS)"
        },
    )
    prometheus_url: str = field(
        default="",
        metadata={
            "help": "Prometheus (http(s)://host:port) that scrapes model-server pods through their ServiceMonitor: "
            "GetDeploymentMetrics of Kubernetes deployments queries it; empty = the deployer scrapes the pods itself"
        },
    )
    metrics_sample_seconds: float = field(
        default=5.0,
        metadata={
            "help": "how often the deployer samples its local replicas' (and, without --prometheus-url, pods') /metrics "
            "for GetDeploymentMetrics windows; 0 = only when asked (windows then reach back to the replica's start)"
        },
    )


class _ConvergingNotifier(Notifier):
    """Every wake-up of a deployment (a commit here, or another replica's NOTIFY) also reaches the controller, which
    converges it when this replica owns it."""

    def __init__(self) -> None:
        super().__init__()
        self.controller: Controller | None = None

    def wake(self, key: str) -> None:
        super().wake(key)
        if self.controller is not None:
            self.controller.on_notified(key)


def build(config: DeployerConfig) -> GrpcService:
    database_url = config.database_url or config.sqlite_default("deployer")
    db = Database(database_url)
    notifier = _ConvergingNotifier()
    secret = config.page_token_key("deployer")
    roots = [r for r in config.artifact_roots.split(",") if r]
    client_tls = ClientTLS.from_config(config)
    try:
        # Local replicas and routers serve with the deployer's own certificate; routers dial replicas as the deployer.
        server_tls = ServerTLS.from_config(config)
        local_client_tls = (
            dataclasses.replace(client_tls, server_name=config.local_tls_server_name)
            if config.local_tls_server_name
            else client_tls
        )
        router_ports = PortRange(config.local_router_ports) if config.local_router_ports else None
        if (config.local_router_host or config.local_host) in ("0.0.0.0", "::") and not config.local_advertise_host:
            raise ValueError("local routers bind a wildcard address: set --local-advertise-host (what callers dial)")
        if server_tls.enabled and not local_client_tls.enabled:
            raise ValueError("local replicas serve TLS with --tls-cert: set --client-tls-ca so the deployer can reach them")
        kube = KubeDefaults(
            image=config.model_server_image,
            namespace=config.kube_namespace,
            auth_secret=(config.kube_model_server_auth_secret or None) if config.auth_tokens else None,
            tls_secret=config.kube_model_server_tls_secret or None,
            tls_client_auth=bool(config.kube_model_server_tls_secret and config.tls_client_ca),
            artifacts_claim=config.kube_artifacts_claim or None,
            artifacts_mount_path=config.kube_artifacts_mount_path,
            models_claim=config.kube_models_claim or None,
            models_mount_path=config.kube_models_mount_path,
            otlp_headers_secret=config.kube_otlp_headers_secret or None,
        )
        kube.data_volumes()  # a bad claim name or mount path stops the start, not the first deployment
        if not 0 < config.lease_renew_seconds < config.lease_seconds:
            raise ValueError("--lease-renew-seconds must be above 0 and below --lease-seconds")
        if config.prometheus_url and not config.prometheus_url.startswith(("http://", "https://")):
            raise ValueError("--prometheus-url must be an http:// or https:// URL (Prometheus' HTTP API root)")
        if config.metrics_sample_seconds < 0:
            raise ValueError("--metrics-sample-seconds must be 0 (only when asked) or more")
        if config.auth_tokens and config.kubernetes and not kube.auth_secret:
            raise ValueError("auth is on: set --kube-model-server-auth-secret so model-server pods can authenticate callers")
    except ValueError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    registry = RegistryGateway(config.registry_target, config.registry_token, artifact_roots=roots, tls=client_tls)
    backends: dict = {}
    uow = SqlUnitOfWorkFactory(db)
    controller = Controller(
        uow, notifier, backends,
        owner=instance_id(), lease_seconds=config.lease_seconds, renew_seconds=config.lease_renew_seconds,
    )  # fmt: skip
    notifier.controller = controller
    backends[Backend.LOCAL] = LocalBackend(
        controller.on_status,
        host=config.local_host,
        log_dir=Path(config.data_dir) / "deployer-logs",
        startup_timeout=config.replica_startup_timeout,
        grace_seconds=config.replica_grace_seconds,
        auth_tokens=config.auth_tokens,
        server_tls=server_tls,
        client_tls=local_client_tls,
        router_host=config.local_router_host,
        advertise_host=config.local_advertise_host,
        router_ports=router_ports,
        env={
            "NW_DATA_DIR": config.data_dir,
            **(
                {"OMP_NUM_THREADS": str(config.local_replica_threads), "MKL_NUM_THREADS": str(config.local_replica_threads)}
                if config.local_replica_threads > 0
                else {}
            ),
        },
    )
    if config.kubernetes:
        from neuroweaver_kube.client import KubeClient

        from .adapters.kube import KubeBackend

        kwargs = {"host": config.kube_api_url, "token": config.kube_token} if config.kube_api_url else {}
        backends[Backend.KUBERNETES] = KubeBackend(
            KubeClient.from_config(**kwargs),
            controller.on_status,
            defaults=kube,
            poll_seconds=config.kube_poll_seconds,
            on_missing=controller.reapply,
        )
    service = DeployerService(
        uow,
        notifier,
        PageTokens(secret),
        registry,
        controller,
        render_manifests=functools.partial(render_manifests, defaults=kube),
    )
    scraper = ReplicaScraper(interval=config.metrics_sample_seconds, client_tls=local_client_tls)
    local_metrics = LocalMetrics(backends[Backend.LOCAL], controller.owns, scraper)
    metric_sources: dict = {Backend.LOCAL: local_metrics}
    scrapers = [scraper]

    def locate(d) -> tuple[str, str]:  # the namespace and object name of a deployment's Kubernetes objects
        return d.namespace or kube.namespace, dns1123_name(d.name)

    if config.kubernetes and config.prometheus_url:
        from .adapters.prometheus import PrometheusMetrics

        metric_sources[Backend.KUBERNETES] = PrometheusMetrics(config.prometheus_url, locate)
    elif config.kubernetes:  # no Prometheus: the deployer scrapes the pods itself (rings of their own)
        pod_scraper = ReplicaScraper(interval=config.metrics_sample_seconds, client_tls=client_tls)
        scrapers.append(pod_scraper)
        metric_sources[Backend.KUBERNETES] = PodMetrics(
            backends[Backend.KUBERNETES].client, locate, pod_scraper, tls=bool(kube.tls_secret)
        )
    metrics = DeploymentMetrics(uow, metric_sources)
    follower = AliasFollower(uow, registry, service, controller.owns)
    service.on_alias_change = follower.request_sync
    controller.on_ownership_change.append(follower.request_sync)
    # PostgreSQL: every replica hears every deployment write (watchers wake, owners converge changes made elsewhere).
    listener = PostgresListener(db.url, CHANGES_CHANNEL, notifier) if db.is_postgres else None

    async def start_work() -> None:
        if listener is not None:
            await listener.start()
        await controller.start()
        await follower.sync()
        local_metrics.start()

    async def stop_work() -> None:
        await local_metrics.close()
        for source in metric_sources.values():
            if hasattr(source, "close") and source is not local_metrics:
                await source.close()
        for each in scrapers:
            await each.close()
        await follower.close()
        await controller.close()  # local replicas stop, then the leases are released for the other replicas
        if listener is not None:
            await listener.stop()
        await registry.close()

    grpc_service = database_service(
        config,
        db,
        name="deployer",
        full_name=SERVICE_NAME,
        method_roles=METHOD_ROLES,
        add_servicers=lambda server: svc_grpc.add_DeployerServiceServicer_to_server(DeployerServicer(service, metrics), server),
        migrations_dir=MIGRATIONS,
        migrate=config.migrate,
        default_port=DEFAULT_PORT,
        default_metrics_port=DEFAULT_METRICS_PORT,
        on_ready=[start_work],
        on_stop=[stop_work],
    )
    grpc_service.deployer = service  # type: ignore[attr-defined]  # handy for in-process tests
    grpc_service.controller = controller  # type: ignore[attr-defined]
    return grpc_service
