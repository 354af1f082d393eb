"""`GrpcService.stop` on SIGTERM: watches (streams that never end) are cancelled, but a stream that ends by itself
(`ServiceDefinition.finite_streams`, e.g. a generation) is left to finish within the grace period, and the other
listeners (`close_listeners`, e.g. an HTTP API) are closed alongside the gRPC server with that grace period."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2

from neuroweaver_runtime.config import ServiceConfig
from neuroweaver_runtime.server import GrpcService, ServiceDefinition

SERVICE = "neuroweaver.test.v1.Drain"
_CODEC = dict(
    request_deserializer=health_pb2.HealthCheckRequest.FromString,
    response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
)


async def test_stop_cancels_watches_and_lets_finite_streams_finish(tmp_path):
    release = asyncio.Event()
    closed: list[float] = []
    watch_cancelled = asyncio.Event()

    async def generate(request, context):  # ends by itself once released
        yield health_pb2.HealthCheckResponse(status=1)
        await release.wait()
        yield health_pb2.HealthCheckResponse(status=2)

    async def watch(request, context):  # never ends by itself
        yield health_pb2.HealthCheckResponse(status=1)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            watch_cancelled.set()
            raise

    async def close_listener(grace: float) -> None:
        closed.append(grace)

    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(generate, **_CODEC),
        "Watch": grpc.unary_stream_rpc_method_handler(watch, **_CODEC),
    }
    definition = ServiceDefinition(
        name="drain-probe", full_names=[SERVICE], error_domain="test.neuroweaver.v1", method_roles={},
        add_servicers=lambda s: s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),)),
        finite_streams=frozenset({f"/{SERVICE}/Generate"}), close_listeners=[close_listener],
    )  # fmt: skip
    config = ServiceConfig(port=0, metrics_port=-1, data_dir=str(tmp_path), shutdown_drain_seconds=0, shutdown_grace_seconds=30)
    service = GrpcService(definition, config, default_port=0, default_metrics_port=-1)
    await service.start()
    request = health_pb2.HealthCheckRequest().SerializeToString()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        decode = health_pb2.HealthCheckResponse.FromString
        gen = channel.unary_stream(f"/{SERVICE}/Generate", response_deserializer=decode)(request, timeout=60)
        wat = channel.unary_stream(f"/{SERVICE}/Watch", response_deserializer=decode)(request, timeout=60)
        assert (await anext(aiter(gen))).status == 1 and (await anext(aiter(wat))).status == 1

        stopping = asyncio.ensure_future(service.stop())
        async with asyncio.timeout(10):
            await watch_cancelled.wait()  # the watch's handler, at once
            while not closed:
                await asyncio.sleep(0.01)
        # grpc.aio ends a call whose handler was cancelled only when the server stops (here: after the grace period);
        # its caller leaves, so that only the generation can hold the stop.
        wat.cancel()
        assert service.stopping and closed == [30]
        assert not stopping.done()  # the generation holds the stop (up to the grace period)

        release.set()
        assert [m.status async for m in gen] == [2] and await gen.code() == grpc.StatusCode.OK
        async with asyncio.timeout(10):  # well before the 30 s grace period: the stop waited for the generation only
            await stopping
