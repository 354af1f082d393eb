"""Several versions on one base on the llama.cpp engine, and a version that is the base itself (issue 17 §3).

llama.cpp: every version served together gets its GGUF LoRA (its GGUF_LORA export, or its own artifact when that is
a .gguf) on the shared GGUF base, on the local command line and in the Kubernetes pod args alike; a CPU deployment
naming no engine gets llama.cpp when every version has one (as one version with a GGUF export does), the PEFT
adapters otherwise or with a GPU. FAILED_PRECONDITION `GGUF_ARTIFACT_MISSING` for a version without a GGUF LoRA
(a merged GGUF cannot share the base) or a base that is no GGUF, `SHARED_BASE_MISMATCH` for another base.

The base itself (a version without an adapter: a merged artifact that is the shared base model) is served beside
the adapters, as the deployment's own version or an additional one, on either engine: the model server gets no
adapter for it. Only one version may be the base (`ADAPTER_REQUIRED`), and a GGUF LoRA never goes to the
transformers engine (`ADAPTER_REQUIRED`)."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from neuroweaver_deployer.adapters.kube import KubeDefaults, model_server_spec
from neuroweaver_deployer.adapters.local import model_server_command
from neuroweaver_deployer.domain.model import (
    VERSION,
    Autoscaling,
    Deployment,
    ResolvedVersion,
    Resources,
    Serving,
    Target,
    server_load,
)
from neuroweaver_kube.manifests import model_server_args
from neuroweaver_runtime.errors import FailedPrecondition

P = "projects/default"
BASE = "builtin:smollm2-135m-instruct"
KUBE = KubeDefaults(
    image="img", namespace="nw", artifacts_mount_path="/artifacts", models_claim="models", models_mount_path="/models"
)


def smol(number: str, *, gguf_lora: bool = True, base: str = BASE) -> ResolvedVersion:
    """A version trained on the builtin GGUF base: its PEFT adapter, and (by default) its GGUF LoRA export."""
    name = VERSION.format(project="default", model="smol", version=number)
    v = ResolvedVersion(name, number, f"file:///artifacts/smol/{number}", number.encode().hex().ljust(64, "a"), base)
    if gguf_lora:
        v = dataclasses.replace(
            v,
            gguf_lora_uri=f"file:///artifacts/smol/{number}-export/adapter-f16.gguf",
            gguf_lora_sha256=number.encode().hex().ljust(64, "b"),
        )
    return v


def the_base(number: str = "1.0.0", base: str = BASE) -> ResolvedVersion:
    """The base model registered as a version (a MERGED artifact whose uri is the base): no adapter."""
    return ResolvedVersion(VERSION.format(project="default", model="smol", version=number), number, "", "", base)


def ab(own: ResolvedVersion, *others: ResolvedVersion, **serving) -> Deployment:
    return Deployment(name="", model_version=own.name, serving=Serving(additional_versions=[o.name for o in others], **serving))


async def applied(fakes, name: str) -> Target:
    async with asyncio.timeout(60):
        while not [t for t in fakes.backend.applied if t.deployment == name]:
            await asyncio.sleep(0.01)
    return [t for t in fakes.backend.applied if t.deployment == name][-1]


def flag(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def loads(target: Target) -> tuple[str | None, str | None, str | None, list[tuple[str, str]]]:
    """What the replica gets: --engine, --base-model, --adapter-uri and each extra version's (adapter_uri, sha256);
    the Kubernetes pod's args say the same."""
    command = model_server_command(target, "127.0.0.1", 1, 2, 3, 5.0)
    extra = json.loads(flag(command, "--extra-versions") or "[]")
    args = model_server_args(model_server_spec(target, KUBE))
    assert flag(args, "--extra-versions") == flag(command, "--extra-versions")
    assert (flag(args, "--engine"), flag(args, "--adapter-uri")) == (flag(command, "--engine"), flag(command, "--adapter-uri"))
    got = flag(command, "--engine"), flag(command, "--base-model"), flag(command, "--adapter-uri")
    return (*got, [(e["adapter_uri"], e["adapter_sha256"]) for e in extra])


