"""Outbound TLS (ClientTLS + open_channel) against the shared server bootstrap with TLS and mTLS on.

Certificates come from a throw-away CA (neuroweaver_runtime.testing.TestCA); a second, unrelated CA
issues the certificates that must be refused.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver_runtime.client import ClientTLS, open_channel
from neuroweaver_runtime.config import ServiceConfig, load_config
from neuroweaver_runtime.server import GrpcService, ServiceDefinition
from neuroweaver_runtime.testing import TestCA

SERVICE = "neuroweaver.test.v1.TlsProbe"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca, other = TestCA(root / "ca"), TestCA(root / "other", name="unrelated CA")
    return {
        "ca": ca,
        "server": ca.issue("server", client=False),
        "named": ca.issue("named", hosts=("registry.neuroweaver.internal",), client=False),
        "client": ca.issue("client", server=False),
        "other_ca": other,
        "stranger": other.issue("stranger", server=False),
    }


async def _serve(tmp_path, cert, key, client_ca="") -> GrpcService:
    return await _serve_config(tmp_path, tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(client_ca))


async def _serve_config(tmp_path, **tls) -> GrpcService:
    config = ServiceConfig(port=0, metrics_port=-1, data_dir=str(tmp_path), **tls)
    definition = ServiceDefinition(
        name="tls-probe", full_names=[SERVICE], error_domain="test.neuroweaver.v1", method_roles={}, add_servicers=lambda s: None
    )
    service = GrpcService(definition, config, default_port=0, default_metrics_port=-1)
    await service.start()
    return service


async def _check(port: int, tls: ClientTLS | None) -> grpc.StatusCode:
    async with open_channel(f"127.0.0.1:{port}", tls=tls, deadline=5.0) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE))
        except grpc.aio.AioRpcError as err:
            return err.code()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return grpc.StatusCode.OK


async def test_mtls_accepts_its_clients_and_refuses_everyone_else(pki, tmp_path):
    ca = str(pki["ca"].cert)
    service = await _serve(tmp_path, *pki["server"], client_ca=ca)
    try:
        cert, key = pki["client"]
        assert await _check(service.port, ClientTLS(ca=ca, cert=str(cert), key=str(key))) == grpc.StatusCode.OK
        # Refused during the handshake: the call never reaches a handler, so the code is UNAVAILABLE.
        assert await _check(service.port, None) == grpc.StatusCode.UNAVAILABLE  # plaintext
        assert await _check(service.port, ClientTLS(ca=ca)) == grpc.StatusCode.UNAVAILABLE  # no client certificate
        stranger, stranger_key = pki["stranger"]
        assert (
            await _check(service.port, ClientTLS(ca=ca, cert=str(stranger), key=str(stranger_key))) == grpc.StatusCode.UNAVAILABLE
        )
        # and the client refuses a server its CA bundle does not vouch for
        other = str(pki["other_ca"].cert)
        assert await _check(service.port, ClientTLS(ca=other, cert=str(cert), key=str(key))) == grpc.StatusCode.UNAVAILABLE
    finally:
        await service.stop()


async def test_server_name_override_verifies_a_certificate_issued_for_another_name(pki, tmp_path):
    service = await _serve(tmp_path, *pki["named"])  # TLS without client certificates
    try:
        ca = str(pki["ca"].cert)
        assert await _check(service.port, ClientTLS(ca=ca)) == grpc.StatusCode.UNAVAILABLE  # 127.0.0.1 is not in its SANs
        named = ClientTLS(ca=ca, server_name="registry.neuroweaver.internal")
        assert await _check(service.port, named) == grpc.StatusCode.OK
    finally:
        await service.stop()


def test_service_settings_come_from_env_and_flags(monkeypatch, pki):
    cert, key = pki["client"]
    monkeypatch.setenv("NW_PROBE_CLIENT_TLS_CA", str(pki["ca"].cert))
    config = load_config(ServiceConfig, "probe", ["--client-tls-cert", str(cert), "--client-tls-key", str(key)])
    assert ClientTLS.from_config(config) == ClientTLS(ca=str(pki["ca"].cert), cert=str(cert), key=str(key))
    assert not ClientTLS.from_config(ServiceConfig()).enabled  # nothing set: plaintext


def test_bad_settings_stop_a_service_at_start_with_a_clear_message(pki, tmp_path):
    cert, key = pki["client"]
    (tmp_path / "not-pem.txt").write_text("hello")
    cases = {
        "needs its private key": ServiceConfig(client_tls_ca=str(pki["ca"].cert), client_tls_cert=str(cert)),
        "client TLS CA bundle '.*' cannot be read": ServiceConfig(client_tls_ca=str(tmp_path / "missing.pem")),
        "is not PEM": ServiceConfig(client_tls_ca=str(tmp_path / "not-pem.txt")),
    }
    for message, config in cases.items():
        with pytest.raises(SystemExit, match=message):
            ClientTLS.from_config(config)
    with pytest.raises(ValueError, match="server-name override needs"):
        ClientTLS(server_name="registry")


async def test_server_settings_that_cannot_work_stop_it_instead_of_serving_plaintext(pki, tmp_path):
    cert, key = pki["server"]
    ca = str(pki["ca"].cert)
    cases = {
        "needs both tls_cert and tls_key": dict(tls_client_ca=ca),  # mTLS asked for, no certificate
        "needs both": dict(tls_cert=str(cert)),
        "server TLS client CA bundle '.*' cannot be read": dict(
            tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(tmp_path / "missing.pem")
        ),
    }
    for message, settings in cases.items():
        with pytest.raises(SystemExit, match=message):
            await _serve_config(tmp_path, **settings)


def test_cli_environment_and_overrides():
    env = {"NW_TLS_CA": "/etc/nw/ca.pem", "NW_TLS_CERT": "/etc/nw/me.pem", "NW_TLS_KEY": "/etc/nw/me-key.pem"}
    assert ClientTLS.from_env("NW_", env) == ClientTLS("/etc/nw/ca.pem", "/etc/nw/me.pem", "/etc/nw/me-key.pem")
    assert ClientTLS.from_env("NW_", env, ca="/tmp/other.pem", cert=None).ca == "/tmp/other.pem"
    assert not ClientTLS.from_env("NW_", {}).enabled


async def test_server_tls_over_https_checks_the_same_client_certificates_as_grpc(pki, tmp_path):
    """ServerTLS.ssl_context (the model server's HTTPS, the router) with client_ssl_context on the other end: the
    same CA and client certificate as the gRPC side; the ops-port variant asks for no client certificate."""
    import asyncio
    import ssl

    from neuroweaver_runtime.tls import ServerTLS, client_ssl_context

    ca = str(pki["ca"].cert)
    cert, key = pki["server"]
    tls = ServerTLS.from_config(ServiceConfig(tls_cert=str(cert), tls_key=str(key), tls_client_ca=ca))
    assert tls.mutual and client_ssl_context(ClientTLS()) is None  # TLS off: plain http://

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await reader.readexactly(4))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # a refused handshake
        finally:
            writer.close()

    async def answered(server_ctx: ssl.SSLContext, client: ClientTLS) -> bool:
        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            # With TLS 1.3 the server checks the client certificate after the client's handshake: read an answer.
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl_context(client))
            writer.write(b"ping")
            return await reader.read(4) == b"ping"
        except (ConnectionError, ssl.SSLError):
            return False
        finally:
            server.close()

    client_cert, client_key = pki["client"]
    stranger, stranger_key = pki["stranger"]
    mine = ClientTLS(ca=ca, cert=str(client_cert), key=str(client_key))
    assert await answered(tls.ssl_context(), mine)
    assert not await answered(tls.ssl_context(), ClientTLS(ca=ca))  # no client certificate
    assert not await answered(tls.ssl_context(), ClientTLS(ca=ca, cert=str(stranger), key=str(stranger_key)))
    assert not await answered(
        tls.ssl_context(), ClientTLS(ca=str(pki["other_ca"].cert), cert=str(client_cert), key=str(client_key))
    )
    assert await answered(tls.ssl_context(require_client_cert=False), ClientTLS(ca=ca))  # an ops port
