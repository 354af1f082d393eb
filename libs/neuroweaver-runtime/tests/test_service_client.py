"""ServiceClient, the base of every outbound client: what its calls carry, its stubs, its channel's life."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from neuroweaver_runtime.auth import ON_BEHALF_OF_HEADER, acting_as, parse_principal
from neuroweaver_runtime.client import ServiceClient


class _RecordingHealth(health.aio.HealthServicer):
    """Health that remembers each Check's metadata and remaining deadline."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[dict[str, str], float | None]] = []

    async def Check(self, request, context):
        self.calls.append((dict(context.invocation_metadata()), context.time_remaining()))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
async def server():
    servicer = _RecordingHealth()
    srv = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    yield f"127.0.0.1:{port}", servicer
    await srv.stop(None)


async def test_calls_carry_token_caller_and_default_deadline(server):
    target, servicer = server
    async with ServiceClient(target, token="svc", deadline=5.0) as client:
        stub = client.stub(health_pb2_grpc.HealthStub)
        assert client.stub(health_pb2_grpc.HealthStub) is stub  # one stub per type, on one channel
        with acting_as(parse_principal("a:operator:alice")):
            await stub.Check(health_pb2.HealthCheckRequest())
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=60)  # a call's own deadline wins
    (acting, remaining), (own, own_remaining) = servicer.calls
    assert acting["authorization"] == "Bearer svc" and own["authorization"] == "Bearer svc"
    assert "alice" in acting[ON_BEHALF_OF_HEADER] and ON_BEHALF_OF_HEADER not in own
    assert remaining is not None and 0 < remaining <= 5.5  # gRPC rounds deadlines up a little
    assert own_remaining is not None and 30 < own_remaining <= 61


async def test_no_token_sends_no_authorization_and_close_lets_a_later_call_reopen(server):
    target, servicer = server
    client = ServiceClient(target, token="", deadline=None)
    first = client.channel()
    await client.stub(health_pb2_grpc.HealthStub).Check(health_pb2.HealthCheckRequest())
    await client.close()
    assert client.channel() is not first  # closed: the next use opens a fresh channel
    await client.stub(health_pb2_grpc.HealthStub).Check(health_pb2.HealthCheckRequest())
    await client.close()
    await client.close()  # closing twice is harmless
    assert [("authorization" in md, remaining) for md, remaining in servicer.calls] == [(False, None), (False, None)]
