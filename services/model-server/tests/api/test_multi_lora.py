"""Several versions on one base (issue 17 §3): one model server, the tiny Llama loaded once, two LoRA adapters (two
registry versions of one model). A request's model name picks its version's adapter: each name answers with its own
adapter's greedy output (what that adapter gives alone), requests of both versions mixed in one running batch keep
their adapters, every answer says which version served it, `GET /v1/models` lists both with `parent` (the shared
base) and `root` (the version's own name), gRPC ListModels both; anything else is NOT_FOUND / 404."""

from __future__ import annotations

import asyncio
import json

import grpc
import openai
import pytest

from neuroweaver.inference.v1 import inference_pb2 as pb
from neuroweaver.inference.v1 import inference_service_pb2 as svc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as svc_grpc
from neuroweaver_model_server.app import ModelServer, ModelServerConfig
from neuroweaver_runtime.grpc_errors import error_info

DEPLOYMENT = "projects/default/deployments/advisor-ab"
VERSIONS = ["projects/default/models/advisor/versions/1.0.0", "projects/default/models/advisor/versions/1.1.0"]
SERVED = ["advisor-1-0-0-aaaaaaaa", "advisor-1-1-0-bbbbbbbb"]
NAMES = [
    [DEPLOYMENT, "advisor-ab", f"{DEPLOYMENT}/1.0.0", "advisor-ab/1.0.0", "advisor@production"],
    [f"{DEPLOYMENT}/1.1.0", "advisor-ab/1.1.0", "advisor@candidate"],
]
HEADER = "x-neuroweaver-model-version"
PROMPTS = ["Hi", "Tell me about the weather in spring.", "a b c d", "Once upon a time there was"]


def config(tiny_base, adapters, **kw) -> ModelServerConfig:
    (path0, sha0), (path1, sha1) = adapters
    extra = [{"served_model_name": SERVED[1], "model_version": VERSIONS[1], "model_names": NAMES[1],
              "adapter_uri": path1.as_uri(), "adapter_sha256": sha1}]  # fmt: skip
    values = dict(
        grpc_port=0, http_port=0, metrics_port=-1, base_model=str(tiny_base), served_model_name=SERVED[0],
        model_names=",".join(NAMES[0]), model_version=VERSIONS[0], adapter_uri=path0.as_uri(), adapter_sha256=sha0,
        extra_versions=json.dumps(extra), device="cpu", shutdown_grace_seconds=1.0, shutdown_drain_seconds=0,
    )  # fmt: skip
    values.update(kw)
    return ModelServerConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
async def server(tiny_base, adapters):
    s = ModelServer(config(tiny_base, adapters))
    await s.start()
    yield s
    await s.stop()


@pytest.fixture(scope="module")
async def stub(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc.port}") as channel:
        yield svc_grpc.InferenceServiceStub(channel)


@pytest.fixture
async def client(server):
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="-", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def alone(tiny_base, adapters):
    """Each version's greedy answers with its adapter alone on the base (unmerged PEFT, one request, no padding)."""
    from neuroweaver_ml import generate, load_for_inference

    out = []
    for path, _ in adapters:
        loaded = load_for_inference(tiny_base, path, device="cpu", merge_adapter=False)
        out.append({p: generate(loaded.model, loaded.tokenizer, [{"role": "user", "content": p}], 12).text for p in PROMPTS})
    assert out[0] != out[1], "the two adapters must answer differently, or routing would go unchecked"
    return out


def chat(model: str, prompt: str) -> svc.GenerateRequest:
    return svc.GenerateRequest(
        model=model, messages=[pb.ChatMessage(role="user", content=prompt)], sampling=pb.SamplingParams(max_tokens=12)
    )


async def test_the_base_is_loaded_once_with_both_adapters(server):
    engine = server.service.engine
    assert engine is not None and engine.name == "transformers"
    model = engine.model  # type: ignore[attr-defined]
    assert sorted(model.peft_config) == ["v0", "v1"]  # one PeftModel: one copy of the base weights, two adapters
    assert [m.adapter for m in server.service.models()] == ["v0", "v1"]


async def test_each_name_answers_with_its_own_adapter(stub, client, alone):
    for version, names in enumerate(NAMES):
        for name in names:
            reply = await stub.Generate(chat(name, PROMPTS[1]))
            assert reply.text == alone[version][PROMPTS[1]], name
            assert (reply.model, reply.model_version, reply.served_model) == (name, VERSIONS[version], SERVED[version])
        raw = await client.chat.completions.with_raw_response.create(
            model=names[-1], messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=12, temperature=0
        )
        completion = raw.parse()
        assert raw.headers[HEADER] == VERSIONS[version]
        assert completion.choices[0].message.content == alone[version][PROMPTS[0]]
        assert completion.model == names[-1] and completion.system_fingerprint.startswith(f"nw-1-{version}-0-")
    # the default (an empty model) is the first version
    reply = await stub.Generate(chat("", PROMPTS[2]))
    assert (reply.model, reply.text, reply.served_model) == (NAMES[0][0], alone[0][PROMPTS[2]], SERVED[0])


