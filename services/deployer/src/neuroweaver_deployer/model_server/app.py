"""Composition root of the model server: config → use cases → gRPC servicer (shared runtime server) + HTTP app.

Health stays NOT_SERVING (overall and for `neuroweaver.inference.v1.InferenceService`) until the model is
loaded: the shared `GrpcService` runs `ready()` (start HTTP, load the model) after the port is bound and
flips health to SERVING only when it returns. `/metrics` is served on the HTTP port, next to the OpenAI API.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from neuroweaver.inference.v1 import inference_service_pb2_grpc as svc_grpc
from neuroweaver_runtime.config import ServiceConfig
from neuroweaver_runtime.server import GrpcService, ServiceDefinition

from .domain import Limits, ServedModel, validate_served_name
from .http_api import OpenAIApi
from .service import InferenceService, LoadSpec
from .servicer import METHOD_ROLES, InferenceServicer

SERVICE_NAME = "neuroweaver.inference.v1.InferenceService"
ERROR_DOMAIN = "inference.neuroweaver.v1"


@dataclass
class ModelServerConfig(ServiceConfig):
    grpc_port: int = field(default=50051, metadata={"help": "gRPC port (0 = any free port)"})
    http_port: int = field(default=8080, metadata={"help": "HTTP port: OpenAI API, /metrics, /healthz (0 = any free port)"})
    base_model: str = field(default="", metadata={"help": "base model: builtin:<name>, a local dir or a file:// URI"})
    served_model_name: str = field(default="", metadata={"help": "name clients address the model by (unique per version)"})
    model_version: str = field(default="", metadata={"help": "registry version served (full resource name)"})
    adapter_uri: str = field(default="", metadata={"help": "LoRA adapter directory (file:// URI or path)"})
    adapter_sha256: str = field(default="", metadata={"help": "expected sha256 of the adapter (checked before loading)"})
    load_in_4bit: bool = field(default=False, metadata={"help": "load the base in 4-bit NF4 (bitsandbytes)"})
    max_queue: int = field(default=64, metadata={"help": "bounded request queue; full → RESOURCE_EXHAUSTED"})
    max_new_tokens_limit: int = field(default=1024, metadata={"help": "largest max_tokens a request may ask for"})
    max_batch_size: int = field(default=8, metadata={"help": "requests decoded together"})
    die_with_parent: bool = field(default=False, metadata={"help": "exit when the process that started it dies (local replicas)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})


class ModelServer:
    """The running pieces, exposed for in-process tests."""

    def __init__(self, config: ModelServerConfig) -> None:
        if not config.base_model:
            raise SystemExit("configuration error: --base-model is required")
        if config.adapter_uri and not config.adapter_sha256:
            raise SystemExit("configuration error: --adapter-uri needs --adapter-sha256")
        if min(config.max_queue, config.max_new_tokens_limit, config.max_batch_size) < 1:
            raise SystemExit("configuration error: --max-queue, --max-new-tokens-limit and --max-batch-size must be >= 1")
        name = validate_served_name(config.served_model_name or "model")
        self.config = config
        self.service = InferenceService(
            ServedModel(name, config.model_version, config.base_model, config.adapter_sha256, config.load_in_4bit),
            Limits(config.max_new_tokens_limit, config.max_queue, config.max_batch_size),
        )
        self.load_spec = LoadSpec(
            config.base_model, config.adapter_uri, config.adapter_sha256, config.load_in_4bit, config.device
        )
        self.http_runner: web.AppRunner | None = None
        self.http_port = config.http_port
        config.metrics_port = -1  # /metrics lives on the HTTP port
        config.port = config.grpc_port
        definition = ServiceDefinition(
            name="model-server",
            full_names=[SERVICE_NAME],
            error_domain=ERROR_DOMAIN,
            method_roles=METHOD_ROLES,
            add_servicers=lambda server: svc_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(self.service), server),
            ready=self._ready,
            on_stop=[self._close],
        )
        self.grpc = GrpcService(definition, config, default_port=config.grpc_port, default_metrics_port=-1)

    async def start_http(self) -> int:
        runner = web.AppRunner(
            OpenAIApi(self.service).app(), access_log=None, shutdown_timeout=self.config.shutdown_grace_seconds
        )
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.http_port, reuse_address=True)
        await site.start()
        self.http_runner = runner
        self.http_port = runner.addresses[0][1]
        return self.http_port

    async def _ready(self) -> None:
        if self.http_runner is None:
            await self.start_http()
        await self.service.load(self.load_spec)

    async def _close(self) -> None:
        self.service.stop()
        if self.http_runner is not None:
            await self.http_runner.cleanup()
            self.http_runner = None

    async def start(self) -> int:
        return await self.grpc.start()

    async def stop(self) -> None:
        await self.grpc.stop()
