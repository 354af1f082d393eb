"""The LOCAL backend serving three versions of one GGUF base from ONE llama.cpp model-server process (issue 17 §3),
through the real registry and deployer: versions 1.1.0 and 1.2.0 of a model trained on SmolLM2 each hold a GGUF LoRA
export (`ARTIFACT_FORMAT_GGUF_LORA`, tiny random LoRAs from `make_gguf_lora`) beside their own artifact, a PEFT
adapter directory that llama.cpp never loads (a placeholder here: the exports are the weights served), and 1.0.0 is
the base itself (a MERGED artifact whose uri is the builtin base: no adapter). A deployment of 1.1.0 with the other
two in `serving.additional_versions` and engine llama.cpp hands the replica the GGUF base, 1.1.0's export as
`--adapter-uri` and the others in `--extra-versions` (1.0.0 without an adapter). Through the deployer's router each
version's names answer with that version's weights: the greedy answer a llama.cpp engine with that adapter alone
(or none) gives, up to numerical near-ties (`neuroweaver_model_server.testing`; requests one at a time), and the
three versions' answers differ where they are decided."""

from __future__ import annotations

import json

import grpc
import openai
import pytest
from helpers import model_server_processes, watch_until

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.inference.v1 import inference_pb2 as ipb
from neuroweaver.inference.v1 import inference_service_pb2 as isvc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as igrpc
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc

pytestmark = pytest.mark.slow  # a model-server process

BASE = "builtin:smollm2-135m-instruct"
MODEL = "projects/default/models/smolab"
# Prompts whose decided answers tell the base and the two test LoRAs (seeds 1, 2) apart (as test_llamacpp_multi_lora.py)
PROMPTS = [
    "What is the capital of France?",
    "What does a check engine light mean?",
    "Name a primary color.",
    "How many legs does a spider have?",
]
TOKENS = 8


