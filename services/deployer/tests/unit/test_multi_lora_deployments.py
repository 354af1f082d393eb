"""Several versions on one base (issue 17 §3): a deployment lists fixed versions in serving.additional_versions; they
are resolved with its own (same base model, each a PEFT adapter), stored with the target (SQL repositories too),
listed in `served_versions` with the names that route to each, and reach the model server as `--extra-versions`
(local command line and Kubernetes pod args). Field violations for bad lists; FAILED_PRECONDITION for versions of
another base; changing the list replaces the replicas without a new revision. The llama.cpp engine and a version that
is the base itself: test_multi_lora_llamacpp.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from neuroweaver.deployer.v1 import deployment_pb2 as pb
from neuroweaver_deployer.adapters.kube import KubeDefaults, model_server_spec
from neuroweaver_deployer.adapters.local import model_server_command
from neuroweaver_deployer.api.convert import deployment_from_pb, deployment_to_pb
from neuroweaver_deployer.domain.model import Deployment, Serving, validate_spec
from neuroweaver_kube.manifests import model_server_args
from neuroweaver_runtime.errors import FailedPrecondition, Violations

P = "projects/default"


def ab(v_own, *others, **serving) -> Deployment:
    return Deployment(name="", model_version=v_own.name, serving=Serving(additional_versions=[o.name for o in others], **serving))


async def applied(fakes, name: str, after: int = 0):
    async with asyncio.timeout(10):
        while not [t for t in fakes.backend.applied[after:] if t.deployment == name]:
            await asyncio.sleep(0.01)
    return [t for t in fakes.backend.applied[after:] if t.deployment == name][-1]


async def test_a_deployment_serves_several_versions_of_one_base(fakes):
    svc = fakes.service
    d = await svc.create(P, "advisor-ab", ab(fakes.v1, fakes.v2), "", "b")
    dep = f"{P}/deployments/advisor-ab"
    assert d.model_names == (dep, "advisor-ab", f"{dep}/1.0.0", "advisor-ab/1.0.0")
    assert [(v.model_version, v.served_model_name, v.model_names) for v in d.served_versions] == [
        (fakes.v1.name, d.served_model_name, d.model_names),
        (fakes.v2.name, f"m-1-1-0-{fakes.v2.artifact_sha256[:8]}", (f"{dep}/1.1.0", "advisor-ab/1.1.0")),
    ]
    stored = await svc.get(d.name)  # the resolved additional versions are stored with the target
    assert stored.target is not None and stored.target.co_served == (fakes.v2,)
    out = deployment_to_pb(stored)
    assert list(out.serving.additional_versions) == [fakes.v2.name]
    assert [(v.model_version, list(v.model_names)) for v in out.served_versions] == [
        (fakes.v1.name, list(d.model_names)),
        (fakes.v2.name, [f"{dep}/1.1.0", "advisor-ab/1.1.0"]),
    ]
    assert deployment_from_pb(out).serving.additional_versions == [fakes.v2.name]

    target = await applied(fakes, d.name)
    assert target.version.co_served == (fakes.v2,) and target.model_names == d.model_names
    # the local replica's command line and the Kubernetes pod's args carry the same --extra-versions
    expected = [{
        "served_model_name": f"m-1-1-0-{fakes.v2.artifact_sha256[:8]}", "model_version": fakes.v2.name,
        "model_names": [f"{dep}/1.1.0", "advisor-ab/1.1.0"], "adapter_uri": fakes.v2.artifact_uri,
        "adapter_sha256": fakes.v2.artifact_sha256,
    }]  # fmt: skip
    command = model_server_command(target, "127.0.0.1", 1, 2, 3, 5.0)
    assert json.loads(command[command.index("--extra-versions") + 1]) == expected
    assert command[command.index("--adapter-uri") + 1] == fakes.v1.artifact_uri
    assert "--engine" not in command  # the model server's auto: transformers on the CPU, vllm on CUDA
    defaults = KubeDefaults(image="img", namespace="nw", artifacts_mount_path="/artifacts", models_claim="models",
                            models_mount_path="/models")  # fmt: skip
    args = model_server_args(model_server_spec(target, defaults))
    assert json.loads(args[args.index("--extra-versions") + 1]) == expected

    # a version served alone: one entry, no --extra-versions, the same names as before
    alone = await svc.create(P, "alone", Deployment(name="", model_version=fakes.v1.name), "", "b")
    assert [v.model_version for v in alone.served_versions] == [fakes.v1.name]
    assert alone.model_names == (f"{P}/deployments/alone", "alone")
    assert "--extra-versions" not in model_server_command(await applied(fakes, alone.name), "h", 1, 2, 3, 5.0)


async def test_changing_the_additional_versions_replaces_replicas_without_a_revision(fakes):
    svc = fakes.service
    d = await svc.create(P, "ab", ab(fakes.v1, fakes.v2), "", "b")
    first = await applied(fakes, d.name)
    count = len(fakes.backend.applied)
    updated = await svc.update(
        Deployment(name=d.name, serving=Serving(additional_versions=[fakes.v2.name, fakes.v3.name])), {"serving"}, ""
    )
    assert updated.revision == d.revision == 1 and updated.served_version == fakes.v1.name
    assert updated.target is not None and updated.target.co_served == (fakes.v2, fakes.v3)
    second = await applied(fakes, d.name, count)
    assert second.fingerprint() != first.fingerprint()
    count = len(fakes.backend.applied)
    cleared = await svc.update(Deployment(name=d.name, serving=Serving()), {"serving"}, "")
    assert cleared.target is not None and cleared.target.co_served == ()
    assert [v.model_version for v in cleared.served_versions] == [fakes.v1.name]
    assert "--extra-versions" not in model_server_command(await applied(fakes, d.name, count), "h", 1, 2, 3, 5.0)
    # a new own version keeps the additional ones beside it
    back = await svc.update(Deployment(name=d.name, serving=Serving(additional_versions=[fakes.v2.name])), {"serving"}, "")
    rolled = await svc.update(Deployment(name=back.name, model_version=fakes.v3.name), {"model_version"}, "")
    assert rolled.revision == 2 and rolled.target is not None and rolled.target.co_served == (fakes.v2,)


async def test_an_alias_moving_onto_an_additional_version_serves_it_once(fakes):
    """The A/B's end: production (followed) moves to the candidate served beside it; the candidate is then served
    once, as the deployment's own version, and its name `<deployment>/<version>` still reaches it."""
    svc, alias = fakes.service, f"{P}/models/m/aliases/production"
    fakes.registry.aliases[f"{P}/models/m/versions/production"] = fakes.v1.name
    d = await svc.create(
        P, "ab", Deployment(name="", model_alias=alias, serving=Serving(additional_versions=[fakes.v2.name])), "", "b"
    )
    dep = f"{P}/deployments/ab"
    assert d.model_names == (dep, "ab", "m@production", f"{P}/models/m@production", f"{dep}/1.0.0", "ab/1.0.0")
    assert [v.model_names for v in d.served_versions][1] == (f"{dep}/1.1.0", "ab/1.1.0")
    fakes.registry.aliases[f"{P}/models/m/versions/production"] = fakes.v2.name
    assert await svc.follow_alias(d.name)
    moved = await svc.get(d.name)
    assert moved.served_version == fakes.v2.name and moved.target is not None and moved.target.co_served == ()
    assert [v.model_version for v in moved.served_versions] == [fakes.v2.name]
    assert f"{dep}/1.1.0" in moved.model_names and "ab/1.1.0" in moved.model_names
    async with asyncio.timeout(10):
        while not [t for t in fakes.backend.applied if t.deployment == d.name and t.version.name == fakes.v2.name]:
            await asyncio.sleep(0.01)
    target = [t for t in fakes.backend.applied if t.deployment == d.name][-1]
    assert target.version.name == fakes.v2.name and "ab/1.1.0" in target.model_names
    assert "--extra-versions" not in model_server_command(target, "h", 1, 2, 3, 5.0)


