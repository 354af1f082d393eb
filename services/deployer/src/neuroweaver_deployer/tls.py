"""TLS of the model-server hop, shared by the model server (serving) and the deployer's router (serving to callers,
dialling replicas).

Server side: the same PEM settings every service takes (`--tls-cert`, `--tls-key`, `--tls-client-ca`), for gRPC and
for HTTPS. Client side: the runtime's one outbound configuration (`neuroweaver_runtime.client.ClientTLS`), turned
into an `ssl.SSLContext` for aiohttp here, so gRPC and HTTP calls to a replica check the same CA and present the
same client certificate.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from neuroweaver_runtime.client import ClientTLS


@dataclass(frozen=True)
class ServerTLS:
    """PEM paths a server presents (`cert`, `key`) and, for mTLS, the CA its clients' certificates must chain to."""

    cert: str = ""
    key: str = ""
    client_ca: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("server TLS: a certificate needs its private key and a key its certificate (set both)")
        if self.client_ca and not self.cert:
            raise ValueError("server TLS: a client CA (mTLS) needs a server certificate and key")

    @classmethod
    def from_config(cls, config) -> ServerTLS:
        """A service config's `tls_cert`, `tls_key` and `tls_client_ca`."""
        return cls(config.tls_cert, config.tls_key, config.tls_client_ca)

    @property
    def enabled(self) -> bool:
        return bool(self.cert)

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
            root_certificates=Path(self.client_ca).read_bytes() if self.client_ca else None,
            require_client_auth=self.mutual,
        )

    def ssl_context(self, *, require_client_cert: bool = True) -> ssl.SSLContext:
        """HTTPS context; with a client CA, clients must present a certificate unless `require_client_cert` is off
        (the model server's ops port: kubelet probes and Prometheus scrapes carry none, and it serves no inference)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        if self.client_ca and require_client_cert:
            ctx.load_verify_locations(cafile=self.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def client_ssl_context(tls: ClientTLS) -> ssl.SSLContext | None:
    """aiohttp's view of a `ClientTLS`: None when TLS is off (plain http://)."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert:
        ctx.load_cert_chain(tls.cert, tls.key)
    return ctx