async def register(stack, tmp_path) -> dict[str, tuple[str, str]]:
    """The three versions; returns {version name: (uri, sha256) of the GGUF LoRA llama.cpp must load, or ("", "")}."""
    from neuroweaver_ml import digest_path
    from neuroweaver_ml.models import builtin_gguf_path
    from neuroweaver_ml.testing import make_gguf_lora

    base_gguf = builtin_gguf_path("smollm2-135m-instruct")
    await stack.reg.CreateModel(
        rsvc.CreateModelRequest(parent="projects/default", model_id="smolab", model=rpb.Model(base_model=BASE))
    )
    sha, size = digest_path(base_gguf)
    await stack.reg.CreateModelVersion(
        rsvc.CreateModelVersionRequest(
            parent=MODEL,
            version="1.0.0",
            model_version=rpb.ModelVersion(
                artifact=rpb.Artifact(uri=BASE, sha256=sha, size_bytes=size, format=rpb.ARTIFACT_FORMAT_MERGED),
                lineage=rpb.Lineage(base_model=BASE, method="base"),
            ),
        )
    )
    loads = {f"{MODEL}/versions/1.0.0": ("", "")}
    for seed, version in ((1, "1.1.0"), (2, "1.2.0")):
        peft = tmp_path / f"peft-{version}"
        peft.mkdir()
        (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "note": "placeholder, never loaded"}))
        peft_sha, _ = digest_path(peft)
        mv = await stack.reg.CreateModelVersion(
            rsvc.CreateModelVersionRequest(
                parent=MODEL,
                version=version,
                model_version=rpb.ModelVersion(
                    artifact=rpb.Artifact(uri=peft.as_uri(), sha256=peft_sha, format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
                    lineage=rpb.Lineage(base_model=BASE, method="sft-lora"),
                ),
            )
        )
        lora, lora_sha = make_gguf_lora(base_gguf, tmp_path / f"adapter-{version}-f16.gguf", seed=seed)
        await stack.reg.AddModelVersionArtifact(
            rsvc.AddModelVersionArtifactRequest(
                name=mv.name,
                artifact=rpb.Artifact(
                    uri=lora.as_uri(),
                    sha256=lora_sha,
                    size_bytes=lora.stat().st_size,
                    format=rpb.ARTIFACT_FORMAT_GGUF_LORA,
                    quantization="f16",
                    produced_by="test",
                ),
            )  # fmt: skip
        )
        loads[mv.name] = (lora.as_uri(), lora_sha)
    return loads


async def test_one_llamacpp_process_serves_three_versions_of_one_base(stack, tmp_path):
    from neuroweaver_ml import uri_to_path
    from neuroweaver_ml.models import builtin_gguf_path
    from neuroweaver_model_server.testing import llamacpp_references

    loads = await register(stack, tmp_path)
    base_v, own, other = (f"{MODEL}/versions/{v}" for v in ("1.0.0", "1.1.0", "1.2.0"))
    alone = {
        v: await llamacpp_references(
            str(builtin_gguf_path("smollm2-135m-instruct")), str(uri_to_path(uri)) if uri else None, PROMPTS, TOKENS
        )
        for v, (uri, _) in loads.items()
    }
    for v, mine in alone.items():  # each version's decided answers tell it from every other version
        for w, theirs in alone.items():
            assert v == w or any(not mine[q].admits(theirs[q].text) for q in PROMPTS), (v, w)

    dep, name = stack.dep, "projects/default/deployments/smol-ab"
    created = await dep.CreateDeployment(
        dsvc.CreateDeploymentRequest(
            parent="projects/default",
            deployment_id="smol-ab",
            deployment=dpb.Deployment(
                model_version=own,
                replicas=1,
                backend=dpb.BACKEND_LOCAL,
                serving=dpb.ServingConfig(
                    engine=dpb.ServingConfig.ENGINE_LLAMA_CPP,
                    additional_versions=[other, base_v],
                    max_new_tokens_limit=64,
                    max_batch_size=4,
                ),
            ),
        )
    )
    assert [v.model_version for v in created.served_versions] == [own, other, base_v]
    d = await watch_until(dep, name, lambda d: d.state == dpb.Deployment.STATE_AVAILABLE and d.ready_replicas == 1)
    try:
        [process] = model_server_processes()  # one process serves the three versions
        command = process.cmdline()
        assert command[command.index("--engine") + 1] == "llama.cpp"
        assert command[command.index("--base-model") + 1] == BASE
        assert (command[command.index("--adapter-uri") + 1], command[command.index("--adapter-sha256") + 1]) == loads[own]
        extra = json.loads(command[command.index("--extra-versions") + 1])
        assert {e["model_version"]: (e["adapter_uri"], e["adapter_sha256"]) for e in extra} == {
            other: loads[other],
            base_v: ("", ""),
        }
        async with grpc.aio.insecure_channel(d.endpoint) as channel:
            inference = igrpc.InferenceServiceStub(channel)
            listed = (await inference.ListModels(isvc.ListModelsRequest())).models
            assert [(m.model_version, m.adapter_sha256, m.engine) for m in listed] == [
                (own, loads[own][1], "llama.cpp"),
                (other, loads[other][1], "llama.cpp"),
                (base_v, "", "llama.cpp"),
            ]
            for version in (own, other, base_v):  # one request at a time
                number = version.rsplit("/", 1)[-1]
                for model in (f"smol-ab/{number}", f"{name}/{number}"):
                    for q in PROMPTS:
                        reply = await inference.Generate(
                            isvc.GenerateRequest(
                                model=model,
                                messages=[ipb.ChatMessage(role="user", content=q)],
                                sampling=ipb.SamplingParams(max_tokens=TOKENS),
                            )
                        )
                        assert reply.model_version == version, model
                        assert alone[version][q].admits(reply.text), (model, q, reply.text, alone[version][q])
        async with openai.AsyncOpenAI(base_url=d.openai_base_url, api_key="unused", max_retries=0) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model=f"smol-ab/{base_v.rsplit('/', 1)[-1]}",
                messages=[{"role": "user", "content": PROMPTS[0]}],
                max_tokens=TOKENS,
                temperature=0,
            )
            assert raw.headers["x-neuroweaver-model-version"] == base_v
            assert alone[base_v][PROMPTS[0]].admits(raw.parse().choices[0].message.content or "")
    finally:
        await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=name))
    assert model_server_processes() == []
