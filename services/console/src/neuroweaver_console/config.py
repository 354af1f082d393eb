"""Console settings: defaults < `NW_CONSOLE_*` environment variables < flags (neuroweaver_runtime.config)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PORT = 8090
DEFAULT_METRICS_PORT = 9456


@dataclass
class ConsoleConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0 in containers)"})
    port: int = field(default=DEFAULT_PORT, metadata={"help": "HTTP port of the console (0 = any free port)"})
    metrics_port: int = field(
        default=DEFAULT_METRICS_PORT,
        metadata={"help": "ops port: Prometheus /metrics and /healthz (0 = any free port, -1 = off)"},
    )
    project: str = field(default="default", metadata={"help": "the project whose resources the console shows"})
    registry_target: str = field(default="127.0.0.1:50051", metadata={"help": "registry gRPC address"})
    trainer_target: str = field(default="127.0.0.1:50052", metadata={"help": "trainer gRPC address"})
    deployer_target: str = field(default="127.0.0.1:50053", metadata={"help": "deployer gRPC address"})
    experiments_target: str = field(default="127.0.0.1:50054", metadata={"help": "experiments gRPC address"})
    client_tls_ca: str = field(default="", metadata={"help": "CA bundle (PEM) verifying the services; set = TLS"})
    client_tls_cert: str = field(default="", metadata={"help": "client certificate (PEM) for services requiring mTLS"})
    client_tls_key: str = field(default="", metadata={"help": "private key (PEM) of --client-tls-cert"})
    client_tls_server_name: str = field(
        default="", metadata={"help": "name checked against the services' certificates (when the address is not one)"}
    )
    tls_cert: str = field(default="", metadata={"help": "certificate (PEM) to serve the console over HTTPS"})
    tls_key: str = field(default="", metadata={"help": "private key (PEM) of --tls-cert"})
    token: str = field(
        default="",
        metadata={"help": "bearer token used when the browser has not logged in (empty = none; services with auth off)"},
    )
    assets_dir: str = field(
        default="",
        metadata={"help": "the node_modules with the npm files the pages load (empty = found above the package or the cwd)"},
    )
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING, ERROR"})
    rpc_deadline_seconds: float = field(default=10.0, metadata={"help": "deadline of each unary call to a service"})
