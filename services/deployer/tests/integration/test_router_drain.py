"""Retiring a replica behind a local deployment's router cuts no call: once out of the rotation it gets no new call,
and `drain` returns only when the calls it still serves (gRPC unary and GenerateStream, HTTP and SSE) have ended,
each on that replica; a drain that outlasts its timeout says so. Replicas here are gRPC/HTTP servers of the test
whose answers wait on an event, so "still in flight" is a state the test controls, not a race."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
from aiohttp import web
from helpers import start_http_app

from neuroweaver.inference.v1 import inference_service_pb2 as isvc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as igrpc
from neuroweaver_deployer.adapters.router import Router, Upstream

SERVICE = "neuroweaver.inference.v1.InferenceService"
VERSION = "x-neuroweaver-model-version"


class Replica:
    """A stand-in model server: every answer names `version` and waits for `release` before its last part."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.release = asyncio.Event()
        self.calls = 0

    async def generate(self, request, context):
        self.calls += 1
        await self.release.wait()
        return isvc.GenerateResponse(text="done", model_version=self.version)

    async def generate_stream(self, request, context):
        self.calls += 1
        await context.send_initial_metadata(((VERSION, self.version),))
        yield isvc.GenerateStreamResponse(delta="first ")
        await self.release.wait()
        yield isvc.GenerateStreamResponse(delta="last", finish_reason=1, model_version=self.version)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", VERSION: self.version})
        await response.prepare(request)
        await response.write(b'data: {"delta": "first"}\n\n')
        await self.release.wait()
        await response.write(f"data: {json.dumps({'finish_reason': 'stop', 'version': self.version})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def start(self) -> Upstream:
        self.server = grpc.aio.server()
        handlers = {
            "Generate": grpc.unary_unary_rpc_method_handler(
                self.generate, isvc.GenerateRequest.FromString, isvc.GenerateResponse.SerializeToString
            ),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(
                self.generate_stream, isvc.GenerateStreamRequest.FromString, isvc.GenerateStreamResponse.SerializeToString
            ),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner, http_port = await start_http_app(app)
        url = f"http://127.0.0.1:{http_port}"
        return Upstream(f"127.0.0.1:{port}", url, url + "/metrics")

    async def stop(self) -> None:
        self.release.set()
        await self.server.stop(None)
        await self.runner.cleanup()


async def _sse_events(resp: aiohttp.ClientResponse):
    async for line in resp.content:
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            yield json.loads(line[6:])


async def test_a_retired_replica_finishes_its_calls_before_the_drain_returns():
    old, new = Replica("1.0.0"), Replica("1.1.0")
    old_up, new_up = await old.start(), await new.start()
    new.release.set()  # the new replica answers at once
    router = Router()
    await router.start()
    try:
        await router.set_upstreams([old_up])
        async with grpc.aio.insecure_channel(router.endpoint) as channel, aiohttp.ClientSession() as http:
            stub = igrpc.InferenceServiceStub(channel)
            stream = stub.GenerateStream(isvc.GenerateStreamRequest(prompt="hi"))
            first = await anext(aiter(stream))
            assert first.delta == "first " and (VERSION, "1.0.0") in tuple(await stream.initial_metadata())
            unary = asyncio.ensure_future(stub.Generate(isvc.GenerateRequest(prompt="hi")))
            sse = await http.post(router.openai_base_url + "/chat/completions", json={"stream": True})
            events = _sse_events(sse)
            assert sse.headers[VERSION] == "1.0.0" and await anext(events) == {"delta": "first"}
            async with asyncio.timeout(10):
                while old.calls < 3:  # the unary call reached the replica
                    await asyncio.sleep(0.01)
            assert router.inflight(old_up) == 3

            await router.set_upstreams([new_up])  # the rollover's switch: new calls go to the new replica only
            drain = asyncio.ensure_future(router.drain(old_up, timeout=60))
            assert (await stub.Generate(isvc.GenerateRequest(prompt="hi"), timeout=10)).model_version == "1.1.0"
            async with http.post(router.openai_base_url + "/chat/completions", json={"stream": True}) as resp:
                assert resp.headers[VERSION] == "1.1.0"
                assert [e async for e in _sse_events(resp)][-1] == {"finish_reason": "stop", "version": "1.1.0"}
            assert not drain.done() and router.inflight(old_up) == 3  # the old replica's three calls are still open

            old.release.set()
            last = [m async for m in stream][-1]
            assert last.finish_reason == 1 and last.model_version == "1.0.0"
            assert (await unary).model_version == "1.0.0"
            assert [e async for e in events][-1] == {"finish_reason": "stop", "version": "1.0.0"}
            sse.release()
            assert await drain is True and router.inflight(old_up) == 0
            assert await router.drain(old_up, timeout=0) is True  # nothing left: at once
    finally:
        await router.stop()
        await old.stop()
        await new.stop()


async def test_a_drain_that_outlasts_its_timeout_reports_it():
    replica = Replica("1.0.0")
    up = await replica.start()
    router = Router()
    await router.start()
    try:
        await router.set_upstreams([up])
        async with grpc.aio.insecure_channel(router.endpoint) as channel:
            stream = igrpc.InferenceServiceStub(channel).GenerateStream(isvc.GenerateStreamRequest(prompt="hi"))
            await anext(aiter(stream))
            await router.set_upstreams([])
            assert await router.drain(up, timeout=0.2) is False and router.inflight(up) == 1
            stream.cancel()  # the caller leaves: the router's call ends and the replica is idle
            async with asyncio.timeout(10):
                while router.inflight(up):
                    await asyncio.sleep(0.01)
            assert await router.drain(up, timeout=0) is True
    finally:
        await router.stop()
        await replica.stop()
