"""Server-side TLS, one definition for every NeuroWeaver server: the services' gRPC port (`GrpcService`), the model
server's gRPC, HTTPS and ops ports, and the deployer's router.

`ServerTLS` holds the PEM paths every server takes (`--tls-cert`, `--tls-key`, `--tls-client-ca`) and turns them
into gRPC server credentials or an `ssl.SSLContext` for HTTPS, so both check the same files the same way. The
outbound half is `neuroweaver_runtime.client.ClientTLS`; `client_ssl_context` gives it to HTTP clients (aiohttp).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import grpc

from .client import ClientTLS, read_pem


@dataclass(frozen=True)
class ServerTLS:
    """PEM paths a server presents (`cert`, `key`) and, for mTLS, the CA its clients' certificates must chain to.
    All empty: plaintext."""

    cert: str = ""
    key: str = ""
    client_ca: str = ""

    def __post_init__(self) -> None:
        # A client CA without a certificate must not quietly serve plaintext.
        if (self.cert or self.key or self.client_ca) and not (self.cert and self.key):
            raise ValueError("server TLS needs both tls_cert and tls_key (tls_client_ca alone cannot turn on mTLS)")

    @classmethod
    def from_config(cls, config) -> ServerTLS:
        """A config's `tls_cert`, `tls_key` and `tls_client_ca`. Settings that cannot work (half a pair, a file that
        cannot be read or holds no PEM) stop the server at start: gRPC itself would only fail at the first handshake."""
        try:
            tls = cls(config.tls_cert, config.tls_key, config.tls_client_ca)
            if tls.enabled:
                tls.grpc_credentials()
        except ValueError as exc:
            raise SystemExit(f"configuration error: {exc}") from None
        return tls

    @property
    def enabled(self) -> bool:
        return bool(self.cert)

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(read_pem(self.key, "server TLS private key"), read_pem(self.cert, "server TLS certificate"))],
            root_certificates=read_pem(self.client_ca, "server TLS client CA bundle") if self.mutual else None,
            require_client_auth=self.mutual,
        )

    def ssl_context(self, *, require_client_cert: bool = True) -> ssl.SSLContext:
        """HTTPS context; with a client CA, clients must present a certificate unless `require_client_cert` is off
        (an ops port: kubelet probes and Prometheus scrapes carry none, and it serves no inference)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        if self.mutual and require_client_cert:
            ctx.load_verify_locations(cafile=self.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def client_ssl_context(tls: ClientTLS) -> ssl.SSLContext | None:
    """An HTTP client's view of a `ClientTLS` (same CA, same client certificate as its gRPC calls): None when TLS is
    off (plain http://)."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert:
        ctx.load_cert_chain(tls.cert, tls.key)
    return ctx
