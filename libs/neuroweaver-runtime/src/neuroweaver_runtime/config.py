"""Service configuration: defaults < `NW_<SVC>_<FIELD>` environment variables < command-line flags.

Each service declares a dataclass deriving from `ServiceConfig`; every field becomes a flag
(`database_url` → `--database-url`) and an environment variable (`NW_REGISTRY_DATABASE_URL`), except the shared
fields a service names in its `unused_settings` (a class attribute): those keep their defaults and are neither
offered by `--help` nor accepted (flag or variable), so a setting the service would ignore fails at start instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")  # any flags dataclass: ServiceConfig's, the trainer worker's WorkerConfig


def default_data_dir() -> str:
    return os.environ.get("NW_DATA_DIR") or str(Path.home() / ".neuroweaver")


@dataclass
class ServiceConfig:
    """Settings every service shares."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0 in containers)"})
    port: int = field(default=0, metadata={"help": "gRPC port (0 = the service's default)"})
    metrics_port: int = field(default=0, metadata={"help": "Prometheus /metrics port (0 = default, -1 = off)"})
    data_dir: str = field(default_factory=default_data_dir, metadata={"help": "embedded-mode data directory"})
    database_url: str = field(default="", metadata={"help": "SQLAlchemy async URL; default SQLite under data dir"})
    auth_tokens: str = field(
        default="",
        metadata={"help": "bearer tokens: a file path or `token=project:role,...`; empty = auth off (embedded)"},
    )
    cert_identities: str = field(
        default="",
        metadata={
            "help": "mTLS client certificates as callers: `common-name=project:role[:subject],...` or a JSON file; "
            "a bearer token, when sent, wins"
        },
    )
    page_token_secret: str = field(
        default="", metadata={"help": "HMAC key for page tokens; required when auth is on (empty = a per-process key)"}
    )
    project_grants: str = field(
        default="",
        metadata={"help": "read grants between projects: `granting=>reader|reader;...` (models and judges only)"},
    )
    max_streams_per_principal: int = field(
        default=256, metadata={"help": "open streaming calls one caller may hold; more get RESOURCE_EXHAUSTED"}
    )
    tls_cert: str = field(default="", metadata={"help": "server certificate (PEM) to serve TLS"})
    tls_key: str = field(default="", metadata={"help": "server private key (PEM)"})
    tls_client_ca: str = field(default="", metadata={"help": "CA bundle; when set, clients must present certificates (mTLS)"})
    # Outbound: every call this service makes to another (registry, deployer, ...) uses these (ClientTLS).
    client_tls_ca: str = field(
        default="", metadata={"help": "CA bundle (PEM) that verifies the services this one calls; set = TLS"}
    )
    client_tls_cert: str = field(default="", metadata={"help": "this service's client certificate (PEM) for mTLS"})
    client_tls_key: str = field(default="", metadata={"help": "private key (PEM) of --client-tls-cert"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING, ERROR"})
    trace_file: str = field(default="", metadata={"help": "write OpenTelemetry spans as JSON lines to this file"})
    otlp_endpoint: str = field(
        default="",
        metadata={
            "help": "OTLP collector for spans, e.g. http://otel-collector:4317 (http:// = plaintext); empty = "
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT, unset = no export"
        },
    )
    max_message_bytes: int = field(default=16 * 1024 * 1024, metadata={"help": "largest request/response"})
    shutdown_grace_seconds: float = field(default=10.0, metadata={"help": "in-flight calls get this long on SIGTERM"})
    shutdown_drain_seconds: float = field(
        default=1.0, metadata={"help": "on SIGTERM, keep serving this long after health turns NOT_SERVING (load balancers react)"}
    )

    def page_token_key(self, service: str) -> bytes:
        """The HMAC key of page tokens. With auth on a configured secret is required: the built-in key of the
        embedded default is public (tokens signed with it are still checked like any other)."""
        if self.page_token_secret:
            return self.page_token_secret.encode()
        if self.auth_tokens or self.cert_identities:
            raise SystemExit("configuration error: page_token_secret is required when auth is on")
        return hashlib.sha256(f"neuroweaver-{service}-page-tokens".encode()).hexdigest().encode()

    def sqlite_default(self, service: str) -> str:
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        return f"sqlite+aiosqlite:///{Path(self.data_dir) / (service + '.db')}"


def load_config(cls: type[T], service: str, argv: list[str] | None = None, *, defaults: dict | None = None) -> T:
    """Builds `cls` from defaults, environment (`NW_<SERVICE>_*`) and flags, in rising precedence."""
    prefix = f"NW_{service.upper()}_"
    values: dict[str, typing.Any] = dict(defaults or {})
    hints = typing.get_type_hints(cls)
    unused: frozenset[str] = getattr(cls, "unused_settings", frozenset())
    settings = [f for f in dataclasses.fields(cls) if f.name not in unused]
    for name in sorted(unused):
        if os.environ.get(prefix + name.upper()) is not None:
            raise SystemExit(f"configuration error: {prefix}{name.upper()} is set, but {service} has no {name} setting")
    for f in settings:
        env = os.environ.get(prefix + f.name.upper())
        if env is not None:
            values[f.name] = _coerce(hints[f.name], env, f.name)
    parser = argparse.ArgumentParser(prog=f"python -m neuroweaver_{service}", description=f"NeuroWeaver {service} service")
    for f in settings:
        kind = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} [env {prefix}{f.name.upper()}]"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text)
    args = parser.parse_args(argv)
    for key, value in vars(args).items():
        if value is not None:
            values[key] = value
    return cls(**values)


def _base_type(hint: typing.Any) -> type:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint if hint in (int, float, bool) else str


def _coerce(hint: typing.Any, raw: str, name: str) -> typing.Any:
    kind = _base_type(hint)
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise SystemExit(f"configuration error: {name} expects a boolean, got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise SystemExit(f"configuration error: {name} expects {kind.__name__}, got {raw!r}") from None
