"""The interceptor around streams and cancelled calls: errors mid-stream become statuses; calls the client abandons
end without spurious errors and are counted as `Canceled`; messages are counted as go-grpc-prometheus counts them."""

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


async def _echo(request, context):
    return health_pb2.HealthCheckResponse(status=1)


async def _sum(requests, context):
    total = 0
    async for request in requests:
        total += len(request.service)
    return health_pb2.HealthCheckResponse(status=total % 4)


async def _each(requests, context):
    async for _request in requests:
        yield health_pb2.HealthCheckResponse(status=1)
        yield health_pb2.HealthCheckResponse(status=2)


HANDLERS = {
    "Count": grpc.unary_stream_rpc_method_handler(_count, **_SERVER_CODEC),
    "Fail": grpc.unary_stream_rpc_method_handler(_fail_after_two, **_SERVER_CODEC),
    "Wait": grpc.unary_unary_rpc_method_handler(_wait, **_SERVER_CODEC),
    "Echo": grpc.unary_unary_rpc_method_handler(_echo, **_SERVER_CODEC),
    "Sum": grpc.stream_unary_rpc_method_handler(_sum, **_SERVER_CODEC),
    "Each": grpc.stream_stream_rpc_method_handler(_each, **_SERVER_CODEC),
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
    """The client side of HANDLERS[name] (unary or streaming on either side, as the handler is)."""
    handler = HANDLERS[name]
    make = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(handler.request_streaming, handler.response_streaming)]
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
    handled = telemetry.GRPC_HANDLED.labels("server_stream", "test.Streams", "Count", "Canceled")
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
    handled = telemetry.GRPC_HANDLED.labels("unary", "test.Streams", "Wait", "Canceled")
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
    handled = telemetry.GRPC_HANDLED.labels("server_stream", "test.Streams", "Fail", "NotFound")
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


def _messages(kind: str, name: str) -> tuple[float, float]:
    """(received, sent) as exported for test.Streams/<name>."""
    labels = (kind, SERVICE, name)
    return telemetry.GRPC_MSG_RECEIVED.labels(*labels)._value.get(), telemetry.GRPC_MSG_SENT.labels(*labels)._value.get()


async def test_messages_are_counted_per_call_kind_as_go_grpc_prometheus():
    """Unary: 1 received, 1 sent; server stream: 1 received, one sent per message; client stream: one received per
    message, 1 sent; bidi: every message both ways. A failed call sends no response and counts none."""
    server, port = await _serve(_interceptor())
    before = {
        n: _messages(k, n)
        for k, n in [("unary", "Echo"), ("server_stream", "Fail"), ("client_stream", "Sum"), ("bidi_stream", "Each")]
    }
    ok = telemetry.GRPC_HANDLED.labels("client_stream", SERVICE, "Sum", "OK")
    ok_before = ok._value.get()

    async def three():
        for service in ("a", "bb", "ccc"):
            yield health_pb2.HealthCheckRequest(service=service)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for _ in range(2):
                await _method(channel, "Echo")(health_pb2.HealthCheckRequest())
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in _method(channel, "Fail")(health_pb2.HealthCheckRequest()):
                    pass
            assert (await _method(channel, "Sum")(three())).status == 6 % 4
            assert [r.status async for r in _method(channel, "Each")(three())] == [1, 2] * 3
        await _until_counted(ok, ok_before + 1)
        after = {
            n: _messages(k, n)
            for k, n in [("unary", "Echo"), ("server_stream", "Fail"), ("client_stream", "Sum"), ("bidi_stream", "Each")]
        }
        delta = {n: (after[n][0] - before[n][0], after[n][1] - before[n][1]) for n in after}
        assert delta == {"Echo": (2, 2), "Fail": (1, 2), "Sum": (3, 1), "Each": (3, 6)}
    finally:
        await server.stop(None)


async def test_a_unary_call_that_fails_counts_its_request_but_no_response():
    interceptor = ServiceInterceptor(
        error_domain="test.neuroweaver.v1",
        method_roles=dict.fromkeys(HANDLERS, Role.VIEWER),
        authenticator=TokenAuthenticator.from_setting("secret-token=p1:viewer"),
    )
    server, port = await _serve(interceptor)
    before = _messages("unary", "Echo")
    denied = telemetry.GRPC_HANDLED.labels("unary", SERVICE, "Echo", "Unauthenticated")
    denied_before = denied._value.get()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await _method(channel, "Echo")(health_pb2.HealthCheckRequest())
            assert failed.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await _until_counted(denied, denied_before + 1)
        after = _messages("unary", "Echo")
        assert (after[0] - before[0], after[1] - before[1]) == (1, 0)
        assert denied._value.get() - denied_before == 1
    finally:
        await server.stop(None)
