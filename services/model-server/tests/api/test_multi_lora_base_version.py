"""A version that is the base itself among several on one base (issue 17 §3), transformers engine: one model server,
the tiny Llama loaded once with one LoRA adapter; the base version has no adapter (no `--adapter-uri`, or an extra
version without `adapter_uri`), so its rows decode with the adapter disabled (PEFT's `__base__` in a mixed batch).
Each name answers as its weights alone do (the plain base, or base + adapter), also when rows of both versions share
forward passes; ListModels shows no adapter digest for the base version. At most one version may be the base."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from neuroweaver.inference.v1 import inference_pb2 as pb
from neuroweaver.inference.v1 import inference_service_pb2 as svc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as svc_grpc
from neuroweaver_model_server.app import ModelServer, ModelServerConfig

BASE_VERSION, TUNED = "projects/default/models/advisor/versions/1.0.0", "projects/default/models/advisor/versions/1.1.0"
NAMES = {BASE_VERSION: ["advisor-ab", "advisor-ab/1.0.0"], TUNED: ["advisor-ab/1.1.0"]}
SERVED = {BASE_VERSION: "advisor-1-0-0-", TUNED: "advisor-1-1-0-bbbbbbbb"}
PROMPTS = ["Hi", "Tell me about the weather in spring.", "a b c d", "Once upon a time there was"]
TOKENS = 12


def config(tiny_base, adapter, *, base_first: bool) -> ModelServerConfig:
    """The base version first (no --adapter-uri) or the tuned one first (the base as an extra version)."""
    path, sha = adapter
    first, second = (BASE_VERSION, TUNED) if base_first else (TUNED, BASE_VERSION)
    own = {"adapter_uri": path.as_uri(), "adapter_sha256": sha} if first == TUNED else {}
    extra = {"served_model_name": SERVED[second], "model_version": second, "model_names": NAMES[second]}
    if second == TUNED:
        extra |= {"adapter_uri": path.as_uri(), "adapter_sha256": sha}
    return ModelServerConfig(
        grpc_port=0, http_port=0, metrics_port=-1, base_model=str(tiny_base), served_model_name=SERVED[first],
        model_names=",".join(NAMES[first]), model_version=first, extra_versions=json.dumps([extra]), device="cpu",
        shutdown_grace_seconds=1.0, shutdown_drain_seconds=0, **own,
    )  # type: ignore[arg-type]  # fmt: skip


@pytest.fixture(scope="module")
def alone(tiny_base, adapters):
    """Greedy answers of the plain base and of base + the adapter (unmerged PEFT), one request at a time."""
    from neuroweaver_ml import generate, load_for_inference

    out = {}
    for version, adapter in ((BASE_VERSION, None), (TUNED, adapters[0][0])):
        loaded = load_for_inference(tiny_base, adapter, device="cpu", merge_adapter=False)
        out[version] = {
            p: generate(loaded.model, loaded.tokenizer, [{"role": "user", "content": p}], TOKENS).text for p in PROMPTS
        }
    assert out[BASE_VERSION] != out[TUNED], "the adapter must change the answers, or routing would go unchecked"
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["base-first", "base-extra"])
async def server(request, tiny_base, adapters):
    s = ModelServer(config(tiny_base, adapters[0], base_first=request.param))
    assert s.engine_name == "transformers"
    await s.start()
    yield s
    await s.stop()


def chat(model: str, prompt: str) -> svc.GenerateRequest:
    return svc.GenerateRequest(
        model=model, messages=[pb.ChatMessage(role="user", content=prompt)], sampling=pb.SamplingParams(max_tokens=TOKENS)
    )


async def test_each_version_answers_with_its_own_weights(server, adapters, alone):
    model = server.service.engine.model
    tuned = next(m for m in server.service.models() if m.model_version == TUNED)
    assert list(model.peft_config) == [tuned.adapter]  # the base once, the one adapter on it
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc.port}") as channel:
        stub = svc_grpc.InferenceServiceStub(channel)
        for version, names in NAMES.items():
            for name in (*names, SERVED[version]):
                reply = await stub.Generate(chat(name, PROMPTS[1]))
                assert (reply.text, reply.model_version) == (alone[version][PROMPTS[1]], version), name
        listed = (await stub.ListModels(svc.ListModelsRequest())).models
    assert {m.model_version: m.adapter_sha256 for m in listed} == {BASE_VERSION: "", TUNED: adapters[0][1]}


async def test_mixed_concurrent_requests_keep_their_weights(server, alone):
    """Rows of the base version and of the tuned one in the same forward passes: the adapter is applied to the tuned
    rows only."""
    engine = server.service.engine
    real, passes = engine.model, []

    class Spy:  # records each forward pass's per-row adapters
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, **kw):
            passes.append(tuple(kw.get("adapter_names") or ()))
            return real(**kw)

    tuned = next(m for m in server.service.models() if m.model_version == TUNED).adapter
    calls, expected = [], []
    versions = list(NAMES)
    engine.model = Spy()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc.port}") as channel:
            stub = svc_grpc.InferenceServiceStub(channel)
            for i in range(8):
                version, prompt = versions[i % 2], PROMPTS[(i // 2) % len(PROMPTS)]
                calls.append(stub.Generate(chat(NAMES[version][-1], prompt)))
                expected.append((alone[version][prompt], version))
            replies = await asyncio.gather(*calls)
    finally:
        engine.model = real
    assert [(r.text, r.model_version) for r in replies] == expected
    assert any({"__base__", tuned} <= set(p) for p in passes), "no forward pass had rows of both versions"
