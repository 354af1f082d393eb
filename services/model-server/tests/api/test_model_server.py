"""The model server in-process: health before/after loading, gRPC and OpenAI APIs, bad input, bounded queue,
deadlines, batching and the metric names the PrometheusRule relies on."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from model_server_testkit import wait_until
from prometheus_client.parser import text_string_to_metric_families

from neuroweaver.inference.v1 import inference_pb2 as pb
from neuroweaver.inference.v1 import inference_service_pb2 as svc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as svc_grpc
from neuroweaver_kube.manifests import ModelServerSpec, alert_expressions
from neuroweaver_model_server.app import SERVICE_NAME, ModelServer, ModelServerConfig
from neuroweaver_runtime.grpc_errors import error_info

NAME = "tiny-1-0-0-abcdef12"
VERSION = "projects/default/models/tiny/versions/1.0.0"


def config(tiny_base, adapter, **kw) -> ModelServerConfig:
    path, sha = adapter
    return ModelServerConfig(
        grpc_port=0, http_port=0, metrics_port=0, base_model=str(tiny_base), served_model_name=NAME, model_version=VERSION,
        adapter_uri=path.as_uri(), adapter_sha256=sha, shutdown_grace_seconds=1.0, shutdown_drain_seconds=0, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
async def server(tiny_base, adapters):
    s = ModelServer(config(tiny_base, adapters[0], max_queue=4, max_batch_size=8, max_new_tokens_limit=1000))
    await s.start()
    yield s
    await s.stop()


@pytest.fixture(scope="module")
async def stub(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc.port}") as channel:
        yield svc_grpc.InferenceServiceStub(channel)


def chat(text="Hello! How can I help you today?", max_tokens=8, **kw) -> svc.GenerateRequest:
    return svc.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content=text)], sampling=pb.SamplingParams(max_tokens=max_tokens, **kw)
    )


async def test_health_is_not_serving_until_the_model_is_loaded(tiny_base, adapters):
    s = ModelServer(config(tiny_base, adapters[0]))
    gate = asyncio.Event()
    real_load = s.service.load

    async def gated_load(spec):
        await gate.wait()
        await real_load(spec)

    s.service.load = gated_load
    from neuroweaver_runtime.testing import free_port

    port = s.grpc.port = free_port()
    starting = asyncio.create_task(s.start())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), wait_for_ready=True)
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.NOT_SERVING
            overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert overall.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await svc_grpc.InferenceServiceStub(channel).Generate(chat())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(err.value).reason == "MODEL_LOADING"
            gate.set()
            second = await watch.read()
            assert second.status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            await starting
            reply = await svc_grpc.InferenceServiceStub(channel).Generate(chat())
            assert reply.usage.completion_tokens > 0
    finally:
        gate.set()
        await starting
        await s.stop()


async def test_generate_stream_and_list_models(stub):
    models = await stub.ListModels(svc.ListModelsRequest())
    assert [m.name for m in models.models] == [NAME]
    assert models.models[0].model_version == VERSION and len(models.models[0].adapter_sha256) == 64

    reply = await stub.Generate(chat(max_tokens=12))
    assert reply.model == NAME
    assert reply.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 12
    assert reply.latency.ToNanoseconds() >= reply.time_to_first_token.ToNanoseconds() > 0

    parts = [
        m
        async for m in stub.GenerateStream(
            svc.GenerateStreamRequest(messages=chat().messages, sampling=pb.SamplingParams(max_tokens=12))
        )
    ]
    assert "".join(p.delta for p in parts) == reply.text  # greedy: same text streamed and unary
    assert parts[-1].finish_reason == reply.finish_reason and parts[-1].usage == reply.usage
    assert all(p.finish_reason == pb.FINISH_REASON_UNSPECIFIED for p in parts[:-1])

    raw = await stub.Generate(svc.GenerateRequest(prompt="The service advisor", sampling=pb.SamplingParams(max_tokens=5)))
    assert raw.usage.completion_tokens <= 5
    named = svc.GenerateRequest(model=NAME, messages=chat().messages, sampling=pb.SamplingParams(max_tokens=3))
    assert (await stub.Generate(named)).model == NAME


async def test_stop_sequences_cut_the_text(stub):
    full = await stub.Generate(chat(max_tokens=20))
    if len(full.text) < 4:
        pytest.fail(f"need a longer greedy completion to test stop strings, got {full.text!r}")
    stop = full.text[2:4]
    cut = await stub.Generate(chat(max_tokens=20, stop=[stop]))
    assert cut.finish_reason == pb.FINISH_REASON_STOP
    assert cut.text == full.text[: full.text.find(stop)]


async def test_openai_stop_strings_end_the_text_before_them(server):
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="-", max_retries=0)
    messages = [{"role": "user", "content": "Tell me a story."}]
    full = (await client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)).choices[0]
    text = full.message.content or ""
    if len(text) < 6:
        pytest.fail(f"need a longer greedy completion to test stop strings, got {text!r}")
    for stop in (text[3:5], ["never-in-the-text", text[3:5]]):
        cut = await client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0, stop=stop)
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].message.content == text[: text.find(text[3:5])]  # ends before the first stop string
        streamed = await client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=20, temperature=0, stop=stop, stream=True
        )
        chunks = [c async for c in streamed]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == "stop"


async def test_seeded_sampling_repeats_for_the_same_seed_and_request(server, stub):
    """At temperature 1, the same seed gives the same text, alone or while other requests (the same one included)
    are decoded at the same time; gRPC and HTTP alike. Other seeds give other samples."""
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="-", max_retries=0)
    messages = [{"role": "user", "content": "Say something."}]

    async def sample(seed: int) -> str:
        reply = await client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=1.0, seed=seed)
        return reply.choices[0].message.content or ""

    alone = await sample(7)
    engine = server.service.engine
    busy = asyncio.ensure_future(stub.Generate(chat(max_tokens=200)))  # greedy: the seeded ones join its batch
    await wait_until(lambda: engine.running == 1, what="the greedy request to start decoding")
    waiting = [asyncio.ensure_future(sample(seed)) for seed in (7, 7, 8)]
    together = await asyncio.gather(*waiting)
    await busy
    assert engine.stats.largest_batch >= 2
    assert together[:2] == [alone] * 2  # each row draws from its own generator
    request = chat(text="Say something.", max_tokens=12, temperature=1.0, seed=7)
    assert (await stub.Generate(request)).text == alone  # the same request over gRPC
    others = {alone, together[2], *[await sample(s) for s in (9, 10, 11, 12)]}
    assert len(others) > 1  # the seed matters (six seeds drawing one 12-token sample each)


async def test_text_completions_over_the_openai_sdk(server):
    """`/v1/completions`: the prompt as is, the same sampling options as chat (stop, seed), streaming with usage."""
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="-", max_retries=0)
    prompt = "Once upon a time"
    done = await client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
    assert done.object == "text_completion" and done.model == NAME and done.id.startswith("cmpl-")
    text, choice = done.choices[0].text, done.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    assert done.usage is not None and done.usage.completion_tokens > 0
    # the prompt is not wrapped in the chat template: fewer prompt tokens than the same words as a chat message
    chat_reply = await client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=1)
    assert chat_reply.usage is not None and done.usage.prompt_tokens < chat_reply.usage.prompt_tokens
    if len(text) < 6:
        pytest.fail(f"need a longer greedy completion to test stop strings, got {text!r}")

    stream = await client.completions.create(
        model=NAME, prompt=[prompt], max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    *chunks, last = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == text and chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == done.usage.completion_tokens

    cut = await client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=[text[3:5]])
    assert cut.choices[0].text == text[: text.find(text[3:5])] and cut.choices[0].finish_reason == "stop"
    seeded = [
        (await client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=1.0, seed=5)).choices[0].text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]

    for kwargs, param in ((dict(echo=True), "echo"), (dict(best_of=2), "best_of"), (dict(suffix="x"), "suffix")):
        with pytest.raises(openai.BadRequestError) as err:
            await client.completions.create(model=NAME, prompt=prompt, max_tokens=2, **kwargs)
        assert err.value.body["code"] == "UNSUPPORTED_PARAMETER" and err.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model=NAME, prompt="", max_tokens=2)
    assert err.value.body["param"] == "prompt"


@pytest.mark.parametrize(
    "request_, code, reason",
    [
        (svc.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_GENERATION_REQUEST"),
        (
            svc.GenerateRequest(messages=[pb.ChatMessage(role="user", content="  ")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_GENERATION_REQUEST",
        ),
        (
            svc.GenerateRequest(messages=[pb.ChatMessage(role="robot", content="hi")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_GENERATION_REQUEST",
        ),
        (
            svc.GenerateRequest(prompt="hi", messages=[pb.ChatMessage(role="user", content="hi")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_GENERATION_REQUEST",
        ),
        (chat(max_tokens=10**9), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_GENERATION_REQUEST"),
        (chat(max_tokens=-1), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_GENERATION_REQUEST"),
        (chat(temperature=7.0), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_GENERATION_REQUEST"),
        (chat(text="word " * 5000, max_tokens=1000), grpc.StatusCode.INVALID_ARGUMENT, "CONTEXT_LENGTH_EXCEEDED"),
        (svc.GenerateRequest(model="someone-else", messages=chat().messages), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
    ],
)
async def test_bad_input_gets_a_status_and_the_server_keeps_serving(stub, request_, code, reason):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(request_)
    assert err.value.code() == code
    info = error_info(err.value)
    assert info.reason == reason and info.domain == "inference.neuroweaver.v1"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.GenerateStream(
            svc.GenerateStreamRequest(
                model=request_.model, messages=request_.messages, prompt=request_.prompt, sampling=request_.sampling
            )
        ):
            pass
    assert err.value.code() == code
    assert (await stub.Generate(chat(max_tokens=2))).usage.completion_tokens > 0


async def test_full_queue_answers_resource_exhausted_and_deadlines_are_honoured(tiny_base, adapters):
    s = ModelServer(config(tiny_base, adapters[0], max_queue=1, max_batch_size=1, max_new_tokens_limit=1000))
    await s.start()
    engine = s.service.engine
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.grpc.port}") as channel:
            stub = svc_grpc.InferenceServiceStub(channel)
            long_call = stub.Generate(chat(max_tokens=1000))  # occupies the worker
            await wait_until(lambda: engine.running == 1, what="the long request to start decoding")
            queued = stub.Generate(chat(max_tokens=4))
            await wait_until(lambda: engine.queue_depth == 1, what="the second request to wait in the queue")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(chat(max_tokens=4))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_info(err.value).reason == "QUEUE_FULL"

            # The queued request's deadline passes while it waits: DEADLINE_EXCEEDED, and it leaves the queue.
            queued.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(chat(max_tokens=4), timeout=0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_until(lambda: engine.queue_depth == 0, what="the expired request to leave the queue")

            # A running request past its deadline stops being decoded (the worker frees up long before 1000 tokens).
            long_call.cancel()
            await wait_until(lambda: engine.running == 0, what="the cancelled long request to stop")
            aborted = engine.stats.aborted
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(chat(max_tokens=1000), timeout=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_until(lambda: engine.running == 0, timeout=5, what="decoding of the expired request to stop")
            assert engine.stats.aborted == aborted + 1
            assert (await stub.Generate(chat(max_tokens=2))).usage.completion_tokens > 0
    finally:
        await s.stop()


async def test_waiting_requests_are_batched(tiny_base, adapters):
    s = ModelServer(config(tiny_base, adapters[0], max_queue=16, max_batch_size=4, max_new_tokens_limit=1000))
    await s.start()
    engine = s.service.engine
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.grpc.port}") as channel:
            stub = svc_grpc.InferenceServiceStub(channel)
            blocker = stub.Generate(chat(max_tokens=1000))
            await wait_until(lambda: engine.running == 1, what="the blocker to start")
            calls = [asyncio.ensure_future(stub.Generate(chat(text=f"question {i}", max_tokens=6))) for i in range(4)]
            # continuous batching: three join the blocker's batch of 4, the fourth waits for a free row
            await wait_until(lambda: engine.queue_depth == 1 and engine.running == 4, what="a full batch, one waiting")
            blocker.cancel()
            replies = await asyncio.gather(*calls)
            assert all(r.usage.completion_tokens > 0 for r in replies)
            assert engine.stats.largest_batch == 4
            # batched decoding gives each request the same text it gets alone (greedy)
            alone = await stub.Generate(chat(text="question 2", max_tokens=6))
            assert alone.text == replies[2].text
    finally:
        await s.stop()


async def test_openai_client_against_the_http_endpoint(server):
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0)
    models = await client.models.list()
    assert [m.id for m in models.data] == [NAME]
    messages = [{"role": "user", "content": "Hello! How can I help you today?"}]
    done = await client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    assert done.model == NAME and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens > 0 and done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    stream = await client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == done.choices[0].message.content
    # OpenAI's shape: usage in a final chunk of its own with no choices, `usage: null` on every other chunk
    *body, last = chunks
    assert last.choices == [] and last.usage is not None and all(c.choices and c.usage is None for c in body)
    assert body[-1].choices[0].finish_reason == done.choices[0].finish_reason
    assert last.usage.completion_tokens == done.usage.completion_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    plain = [c async for c in await client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, stream=True)]
    assert all(c.choices and c.usage is None for c in plain)  # no usage chunk unless asked

    with pytest.raises(openai.NotFoundError) as err:
        await client.chat.completions.create(model="nope", messages=messages)
    assert err.value.body["code"] == "MODEL_NOT_FOUND"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model=NAME, messages=[])
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model=NAME, messages=messages, max_tokens=10**7)
    assert err.value.body["param"] == "sampling.max_tokens"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{server.http_port}/v1/chat/completions", data=b"{not json") as resp:
            assert resp.status == 400
    again = await client.chat.completions.create(model=NAME, messages=messages, max_tokens=2)
    assert again.usage.completion_tokens > 0


async def test_metrics_export_every_series_the_prometheus_rule_queries(server, stub):
    await stub.Generate(chat(max_tokens=2))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{server.metrics_port}/metrics") as resp:
            text = await resp.text()
    exported = set()
    for family in text_string_to_metric_families(text):
        exported.update(sample.name for sample in family.samples)
    for name in ("nw_inference_request_duration_seconds_bucket", "nw_inference_requests_total",
                 "nw_inference_time_to_first_token_seconds_bucket", "nw_inference_queue_depth",
                 "nw_inference_prompt_tokens_total", "nw_inference_completion_tokens_total"):  # fmt: skip
        assert name in exported, name
    ok = [s for f in text_string_to_metric_families(text) for s in f.samples
          if s.name == "nw_inference_requests_total" and s.labels == {"method": "Generate", "code": "OK"}]  # fmt: skip
    assert ok and ok[0].value >= 1
    spec = ModelServerSpec(
        name="projects/default/deployments/d", namespace="neuroweaver", image="img", model_version=VERSION,
        served_model_name=NAME, base_model_uri="builtin:smollm2-135m-instruct",
    )  # fmt: skip
    queried = set()
    for expr in alert_expressions(spec).values():
        queried.update(re.findall(r"\b(nw_[a-z0-9_]+)", expr))
    assert queried and queried <= exported, queried - exported


async def test_serves_a_4bit_base_with_the_adapter(tiny_base, adapters):
    s = ModelServer(config(tiny_base, adapters[1], load_in_4bit=True))
    await s.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.grpc.port}") as channel:
            stub = svc_grpc.InferenceServiceStub(channel)
            models = await stub.ListModels(svc.ListModelsRequest())
            assert models.models[0].quantized_4bit and models.models[0].adapter_sha256 == adapters[1][1]
            assert (await stub.Generate(chat(max_tokens=3))).usage.completion_tokens > 0
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in s.service.engine.model.modules())
    finally:
        await s.stop()


async def test_a_wrong_adapter_digest_refuses_to_load(tiny_base, adapters):
    from neuroweaver_ml import DigestMismatch

    s = ModelServer(config(tiny_base, (adapters[0][0], "0" * 64)))
    with pytest.raises(DigestMismatch):
        await s.start()
    await s.stop()
