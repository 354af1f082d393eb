"""Shared test helpers: the in-process registry + deployer stack, watching deployments, model-server processes."""

from __future__ import annotations

import asyncio
from pathlib import Path


async def start_http_app(app) -> tuple[object, int]:
    """Serves an aiohttp app on a free port of 127.0.0.1; returns its runner (clean it up) and the port."""
    from aiohttp import web

    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


class Stack:
    """A real registry and deployer in-process, with extra settings for each (auth, TLS), and `credentials` (TLS and a
    bearer token, for every call including streams) for the test's channels."""

    MODEL = "projects/default/models/advisor"

    def __init__(
        self, root: Path, base: Path, adapters, kube_url: str, *, registry_extra: dict | None = None,
        deployer_extra: dict | None = None, credentials=None, database_urls: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.root, self.base, self.adapters, self.kube_url = root, base, adapters, kube_url
        self.registry_extra, self.deployer_extra, self.credentials = registry_extra or {}, deployer_extra or {}, credentials
        # {"registry": url, "deployer": url}; SQLite files under `root` when not given
        self.database_urls = database_urls or {svc: f"sqlite:///{root / f'{svc}.db'}" for svc in ("registry", "deployer")}

    async def start(self) -> None:

        from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as dgrpc
        from neuroweaver.registry.v1 import registry_pb2 as rpb
        from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
        from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
        from neuroweaver_deployer.app import DeployerConfig
        from neuroweaver_deployer.app import build as build_deployer
        from neuroweaver_registry.app import RegistryConfig
        from neuroweaver_registry.app import build as build_registry
        from neuroweaver_runtime.testing import free_port

        self.registry = build_registry(
            RegistryConfig(
                port=free_port(),
                metrics_port=-1,
                data_dir=str(self.root / "registry"),
                database_url=self.database_urls["registry"],
                **self.registry_extra,
            )
        )
        await self.registry.start()
        settings = dict(
            port=free_port(),
            metrics_port=-1,
            data_dir=str(self.root / "deployer"),
            database_url=self.database_urls["deployer"],
            registry_target=f"127.0.0.1:{self.registry.port}",
            kubernetes=True,
            kube_api_url=self.kube_url,
            kube_poll_seconds=0.2,
            # The base model and adapters live under pytest's base temp dir: model-server pods "mount" it there.
            kube_artifacts_mount_path=str(self.root.parent),
        )  # fmt: skip
        self.deployer = build_deployer(DeployerConfig(**{**settings, **self.deployer_extra}))
        await self.deployer.start()
        self.registry_channel = self.channel(f"127.0.0.1:{self.registry.port}")
        self.deployer_channel = self.channel(f"127.0.0.1:{self.deployer.port}")
        self.reg = rgrpc.RegistryServiceStub(self.registry_channel)
        self.dep = dgrpc.DeployerServiceStub(self.deployer_channel)
        await self.reg.CreateModel(
            rsvc.CreateModelRequest(parent="projects/default", model_id="advisor", model=rpb.Model(base_model=str(self.base)))
        )
        self.versions = []
        for i, (path, sha) in enumerate(self.adapters):
            mv = await self.reg.CreateModelVersion(
                rsvc.CreateModelVersionRequest(
                    parent=self.MODEL,
                    version=f"1.{i}.0",
                    model_version=rpb.ModelVersion(
                        artifact=rpb.Artifact(uri=path.as_uri(), sha256=sha, format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
                        lineage=rpb.Lineage(base_model=str(self.base), method="sft-lora"),
                    ),
                )
            )
            self.versions.append(mv.name)

    def channel(self, target: str):
        import grpc

        if self.credentials is None:
            return grpc.aio.insecure_channel(target)
        return grpc.aio.secure_channel(target, self.credentials)

    async def stop(self) -> None:
        await self.deployer_channel.close()
        await self.registry_channel.close()
        await self.deployer.stop()
        await self.registry.stop()


async def watch_until(dep_stub, name: str, predicate, timeout: float = 180.0, seen: list | None = None):
    """Follows WatchDeployment until `predicate(deployment)`; records every state seen in `seen`."""
    from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc

    call = dep_stub.WatchDeployment(dsvc.WatchDeploymentRequest(name=name))
    try:
        async with asyncio.timeout(timeout):
            async for msg in call:
                if seen is not None:
                    seen.append(msg.deployment.state)
                if predicate(msg.deployment):
                    return msg.deployment
    finally:
        call.cancel()
    raise AssertionError(f"watch of {name} ended before the condition held")


def model_server_processes() -> list:
    """Model-server processes descended from this test process."""
    import os

    import psutil

    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "neuroweaver_model_server" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out
