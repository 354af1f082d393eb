"""The stable front door of a multi-replica local deployment: a tiny round-robin gRPC + HTTP proxy.

Each local deployment gets one router inside the deployer process, on its own ports; the deployment's
`endpoint` and `openai_base_url` point at it and never change while replicas come and go. Calls are
forwarded as raw bytes (no re-serialisation) to the next ready replica; a call that fails with UNAVAILABLE
before any response (a replica that just went away) is retried on another replica. Status codes and
google.rpc details of the replica pass through unchanged.

Credentials pass through: the caller's `authorization` metadata / `Authorization` header reaches the replica,
which authorizes that caller (auth on: a token of the deployment's project), so the router never lends its own
identity to a caller and a refusal (401/403, UNAUTHENTICATED/PERMISSION_DENIED) comes back unchanged.

Tracing: an HTTP call is a SERVER span of the router and a CLIENT span per attempt (the replica's span is the
latter's child); gRPC calls pass through with the caller's `traceparent` (the replica's span is the caller's child).

TLS: with `server_tls` the router serves gRPC and HTTPS with the deployer's certificate (mTLS when it has a client
CA); it dials replicas with `client_tls`, the deployer's outbound `ClientTLS`.

Retiring a replica (rollover, scale-down, removal): `set_upstreams` without it stops new calls reaching it, then
`drain(upstream, timeout)` waits until the calls it still serves (unary and streams, gRPC and HTTP incl. SSE) end;
only then is its process stopped, so a stream started on a replica finishes there. The replica's initial metadata
(e.g. the version serving a GenerateStream) passes through to the caller.

`GET /metrics` on the router's own metrics port (`metrics_url`, never the API port) is every ready replica's
metrics (read from their ops ports) in one Prometheus text exposition, each sample labelled
`replica="<its gRPC address>"` (`merge_expositions`), so a scrape of the deployment sees all of them.

Reachability: the router binds `host` (0.0.0.0 in a container, so other containers reach it) and reports
`advertise_host` in its endpoints (a name they resolve, e.g. the compose service name); with `ports` (a
`PortRange`) its three listeners take fixed ports that compose can publish instead of random ones.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from neuroweaver_runtime import telemetry
from neuroweaver_runtime.client import ClientTLS
from neuroweaver_runtime.tls import ServerTLS, client_ssl_context

log = logging.getLogger("neuroweaver.deployer.router")

INFERENCE_PREFIX = "/neuroweaver.inference.v1.InferenceService/"
STREAMING = {"GenerateStream"}
_SKIP_METADATA = {"user-agent", "te", "content-type", "grpc-accept-encoding", "grpc-timeout"}
_SKIP_INITIAL = {"content-type", "grpc-encoding", "grpc-accept-encoding"}  # a replica's headers the router's own replace
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
_TRACE_HEADERS = {"traceparent", "tracestate"}  # replaced by the router's own span context
_tracer = trace.get_tracer("neuroweaver.deployer.router")


@dataclass(frozen=True)
class Upstream:
    grpc_address: str  # host:port
    http_url: str  # http(s)://host:port of the OpenAI API
    metrics_url: str  # http(s)://host:port of the ops port (/metrics)


class PortRange:
    """Fixed ports for routers (`lo-hi`, both included), handed out lowest free first and taken back when a router
    stops, so the ports a deployment reports are ones compose publishes."""

    def __init__(self, spec: str) -> None:
        lo, sep, hi = spec.partition("-")
        if not (sep and lo.strip().isdigit() and hi.strip().isdigit() and 0 < int(lo) <= int(hi) < 65536):
            raise ValueError(f"port range {spec!r} must be lo-hi, e.g. 50100-50159")
        self.lo, self.hi = int(lo), int(hi)
        self._taken: set[int] = set()

    def __str__(self) -> str:
        return f"{self.lo}-{self.hi}"

    def take(self, host: str) -> int:
        for port in range(self.lo, self.hi + 1):
            if port not in self._taken and _bindable(host, port):
                self._taken.add(port)
                return port
        raise RuntimeError(f"no free port left in the router port range {self} (3 per local deployment): widen it")

    def give_back(self, port: int) -> None:
        self._taken.discard(port)


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class Router(grpc.GenericRpcHandler):
    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        advertise_host: str = "",
        ports: PortRange | None = None,
        server_tls: ServerTLS | None = None,
        client_tls: ClientTLS | None = None,
    ) -> None:
        self.host = host
        self.advertise_host = advertise_host or host  # the name callers dial (bind address when not set)
        self.ports = ports
        self.server_tls = server_tls or ServerTLS()
        self.client_tls = client_tls or ClientTLS()
        self._upstreams: list[Upstream] = []
        self._cycle = itertools.count()
        self._inflight: dict[Upstream, int] = {}  # calls being served per replica (counted from the pick)
        self._drained: dict[Upstream, asyncio.Event] = {}  # set when a draining replica's last call ends
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.metrics_port = 0
        # Calls the router answered itself (UNAVAILABLE / 503) because no replica could take them: they never reach a
        # replica's metrics, so GetDeploymentMetrics counts them from here (a row "router"). Counted from `started_at`.
        self.refused = 0
        self.started_at = 0.0

    @property
    def endpoint(self) -> str:
        return f"{self.advertise_host}:{self.grpc_port}"

    @property
    def _scheme(self) -> str:
        return "https" if self.server_tls.enabled else "http"

    @property
    def openai_base_url(self) -> str:
        return f"{self._scheme}://{self.advertise_host}:{self.http_port}/v1"

    @property
    def metrics_url(self) -> str:
        return f"{self._scheme}://{self.advertise_host}:{self.metrics_port}/metrics"

    async def start(self) -> None:
        self.started_at = time.time()
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        server.add_generic_rpc_handlers((self,))
        address = f"{self.host}:{self._port()}"
        tls = self.server_tls
        self.grpc_port = (
            server.add_secure_port(address, tls.grpc_credentials()) if tls.enabled else server.add_insecure_port(address)
        )
        await server.start()
        self._server = server
        await self._set_health()
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._http)
        self._runner, self.http_port = await self._serve(app, require_client_cert=True)
        metrics_app = web.Application()
        metrics_app.router.add_get("/metrics", self._metrics)
        self._metrics_runner, self.metrics_port = await self._serve(metrics_app, require_client_cert=False)
        connector = aiohttp.TCPConnector(ssl=client_ssl_context(self.client_tls) or True)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))

    async def _serve(self, app: web.Application, *, require_client_cert: bool) -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        tls = self.server_tls
        ssl_context = tls.ssl_context(require_client_cert=require_client_cert) if tls.enabled else None
        await web.TCPSite(runner, self.host, self._port(), ssl_context=ssl_context).start()
        return runner, runner.addresses[0][1]

    def _port(self) -> int:
        return self.ports.take(self.host) if self.ports is not None else 0

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(1.0)
        for runner in (self._runner, self._metrics_runner):
            if runner is not None:
                await runner.cleanup()
        if self.ports is not None:
            for port in (self.grpc_port, self.http_port, self.metrics_port):
                self.ports.give_back(port)
        if self._session is not None:
            await self._session.close()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def set_upstreams(self, upstreams: list[Upstream]) -> None:
        """Atomically replaces the rotation (new calls only go to these); closes channels of dropped ones later."""
        self._upstreams = list(upstreams)
        await self._set_health()

    async def drain(self, upstream: Upstream, timeout: float) -> bool:
        """Waits until `upstream`, already out of the rotation, serves no call through this router (False: `timeout`
        seconds passed first, and its calls are left to the replica's own graceful stop)."""
        if not self._inflight.get(upstream):
            return True
        started = time.monotonic()
        drained = self._drained.setdefault(upstream, asyncio.Event())
        try:
            async with asyncio.timeout(timeout):
                await drained.wait()
        except TimeoutError:
            log.warning("replica %s still serves %d call(s) after the %.0f s drain timeout: stopping it anyway",
                        upstream.grpc_address, self._inflight.get(upstream, 0), timeout)  # fmt: skip
            return False
        finally:
            self._drained.pop(upstream, None)
        log.info("replica %s drained in %.1f s", upstream.grpc_address, time.monotonic() - started)
        return True

    def inflight(self, upstream: Upstream) -> int:
        return self._inflight.get(upstream, 0)

    async def forget(self, upstream: Upstream) -> None:
        """Closes the channel to a stopped replica."""
        channel = self._channels.pop(upstream.grpc_address, None)
        if channel is not None:
            await channel.close()

    async def _set_health(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self._upstreams else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", "neuroweaver.inference.v1.InferenceService"):
            await self._health.set(name, status)

    @contextmanager
    def _pick(self) -> Iterator[Upstream | None]:
        """The next replica of the rotation, counted in flight until the block ends (pick and count happen together,
        with no await between, so a drain that starts after the rotation changed sees every call the replica got)."""
        ups = self._upstreams
        up = ups[next(self._cycle) % len(ups)] if ups else None
        if up is None:
            yield None
            return
        self._inflight[up] = self._inflight.get(up, 0) + 1
        try:
            yield up
        finally:
            left = self._inflight[up] - 1
            if left:
                self._inflight[up] = left
            else:
                del self._inflight[up]
                if up in self._drained:
                    self._drained[up].set()

    def _channel(self, up: Upstream) -> grpc.aio.Channel:
        channel = self._channels.get(up.grpc_address)
        if channel is None:
            # A plain channel, not the runtime's open_channel: calls are forwarded with the caller's own deadline
            # and metadata, and failed attempts are retried here, on another replica.
            tls = self.client_tls
            if tls.enabled:
                channel = grpc.aio.secure_channel(up.grpc_address, tls.credentials(), options=tls.channel_options())
            else:
                channel = grpc.aio.insecure_channel(up.grpc_address)
            self._channels[up.grpc_address] = channel
        return channel

    # -- gRPC --------------------------------------------------------------------------------

    def service(self, handler_call_details):
        method = handler_call_details.method
        if not method.startswith(INFERENCE_PREFIX):
            return None
        if method[len(INFERENCE_PREFIX) :] in STREAMING:
            return grpc.unary_stream_rpc_method_handler(self._stream(method))
        return grpc.unary_unary_rpc_method_handler(self._unary(method))

    def _attempts(self) -> int:
        return max(1, len(self._upstreams)) + 1

    @staticmethod
    def _metadata(context) -> list[tuple[str, str | bytes]]:
        return [(k, v) for k, v in (context.invocation_metadata() or ()) if not k.startswith(":") and k not in _SKIP_METADATA]

    def _unary(self, method: str):
        async def handle(request: bytes, context):
            error: grpc.aio.AioRpcError | None = None
            for _ in range(self._attempts()):
                with self._pick() as up:
                    if up is None:
                        break
                    try:
                        call = self._channel(up).unary_unary(method)(
                            request, timeout=context.time_remaining(), metadata=self._metadata(context)
                        )
                        response = await call
                        await _pass_initial_metadata(call, context)
                        return response
                    except grpc.aio.AioRpcError as exc:
                        error = exc
                        if exc.code() != grpc.StatusCode.UNAVAILABLE:
                            break
            if error is None:
                self.refused += 1
            await _abort(context, error)

        return handle

    def _stream(self, method: str):
        async def handle(request: bytes, context):
            error: grpc.aio.AioRpcError | None = None
            for _ in range(self._attempts()):
                with self._pick() as up:
                    if up is None:
                        break
                    sent = False
                    try:
                        call = self._channel(up).unary_stream(method)(
                            request, timeout=context.time_remaining(), metadata=self._metadata(context)
                        )
                        async for message in call:
                            if not sent:  # headers of the attempt that answers, not of one that failed first
                                await _pass_initial_metadata(call, context)
                                sent = True
                            yield message
                        return
                    except grpc.aio.AioRpcError as exc:
                        error = exc
                        if exc.code() != grpc.StatusCode.UNAVAILABLE or sent:
                            break
            if error is None:
                self.refused += 1
            await _abort(context, error)

        return handle

    # -- HTTP --------------------------------------------------------------------------------

    async def _http(self, request: web.Request) -> web.StreamResponse:
        """Forwards to a replica, as a hop of the caller's trace: a SERVER span here and a CLIENT span per attempt,
        whose context replaces the caller's `traceparent` towards the replica."""
        span = telemetry.server_span(
            _tracer, f"{request.method} {request.path}", request.headers,
            {"http.request.method": request.method, "url.path": request.path}, record=telemetry.spans_are_recorded(),
        )  # fmt: skip
        status = 500
        try:
            with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
                response = await self._forward_http(request)
            status = response.status
            return response
        finally:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()

    async def _forward_http(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS | _TRACE_HEADERS}
        for _ in range(self._attempts()):
            with self._pick() as up, self._attempt_span(request, up) as attempt:
                if up is None or attempt is None or self._session is None:
                    break
                sent = dict(headers)
                propagate.inject(sent)
                try:
                    async with self._session.request(
                        request.method, up.http_url + request.path_qs, data=body, headers=sent, **self._server_hostname
                    ) as resp:
                        attempt.set_attribute("http.response.status_code", resp.status)
                        out_headers = {
                            k: v
                            for k, v in resp.headers.items()
                            if k.lower() not in _HOP_HEADERS | {"content-encoding", "date", "server"}
                        }
                        if resp.content_type == "text/event-stream":
                            stream = web.StreamResponse(status=resp.status, headers=out_headers)
                            await stream.prepare(request)
                            async for chunk in resp.content.iter_any():
                                await stream.write(chunk)
                            await stream.write_eof()
                            return stream
                        return web.Response(status=resp.status, body=await resp.read(), headers=out_headers)
                except aiohttp.ClientConnectionError as exc:
                    attempt.set_status(Status(StatusCode.ERROR, "unreachable"))
                    log.info("replica %s unreachable (%s); trying another", up.http_url, exc)
                    continue
        self.refused += 1  # no replica answered (none ready, or every one unreachable)
        error = {
            "error": {"message": "no ready replica", "type": "service_unavailable", "param": None, "code": "NO_READY_REPLICA"}
        }
        return web.json_response(error, status=503)

    @contextmanager
    def _attempt_span(self, request: web.Request, up: Upstream | None) -> Iterator[Span | None]:
        """The CLIENT span of one forwarding attempt, current while it runs."""
        if up is None:
            yield None
            return
        attempt = _tracer.start_span(
            request.method, kind=SpanKind.CLIENT, attributes={"http.request.method": request.method, "url.full": up.http_url}
        )
        with trace.use_span(attempt, end_on_exit=True, record_exception=False, set_status_on_exception=False):
            yield attempt

    @property
    def _server_hostname(self) -> dict[str, Any]:
        """The name checked on a replica's certificate when it is not the address dialled (`ClientTLS.server_name`)."""
        return {"server_hostname": self.client_tls.server_name} if self.client_tls.server_name else {}

    async def _metrics(self, request: web.Request) -> web.Response:
        """Every ready replica's /metrics, merged; a replica that does not answer in 5 s is left out (and logged)."""
        session, upstreams = self._session, list(self._upstreams)
        if session is None or not upstreams:
            return web.Response(status=503, text="no ready replica\n")

        async def scrape(up: Upstream) -> str | None:
            try:
                async with session.get(up.metrics_url, headers={"Accept": EXPOSITION_TYPE},
                                       timeout=aiohttp.ClientTimeout(total=5), **self._server_hostname) as resp:  # fmt: skip
                    if resp.status == 200:
                        return await resp.text()
                    log.info("replica %s answered /metrics with %s", up.metrics_url, resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.info("replica %s /metrics: %s", up.metrics_url, exc)
            return None

        texts = await asyncio.gather(*(scrape(up) for up in upstreams))
        parts = [(up.grpc_address, text) for up, text in zip(upstreams, texts, strict=True) if text is not None]
        if not parts:
            return web.Response(status=503, text="no replica answered /metrics\n")
        return web.Response(body=merge_expositions(parts).encode(), headers={"Content-Type": EXPOSITION_CONTENT_TYPE})


EXPOSITION_TYPE = "text/plain;version=0.0.4"
EXPOSITION_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


@dataclass
class _Family:
    meta: dict[str, str] = field(default_factory=dict)  # "HELP"/"TYPE" → its line, from the first replica that has it
    samples: list[str] = field(default_factory=list)


def merge_expositions(parts: list[tuple[str, str]]) -> str:
    """Prometheus text expositions of several replicas as one: each metric family once (its HELP and TYPE from the
    first replica that has it), its samples from every replica with a `replica` label added. Families stay
    contiguous, as the format requires; a sample belongs to the family of the HELP/TYPE lines before it."""
    families: dict[str, _Family] = {}
    for replica, text in parts:
        label = 'replica="' + replica.replace("\\", "\\\\").replace('"', '\\"') + '"'
        current: str | None = None
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                words = line.split(None, 3)
                if len(words) >= 3 and words[1] in ("HELP", "TYPE"):
                    current = words[2]
                    families.setdefault(current, _Family()).meta.setdefault(words[1], line)
                continue
            name = _METRIC_NAME.match(line)
            if name is None:
                continue
            rest = line[name.end() :]
            if rest.startswith("{"):
                sample = f"{name.group()}{{{label}{'' if rest.startswith('{}') else ','}{rest[1:]}"
            else:
                sample = f"{name.group()}{{{label}}}{rest}"
            families.setdefault(current or name.group(), _Family()).samples.append(sample)
    lines: list[str] = []
    for family in families.values():
        lines.extend(family.meta.values())
        lines.extend(family.samples)
    return "\n".join(lines) + "\n" if lines else ""


async def _pass_initial_metadata(call, context) -> None:
    """The replica's initial metadata (e.g. `x-neuroweaver-model-version` of a GenerateStream) to the caller."""
    metadata = tuple((k, v) for k, v in (await call.initial_metadata() or ()) if k not in _SKIP_INITIAL and not k.startswith(":"))
    if metadata:
        await context.send_initial_metadata(metadata)


async def _abort(context, error: grpc.aio.AioRpcError | None) -> None:
    if error is None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "no ready replica of this deployment")
        return  # not reached: abort raises
    trailing = tuple((k, v) for k, v in (error.trailing_metadata() or ()) if k == "grpc-status-details-bin")
    await context.abort(error.code(), error.details() or "", trailing_metadata=trailing)


__all__ = ["Router", "Upstream"]
