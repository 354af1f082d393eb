"""The LOCAL backend serving two versions of one base from one model-server process (issue 17 §3): a deployment of
version 1.0.0 with 1.1.0 in serving.additional_versions runs ONE replica process (the tiny base loaded once, both
adapters); through the deployer's router each version's names reach its own adapter (greedy answers equal to that
adapter alone), answers say which version served them, and `/v1/models` lists both with `parent`/`root`."""

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

pytestmark = pytest.mark.slow  # a model-server process

PROMPT = "Tell me about the weather in spring."


async def test_local_deployment_serves_two_versions_on_one_base(stack, tiny_base, adapters):
    from neuroweaver_ml import generate, load_for_inference

    alone = []
    for path, _ in adapters[:2]:
        loaded = load_for_inference(tiny_base, path, device="cpu", merge_adapter=False)
        alone.append(generate(loaded.model, loaded.tokenizer, [{"role": "user", "content": PROMPT}], 10).text)
    assert alone[0] != alone[1]

    dep, own, other = stack.dep, stack.versions[0], stack.versions[1]
    name = "projects/default/deployments/ab"
    created = await dep.CreateDeployment(
        dsvc.CreateDeploymentRequest(
            parent="projects/default",
            deployment_id="ab",
            deployment=dpb.Deployment(
                model_version=own,
                replicas=1,
                backend=dpb.BACKEND_LOCAL,
                serving=dpb.ServingConfig(additional_versions=[other], max_new_tokens_limit=64, max_batch_size=4),
            ),
        )
    )
    own_id, other_id = own.rsplit("/", 1)[-1], other.rsplit("/", 1)[-1]
    assert [(v.model_version, list(v.model_names)) for v in created.served_versions] == [
        (own, [name, "ab", f"{name}/{own_id}", f"ab/{own_id}"]),
        (other, [f"{name}/{other_id}", f"ab/{other_id}"]),
    ]
    d = await watch_until(dep, name, lambda d: d.state == dpb.Deployment.STATE_AVAILABLE and d.ready_replicas == 1)
    try:
        [process] = model_server_processes()  # one process serves both versions
        command = process.cmdline()
        [extra] = json.loads(command[command.index("--extra-versions") + 1])
        assert (extra["model_version"], extra["model_names"]) == (other, [f"{name}/{other_id}", f"ab/{other_id}"])
        async with grpc.aio.insecure_channel(d.endpoint) as channel:
            inference = igrpc.InferenceServiceStub(channel)
            listed = (await inference.ListModels(isvc.ListModelsRequest())).models
            assert [m.model_version for m in listed] == [own, other]
            assert listed[1].name == created.served_versions[1].served_model_name
            for model, version, text in (
                (f"ab/{own_id}", own, alone[0]),
                (f"ab/{other_id}", other, alone[1]),
                ("", own, alone[0]),
            ):
                reply = await inference.Generate(
                    isvc.GenerateRequest(
                        model=model,
                        messages=[ipb.ChatMessage(role="user", content=PROMPT)],
                        sampling=ipb.SamplingParams(max_tokens=10),
                    )
                )
                assert (reply.model_version, reply.text) == (version, text), model
        async with openai.AsyncOpenAI(base_url=d.openai_base_url, api_key="unused", max_retries=0) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model=f"{name}/{other_id}", messages=[{"role": "user", "content": PROMPT}], max_tokens=10, temperature=0
            )
            assert raw.headers["x-neuroweaver-model-version"] == other
            assert raw.parse().choices[0].message.content == alone[1]
            models = {m.id: m for m in (await client.models.list()).data}
            assert models[f"ab/{other_id}"].root == listed[1].name  # type: ignore[attr-defined]
            assert models[f"ab/{other_id}"].parent == models["ab"].parent == str(stack.base)  # type: ignore[attr-defined]
    finally:
        await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=name))
    assert model_server_processes() == []
