"""LOCAL backend: supervised model-server processes on this host, behind one router per deployment.

- Each replica is `python -m neuroweaver_model_server` (the module the Kubernetes pods run) on three free ports
  (gRPC, OpenAI API, ops port with /metrics), started in its own process group with PR_SET_PDEATHSIG, so replicas
  never outlive the deployer.
- Credentials and TLS reach a replica through its environment, never its command line (/proc/PID/cmdline is
  world-readable; /proc/PID/environ is not): NW_MODEL_SERVER_AUTH_TOKENS is the deployer's own token table setting
  (auth on: inference needs a token of the deployment's project, passed as --project), and
  NW_MODEL_SERVER_TLS_CERT/_KEY/_CLIENT_CA are the deployer's server TLS files. The router and the readiness
  check dial replicas with the deployer's outbound ClientTLS.
- A replica is ready when its gRPC health for the inference service turns SERVING (health Watch, no polling).
- Tracing: replicas export spans where the deployer does (`telemetry.child_environment`); a replica's start is a
  span in the trace of the call that asked for it, with the replica's model load beneath it.
- A replica that exits is restarted with exponential backoff (0.5 s doubling to 10 s); meanwhile it is out of
  the router's rotation and the deployment reports `restarting` (DEGRADED). A replica that fails
  `max_start_failures` times before it was ever ready makes the rollout fail.
- Scaling starts or stops replicas of the current version. A new version (or new serving settings) rolls out
  without downtime: start the new replicas, wait until all are ready, switch the router to them, then retire
  the old ones. If the new replicas fail, the old ones keep serving.
- Retiring a replica (rollover, scale-down, removal) never cuts a call: out of the router's rotation first, then
  the router drains it (waits until the calls it serves end, unary and streaming, gRPC and HTTP/SSE, for at most
  `grace_seconds`, the deployer's --replica-grace-seconds), then SIGTERM (the model server finishes whatever is
  left within the rest of that budget) and SIGKILL 10 s after the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode

from neuroweaver_kube.manifests import MODEL_SERVER_MODULE
from neuroweaver_runtime import telemetry
from neuroweaver_runtime.client import ClientTLS
from neuroweaver_runtime.names import project_of
from neuroweaver_runtime.ports import free_port
from neuroweaver_runtime.tls import ServerTLS

from ..domain.model import BackendStatus, Target, extra_versions_json, server_load
from .router import PortRange, Router, Upstream

log = logging.getLogger("neuroweaver.deployer.local")

StatusCallback = Callable[[str, BackendStatus], Awaitable[None]]
INFERENCE_SERVICE = "neuroweaver.inference.v1.InferenceService"
_tracer = trace.get_tracer("neuroweaver.deployer.local")


def model_server_command(target: Target, host: str, grpc_port: int, http_port: int, metrics_port: int, grace: float) -> list[str]:
    """The replica's command line: nothing secret goes here (see the module docstring)."""
    v, s, load = target.version, target.serving.with_defaults(), server_load(target)
    args = [
        sys.executable, "-m", MODEL_SERVER_MODULE,
        "--host", host, "--grpc-port", str(grpc_port), "--http-port", str(http_port),
        "--metrics-port", str(metrics_port), "--project", project_of(target.deployment) or "default",
        "--base-model", load.base_model, "--served-model-name", target.served_model_name, "--model-version", v.name,
        "--max-queue", str(s.max_queue), "--max-new-tokens-limit", str(s.max_new_tokens_limit),
        "--max-batch-size", str(s.max_batch_size), "--shutdown-grace-seconds", str(grace), "--die-with-parent",
        "--shutdown-drain-seconds", "0",  # the router drained it before its SIGTERM: nothing new arrives
    ]  # fmt: skip
    if target.model_names:
        args += ["--model-names", ",".join(target.model_names)]
    if load.adapter_uri:
        args += ["--adapter-uri", load.adapter_uri, "--adapter-sha256", load.adapter_sha256]
    if s.load_in_4bit:
        args.append("--load-in-4bit")
    if load.engine:
        args += ["--engine", load.engine]
    if v.co_served:  # several versions on one base: each answers to its own names, with its own adapter
        args += ["--extra-versions", extra_versions_json(target)]
    return args