async def test_llamacpp_serves_every_versions_gguf_lora_on_the_shared_base(fakes):
    svc, reg = fakes.service, fakes.registry
    a, b = reg.add(smol("1.1.0")), reg.add(smol("1.2.0"))
    d = await svc.create(P, "ab", ab(a, b, engine="llama.cpp"), "", "b")
    assert [v.model_version for v in d.served_versions] == [a.name, b.name]
    target = await applied(fakes, d.name)
    assert loads(target) == ("llama.cpp", BASE, a.gguf_lora_uri, [(b.gguf_lora_uri, b.gguf_lora_sha256)])
    command = model_server_command(target, "127.0.0.1", 1, 2, 3, 5.0)
    assert flag(command, "--adapter-sha256") == a.gguf_lora_sha256

    # naming no engine on a CPU: llama.cpp too, since every version has a GGUF LoRA
    auto = await svc.create(P, "ab-auto", ab(a, b), "", "b")
    assert auto.serving.engine == ""
    assert loads(await applied(fakes, auto.name)) == loads(target)
    # a version's own artifact may be the GGUF LoRA (no export needed)
    own_gguf = reg.add(
        dataclasses.replace(smol("1.3.0", gguf_lora=False), artifact_uri="file:///artifacts/smol/1.3.0/adapter.gguf")
    )
    mixed = await svc.create(P, "ab-own", ab(a, own_gguf), "", "b")
    assert loads(await applied(fakes, mixed.name))[3] == [(own_gguf.artifact_uri, own_gguf.artifact_sha256)]


def test_naming_no_engine_picks_the_peft_adapters_unless_every_version_has_a_gguf_lora():
    a, b, peft_only = smol("1.1.0"), smol("1.2.0"), smol("1.4.0", gguf_lora=False)

    def load(own: ResolvedVersion, *others: ResolvedVersion, gpus: int = 0, **serving):
        version = dataclasses.replace(own, co_served=others)
        t = Target(f"{P}/deployments/d", version, "n", 1, Serving(**serving), Resources(gpus=gpus), Autoscaling(), "", {})
        got = server_load(t)
        return got.engine, got.adapter_uri, [uri for uri, _ in got.co_served]

    assert load(a, b) == ("llama.cpp", a.gguf_lora_uri, [b.gguf_lora_uri])
    # one version without a GGUF LoRA, a GPU, 4-bit or another engine named: the PEFT adapters (the model server's auto)
    assert load(a, peft_only) == ("", a.artifact_uri, [peft_only.artifact_uri])
    assert load(a, b, gpus=1) == ("", a.artifact_uri, [b.artifact_uri])
    assert load(a, b, load_in_4bit=True)[0] == ""
    assert load(a, b, engine="transformers") == ("transformers", a.artifact_uri, [b.artifact_uri])
    # a base that is no GGUF file: no llama.cpp by default
    assert load(*(dataclasses.replace(v, base_model="file:///models/base") for v in (a, b)))[0] == ""
    # the base itself among them: no adapter for it, on either engine
    assert load(the_base(), a) == ("llama.cpp", "", [a.gguf_lora_uri])
    assert load(a, the_base(), engine="transformers") == ("transformers", a.artifact_uri, [""])
    # the replicas are replaced when the GGUF LoRAs picked change
    fingerprints = {
        Target(f"{P}/deployments/d", dataclasses.replace(a, co_served=(v,)), "n", 1, Serving(), Resources(), Autoscaling(), "", {})
        .fingerprint()
        for v in (b, dataclasses.replace(b, gguf_lora_sha256="c" * 64))
    }  # fmt: skip
    assert len(fingerprints) == 2