async def test_mixed_concurrent_requests_keep_their_adapters(server, stub, client, alone):
    """16 requests, both versions interleaved, gRPC unary, gRPC streams and SSE at once: they share decode steps
    (the batch holds rows of both adapters) and each answer is its own adapter's."""

    async def grpc_unary(version: int, prompt: str):
        r = await stub.Generate(chat(NAMES[version][0], prompt))
        return r.text, r.model_version

    async def grpc_stream(version: int, prompt: str):
        req = svc.GenerateStreamRequest(
            model=NAMES[version][1],
            messages=[pb.ChatMessage(role="user", content=prompt)],
            sampling=pb.SamplingParams(max_tokens=12),
        )
        parts = [m async for m in stub.GenerateStream(req)]
        return "".join(m.delta for m in parts), parts[-1].model_version

    async def sse(version: int, prompt: str):
        async with client.chat.completions.with_streaming_response.create(
            model=NAMES[version][2], messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0, stream=True
        ) as streamed:
            chunks = [c async for c in await streamed.parse()]
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), streamed.headers[HEADER]

    calls, expected = [], []
    for i in range(16):
        version, prompt = i % 2, PROMPTS[(i // 2) % len(PROMPTS)]
        calls.append((grpc_unary, grpc_stream, sse)[i % 3](version, prompt))
        expected.append((alone[version][prompt], VERSIONS[version]))
    engine = server.service.engine
    real, passes = engine.model, []

    class Spy:  # records each forward pass's per-row adapters
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, **kw):
            passes.append(tuple(kw.get("adapter_names") or ()))
            return real(**kw)

    engine.model = Spy()
    try:
        results = await asyncio.gather(*calls)
    finally:
        engine.model = real
    assert results == expected
    assert any({"v0", "v1"} <= set(p) for p in passes), "no forward pass had rows of both versions"


async def test_models_list_both_versions_with_parent_and_root(server, stub, client, tiny_base, adapters):
    models = (await client.models.list()).data
    assert [m.id for m in models] == [*NAMES[0], SERVED[0], *NAMES[1], SERVED[1]]
    for m in models:
        version = 0 if m.id in (*NAMES[0], SERVED[0]) else 1
        assert m.root == SERVED[version] and m.parent == str(tiny_base)  # type: ignore[attr-defined]
        assert m.model_version == VERSIONS[version]  # type: ignore[attr-defined]
    got = await client.models.retrieve(NAMES[1][0])
    assert (got.root, got.parent) == (SERVED[1], str(tiny_base))  # type: ignore[attr-defined]
    listed = (await stub.ListModels(svc.ListModelsRequest())).models
    assert [(m.name, m.model_version, list(m.stable_names)) for m in listed] == [
        (SERVED[0], VERSIONS[0], NAMES[0]),
        (SERVED[1], VERSIONS[1], NAMES[1]),
    ]
    assert [m.adapter_sha256 for m in listed] == [sha for _, sha in adapters]
    assert {m.base_model for m in listed} == {str(tiny_base)} and {m.engine for m in listed} == {"transformers"}


@pytest.mark.parametrize("name", ["advisor-ab/1.2.0", "advisor@staging", "advisor-1-1-0-cccccccc"])
async def test_other_names_are_not_found(stub, client, name):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(chat(name, "Hi"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and error_info(err.value).reason == "MODEL_NOT_FOUND"
    with pytest.raises(openai.NotFoundError) as http_err:
        await client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    body = http_err.value.body
    assert isinstance(body, dict) and body["code"] == "MODEL_NOT_FOUND" and body["type"] == "not_found_error"
    assert not any(n in body["message"] for n in (*SERVED, *NAMES[1]))


def test_configuration_errors(tiny_base, adapters):
    (path1, sha1) = adapters[1]
    one = {"served_model_name": SERVED[1], "adapter_uri": path1.as_uri(), "adapter_sha256": sha1}
    bad = {
        "not JSON": "[{",
        "must be a JSON list": json.dumps(one),
        "needs adapter_uri and adapter_sha256": json.dumps([{"served_model_name": SERVED[1], "adapter_uri": path1.as_uri()}]),
        "keys among": json.dumps([{**one, "engine": "vllm"}]),
        "served model name": json.dumps([{**one, "served_model_name": "Bad Name"}]),
        "given to two versions": json.dumps([{**one, "model_names": [NAMES[0][1]]}]),
    }
    for message, raw in bad.items():
        with pytest.raises(SystemExit, match=f"configuration error: .*{message}"):
            ModelServer(config(tiny_base, adapters, extra_versions=raw))
    with pytest.raises(SystemExit, match="at most one may be the base"):  # no adapter: both are the base itself
        ModelServer(
            config(
                tiny_base,
                adapters,
                adapter_uri="",
                adapter_sha256="",
                extra_versions=json.dumps([{"served_model_name": SERVED[1]}]),
            )
        )