class Replica:
    """One supervised model-server process (restarted on crash until stopped)."""

    def __init__(self, deployment: LocalDeployment, target: Target, index: int) -> None:
        self.dep, self.target, self.index = deployment, target, index
        self.state = "starting"  # starting | ready | restarting | failed | stopped
        self.ever_ready = False
        self.failures = 0
        self.process: asyncio.subprocess.Process | None = None
        self.upstream: Upstream | None = None
        self.started_at = 0.0  # wall-clock start of the current process
        self.last_error = ""
        self.settled = asyncio.Event()  # ready or failed
        self._stopping = False
        self._task: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"replica-{self.dep.name}-{self.index}")

    async def _spawn(self) -> None:
        cfg = self.dep.backend
        grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
        scheme = "https" if cfg.server_tls.enabled else "http"
        self.upstream = Upstream(
            f"{cfg.host}:{grpc_port}", f"{scheme}://{cfg.host}:{http_port}", f"{scheme}://{cfg.host}:{metrics_port}/metrics"
        )
        self.started_at = time.time()  # its metrics count from 0 from here (GetDeploymentMetrics' first sample)
        log_path = cfg.log_dir / f"{self.dep.object_id}-{self.target.fingerprint()}-{self.index}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        with open(log_path, "ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                *model_server_command(self.target, cfg.host, grpc_port, http_port, metrics_port, cfg.grace_seconds),
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True, env=telemetry.child_environment({**os.environ, **cfg.env, **cfg.credentials_env()}),
            )  # fmt: skip
        log.info(
            "replica started",
            extra={"fields": {"deployment": self.dep.name, "pid": self.process.pid, "grpc": self.upstream.grpc_address}},
        )

    async def _wait_serving(self) -> None:
        assert self.upstream is not None
        # Short reconnect backoff: the process needs seconds to import torch before it listens, and gRPC's
        # default backoff (1 s growing to 120 s) would otherwise notice readiness long after it happened.
        options = [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 250),
        ]
        tls = self.dep.backend.client_tls
        if tls.enabled:
            channel = grpc.aio.secure_channel(
                self.upstream.grpc_address, tls.credentials(), options=options + tls.channel_options()
            )
        else:
            channel = grpc.aio.insecure_channel(self.upstream.grpc_address, options=options)
        async with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            call = stub.Watch(health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE), wait_for_ready=True)
            async for msg in call:
                if msg.status == health_pb2.HealthCheckResponse.SERVING:
                    call.cancel()
                    return

    async def _supervise(self) -> None:
        backoff = 0.5
        cfg = self.dep.backend
        # The first start belongs to the trace of the change that asked for the replica (create, scale, rollout);
        # a restart after a crash begins a trace of its own. The replica's model load is a child span (TRACEPARENT).
        parent: Context | None = None
        while not self._stopping:
            span = _tracer.start_span(
                "LocalReplica/start", context=parent,
                attributes={"neuroweaver.deployment": self.dep.name, "neuroweaver.replica": self.index},
            )  # fmt: skip
            parent = Context()
            try:
                with trace.use_span(span, end_on_exit=False):
                    await self._spawn()
                assert self.process is not None
                exited = asyncio.ensure_future(self.process.wait())
                serving = asyncio.ensure_future(asyncio.wait_for(self._wait_serving(), cfg.startup_timeout))
                await asyncio.wait({exited, serving}, return_when=asyncio.FIRST_COMPLETED)
                ready = serving.done() and not serving.cancelled() and serving.exception() is None and not exited.done()
                if not ready:
                    span.set_status(Status(StatusCode.ERROR, "not SERVING"))
            finally:
                span.end()
            if ready:
                self.state, self.ever_ready, backoff = "ready", True, 0.5
                self.settled.set()
                await self.dep.changed()
                await exited
            else:
                serving.cancel()
                with contextlib.suppress(BaseException):
                    await serving
                if not exited.done():  # startup timed out
                    self.last_error = f"not SERVING within {cfg.startup_timeout:.0f}s"
                    await self._kill()
                await exited
            if self._stopping:
                break
            self.failures += 1
            self.last_error = self.last_error or f"exited with code {self.process.returncode}: {self._log_tail()}"
            log.warning("replica exited", extra={"fields": {"deployment": self.dep.name, "code": self.process.returncode}})
            if not self.ever_ready and self.failures >= cfg.max_start_failures:
                self.state = "failed"
                self.settled.set()
                await self.dep.changed()
                return
            self.state = "restarting"
            await self.dep.changed()
            await asyncio.sleep(backoff)  # restart backoff (not synchronisation)
            backoff = min(backoff * 2, 10.0)
            self.last_error = ""
        self.state = "stopped"

    def _log_tail(self) -> str:
        try:
            lines = Path(self.log_path).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1][-300:] if lines else ""

    async def _kill(self) -> None:
        if self.process and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def stop(self) -> None:
        """Retires the replica, already out of the router's rotation: waits until the calls the router still sends
        it end (at most the grace period), then SIGTERM (the server finishes what is left), SIGKILL 10 s after the
        grace period."""
        self._stopping = True
        grace = self.dep.backend.grace_seconds
        deadline = asyncio.get_running_loop().time() + grace
        proc = self.process
        if proc is not None and proc.returncode is None:
            if self.upstream is not None:
                await self.dep.router.drain(self.upstream, grace)
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), max(0.0, deadline - asyncio.get_running_loop().time()) + 10)
            except TimeoutError:
                await self._kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.state = "stopped"
        if self.upstream is not None:
            await self.dep.router.forget(self.upstream)


