"""Composition root: configuration → database → use cases → servicer → shared server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from neuroweaver.registry.v1 import registry_service_pb2_grpc as svc_grpc
from neuroweaver_runtime.app import database_service
from neuroweaver_runtime.config import ServiceConfig
from neuroweaver_runtime.db import Database
from neuroweaver_runtime.notify import PostgresListener
from neuroweaver_runtime.pagination import PageTokens
from neuroweaver_runtime.server import GrpcService

from .adapters.unit_of_work import SqlUnitOfWorkFactory
from .api.servicer import METHOD_ROLES, RegistryServicer
from .service.cache import InvalidatingNotifier, VersionCache
from .service.events import EVENT_CHANNEL
from .service.registry import Registry

SERVICE_NAME = "neuroweaver.registry.v1.RegistryService"
DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9451
MIGRATIONS = str(Path(__file__).parent / "migrations")


@dataclass
class RegistryConfig(ServiceConfig):
    migrate: bool = True  # run Alembic migrations to head at start
    # GetModelVersion results cached per replica (PostgreSQL only; invalidated by LISTEN/NOTIFY); 0 = off
    version_cache_size: int = 10_000


def build(config: RegistryConfig) -> GrpcService:
    database_url = config.database_url or config.sqlite_default("registry")
    db = Database(database_url)
    listener: PostgresListener | None = None
    # The cache is sound only while every write anywhere reaches this replica's Notifier: on PostgreSQL through
    # LISTEN (used only while that connection is open). SQLite has no cross-process notifications: no cache.
    size = config.version_cache_size if db.is_postgres else 0
    cache = VersionCache(max_entries=size, enabled=lambda: listener is not None and listener.listening)
    notifier = InvalidatingNotifier(cache)
    secret = config.page_token_key("registry")
    service = Registry.on(SqlUnitOfWorkFactory(db, notifier), notifier, PageTokens(secret), cache=cache if size > 0 else None)
    service.db = db
    listener = PostgresListener(db.url, EVENT_CHANNEL, notifier) if db.is_postgres else None

    grpc_service = database_service(
        config,
        db,
        name="registry",
        full_name=SERVICE_NAME,
        method_roles=METHOD_ROLES,
        add_servicers=lambda server: svc_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(service), server),
        migrations_dir=MIGRATIONS,
        migrate=config.migrate,
        default_port=DEFAULT_PORT,
        default_metrics_port=DEFAULT_METRICS_PORT,
        on_ready=[listener.start] if listener else [],
        on_stop=[listener.stop] if listener else [],
    )
    grpc_service.registry = service  # type: ignore[attr-defined]  # handy for in-process tests
    return grpc_service
