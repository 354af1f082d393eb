"""Composition root of the model server: config → use cases → gRPC servicer (shared runtime server) + HTTP apps.

Health stays NOT_SERVING (overall and for `neuroweaver.inference.v1.InferenceService`) until the model is
loaded: the shared `GrpcService` runs `ready()` (start HTTP, load the model) after the port is bound and
flips health to SERVING only when it returns.

Three ports: gRPC, the OpenAI-compatible HTTP API, and the ops port (`/metrics`, `/healthz`), so scrapes and
probes never share a port with inference traffic. With `--auth-tokens` (the platform's token table, as every
service takes it) gRPC inference and the HTTP API need a bearer token valid for `--project` with at least the
viewer role; health and the ops port stay open. With `--tls-cert/--tls-key` all three ports speak TLS; with
`--tls-client-ca` gRPC and the API require client certificates (the ops port does not: probes carry none).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from aiohttp import web
from opentelemetry import trace

from neuroweaver.inference.v1 import inference_service_pb2_grpc as svc_grpc
from neuroweaver_runtime import telemetry
from neuroweaver_runtime.auth import TokenAuthenticator
from neuroweaver_runtime.config import ServiceConfig
from neuroweaver_runtime.names import project_of
from neuroweaver_runtime.server import GrpcService, ServiceDefinition
from neuroweaver_runtime.tls import ServerTLS

from .adapters.loading import LoadSpec, check_spec
from .api.openai_http import OpenAIApi
from .api.servicer import METHOD_ROLES, InferenceServicer
from .domain import Limits, ServedModel, parse_extra_versions, parse_stable_names, validate_served_name
from .service import InferenceService

SERVICE_NAME = "neuroweaver.inference.v1.InferenceService"
ERROR_DOMAIN = "inference.neuroweaver.v1"
DEFAULT_GRPC_PORT = 50060  # the control plane's services hold 50051-50054 (README's port table)
DEFAULT_HTTP_PORT = 8080
DEFAULT_METRICS_PORT = 9460
DEFAULT_PROJECT = "default"
_tracer = trace.get_tracer("neuroweaver.model_server")


@dataclass
class ModelServerConfig(ServiceConfig):
    # Shared settings the model server has no use for (no database, no page tokens, no calls to other services, no
    # resource references to grant): not offered as flags, so passing one fails at start. `port` is `--grpc-port`.
    unused_settings: ClassVar[frozenset[str]] = frozenset(
        {"port", "data_dir", "database_url", "page_token_secret", "project_grants", "client_tls_ca", "client_tls_cert",
         "client_tls_key"}
    )  # fmt: skip
    grpc_port: int = field(default=DEFAULT_GRPC_PORT, metadata={"help": "gRPC port (0 = any free port)"})
    http_port: int = field(default=DEFAULT_HTTP_PORT, metadata={"help": "HTTP port: OpenAI API and /healthz (0 = any free port)"})
    metrics_port: int = field(
        default=DEFAULT_METRICS_PORT,
        metadata={"help": "ops port: Prometheus /metrics and /healthz, apart from the API (0 = any free port, -1 = off)"},
    )
    project: str = field(
        default="",
        metadata={"help": "project whose callers may use this server when auth is on (default: --model-version's project)"},
    )
    base_model: str = field(default="", metadata={"help": "base model: builtin:<name>, a local dir or a file:// URI"})
    served_model_name: str = field(
        default="", metadata={"help": "name unique to this version and its weights (accepted; naming it pins the version)"}
    )
    model_names: str = field(
        default="",
        metadata={
            "help": "comma-separated stable names also accepted, the same on every version the deployment rolls over "
            "to (first = default), e.g. projects/p/deployments/d,d,m@production"
        },
    )
    model_version: str = field(default="", metadata={"help": "registry version served (full resource name)"})
    adapter_uri: str = field(default="", metadata={"help": "LoRA adapter directory (file:// URI or path)"})
    adapter_sha256: str = field(default="", metadata={"help": "expected sha256 of the adapter (checked before loading)"})
    extra_versions: str = field(
        default="",
        metadata={
            "help": "more versions served on the same base (multi-LoRA), a JSON list of {served_model_name, "
            "model_version, model_names, adapter_uri, adapter_sha256}; requests pick one by model name; one version "
            "(this one or an extra) may have no adapter: it is the base itself"
        },
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "load the base in 4-bit NF4 (bitsandbytes)"})
    max_queue: int = field(default=64, metadata={"help": "bounded request queue; full → RESOURCE_EXHAUSTED"})
    max_new_tokens_limit: int = field(default=1024, metadata={"help": "largest max_tokens a request may ask for"})
    max_batch_size: int = field(default=8, metadata={"help": "requests decoded together"})
    die_with_parent: bool = field(default=False, metadata={"help": "exit when the process that started it dies (local replicas)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    engine: str = field(
        default="auto",
        metadata={
            "help": "decoding engine: transformers, llama.cpp (GGUF base + GGUF LoRA, CPU), vllm (CUDA) or auto "
            "(CUDA: vllm if installed, else transformers; CPU: llama.cpp when the base has a GGUF and the adapter, if "
            "any, is a GGUF LoRA, else transformers)"
        },
    )
    threads: int = field(default=0, metadata={"help": "llama.cpp engine: CPU threads (0 = every core it may use)"})
    context_length: int = field(
        default=0,
        metadata={
            "help": "llama.cpp engine: tokens (prompt + completion) per request; each of --max-batch-size parallel "
            "requests has a KV cache this long (0 = the model's context, at most 2048)"
        },
    )
    # A generation takes seconds to minutes, not the control plane's sub-second calls: longer shutdown defaults.
    # Kubernetes pods get terminationGracePeriodSeconds above drain + grace (manifests.py).
    shutdown_grace_seconds: float = field(
        default=30.0, metadata={"help": "on SIGTERM, in-flight generations (unary and streams, gRPC and HTTP) get this long"}
    )
    shutdown_drain_seconds: float = field(
        default=5.0,
        metadata={
            "help": "on SIGTERM, keep serving this long after readiness turns NOT_SERVING, so Kubernetes endpoints drop "
            "the pod first (what a preStop sleep would do); 0 when a router already drained it (local replicas)"
        },
    )


class ModelServer:
    """The running pieces, exposed for in-process tests."""

    def __init__(self, config: ModelServerConfig) -> None:
        if not config.base_model:
            raise SystemExit("configuration error: --base-model is required")
        if config.adapter_uri and not config.adapter_sha256:
            raise SystemExit("configuration error: --adapter-uri needs --adapter-sha256")
        ports = [p for p in (config.grpc_port, config.http_port, config.metrics_port) if p > 0]
        if len(set(ports)) != len(ports):
            raise SystemExit("configuration error: --grpc-port, --http-port and --metrics-port must differ")
        if config.grpc_port < 0 or config.http_port < 0 or config.metrics_port < -1:
            raise SystemExit("configuration error: ports must be >= 0 (--metrics-port -1 = no ops port)")
        if config.threads < 0 or config.context_length < 0:
            raise SystemExit("configuration error: --threads and --context-length must be >= 0 (0 = the default)")
        if min(config.max_queue, config.max_new_tokens_limit, config.max_batch_size) < 1:
            raise SystemExit("configuration error: --max-queue, --max-new-tokens-limit and --max-batch-size must be >= 1")
        try:
            name = validate_served_name(config.served_model_name or "model")
            stable_names = parse_stable_names(config.model_names)
            extra = parse_extra_versions(config.extra_versions)
        except ValueError as exc:
            raise SystemExit(f"configuration error: {exc}") from None
        if extra and config.adapter_sha256 and not config.adapter_uri:  # a digest names an adapter (see adapter_name)
            raise SystemExit("configuration error: --adapter-sha256 needs --adapter-uri")
        self.tls = ServerTLS.from_config(config)  # HTTPS and the ops port; gRPC reads the same settings
        try:
            self.authenticator = TokenAuthenticator.from_setting(config.auth_tokens)
        except (ValueError, KeyError, OSError) as exc:  # OSError/KeyError: an unreadable or malformed token file
            raise SystemExit(f"configuration error: {exc}") from None
        self.project = config.project or project_of(config.model_version) or DEFAULT_PROJECT
        self.config = config
        extra_served = tuple(
            ServedModel(
                e.served_model_name, e.model_version, config.base_model, e.adapter_sha256, config.load_in_4bit, e.model_names
            )
            for e in extra
        )
        try:
            self.service = InferenceService(
                ServedModel(
                    name, config.model_version, config.base_model, config.adapter_sha256, config.load_in_4bit, stable_names
                ),
                Limits(config.max_new_tokens_limit, config.max_queue, config.max_batch_size),
                extra_served,
            )
        except ValueError as exc:  # a name given to two versions
            raise SystemExit(f"configuration error: {exc}") from None
        self.load_spec = LoadSpec(
            config.base_model,
            config.adapter_uri,
            config.adapter_sha256,
            config.load_in_4bit,
            config.device,
            config.engine,
            config.threads,
            config.context_length,
            tuple((e.adapter_uri, e.adapter_sha256) for e in extra),
        )
        try:
            self.engine_name = check_spec(self.load_spec)  # refused combinations fail at start, before loading
        except ValueError as exc:
            raise SystemExit(f"configuration error: {exc}") from None
        self.api = OpenAIApi(self.service, self.authenticator, self.project, stopping=lambda: self.grpc.stopping)
        self.http_runner: web.AppRunner | None = None
        self.ops_runner: web.AppRunner | None = None
        self.http_port = config.http_port
        self.metrics_port = config.metrics_port
        definition = ServiceDefinition(
            name="model-server",
            full_names=[SERVICE_NAME],
            error_domain=ERROR_DOMAIN,
            method_roles=METHOD_ROLES,
            add_servicers=lambda server: svc_grpc.add_InferenceServiceServicer_to_server(
                InferenceServicer(self.service, self.project), server
            ),
            ready=self._ready,
            on_stop=[self._close],
            finite_streams=frozenset({f"/{SERVICE_NAME}/GenerateStream"}),
            close_listeners=[self._close_api],
        )
        # The shared server listens on --grpc-port; its own metrics listener stays off (the ops port serves /metrics).
        grpc_config = dataclasses.replace(config, port=config.grpc_port, metrics_port=-1)
        self.grpc = GrpcService(definition, grpc_config, default_port=config.grpc_port, default_metrics_port=-1)

    async def _serve(self, app: web.Application, port: int, *, require_client_cert: bool) -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.config.shutdown_grace_seconds)
        await runner.setup()
        ssl_context = self.tls.ssl_context(require_client_cert=require_client_cert) if self.tls.enabled else None
        site = web.TCPSite(runner, self.config.host, port, reuse_address=True, ssl_context=ssl_context)
        await site.start()
        return runner, runner.addresses[0][1]

    async def start_http(self) -> int:
        self.http_runner, self.http_port = await self._serve(self.api.app(), self.config.http_port, require_client_cert=True)
        if self.metrics_port >= 0:
            self.ops_runner, self.metrics_port = await self._serve(
                self.api.ops_app(), self.metrics_port, require_client_cert=False
            )
        return self.http_port

    async def _ready(self) -> None:
        if self.http_runner is None:
            await self.start_http()
        # A replica the deployer started loads under the deployer's span (TRACEPARENT): the rollout's trace shows it.
        with _tracer.start_as_current_span(
            "ModelServer/load",
            context=telemetry.context_from_environment(),
            attributes={"neuroweaver.model_version": self.config.model_version, "neuroweaver.base_model": self.config.base_model},
        ):  # fmt: skip
            await self.service.load(self.load_spec)

    async def _close_api(self, grace: float) -> None:
        """Alongside the gRPC server's stop: the API port stops accepting, in-flight completions (SSE streams
        included) finish within the runner's shutdown_timeout (the grace period)."""
        if self.http_runner is not None:
            await self.http_runner.cleanup()
            self.http_runner = None

    async def _close(self) -> None:
        self.service.stop()
        if self.ops_runner is not None:  # the ops port (probes, scrapes) answers until the very end
            await self.ops_runner.cleanup()
            self.ops_runner = None

    async def start(self) -> int:
        return await self.grpc.start()

    async def stop(self) -> None:
        await self.grpc.stop()
