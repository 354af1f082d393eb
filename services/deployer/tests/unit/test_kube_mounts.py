"""What model-server pods get from the deployer's settings: the claims they mount (the base-model claim; bad
settings stop the start) and where they export traces."""

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


def test_pods_export_traces_where_the_deployer_does(monkeypatch):
    from neuroweaver_kube.manifests import model_server_manifests

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "neuroweaver-deployer")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer s3cret")
    defaults = KubeDefaults(image="m", namespace="neuroweaver", otlp_headers_secret="otel-auth")
    spec = model_server_spec(target("", "builtin:tiny"), defaults)
    deployment = next(o for o in model_server_manifests(spec) if o["kind"] == "Deployment")
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://collector:4317"
    assert "OTEL_SERVICE_NAME" not in env  # the pod reports as the model server
    assert env["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"]["secretKeyRef"] == {"name": "otel-auth", "key": "otlp-headers"}
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    assert not model_server_spec(target("", "builtin:tiny"), defaults).tracing.get("OTEL_EXPORTER_OTLP_ENDPOINT")
