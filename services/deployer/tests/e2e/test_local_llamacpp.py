"""The LOCAL backend deploying with engine=llama.cpp: a version whose base is the demo's GGUF (SmolLM2-135M-Instruct
Q4_1) and whose adapter is a GGUF LoRA, served by a real model-server process on the llama.cpp engine; a version
with a PEFT adapter is refused for that engine before anything runs."""

from __future__ import annotations

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
from neuroweaver_runtime.grpc_errors import error_info

pytestmark = pytest.mark.slow  # a model-server process

BASE = "builtin:smollm2-135m-instruct"
LLAMA_CPP = dpb.ServingConfig.ENGINE_LLAMA_CPP


async def test_local_deployment_on_the_llamacpp_engine(stack, tmp_path):
    from neuroweaver_ml.models import builtin_gguf_path
    from neuroweaver_ml.testing import make_gguf_lora

    lora, sha = make_gguf_lora(builtin_gguf_path("smollm2-135m-instruct"), tmp_path / "adapter.gguf", seed=1)
    await stack.reg.CreateModel(
        rsvc.CreateModelRequest(parent="projects/default", model_id="smol", model=rpb.Model(base_model=BASE))
    )
    mv = await stack.reg.CreateModelVersion(
        rsvc.CreateModelVersionRequest(
            parent="projects/default/models/smol",
            version="1.0.0",
            model_version=rpb.ModelVersion(
                artifact=rpb.Artifact(uri=lora.as_uri(), sha256=sha, format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
                lineage=rpb.Lineage(base_model=BASE, method="sft-lora"),
            ),
        )
    )
    dep = stack.dep

    def request(deployment_id: str, version: str) -> dsvc.CreateDeploymentRequest:
        return dsvc.CreateDeploymentRequest(
            parent="projects/default",
            deployment_id=deployment_id,
            deployment=dpb.Deployment(
                model_version=version,
                replicas=1,
                backend=dpb.BACKEND_LOCAL,
                serving=dpb.ServingConfig(engine=LLAMA_CPP, max_new_tokens_limit=64, max_batch_size=2),
            ),
        )

    with pytest.raises(grpc.aio.AioRpcError) as err:  # a PEFT adapter on a transformers checkpoint: no GGUF
        await dep.CreateDeployment(request("tiny-cpu", stack.versions[0]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err.value).reason == "GGUF_ARTIFACT_MISSING"

    name = "projects/default/deployments/smol-cpu"
    created = await dep.CreateDeployment(request("smol-cpu", mv.name))
    assert created.serving.engine == LLAMA_CPP
    d = await watch_until(dep, name, lambda d: d.state == dpb.Deployment.STATE_AVAILABLE and d.ready_replicas == 1)
    [process] = model_server_processes()
    command = process.cmdline()
    assert command[command.index("--engine") + 1] == "llama.cpp"
    try:
        async with grpc.aio.insecure_channel(d.endpoint) as channel:
            inference = igrpc.InferenceServiceStub(channel)
            [served] = (await inference.ListModels(isvc.ListModelsRequest())).models
            assert (served.engine, served.adapter_sha256, served.model_version) == ("llama.cpp", sha, mv.name)
            reply = await inference.Generate(
                isvc.GenerateRequest(
                    messages=[ipb.ChatMessage(role="user", content="Hello!")], sampling=ipb.SamplingParams(max_tokens=6)
                )
            )
            assert reply.text and 0 < reply.usage.completion_tokens <= 6 and reply.model_version == mv.name
        client = openai.AsyncOpenAI(base_url=d.openai_base_url, api_key="unused", max_retries=0)
        chat = await client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hello!"}], max_tokens=6, temperature=0
        )
        assert chat.choices[0].message.content == reply.text  # greedy: the same answer through the router's HTTP
    finally:
        await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=name))
    assert model_server_processes() == []


async def test_a_cpu_deployment_naming_no_engine_serves_the_versions_gguf_lora_export(stack, tmp_path):
    """The real pipeline: a PEFT adapter trained on SmolLM2 (here random LoRA weights), exported to a GGUF LoRA with
    llama.cpp's converter and added to the version's artifacts; a LOCAL deployment that names no engine runs it on
    llama.cpp (the adapter's GGUF on the builtin GGUF base). Which weights a named engine gets: unit test_engines."""
    from neuroweaver_ml import digest_path, resolve_base_model
    from neuroweaver_ml.export import convert_lora_to_gguf
    from neuroweaver_ml.testing import make_lora_adapter

    base_dir = resolve_base_model(BASE)
    peft_dir, peft_sha = make_lora_adapter(base_dir, tmp_path / "peft", seed=3)
    export = convert_lora_to_gguf(peft_dir, base_dir, tmp_path / "adapter-f16.gguf")
    gguf_sha, gguf_size = digest_path(export.path)
    await stack.reg.CreateModel(
        rsvc.CreateModelRequest(parent="projects/default", model_id="smol2", model=rpb.Model(base_model=BASE))
    )
    mv = await stack.reg.CreateModelVersion(
        rsvc.CreateModelVersionRequest(
            parent="projects/default/models/smol2",
            version="1.0.0",
            model_version=rpb.ModelVersion(
                artifact=rpb.Artifact(uri=peft_dir.as_uri(), sha256=peft_sha, format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
                lineage=rpb.Lineage(base_model=BASE, method="sft-lora"),
            ),
        )
    )
    await stack.reg.AddModelVersionArtifact(
        rsvc.AddModelVersionArtifactRequest(
            name=mv.name,
            artifact=rpb.Artifact(
                uri=export.path.as_uri(),
                sha256=gguf_sha,
                size_bytes=gguf_size,
                format=rpb.ARTIFACT_FORMAT_GGUF_LORA,
                quantization="f16",
                produced_by="test (llama.cpp convert_lora_to_gguf)",
            ),  # fmt: skip
        )
    )
    dep = stack.dep
    served = {}
    for deployment_id, engine in (("smol2-auto", dpb.ServingConfig.ENGINE_UNSPECIFIED),):
        name = f"projects/default/deployments/{deployment_id}"
        await dep.CreateDeployment(
            dsvc.CreateDeploymentRequest(
                parent="projects/default",
                deployment_id=deployment_id,
                deployment=dpb.Deployment(
                    model_version=mv.name,
                    replicas=1,
                    backend=dpb.BACKEND_LOCAL,
                    serving=dpb.ServingConfig(engine=engine, max_new_tokens_limit=64, max_batch_size=2),
                ),  # fmt: skip
            )
        )
        try:
            d = await watch_until(dep, name, lambda d: d.state == dpb.Deployment.STATE_AVAILABLE and d.ready_replicas == 1)
            [process] = model_server_processes()
            command = process.cmdline()
            async with grpc.aio.insecure_channel(d.endpoint) as channel:
                inference = igrpc.InferenceServiceStub(channel)
                [model] = (await inference.ListModels(isvc.ListModelsRequest())).models
                reply = await inference.Generate(
                    isvc.GenerateRequest(
                        messages=[ipb.ChatMessage(role="user", content="What is the capital of France?")],
                        sampling=ipb.SamplingParams(max_tokens=6),
                    )
                )
            served[deployment_id] = (model.engine, command[command.index("--adapter-uri") + 1], model.adapter_sha256)
            assert reply.text and reply.model_version == mv.name
        finally:
            await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=name))
    assert served["smol2-auto"] == ("llama.cpp", export.path.as_uri(), gguf_sha)