async def test_versions_of_another_base_are_refused(fakes):
    svc = fakes.service
    other_base = fakes.registry.add(dataclasses.replace(fakes.v3, base_model="file:///models/other"))
    with pytest.raises(FailedPrecondition) as caught:
        await svc.create(P, "mixed", ab(fakes.v1, other_base), "", "b")
    assert caught.value.reason == "SHARED_BASE_MISMATCH" and caught.value.metadata["model_version"] == other_base.name
    merged = fakes.registry.add(  # merged weights of their own (a MERGED artifact: its base is itself)
        dataclasses.replace(fakes.v3, name=f"{P}/models/m/versions/3.0.0", version="3.0.0", artifact_uri="",
                            base_model="file:///artifacts/m/3.0.0-merged")
    )  # fmt: skip
    with pytest.raises(FailedPrecondition) as caught:
        await svc.create(P, "merged", ab(fakes.v1, merged), "", "b")
    assert caught.value.reason == "SHARED_BASE_MISMATCH"
    assert [d.name for d in (await svc.list(P, 10, "", "", "")).items] == []  # nothing stored


def test_validation_of_additional_versions():
    own = f"{P}/models/m/versions/1.0.0"

    def violations(*extra: str, **serving) -> dict[str, str]:
        v = Violations()
        d = Deployment(name="", model_version=own, serving=Serving(additional_versions=list(extra), **serving))
        validate_spec(d, v, creating=True)
        return {f.field: f.description for f in v.items}

    path = "deployment.serving.additional_versions"
    assert violations(f"{P}/models/m/versions/1.1.0", f"{P}/models/n/versions/2.0.0") == {}
    assert f"{path}[0]" in violations(f"{P}/models/m/aliases/candidate")  # fixed versions only
    assert f"{path}[1]" in violations(f"{P}/models/m/versions/1.1.0", "not-a-name")
    assert "twice" in violations(f"{P}/models/m/versions/1.1.0", f"{P}/models/m/versions/1.1.0")[f"{path}[1]"]
    assert "twice" in violations(own)[f"{path}[0]"]  # the deployment's own version
    assert "at most 7" in violations(*(f"{P}/models/m/versions/1.{i}.1" for i in range(8)))[path]
    assert violations(f"{P}/models/m/versions/1.1.0", engine="llama.cpp") == {}  # GGUF LoRAs: checked once resolved


def test_the_proto_field_round_trips():
    m = pb.Deployment(name=f"{P}/deployments/d", serving=pb.ServingConfig(additional_versions=[f"{P}/models/m/versions/2"]))
    assert deployment_from_pb(m).serving.additional_versions == [f"{P}/models/m/versions/2"]


async def test_an_additional_adapter_on_no_mounted_volume_is_refused_for_kubernetes(fakes):
    d = await fakes.service.create(P, "ab", ab(fakes.v1, fakes.v2), "", "b")
    target = await applied(fakes, d.name)
    defaults = KubeDefaults(image="img", namespace="nw", artifacts_mount_path="/artifacts", models_claim="models",
                            models_mount_path="/models")  # fmt: skip
    elsewhere = dataclasses.replace(fakes.v2, artifact_uri="file:///elsewhere/m/1.1.0")
    moved = dataclasses.replace(target, version=dataclasses.replace(target.version, co_served=(elsewhere,)))
    with pytest.raises(FailedPrecondition) as caught:
        model_server_spec(moved, defaults)
    assert caught.value.reason == "ARTIFACT_NOT_MOUNTED" and "elsewhere" not in caught.value.message
