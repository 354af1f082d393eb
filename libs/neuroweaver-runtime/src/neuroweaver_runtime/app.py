"""The end of every service's composition root: its own database, migrated at start, behind the shared server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence

import grpc

from . import migrations
from .auth import Role
from .config import ServiceConfig
from .db import Database
from .server import GrpcService, ServiceDefinition

Step = Callable[[], Awaitable[None]]


def database_service(
    config: ServiceConfig,
    db: Database,
    *,
    name: str,
    full_name: str,
    method_roles: Mapping[str, Role],
    add_servicers: Callable[[grpc.aio.Server], None],
    migrations_dir: str,
    migrate: bool,
    default_port: int,
    default_metrics_port: int,
    on_ready: Sequence[Step] = (),
    on_stop: Sequence[Step] = (),
) -> GrpcService:
    """The shared server for service `name` (registry, trainer, ...) serving `full_name` on `db`.

    Health turns SERVING once the database answers, Alembic has taken it to head (with `migrate`) and the `on_ready`
    steps (listeners, schedulers, resumed work) have run, in order. At stop the `on_stop` steps run in order, then the
    engine is disposed. Errors go out under the domain `<name>.neuroweaver.v1`.
    """

    async def ready() -> None:
        await db.wait_until_ready()
        if migrate:
            await asyncio.to_thread(migrations.upgrade, db.url, migrations_dir)
        for step in on_ready:
            await step()

    async def close() -> None:
        for step in on_stop:
            await step()
        await db.dispose()

    definition = ServiceDefinition(
        name=name,
        full_names=[full_name],
        error_domain=f"{name}.neuroweaver.v1",
        method_roles=method_roles,
        add_servicers=add_servicers,
        ready=ready,
        on_stop=[close],
    )
    return GrpcService(definition, config, default_port=default_port, default_metrics_port=default_metrics_port)
