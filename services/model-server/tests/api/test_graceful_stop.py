"""SIGTERM's graceful stop of the model server: readiness (`/healthz` as gRPC health) turns NOT_SERVING, the API port
stops accepting, and generations in flight — a gRPC GenerateStream and an OpenAI SSE stream — finish within the
grace period instead of being cut. The generations are held mid-stream by the test, so "in flight while the server
stops" is a state the test controls."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
from model_server_testkit import wait_until

from neuroweaver.inference.v1 import inference_pb2 as pb
from neuroweaver.inference.v1 import inference_service_pb2 as svc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as svc_grpc
from neuroweaver_model_server.app import ModelServer, ModelServerConfig

VERSION = "projects/default/models/tiny/versions/1.0.0"
HEADER = "x-neuroweaver-model-version"


async def test_streams_in_flight_finish_when_the_server_stops(tiny_base, adapters):
    path, sha = adapters[0]
    server = ModelServer(
        ModelServerConfig(
            grpc_port=0, http_port=0, metrics_port=0, base_model=str(tiny_base), served_model_name="tiny-1-0-0",
            model_version=VERSION, adapter_uri=path.as_uri(), adapter_sha256=sha,
            shutdown_grace_seconds=60.0, shutdown_drain_seconds=0,
        )
    )  # fmt: skip
    release, held = asyncio.Event(), []
    real_stream = server.service.stream

    async def held_stream(req, deadline, method):  # the first delta, then wait for the test, then the rest
        deltas = real_stream(req, deadline, method)
        yield await anext(deltas)
        held.append(method)
        await release.wait()
        async for delta in deltas:
            yield delta

    server.service.stream = held_stream
    await server.start()
    stopping: asyncio.Future | None = None
    try:
        api, ops = f"http://127.0.0.1:{server.http_port}", f"http://127.0.0.1:{server.metrics_port}"
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc.port}") as channel,
            aiohttp.ClientSession() as http,
        ):
            request = svc.GenerateStreamRequest(
                messages=[pb.ChatMessage(role="user", content="Hi")], sampling=pb.SamplingParams(max_tokens=6, temperature=0)
            )
            stream = svc_grpc.InferenceServiceStub(channel).GenerateStream(request)
            assert (HEADER, VERSION) in tuple(await stream.initial_metadata())  # the version, from the stream's start
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0, "stream": True}
            sse = await http.post(api + "/v1/chat/completions", json=body)
            assert sse.status == 200 and sse.headers[HEADER] == VERSION
            await wait_until(lambda: len(held) == 2, what="both generations held mid-stream")

            stopping = asyncio.ensure_future(server.stop())

            async def healthz() -> int:
                async with http.get(ops + "/healthz") as resp:
                    return resp.status

            async with asyncio.timeout(10):
                while await healthz() != 503:  # readiness probes (the ops port) drop the pod; the port stays open
                    await asyncio.sleep(0.01)
                while True:  # the API port stops accepting (its listener closes alongside the gRPC server's stop)
                    try:
                        async with aiohttp.ClientSession() as fresh, fresh.get(api + "/v1/models") as resp:
                            await resp.read()
                    except aiohttp.ClientConnectionError:
                        break
                    await asyncio.sleep(0.01)
            assert not stopping.done()  # held by the two generations

            release.set()
            messages = [m async for m in stream]
            assert await stream.code() == grpc.StatusCode.OK
            assert messages[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED and messages[-1].model_version == VERSION
            events = [line[6:] async for line in sse.content if line.startswith(b"data: ")]
            assert events[-1].strip() == b"[DONE]"
            finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
            assert finish[-1] in ("stop", "length") and all(f is None for f in finish[:-1])
            sse.release()
            async with asyncio.timeout(20):  # far below the 60 s grace period: the stop waited for these two only
                await stopping
    finally:
        release.set()
        await (stopping if stopping is not None else server.stop())
