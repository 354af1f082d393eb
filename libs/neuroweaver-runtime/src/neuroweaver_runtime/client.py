"""Typed gRPC clients with deadlines, retries, auth and trace propagation (a CLIENT span per call when spans are
exported, its context in the `traceparent` metadata).

    channel = open_channel("127.0.0.1:50051", token="...")
    registry = RegistryServiceStub(channel)

Every outbound client of a service, the SDK and the CLI is a `ServiceClient`: one target, its channel (opened on
first use through `open_channel`), its stubs and its close; subclasses add the calls and map remote failures.

Every call gets a default deadline unless it sets its own; UNAVAILABLE is retried with exponential
backoff by gRPC's retry policy (only safe because writes carry request_id / etag).

Load balancing: `round_robin` over every address the target resolves to (gRPC's default `pick_first` keeps one
HTTP/2 connection, so behind a ClusterIP VIP every call lands on one replica). A bare `host:port` resolves
through DNS (`dns:///host:port` spelled out); with a Kubernetes headless Service the answer is every ready pod,
and `ipv4:a:p,b:p` names a static list. One address (a VIP, a mesh sidecar) behaves as before.

TLS: `open_channel(target, tls=ClientTLS(ca=..., cert=..., key=...))`. Every internal caller builds its
`ClientTLS` from the service's `--client-tls-*` settings (`ClientTLS.from_config`), the CLI and SDK from
`NW_TLS_*` (`ClientTLS.from_env`); there is no other way to configure outbound TLS.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar, cast

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from .auth import ANONYMOUS_ADMIN, ON_BEHALF_OF_HEADER, principal_var
from .telemetry import inject_metadata, spans_are_recorded

DEFAULT_DEADLINE_SECONDS = 30.0
StubT = TypeVar("StubT")
_tracer = trace.get_tracer("neuroweaver.grpc.client")

_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


class _CallMetadata:
    """What every outgoing call carries: bearer token, on-behalf-of, trace context, and a default deadline."""

    def __init__(self, token: str | None, deadline: float | None) -> None:
        self._token = token
        self._deadline = deadline

    def details(self, details: grpc.aio.ClientCallDetails, streaming_response: bool) -> grpc.aio.ClientCallDetails:
        metadata = list(details.metadata or [])
        if self._token and not any(k == "authorization" for k, _ in metadata):
            metadata.append(("authorization", f"Bearer {self._token}"))
        # Inside a service (token or client certificate): the callee authorizes the caller this service works for.
        caller = principal_var.get()
        if caller is not ANONYMOUS_ADMIN and not any(k == ON_BEHALF_OF_HEADER for k, _ in metadata):
            metadata.append((ON_BEHALF_OF_HEADER, caller.header()))
        metadata = inject_metadata(metadata)
        timeout = details.timeout
        if timeout is None and not streaming_response:  # watch streams are long-lived by design
            timeout = self._deadline
        return grpc.aio.ClientCallDetails(details.method, timeout, metadata, details.credentials, details.wait_for_ready)


def _client_span(method: str | bytes) -> Span | None:
    """A CLIENT span for one call, when this process exports spans and the caller has not opened the client span
    itself (the trainer's registration spans its retries): the callee's server span becomes its child."""
    if not spans_are_recorded():
        return None
    current = trace.get_current_span()
    if current.is_recording() and getattr(current, "kind", None) is SpanKind.CLIENT:
        return None
    full = method.decode() if isinstance(method, bytes) else method
    service, _, name = full.lstrip("/").partition("/")
    return _tracer.start_span(
        f"{service}/{name}",
        kind=SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )


def _end(span: Span, code: grpc.StatusCode | None) -> None:
    if code is not None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


# grpc.aio files each interceptor under the first call kind it implements, so one object per kind.
class _UnaryResponse:
    def __init__(self, call: _CallMetadata) -> None:
        self._call = call

    async def _intercept(self, continuation, client_call_details, request):
        span = _client_span(client_call_details.method)
        if span is None:
            return await continuation(self._call.details(client_call_details, False), request)
        with trace.use_span(span, end_on_exit=False):  # the metadata carries this span as the callee's parent
            details = self._call.details(client_call_details, False)
        code: grpc.StatusCode | None = None
        try:
            call = await continuation(details, request)
            try:
                await call
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()  # the caller gets the same error when it awaits the call
            return call
        finally:
            _end(span, code)


class _StreamResponse:
    def __init__(self, call: _CallMetadata) -> None:
        self._call = call

    async def _intercept(self, continuation, client_call_details, request):
        span = _client_span(client_call_details.method)
        if span is None:
            return await continuation(self._call.details(client_call_details, True), request)
        with trace.use_span(span, end_on_exit=False):
            details = self._call.details(client_call_details, True)
        try:
            call = await continuation(details, request)
        except BaseException:
            _end(span, None)
            raise
        call.add_done_callback(lambda _call: _end(span, None))  # the stream's status is only awaitable there
        return call


class _UnaryUnary(_UnaryResponse, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await self._intercept(continuation, client_call_details, request)


class _UnaryStream(_StreamResponse, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await self._intercept(continuation, client_call_details, request)


class _StreamUnary(_UnaryResponse, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await self._intercept(continuation, client_call_details, request_iterator)


class _StreamStream(_StreamResponse, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await self._intercept(continuation, client_call_details, request_iterator)


@dataclass(frozen=True)
class ClientTLS:
    """Outbound TLS settings: PEM file paths.

    TLS is on when `ca` or `cert` is set: `ca` verifies the server (without it, the system roots do);
    `cert` + `key` are this client's identity for servers that require client certificates (mTLS).
    `server_name` overrides the name checked against the server's certificate, for when the address
    dialled is not a name the certificate carries (a port-forward, a mesh, a test CA).
    """

    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("client TLS: a client certificate needs its private key and a key its certificate (set both)")
        if self.server_name and not self.enabled:
            raise ValueError("client TLS: a server-name override needs a CA bundle or a client certificate")

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert)

    @classmethod
    def from_config(cls, config) -> ClientTLS:
        """A service's outbound settings (`--client-tls-ca/-cert/-key`); unreadable files stop the service at start."""
        try:
            tls = cls(config.client_tls_ca, config.client_tls_cert, config.client_tls_key)
            tls.credentials()
        except ValueError as exc:
            raise SystemExit(f"configuration error: {exc}") from None
        return tls

    @classmethod
    def from_env(cls, prefix: str = "NW_", environ: Mapping[str, str] = os.environ, **overrides: str | None) -> ClientTLS:
        """`<prefix>TLS_CA`, `_CERT`, `_KEY`, `_SERVER_NAME` (the CLI and SDK: `NW_TLS_*`); overrides that are not None win."""
        values = {f: environ.get(f"{prefix}TLS_{f.upper()}", "") for f in ("ca", "cert", "key", "server_name")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca, "client TLS CA bundle") if self.ca else None,
            private_key=read_pem(self.key, "client TLS private key") if self.key else None,
            certificate_chain=read_pem(self.cert, "client TLS certificate") if self.cert else None,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def read_pem(path: str, what: str) -> bytes:
    """A PEM file's bytes; ValueError naming `what` when it cannot be read or holds no PEM block (TLS settings
    are checked at start: gRPC itself would only fail at the first handshake)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {path!r} cannot be read: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path!r} is not PEM")
    return data


def channel_options(max_message_bytes: int = 16 * 1024 * 1024) -> list[tuple[str, str | int]]:
    """The channel arguments of every NeuroWeaver client: round_robin, UNAVAILABLE retries, message limits.
    `open_channel` uses them; a synchronous `grpc.Channel` (tests, scripts) takes the same."""
    return [
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def open_channel(
    target: str,
    *,
    token: str | None = None,
    deadline: float | None = DEFAULT_DEADLINE_SECONDS,
    tls: ClientTLS | None = None,
    max_message_bytes: int = 16 * 1024 * 1024,
) -> grpc.aio.Channel:
    """The one way NeuroWeaver code dials a gRPC server: retries, default deadline, bearer token, trace
    context, and TLS/mTLS when `tls` is enabled (plaintext otherwise)."""
    options = channel_options(max_message_bytes)
    call = _CallMetadata(token, deadline)
    interceptors = [_UnaryUnary(call), _UnaryStream(call), _StreamUnary(call), _StreamStream(call)]
    if tls is not None and tls.enabled:
        options += tls.channel_options()
        return grpc.aio.secure_channel(target, tls.credentials(), options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


class ServiceClient:
    """One remote service: `target`, its channel through `open_channel` (UNAVAILABLE retried, `deadline` for calls
    that set none, bearer `token`, on-behalf-of the caller being served, trace context, `tls`), opened on first use
    and shared by its stubs, and `close()` (or `async with`). Subclasses hold the calls and the error mapping."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        deadline: float | None = DEFAULT_DEADLINE_SECONDS,
        tls: ClientTLS | None = None,
    ) -> None:
        self.target = target
        self.deadline = deadline
        self._token = token or None  # "" (an unset setting) sends no authorization header
        self._tls = tls
        self._channel: grpc.aio.Channel | None = None
        self._stubs: dict[type, object] = {}

    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = open_channel(self.target, token=self._token, deadline=self.deadline, tls=self._tls)
        return self._channel

    def stub(self, stub_type: type[StubT]) -> StubT:
        """The generated stub `stub_type` on this client's channel (one per type)."""
        stub = self._stubs.get(stub_type)
        if stub is None:
            stub = self._stubs[stub_type] = stub_type(self.channel())  # type: ignore[call-arg]
        return cast(StubT, stub)

    async def close(self) -> None:
        """Closes the channel if it was opened; a later call opens a new one."""
        channel, self._channel = self._channel, None
        self._stubs.clear()
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
