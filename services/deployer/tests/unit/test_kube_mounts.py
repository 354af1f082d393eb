"""Which claims model-server pods mount, from the deployer's flags; the base-model claim; bad settings stop the start."""

from __future__ import annotations

import pytest

from neuroweaver_deployer.adapters.kube import KubeDefaults, model_server_spec
from neuroweaver_deployer.app import DeployerConfig, build
from neuroweaver_deployer.domain.model import Autoscaling, ResolvedVersion, Resources, Serving, Target
from neuroweaver_runtime.errors import FailedPrecondition


def target(adapter: str, base: str) -> Target:
    version = ResolvedVersion("projects/p/models/m/versions/1.0.0", "1.0.0", adapter, "a" * 64, base)
    return Target("projects/p/deployments/d", version, "m-1.0.0", 1, Serving(), Resources(), Autoscaling(), "", {})


def test_defaults_mount_the_kustomize_packages_artifact_store_read_only():
    defaults = KubeDefaults(image="m", namespace="neuroweaver")
    spec = model_server_spec(target("file:///var/lib/neuroweaver/artifacts/p/a", "/var/lib/neuroweaver/models/base"), defaults)
    assert [(m.claim, m.mount_path) for m in spec.data_volumes] == [("neuroweaver-artifacts", "/var/lib/neuroweaver")]


def test_base_models_on_their_own_claim():
    defaults = KubeDefaults(image="m", namespace="neuroweaver", models_claim="models", models_mount_path="/models")
    with pytest.raises(FailedPrecondition) as exc:
        model_server_spec(target("file:///var/lib/neuroweaver/artifacts/a", "/elsewhere/base"), defaults)
    assert exc.value.reason == "ARTIFACT_NOT_MOUNTED" and "base model" in exc.value.message
    assert "/elsewhere" not in exc.value.message
    spec = model_server_spec(target("file:///var/lib/neuroweaver/artifacts/a", "/models/base"), defaults)
    assert [m.claim for m in spec.data_volumes] == ["neuroweaver-artifacts", "models"]
    # Without the store mounted only names (hub ids, builtin:) can be served.
    bare = KubeDefaults(image="m", namespace="neuroweaver", artifacts_claim=None)
    with pytest.raises(FailedPrecondition, match="adapter"):
        model_server_spec(target("file:///var/lib/neuroweaver/artifacts/a", "builtin:tiny"), bare)
    assert model_server_spec(target("", "builtin:tiny"), bare).data_volumes == []


@pytest.mark.parametrize(
    "flags", [{"kube_artifacts_claim": "Not_A_Claim"}, {"kube_models_claim": "m", "kube_models_mount_path": "models"}]
)
def test_bad_mount_settings_stop_the_start(flags, tmp_path):
    with pytest.raises(SystemExit, match="configuration error"):
        build(DeployerConfig(data_dir=str(tmp_path), database_url=f"sqlite:///{tmp_path / 'd.db'}", **flags))
