"""The console process: the HTTP app (pages, SSE, actions) and an ops port (/metrics, /healthz), SIGTERM = graceful."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from neuroweaver_runtime.client import ClientTLS

from . import audit, deployments, experiments, playground, registry, training
from . import web as pages
from .config import ConsoleConfig
from .gateway import Gateways

log = logging.getLogger("neuroweaver.console")
STATIC = Path(__file__).parent / "static"
# Each screen module registers its routes; earlier ones first (a literal path such as /jobs/new before /jobs/{job}).
SCREENS = (training, registry, deployments, playground, experiments, audit)
# npm packages the pages load (the repo root's package.json; `make install` runs npm ci).
ASSETS = {
    "/assets/chart.umd.min.js": "chart.js/dist/chart.umd.min.js",
    "/assets/cytoscape.min.js": "cytoscape/dist/cytoscape.min.js",
    "/assets/cytoscape-dagre.min.js": "cytoscape-dagre/dist/cytoscape-dagre.min.js",
}


def find_assets(assets_dir: str) -> dict[str, Path]:
    """The npm files, from --assets-dir or the first node_modules above this package or the working directory."""
    candidates = [Path(assets_dir)] if assets_dir else []
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        candidates += [p / "node_modules" for p in start.parents]
    for root in candidates:
        if all((root / rel).is_file() for rel in ASSETS.values()):
            return {url: root / rel for url, rel in ASSETS.items()}
    raise SystemExit(
        "configuration error: chart.js, cytoscape or cytoscape-dagre not found (run `make install`, or point --assets-dir "
        "at a node_modules with them)"
    )


def client_tls(config: ConsoleConfig) -> ClientTLS:
    try:
        tls = ClientTLS(config.client_tls_ca, config.client_tls_cert, config.client_tls_key, config.client_tls_server_name)
        if tls.enabled:
            tls.credentials()  # unreadable files stop the console at start, not at the first page
    except ValueError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    return tls


class Console:
    def __init__(self, config: ConsoleConfig) -> None:
        if bool(config.tls_cert) != bool(config.tls_key):
            raise SystemExit("configuration error: --tls-cert and --tls-key go together")
        self.config = config
        targets = (config.registry_target, config.trainer_target, config.deployer_target, config.experiments_target)
        self.gateways = Gateways(config.project, targets, client_tls(config), config.rpc_deadline_seconds)
        self.assets = find_assets(config.assets_dir)
        self.port = config.port
        self.metrics_port = config.metrics_port
        self._runners: list[web.AppRunner] = []

    def app(self) -> web.Application:
        app = web.Application(middlewares=[pages.observe])
        app[pages.gateways_key] = self.gateways
        app[pages.templates_key] = pages.templates()
        app[pages.default_token_key] = self.config.token
        app[pages.project_key] = self.config.project
        app[pages.secure_cookie_key] = bool(self.config.tls_cert)
        for screen in SCREENS:
            screen.routes(app)
        pages.routes(app, STATIC, self.assets)
        return app

    @staticmethod
    def ops_app() -> web.Application:
        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", pages.healthz)
        return app

    async def _serve(self, app: web.Application, port: int, ssl_context: ssl.SSLContext | None) -> int:
        # handler_cancellation: a browser that leaves cancels its handler at once, so an SSE stream's gRPC call ends
        # then instead of at its next write.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, port, reuse_address=True, ssl_context=ssl_context)
        await site.start()
        self._runners.append(runner)
        server = site._server
        assert server is not None
        return int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def start(self) -> int:
        ssl_context = None
        if self.config.tls_cert:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        self.port = await self._serve(self.app(), self.config.port, ssl_context)
        if self.config.metrics_port >= 0:
            self.metrics_port = await self._serve(self.ops_app(), self.config.metrics_port, None)
        scheme = "https" if ssl_context else "http"
        log.info(
            "console serving",
            extra={
                "fields": {
                    "url": f"{scheme}://{self.config.host}:{self.port}",
                    "metrics_port": self.metrics_port,
                    "registry": self.config.registry_target,
                    "trainer": self.config.trainer_target,
                }
            },
        )
        return self.port

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        await self.gateways.close()

    async def run_until_signal(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        log.info("console stopping")
        await self.stop()