class LocalDeployment:
    def __init__(self, backend: LocalBackend, name: str) -> None:
        self.backend, self.name = backend, name
        self.object_id = name.rsplit("/", 1)[-1]
        self.router = Router(
            backend.router_host,
            advertise_host=backend.advertise_host,
            ports=backend.router_ports,
            server_tls=backend.server_tls,
            client_tls=backend.client_tls,
        )
        self.target: Target | None = None
        self.replicas: list[Replica] = []  # replicas of the current target
        self.rolling_out = False
        self.failed_message = ""
        self._lock = asyncio.Lock()
        self._publishing = asyncio.Lock()  # orders rotation updates and status reports (see _publish_status)
        self._counter = 0
        self._all: list[Replica] = []  # every replica started, so a cancelled rollout leaves nothing behind

    def _new_replica(self, target: Target) -> Replica:
        self._counter += 1
        r = Replica(self, target, self._counter)
        self._all.append(r)
        r.start()
        return r

    async def changed(self) -> None:
        """A replica changed state: update the rotation (current replicas that are ready) and report."""
        async with self._publishing:
            await self.router.set_upstreams([r.upstream for r in self.replicas if r.state == "ready" and r.upstream])
            await self._publish_status()

    async def report(self) -> None:
        async with self._publishing:
            await self._publish_status()

    async def _publish_status(self) -> None:
        """Computed and written under `_publishing`, so the last write carries the newest state. Unserialized, two
        reports in flight (a replica turning ready while the rollout waiting for it finishes) could commit out of
        order and leave a stale status (PROGRESSING with every replica ready) as the last word."""
        desired = self.target.replicas if self.target else 0
        ready = sum(1 for r in self.replicas if r.state == "ready")
        restarting = sum(1 for r in self.replicas if r.state == "restarting" and r.ever_ready)
        messages = [r.last_error for r in self.replicas if r.last_error]
        status = BackendStatus(
            desired=desired,
            ready=ready,
            observed=self.target.rollout_key() if self.target else "",  # `replicas` run `target` (see _roll)
            rolling_out=self.rolling_out,
            failed=bool(self.failed_message),
            restarting=restarting,
            message=self.failed_message or (messages[0] if messages else ""),
            endpoint=self.router.endpoint,
            openai_base_url=self.router.openai_base_url,
        )
        await self.backend.on_status(self.name, status)

    async def apply(self, target: Target) -> None:
        async with self._lock:
            if self.router.grpc_port == 0:
                await self.router.start()
            if self.target is not None and self.target.fingerprint() == target.fingerprint() and not self.failed_message:
                await self._scale(target)
            else:
                await self._roll(target)

    async def _scale(self, target: Target) -> None:
        self.target = target
        extra = self.replicas[target.replicas :]
        self.replicas = self.replicas[: target.replicas]
        if extra:  # out of the rotation first, then drained and stopped, then reported
            await self.router.set_upstreams([r.upstream for r in self.replicas if r.state == "ready" and r.upstream])
            await asyncio.gather(*(r.stop() for r in extra))
            self._forget_stopped()
        new = [self._new_replica(target) for _ in range(target.replicas - len(self.replicas))]
        self.replicas += new
        self.rolling_out = bool(new)  # a scale-up is a rollout until its replicas are ready (not DEGRADED meanwhile)
        await self.changed()
        if new:
            await asyncio.gather(*(r.settled.wait() for r in new))
            self.rolling_out = False
            await self.changed()

    async def _roll(self, target: Target) -> None:
        old = self.replicas
        self.rolling_out, self.failed_message = True, ""
        if self.target is None or not old:
            self.target = target  # first rollout: desired count is the new one right away
        await self.report()
        new = [self._new_replica(target) for _ in range(target.replicas)]
        await asyncio.gather(*(r.settled.wait() for r in new))
        failed = [r for r in new if r.state != "ready"]
        if failed:
            await asyncio.gather(*(r.stop() for r in new))
            self._forget_stopped()
            self.failed_message = f"rollout of {target.version.name} failed: {failed[0].last_error}"
            self.rolling_out = False
            await self.changed()
            return
        self.target, self.replicas = target, new
        await self.changed()  # switch the router to the new replicas first...
        self.rolling_out = False
        await asyncio.gather(*(r.stop() for r in old))  # ...then drain and stop the old ones
        self._forget_stopped()
        await self.changed()

    async def shutdown(self) -> None:
        async with self._lock:
            self.replicas = []
            await self.router.set_upstreams([])
            await asyncio.gather(*(r.stop() for r in self._all if r.state != "stopped"))
            self._all.clear()
            await self.router.stop()

    def _forget_stopped(self) -> None:
        self._all = [r for r in self._all if r.state != "stopped"]

    def pids(self) -> list[int]:
        return [r.pid for r in self._all if r.pid and r.state != "stopped"]


