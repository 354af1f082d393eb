"""`GrpcService.stop` on SIGTERM: watches (streams that never end) end at once with UNAVAILABLE (reason
SHUTTING_DOWN, so clients reconnect elsewhere) and no longer hold the stop, health Watch streams too; a stream that
ends by itself (`ServiceDefinition.finite_streams`, e.g. a generation) and a unary call in flight are left to finish
within the grace period, and the other listeners (`close_listeners`, e.g. an HTTP API) are closed alongside the gRPC
server with that grace period."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver_runtime.config import ServiceConfig
from neuroweaver_runtime.grpc_errors import error_info
from neuroweaver_runtime.server import GrpcService, ServiceDefinition

SERVICE = "neuroweaver.test.v1.Drain"
_CODEC = dict(
    request_deserializer=health_pb2.HealthCheckRequest.FromString,
    response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
)
_REQUEST = health_pb2.HealthCheckRequest().SerializeToString()
_DECODE = health_pb2.HealthCheckResponse.FromString


class _Probe:
    """A service with a generation (ends once released), a watch (never ends) and a unary call (ends once released)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.unary_started = asyncio.Event()
        self.watch_closed = asyncio.Event()  # the watch handler's `finally` ran
        self.closed: list[float] = []

    async def generate(self, request, context):
        yield health_pb2.HealthCheckResponse(status=1)
        await self.release.wait()
        yield health_pb2.HealthCheckResponse(status=2)

    async def watch(self, request, context):
        try:
            yield health_pb2.HealthCheckResponse(status=1)
            await asyncio.Event().wait()
        finally:
            self.watch_closed.set()

    async def unary(self, request, context):
        self.unary_started.set()
        await self.release.wait()
        return health_pb2.HealthCheckResponse(status=3)

    async def close_listener(self, grace: float) -> None:
        self.closed.append(grace)

    def service(self, tmp_path, grace: float = 30) -> GrpcService:
        handlers = {
            "Generate": grpc.unary_stream_rpc_method_handler(self.generate, **_CODEC),
            "Watch": grpc.unary_stream_rpc_method_handler(self.watch, **_CODEC),
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary, **_CODEC),
        }
        definition = ServiceDefinition(
            name="drain-probe", full_names=[SERVICE], error_domain="test.neuroweaver.v1", method_roles={},
            add_servicers=lambda s: s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),)),
            finite_streams=frozenset({f"/{SERVICE}/Generate"}), close_listeners=[self.close_listener],
        )  # fmt: skip
        config = ServiceConfig(
            port=0, metrics_port=-1, data_dir=str(tmp_path), shutdown_drain_seconds=0, shutdown_grace_seconds=grace
        )
        return GrpcService(definition, config, default_port=0, default_metrics_port=-1)


async def _ends_shutting_down(call) -> None:
    """The stream's remaining messages are read, then its status is UNAVAILABLE / SHUTTING_DOWN."""
    try:
        async with asyncio.timeout(10):
            async for _ in call:
                pass
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in (exc.details() or "")
        info = error_info(exc)
        if info is not None:  # the interceptor's streams carry it; the health Watch a plain status
            assert info.reason == "SHUTTING_DOWN"
        return
    raise AssertionError(f"the stream ended with {await call.code()}, not UNAVAILABLE")


async def test_stop_ends_watches_and_lets_finite_streams_finish(tmp_path):
    probe = _Probe()
    service = probe.service(tmp_path)
    await service.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        gen = channel.unary_stream(f"/{SERVICE}/Generate", response_deserializer=_DECODE)(_REQUEST, timeout=60)
        wat = channel.unary_stream(f"/{SERVICE}/Watch", response_deserializer=_DECODE)(_REQUEST, timeout=60)
        health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=60)
        assert (await anext(aiter(gen))).status == 1 and (await anext(aiter(wat))).status == 1
        assert (await anext(aiter(health))).status == health_pb2.HealthCheckResponse.SERVING

        stopping = asyncio.ensure_future(service.stop())
        # The watches end by themselves, their callers still on the line: the server ends the calls.
        await _ends_shutting_down(wat)
        await _ends_shutting_down(health)
        assert probe.watch_closed.is_set()
        async with asyncio.timeout(10):
            while not probe.closed:
                await asyncio.sleep(0.01)
        assert service.stopping and probe.closed == [30]
        assert not stopping.done()  # the generation holds the stop (up to the grace period)

        probe.release.set()
        assert [m.status async for m in gen] == [2] and await gen.code() == grpc.StatusCode.OK
        async with asyncio.timeout(10):  # well before the 30 s grace period: the stop waited for the generation only
            await stopping


async def test_stop_with_only_watches_open_waits_for_the_unary_call_only(tmp_path):
    probe = _Probe()
    service = probe.service(tmp_path, grace=60)
    await service.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        watches = [
            channel.unary_stream(f"/{SERVICE}/Watch", response_deserializer=_DECODE)(_REQUEST, timeout=120) for _ in range(3)
        ]
        for w in watches:
            assert (await anext(aiter(w))).status == 1
        unary = channel.unary_unary(f"/{SERVICE}/Unary", response_deserializer=_DECODE)(_REQUEST, timeout=120)
        async with asyncio.timeout(10):
            await probe.unary_started.wait()

        stopping = asyncio.ensure_future(service.stop())
        for w in watches:
            await _ends_shutting_down(w)
        assert not stopping.done()  # the unary call in flight holds the stop
        probe.release.set()
        assert (await unary).status == 3
        async with asyncio.timeout(30):  # half the grace period: nothing else held the stop
            await stopping


async def test_streams_opened_after_end_streams_end_at_once(tmp_path):
    """Between `end_streams` and the server refusing calls, a new watch is ended as soon as it starts."""
    probe = _Probe()
    service = probe.service(tmp_path)
    await service.start()
    try:
        assert service.interceptor is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            open_watch = channel.unary_stream(f"/{SERVICE}/Watch", response_deserializer=_DECODE)(_REQUEST, timeout=60)
            assert (await anext(aiter(open_watch))).status == 1
            assert service.interceptor.end_streams(keep={f"/{SERVICE}/Generate"}) == 1
            await _ends_shutting_down(open_watch)

            late = channel.unary_stream(f"/{SERVICE}/Watch", response_deserializer=_DECODE)(_REQUEST, timeout=60)
            await _ends_shutting_down(late)
            gen = channel.unary_stream(f"/{SERVICE}/Generate", response_deserializer=_DECODE)(_REQUEST, timeout=60)
            assert (await anext(aiter(gen))).status == 1  # finite streams still start
            probe.release.set()
            assert [m.status async for m in gen] == [2]
    finally:
        probe.release.set()
        await service.stop()
