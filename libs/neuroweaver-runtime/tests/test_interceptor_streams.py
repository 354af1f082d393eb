"""The interceptor around streams and cancelled calls: errors mid-stream become statuses; calls the client abandons
end without spurious errors and are counted as CANCELLED."""

from __future__ import annotations

import asyncio
import gc
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2

from neuroweaver_runtime import telemetry
from neuroweaver_runtime.auth import Role, TokenAuthenticator
from neuroweaver_runtime.errors import NotFound
from neuroweaver_runtime.grpc_errors import error_info
from neuroweaver_runtime.interceptors import ServiceInterceptor

SERVICE = "test.Streams"
_SERVER_CODEC = dict(
    request_deserializer=health_pb2.HealthCheckRequest.FromString,
    response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
)


async def _count(request, context):
    for i in range(100_000):
        yield health_pb2.HealthCheckResponse(status=i % 3)
        await asyncio.sleep(0)


async def _fail_after_two(request, context):
    yield health_pb2.HealthCheckResponse(status=1)
    yield health_pb2.HealthCheckResponse(status=2)
    raise NotFound("the watched thing is gone", reason="THING_GONE")


async def _wait(request, context):
    await asyncio.sleep(60)
    return health_pb2.HealthCheckResponse()


HANDLERS = {
    "Count": grpc.unary_stream_rpc_method_handler(_count, **_SERVER_CODEC),
    "Fail": grpc.unary_stream_rpc_method_handler(_fail_after_two, **_SERVER_CODEC),
    "Wait": grpc.unary_unary_rpc_method_handler(_wait, **_SERVER_CODEC),
}


async def _serve(interceptor: ServiceInterceptor) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, HANDLERS)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _interceptor() -> ServiceInterceptor:
    return ServiceInterceptor(
        error_domain="test.neuroweaver.v1",
        method_roles=dict.fromkeys(HANDLERS, Role.VIEWER),
        authenticator=TokenAuthenticator.from_setting(""),
    )


def _method(channel: grpc.aio.Channel, name: str):
    """The client side of HANDLERS[name] (unary_unary or unary_stream, as the handler is)."""
    make = channel.unary_stream if HANDLERS[name].response_streaming else channel.unary_unary
    return make(
        f"/{SERVICE}/{name}",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )


async def _until_counted(counter, expected: float) -> None:
    """Waits up to ~1 s for a Prometheus counter to reach `expected` (calls are counted when their handler ends)."""
    for _ in range(50):
        if counter._value.get() >= expected:
            return
        await asyncio.sleep(0.02)


async def test_a_stream_the_client_cancels_ends_without_context_errors(caplog):
    """grpc.aio drops the handler's generator while it waits at a `yield` and the event loop closes it later in
    another task: a span context held across the `yield` then fails to detach, and OpenTelemetry logs an ERROR
    for every cancelled watch. The call is still counted, as CANCELLED."""
    interceptor = _interceptor()
    server, port = await _serve(interceptor)
    handled = telemetry.GRPC_HANDLED.labels("server_stream", "test.Streams", "Count", "CANCELLED")
    before = handled._value.get()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            count = _method(channel, "Count")
            with caplog.at_level(logging.WARNING):
                for _ in range(5):
                    call = count(health_pb2.HealthCheckRequest())
                    await call.read()
                    await call.read()
                    call.cancel()
                    await asyncio.sleep(0.1)
                gc.collect()  # the dropped generators are closed now (at the latest)
                await _until_counted(handled, before + 5)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == []
        assert handled._value.get() - before == 5
        assert not [t for t in interceptor.streams if not t.done()]
    finally:
        await server.stop(None)


async def test_a_unary_call_the_client_cancels_is_counted_as_cancelled():
    server, port = await _serve(_interceptor())
    handled = telemetry.GRPC_HANDLED.labels("unary", "test.Streams", "Wait", "CANCELLED")
    before = handled._value.get()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = _method(channel, "Wait")(health_pb2.HealthCheckRequest())
            await asyncio.sleep(0.2)
            call.cancel()
            await _until_counted(handled, before + 1)
        assert handled._value.get() - before == 1
    finally:
        await server.stop(None)


async def test_an_error_after_some_messages_ends_the_stream_with_its_status():
    server, port = await _serve(_interceptor())
    handled = telemetry.GRPC_HANDLED.labels("server_stream", "test.Streams", "Fail", "NOT_FOUND")
    before = handled._value.get()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                async for response in _method(channel, "Fail")(health_pb2.HealthCheckRequest()):
                    received.append(response.status)
            assert failed.value.code() == grpc.StatusCode.NOT_FOUND
            info = error_info(failed.value)
            assert info is not None and info.reason == "THING_GONE" and info.domain == "test.neuroweaver.v1"
            assert received == [1, 2]
        assert handled._value.get() - before == 1
    finally:
        await server.stop(None)