class LocalBackend:
    interruptible = True  # a cancelled apply leaves nothing behind: remove() stops every replica started

    def __init__(
        self,
        on_status: StatusCallback,
        *,
        host: str = "127.0.0.1",
        log_dir: str | os.PathLike = "logs",
        env: dict[str, str] | None = None,
        startup_timeout: float = 300.0,
        max_start_failures: int = 3,
        grace_seconds: float = 30.0,
        auth_tokens: str = "",
        server_tls: ServerTLS | None = None,
        client_tls: ClientTLS | None = None,
        router_host: str = "",
        advertise_host: str = "",
        router_ports: PortRange | None = None,
    ) -> None:
        """`auth_tokens`: the token-table setting replicas authenticate callers with (the deployer's own; empty = auth
        off). `server_tls`: what replicas and routers serve with. `client_tls`: how routers and readiness checks dial
        replicas; it must be on whenever `server_tls` is. Replicas bind `host`; routers, the deployments' front doors,
        bind `router_host` (default `host`; 0.0.0.0 in a container) on `router_ports` (default any free port) and
        report `advertise_host` (default their bind address) in the endpoints, so other containers can dial them."""
        self.server_tls = server_tls or ServerTLS()
        self.client_tls = client_tls or ClientTLS()
        self.auth_tokens = auth_tokens
        self.on_status = on_status
        self.host = host
        self.router_host = router_host or host
        self.advertise_host = advertise_host
        self.router_ports = router_ports
        self.log_dir = Path(log_dir)
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.max_start_failures = max_start_failures
        self.grace_seconds = grace_seconds  # drain timeout of a retiring replica (see the module docstring)
        self.deployments: dict[str, LocalDeployment] = {}

    def credentials_env(self) -> dict[str, str]:
        """Set even when empty, so a variable in the deployer's own environment cannot turn a replica's auth off."""
        tls = self.server_tls
        return {
            "NW_MODEL_SERVER_AUTH_TOKENS": self.auth_tokens,
            "NW_MODEL_SERVER_TLS_CERT": tls.cert,
            "NW_MODEL_SERVER_TLS_KEY": tls.key,
            "NW_MODEL_SERVER_TLS_CLIENT_CA": tls.client_ca,
        }

    async def apply(self, target: Target) -> None:
        dep = self.deployments.get(target.deployment)
        if dep is None:
            dep = self.deployments[target.deployment] = LocalDeployment(self, target.deployment)
        await dep.apply(target)

    async def remove(self, name: str, target: Target | None = None) -> None:
        dep = self.deployments.pop(name, None)
        if dep is not None:
            await dep.shutdown()

    async def release(self, name: str) -> None:
        """Another replica owns the deployment now and starts replicas of its own: stop ours."""
        await self.remove(name)

    async def close(self) -> None:
        """Every deployment at once: each waits for its replicas' calls to drain."""
        await asyncio.gather(*(self.remove(name) for name in list(self.deployments)))
