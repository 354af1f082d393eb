"""open_channel balances round_robin over every address of a multi-address target, in plaintext and with mTLS.

Two servers share one port on 127.0.0.1 and 127.0.0.2 (a headless Service's shape: one name, one address per pod);
each counts the calls it answered. With TLS the name checked against the certificates is the target's authority:
`dns:///name:port` checks `name`, while a static `ipv4:a:p,b:p` list has no host name, so it needs
`ClientTLS.server_name` (`NW_TLS_SERVER_NAME` for the CLI/SDK), as a port-forward does.
"""

from __future__ import annotations

import socket

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from neuroweaver_runtime.client import ClientTLS, open_channel
from neuroweaver_runtime.testing import TestCA, free_port

CALLS = 20
HOSTS = ("127.0.0.1", "127.0.0.2")


def _second_loopback_bindable() -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOSTS[1], 0))
        except OSError:
            return False
    return True


pytestmark = pytest.mark.skipif(not _second_loopback_bindable(), reason="127.0.0.2 cannot be bound here")


class _Counting(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self.calls = 0

    async def intercept_service(self, continuation, handler_call_details):
        self.calls += 1
        return await continuation(handler_call_details)


async def _replicas(port: int, credentials: grpc.ServerCredentials | None):
    servers, counters = [], []
    for host in HOSTS:
        counter = _Counting()
        server = grpc.aio.server(interceptors=[counter])
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        if credentials is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", credentials)
        assert bound == port, f"{host}:{port} did not bind"
        await server.start()
        servers.append(server)
        counters.append(counter)
    return servers, counters


async def _call_all(target: str, tls: ClientTLS | None = None) -> None:
    channel = open_channel(target, tls=tls, deadline=5)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(CALLS):
            await stub.Check(health_pb2.HealthCheckRequest())
    finally:
        await channel.close()


def _target(port: int) -> str:
    return "ipv4:" + ",".join(f"{h}:{port}" for h in HOSTS)


async def test_plaintext_calls_spread_over_every_address():
    port = free_port()
    servers, counters = await _replicas(port, None)
    try:
        await _call_all(_target(port))
    finally:
        for s in servers:
            await s.stop(None)
    served = [c.calls for c in counters]
    assert sum(served) == CALLS and min(served) >= CALLS // 4, served


async def test_mtls_over_a_multi_address_target_checks_the_server_name(tmp_path):
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("registry", hosts=("neuroweaver-registry-headless",))
    client_cert, client_key = ca.issue("client", server=False)
    credentials = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())], root_certificates=ca.cert.read_bytes(), require_client_auth=True
    )
    port = free_port()
    servers, counters = await _replicas(port, credentials)
    tls = ClientTLS(ca=str(ca.cert), cert=str(client_cert), key=str(client_key))
    try:
        # No host name in an address list: the certificate cannot match, every address fails the handshake.
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await _call_all(_target(port), tls)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert [c.calls for c in counters] == [0, 0]
        # With the name the certificate carries (the headless Service's), both replicas serve.
        named = ClientTLS(ca=tls.ca, cert=tls.cert, key=tls.key, server_name="neuroweaver-registry-headless")
        await _call_all(_target(port), named)
    finally:
        for s in servers:
            await s.stop(None)
    served = [c.calls for c in counters]
    assert sum(served) == CALLS and min(served) >= CALLS // 4, served