async def test_llamacpp_refuses_versions_without_a_gguf_lora_or_of_another_base(fakes):
    svc, reg = fakes.service, fakes.registry
    a = reg.add(smol("1.1.0"))
    peft_only = reg.add(smol("1.4.0", gguf_lora=False))
    merged_gguf_only = reg.add(
        dataclasses.replace(smol("1.5.0", gguf_lora=False), gguf_uri="file:///e/m.gguf", gguf_sha256="d" * 64)
    )
    other_base = reg.add(smol("1.6.0", base="builtin:other-model"))
    cases = [
        (ab(a, peft_only, engine="llama.cpp"), "GGUF_ARTIFACT_MISSING", peft_only.name),
        (ab(a, merged_gguf_only, engine="llama.cpp"), "GGUF_ARTIFACT_MISSING", merged_gguf_only.name),
        (ab(merged_gguf_only, a, engine="llama.cpp"), "GGUF_ARTIFACT_MISSING", merged_gguf_only.name),
        (ab(a, other_base, engine="llama.cpp"), "SHARED_BASE_MISMATCH", other_base.name),
    ]
    for i, (spec, reason, version) in enumerate(cases):
        with pytest.raises(FailedPrecondition) as caught:
            await svc.create(P, f"refused-{i}", spec, "", "b")
        assert (caught.value.reason, caught.value.metadata["model_version"]) == (reason, version), i
        if reason == "GGUF_ARTIFACT_MISSING":
            assert caught.value.metadata["missing"] == "adapter" and "gguf-lora" in caught.value.message
    # a base that is no GGUF file
    on_dir = [reg.add(dataclasses.replace(v, name=v.name + "-dir", version=v.version + "-dir", base_model="file:///m/base"))
              for v in (a, smol("1.7.0"))]  # fmt: skip
    with pytest.raises(FailedPrecondition) as caught:
        await svc.create(P, "on-dir", ab(*on_dir, engine="llama.cpp"), "", "b")
    assert (caught.value.reason, caught.value.metadata["missing"]) == ("GGUF_ARTIFACT_MISSING", "base_model")
    assert [d.name for d in (await svc.list(P, 10, "", "", "")).items] == []  # nothing stored

    # switching a running deployment to llama.cpp is checked against every version it serves
    d = await svc.create(P, "ab", ab(a, peft_only), "", "b")
    with pytest.raises(FailedPrecondition) as caught:
        await svc.update(
            Deployment(name=d.name, serving=Serving(engine="llama.cpp", additional_versions=[peft_only.name])), {"serving"}, ""
        )
    assert (caught.value.reason, caught.value.metadata["model_version"]) == ("GGUF_ARTIFACT_MISSING", peft_only.name)
    assert (await svc.get(d.name)).serving.engine == ""


async def test_the_base_itself_is_served_beside_the_adapters(fakes):
    svc, reg = fakes.service, fakes.registry
    # transformers (the fakes' versions: PEFT adapters on a checkpoint directory), the base as an additional version
    base_dir = reg.add(the_base("0.9.0", base="file:///models/base"))
    d = await svc.create(P, "with-base", ab(fakes.v1, base_dir), "", "b")
    assert [v.model_version for v in d.served_versions] == [fakes.v1.name, base_dir.name]
    target = await applied(fakes, d.name)
    assert loads(target) == (None, "file:///models/base", fakes.v1.artifact_uri, [("", "")])
    # ... and as the deployment's own version: no --adapter-uri at all
    d = await svc.create(P, "base-own", ab(base_dir, fakes.v2), "", "b")
    assert loads(await applied(fakes, d.name)) == (
        None,
        "file:///models/base",
        None,
        [(fakes.v2.artifact_uri, fakes.v2.artifact_sha256)],
    )
    # llama.cpp: the builtin base with the others' GGUF LoRAs
    base, a = reg.add(the_base()), reg.add(smol("1.1.0"))
    d = await svc.create(P, "smol-ab", ab(base, a, engine="llama.cpp"), "", "b")
    assert loads(await applied(fakes, d.name)) == ("llama.cpp", BASE, None, [(a.gguf_lora_uri, a.gguf_lora_sha256)])


async def test_one_base_at_most_and_no_gguf_lora_on_transformers(fakes):
    svc, reg = fakes.service, fakes.registry
    first, second = reg.add(the_base("0.9.0", base="file:///models/base")), reg.add(the_base("0.9.1", base="file:///models/base"))
    with pytest.raises(FailedPrecondition) as caught:
        await svc.create(P, "two-bases", ab(first, fakes.v1, second), "", "b")
    assert (caught.value.reason, caught.value.metadata["model_version"]) == ("ADAPTER_REQUIRED", second.name)
    gguf_own = reg.add(
        dataclasses.replace(fakes.v3, name=f"{P}/models/m/versions/3.0.0", version="3.0.0", artifact_uri="file:///a/x.gguf")
    )
    with pytest.raises(FailedPrecondition) as caught:
        await svc.create(P, "gguf-on-transformers", ab(fakes.v1, gguf_own), "", "b")
    assert (caught.value.reason, caught.value.metadata["model_version"]) == ("ADAPTER_REQUIRED", gguf_own.name)
    assert [d.name for d in (await svc.list(P, 10, "", "", "")).items] == []
