"""The deployment spec names the model server's engine: validation, the version's artifacts checked against it,
the proto enum, and the flag reaching the model server (local command line and Kubernetes pod args)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from neuroweaver.deployer.v1 import deployment_pb2 as pb
from neuroweaver_deployer.adapters.kube import KubeDefaults, model_server_spec
from neuroweaver_deployer.adapters.local import model_server_command
from neuroweaver_deployer.api.convert import deployment_from_pb, deployment_to_pb
from neuroweaver_deployer.domain.model import (
    VERSION,
    Autoscaling,
    Backend,
    Deployment,
    ResolvedVersion,
    Resources,
    Serving,
    Target,
)
from neuroweaver_kube.manifests import model_server_args
from neuroweaver_runtime.errors import FailedPrecondition, InvalidArgument

P = "projects/default"


def version(model: str, number: str) -> ResolvedVersion:  # a PEFT adapter directory on a local base (as conftest's)
    name = VERSION.format(project="default", model=model, version=number)
    return ResolvedVersion(
        name,
        number,
        f"file:///artifacts/{model}/{number}",
        f"{model}{number}".encode().hex().ljust(64, "0"),
        "file:///models/base",
    )


def gguf_version(number: str = "3.0.0", base: str = "builtin:smollm2-135m-instruct") -> ResolvedVersion:
    v = version("smol", number)
    return dataclasses.replace(v, artifact_uri=f"file:///artifacts/smol/{number}/adapter.gguf", base_model=base)


def spec(v: ResolvedVersion, **serving) -> Deployment:
    return Deployment(name="", model_version=v.name, serving=Serving(**serving))


async def test_the_engine_must_fit_the_version(fakes):
    svc = fakes.service
    gguf = fakes.registry.add(gguf_version())
    with pytest.raises(FailedPrecondition) as caught:  # a PEFT adapter directory: no GGUF LoRA
        await svc.create(P, "peft-on-llama", spec(fakes.v1, engine="llama.cpp"), "", "b")
    assert caught.value.reason == "GGUF_ARTIFACT_MISSING" and caught.value.metadata["missing"] == "base_model"
    local_base = fakes.registry.add(gguf_version("3.1.0", base="/models/smol.gguf"))
    no_gguf_adapter = fakes.registry.add(
        dataclasses.replace(version("smol", "3.2.0"), base_model="builtin:smollm2-135m-instruct")
    )
    with pytest.raises(FailedPrecondition) as caught:
        await svc.create(P, "adapter-not-gguf", spec(no_gguf_adapter, engine="llama.cpp"), "", "b")
    assert caught.value.reason == "GGUF_ARTIFACT_MISSING" and caught.value.metadata["missing"] == "adapter"
    for engine in ("transformers", "vllm"):
        with pytest.raises(FailedPrecondition) as caught:
            await svc.create(P, f"gguf-on-{engine}", spec(gguf, engine=engine), "", "b")
        assert caught.value.reason == "ENGINE_CANNOT_LOAD_ARTIFACT"
    assert [d.name for d in (await svc.list(P, 10, "", "", "")).items] == []  # nothing stored

    created = await svc.create(P, "smol", spec(gguf, engine="llama.cpp"), "", "b")
    assert created.serving.engine == "llama.cpp"
    assert (await svc.create(P, "smol-file", spec(local_base, engine="llama.cpp"), "", "b")).serving.engine == "llama.cpp"
    auto = await svc.create(P, "auto", spec(fakes.v1), "", "b")  # unset: the model server's auto
    assert auto.serving.engine == ""

    # changing only the engine is checked against the version served now, and replaces the replicas
    with pytest.raises(FailedPrecondition) as caught:
        await svc.update(Deployment(name=created.name, serving=Serving(engine="transformers")), {"serving"}, "")
    assert caught.value.reason == "ENGINE_CANNOT_LOAD_ARTIFACT"
    async with asyncio.timeout(60):
        while not any(t.deployment == auto.name for t in fakes.backend.applied):  # the controller runs it first
            await asyncio.sleep(0.01)
    applied = len(fakes.backend.applied)
    updated = await svc.update(Deployment(name=auto.name, serving=Serving(engine="transformers")), {"serving"}, "")
    assert updated.serving.engine == "transformers"
    assert updated.target is not None

    def applies_of_auto() -> list:  # the other deployments' applies may still come in between
        return [t for t in fakes.backend.applied if t.deployment == auto.name]

    async with asyncio.timeout(60):
        while not any(t.deployment == auto.name for t in fakes.backend.applied[applied:]):  # converged in a task
            await asyncio.sleep(0.01)
    before, *_, new = applies_of_auto()
    assert new.deployment == auto.name and new.serving.engine == "transformers" and before.serving.engine == ""
    assert new.fingerprint() != before.fingerprint()  # another engine: the replicas are replaced


def test_validation_of_the_engine():
    from neuroweaver_deployer.domain.model import validate_spec
    from neuroweaver_runtime.errors import Violations

    def violations(d: Deployment) -> dict[str, str]:
        v = Violations()
        validate_spec(d, v, creating=True)
        return {f.field: f.description for f in v.items}

    base = dict(name="", model_version=f"{P}/models/m/versions/1.0.0")
    assert violations(Deployment(**base, serving=Serving(engine="llama.cpp"))) == {}
    assert "deployment.serving.engine" in violations(Deployment(**base, serving=Serving(engine="onnx")))
    assert "deployment.serving.load_in_4bit" in violations(
        Deployment(**base, serving=Serving(engine="llama.cpp", load_in_4bit=True))
    )
    kube = dict(base, backend=Backend.KUBERNETES)
    assert "GPU" in violations(Deployment(**kube, serving=Serving(engine="vllm")))["deployment.serving.engine"]
    assert violations(Deployment(**kube, serving=Serving(engine="vllm"), resources=Resources(gpus=1))) == {}
    assert (
        "CPU"
        in violations(Deployment(**kube, serving=Serving(engine="llama.cpp"), resources=Resources(gpus=1)))[
            "deployment.serving.engine"
        ]
    )


def test_the_proto_enum_round_trips_and_unknown_values_are_refused():
    for value, engine in (
        (pb.ServingConfig.ENGINE_UNSPECIFIED, ""),
        (pb.ServingConfig.ENGINE_TRANSFORMERS, "transformers"),
        (pb.ServingConfig.ENGINE_LLAMA_CPP, "llama.cpp"),
        (pb.ServingConfig.ENGINE_VLLM, "vllm"),
    ):
        d = deployment_from_pb(pb.Deployment(name=f"{P}/deployments/d", serving=pb.ServingConfig(engine=value)))
        assert d.serving.engine == engine
        assert deployment_to_pb(d).serving.engine == value
    with pytest.raises(InvalidArgument) as caught:
        deployment_from_pb(pb.Deployment(serving=pb.ServingConfig(engine=42)))  # type: ignore[arg-type]
    assert caught.value.reason == "INVALID_ENUM"


def test_the_engine_reaches_the_model_server_locally_and_on_kubernetes():
    v = gguf_version()
    target = Target(
        f"{P}/deployments/smol", v, "smol-3-0-0-x", 1, Serving(engine="llama.cpp"), Resources(), Autoscaling(), "", {}
    )
    command = model_server_command(target, "127.0.0.1", 1, 2, 3, 5.0)
    assert command[command.index("--engine") + 1] == "llama.cpp"
    assert "--engine" not in model_server_command(dataclasses.replace(target, serving=Serving()), "127.0.0.1", 1, 2, 3, 5.0)
    pod = model_server_spec(target, KubeDefaults(image="m", namespace="neuroweaver", artifacts_mount_path="/artifacts"))
    args = model_server_args(pod)
    assert args[args.index("--engine") + 1] == "llama.cpp"


def test_which_weights_each_engine_gets_from_the_versions_exports():
    from neuroweaver_deployer.domain.model import check_engine_fits, server_load

    peft = dataclasses.replace(version("smol", "4.0.0"), base_model="builtin:smollm2-135m-instruct")
    lora = dataclasses.replace(peft, gguf_lora_uri="file:///exports/a-f16.gguf", gguf_lora_sha256="c" * 64)
    merged = dataclasses.replace(lora, gguf_uri="file:///exports/m-q4_k_m.gguf", gguf_sha256="d" * 64)

    def load(v: ResolvedVersion, gpus: int = 0, **serving):
        t = Target(f"{P}/deployments/d", v, "n", 1, Serving(**serving), Resources(gpus=gpus), Autoscaling(), "", {})
        got = server_load(t)
        return got.engine, got.base_model, got.adapter_uri

    # no export: the model server's auto with the PEFT adapter (transformers on a CPU)
    assert load(peft) == ("", "builtin:smollm2-135m-instruct", peft.artifact_uri)
    # a GGUF LoRA export on a GGUF base: llama.cpp on a CPU, by default and when named
    assert load(lora) == ("llama.cpp", "builtin:smollm2-135m-instruct", "file:///exports/a-f16.gguf")
    assert load(lora, engine="llama.cpp") == load(lora)
    # a merged GGUF export is preferred: no adapter matmuls
    assert load(merged) == ("llama.cpp", "file:///exports/m-q4_k_m.gguf", "")
    # GPUs, 4-bit or another engine named: the trained PEFT adapter
    assert load(merged, gpus=1) == ("", "builtin:smollm2-135m-instruct", peft.artifact_uri)
    assert load(merged, load_in_4bit=True)[0] == ""
    assert load(merged, engine="transformers") == ("transformers", "builtin:smollm2-135m-instruct", peft.artifact_uri)
    # a GGUF LoRA on a transformers checkpoint base is no llama.cpp load
    on_dir = dataclasses.replace(lora, base_model="file:///models/base")
    assert load(on_dir)[0] == ""
    with pytest.raises(FailedPrecondition):
        check_engine_fits(Serving(engine="llama.cpp"), on_dir)
    check_engine_fits(Serving(engine="llama.cpp"), lora)  # the export makes it fit
    check_engine_fits(Serving(engine="llama.cpp"), dataclasses.replace(on_dir, gguf_uri="file:///exports/m.gguf"))
    # another export changes what replicas load: they are replaced
    fp = [
        Target(f"{P}/deployments/d", v, "n", 1, Serving(), Resources(), Autoscaling(), "", {}).fingerprint()
        for v in (peft, lora, merged)
    ]
    assert len(set(fp)) == 3


def test_the_registry_gateway_picks_the_exports():
    from neuroweaver.registry.v1 import registry_pb2 as rpb
    from neuroweaver_deployer.adapters.registry import GGUF_LORA_PREFERENCE, GGUF_PREFERENCE, _pick

    artifacts = [
        rpb.Artifact(uri="file:///e/m-f16.gguf", format=rpb.ARTIFACT_FORMAT_GGUF, quantization="f16"),
        rpb.Artifact(uri="file:///e/m-q4.gguf", format=rpb.ARTIFACT_FORMAT_GGUF, quantization="q4_k_m"),
        rpb.Artifact(uri="file:///e/a-q8.gguf", format=rpb.ARTIFACT_FORMAT_GGUF_LORA, quantization="q8_0"),
        rpb.Artifact(uri="file:///e/a-f16.gguf", format=rpb.ARTIFACT_FORMAT_GGUF_LORA, quantization="f16"),
        rpb.Artifact(uri="file:///e/merged", format=rpb.ARTIFACT_FORMAT_MERGED, quantization="f16"),
    ]
    assert _pick(artifacts, rpb.ARTIFACT_FORMAT_GGUF, GGUF_PREFERENCE).uri == "file:///e/m-q4.gguf"
    assert _pick(artifacts, rpb.ARTIFACT_FORMAT_GGUF_LORA, GGUF_LORA_PREFERENCE).uri == "file:///e/a-f16.gguf"
    assert _pick(artifacts[4:], rpb.ARTIFACT_FORMAT_GGUF, GGUF_PREFERENCE) is None
