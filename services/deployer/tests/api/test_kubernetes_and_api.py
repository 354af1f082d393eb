"""RenderManifests validated against the Kubernetes schemas, the KUBERNETES backend against a local STAND-IN
of the Kubernetes API (neuroweaver_kube.testing.KubeApiStandIn — not a cluster), and API error statuses."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import jsonschema
import kubernetes_validate
import pytest
import yaml
from google.protobuf import field_mask_pb2
from helpers import watch_until

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver_kube.manifests import dns1123_name
from neuroweaver_runtime.grpc_errors import error_info, field_violations

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "libs" / "neuroweaver-kube" / "tests"))
from crd_schemas import PROMETHEUS_RULE, SERVICE_MONITOR  # noqa: E402

AVAILABLE = dpb.Deployment.STATE_AVAILABLE


def gpu_spec(stack, name="projects/default/deployments/advisor-gpu", **kw) -> dpb.Deployment:
    return dpb.Deployment(
        name=name, model_version=stack.versions[1], backend=dpb.BACKEND_KUBERNETES, replicas=2,
        autoscaling=dpb.Autoscaling(min_replicas=2, max_replicas=6, target_cpu_utilization=60, target_inflight_requests=6),
        resources=dpb.Resources(cpu="4", memory="16Gi", gpus=1, node_selector={"nvidia.com/gpu.product": "NVIDIA-L4"},
                                tolerations=[dpb.Toleration(key="dedicated", operator="Equal", value="inference", effect="NoSchedule")]),
        serving=dpb.ServingConfig(load_in_4bit=True, image="ghcr.io/neuroweaver/model-server:0.1.0"), namespace="serving", **kw,
    )  # fmt: skip


@pytest.mark.parametrize("version", ["1.29", kubernetes_validate.latest_version()])
async def test_rendered_gpu_autoscaling_manifests_validate(stack, version):
    out = await stack.dep.RenderManifests(dsvc.RenderManifestsRequest(deployment=gpu_spec(stack)))
    objects = list(yaml.safe_load_all(out.yaml))
    kinds = [o["kind"] for o in objects]
    assert kinds == [
        "Service",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
    ]
    assert out.objects == [f"{o['kind']}/{o['metadata']['name']}" for o in objects]
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            jsonschema.validate(obj, SERVICE_MONITOR)
        elif obj["kind"] == "PrometheusRule":
            jsonschema.validate(obj, PROMETHEUS_RULE)
        else:
            kubernetes_validate.validate(obj, version, strict=True)
    deployment = objects[1]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--load-in-4bit" in container["args"] and "--adapter-sha256" in container["args"]
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    assert objects[2]["spec"]["minReplicas"] == 2 and objects[2]["spec"]["maxReplicas"] == 6
    # The requested in-flight target drives the HPA through the custom-metrics API; CPU stays as the fallback.
    inflight, cpu = objects[2]["spec"]["metrics"]
    assert inflight["pods"]["target"] == {"type": "AverageValue", "averageValue": "6"}
    assert cpu["resource"]["target"]["averageUtilization"] == 60
    assert deployment["metadata"]["namespace"] == "serving"
    # The artifact store claim is mounted read-only where the adapter's file:// path points.
    pod = deployment["spec"]["template"]["spec"]
    (store,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert store["persistentVolumeClaim"] == {"claimName": "neuroweaver-artifacts", "readOnly": True}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == store["name"]]
    adapter = container["args"][container["args"].index("--adapter-uri") + 1]
    assert mount["readOnly"] and adapter.removeprefix("file://").startswith(mount["mountPath"] + "/")


async def test_an_adapter_on_no_mounted_claim_is_refused_not_left_to_a_pod_that_cannot_start(stack, kube_standin):
    from neuroweaver.registry.v1 import registry_pb2 as rpb
    from neuroweaver.registry.v1 import registry_service_pb2 as rsvc

    elsewhere = "/srv/elsewhere/adapters/advisor-9"  # outside the mounted store: no pod could read it
    mv = await stack.reg.CreateModelVersion(
        rsvc.CreateModelVersionRequest(
            parent=stack.MODEL, version="9.0.0",
            model_version=rpb.ModelVersion(
                artifact=rpb.Artifact(uri=f"file://{elsewhere}", sha256="c" * 64, format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
                lineage=rpb.Lineage(base_model=str(stack.base), method="sft-lora"),
            ),
        )
    )  # fmt: skip
    spec = gpu_spec(stack, name="projects/default/deployments/unmounted")
    spec.model_version = mv.name
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.dep.RenderManifests(dsvc.RenderManifestsRequest(deployment=spec))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(err.value)
    assert info.reason == "ARTIFACT_NOT_MOUNTED" and info.metadata["model_version"] == mv.name
    assert "/srv/elsewhere" not in err.value.details()  # server paths are never echoed
    # Created anyway (the registry may hold it elsewhere later), the KUBERNETES backend reports FAILED, applies nothing.
    await stack.dep.CreateDeployment(create(stack, "unmounted", model_version=mv.name, backend=dpb.BACKEND_KUBERNETES))
    d = await watch_until(
        stack.dep, "projects/default/deployments/unmounted", lambda d: d.state == dpb.Deployment.STATE_FAILED, timeout=30
    )
    assert any("no volume model-server pods mount" in c.message for c in d.conditions)
    assert kube_standin.get_object("apps/v1", "Deployment", "serving", dns1123_name(d.name)) is None
    await stack.dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=d.name))


async def test_kubernetes_backend_against_the_api_standin(stack, kube_standin):
    dep = stack.dep
    name = "projects/default/deployments/advisor-k8s"
    spec = dpb.Deployment(model_version=stack.versions[0], backend=dpb.BACKEND_KUBERNETES, replicas=2, namespace="serving")
    await dep.CreateDeployment(
        dsvc.CreateDeploymentRequest(parent="projects/default", deployment_id="advisor-k8s", deployment=spec)
    )
    d = await watch_until(dep, name, lambda d: d.state == AVAILABLE and d.ready_replicas == 2, timeout=30)
    obj = dns1123_name(name)
    assert d.endpoint == f"{obj}.serving.svc.cluster.local:50051"
    assert d.openai_base_url == f"http://{obj}.serving.svc.cluster.local:8080/v1"
    for api_version, kind in [
        ("v1", "Service"),
        ("apps/v1", "Deployment"),
        ("policy/v1", "PodDisruptionBudget"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
    ]:
        assert kube_standin.get_object(api_version, kind, "serving", obj) is not None, kind
    applies = [r for r in kube_standin.requests if r.method == "PATCH" and r.content_type == "application/apply-patch+yaml"]
    assert applies and all("fieldManager" in r.query for r in applies)

    await dep.ScaleDeployment(dsvc.ScaleDeploymentRequest(name=name, replicas=3))
    d = await watch_until(dep, name, lambda d: d.ready_replicas == 3 and d.state == AVAILABLE, timeout=30)
    assert kube_standin.get_object("apps/v1", "Deployment", "serving", obj)["spec"]["replicas"] == 3
    assert kube_standin.requests_to("PATCH", "/scale")

    await dep.UpdateDeployment(
        dsvc.UpdateDeploymentRequest(
            deployment=dpb.Deployment(name=name, model_version=stack.versions[2]),
            update_mask=field_mask_pb2.FieldMask(paths=["model_version"]),
        )
    )
    d = await watch_until(dep, name, lambda d: d.served_version == stack.versions[2] and d.state == AVAILABLE, timeout=30)
    container = kube_standin.get_object("apps/v1", "Deployment", "serving", obj)["spec"]["template"]["spec"]["containers"][0]
    assert stack.versions[2] in container["args"] and d.served_model_name in container["args"]
    # Pods answer to the deployment's stable names too, the same on every version (no NOT_FOUND after a rollover).
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NW_MODEL_SERVER_MODEL_NAMES"] == ",".join(d.model_names) and d.model_names[0] == name

    await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=name))
    for api_version, kind in [("v1", "Service"), ("apps/v1", "Deployment"), ("monitoring.coreos.com/v1", "PrometheusRule")]:
        assert kube_standin.get_object(api_version, kind, "serving", obj) is None, kind


async def test_list_filters_take_the_contracts_enum_names_with_or_without_prefix(stack):
    dep, name = stack.dep, "projects/default/deployments/filtered"
    await dep.CreateDeployment(
        create(stack, "filtered", backend=dpb.BACKEND_KUBERNETES, namespace="serving", labels={"case": "enum-filters"})
    )
    await watch_until(dep, name, lambda d: d.state == AVAILABLE, timeout=30)

    async def listed(filter_text: str) -> list[str]:
        page = await dep.ListDeployments(
            dsvc.ListDeploymentsRequest(parent="projects/default", filter=f'labels.case = "enum-filters" AND {filter_text}')
        )
        return [d.name for d in page.deployments]

    for state, backend in (("STATE_AVAILABLE", "BACKEND_KUBERNETES"), ("AVAILABLE", "KUBERNETES"), ("available", "Kubernetes")):
        assert await listed(f"state = {state} AND backend = {backend}") == [name]
        assert await listed(f"state != {state}") == await listed(f"backend != {backend}") == []
    assert await listed("state != STATE_DELETING AND backend != LOCAL") == [name]
    assert await listed("state = AVAILABLE AND state = FAILED") == []
    for bad, says in (
        ("state = BOGUS", "unknown state 'BOGUS'; one of: STATE_AVAILABLE, STATE_DEGRADED, STATE_DELETING, STATE_FAILED"),
        ("state = STATE_UNSPECIFIED", "unknown state 'STATE_UNSPECIFIED'"),
        ("backend = BACKEND_UNSPECIFIED", "one of: BACKEND_KUBERNETES, BACKEND_LOCAL (the BACKEND_ prefix may be left out)"),
        ("backend = STATE_LOCAL", "unknown backend 'STATE_LOCAL'"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await listed(bad)
        assert (err.value.code(), error_info(err.value).reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FILTER")
        assert [v.field for v in field_violations(err.value)] == ["filter"] and says in err.value.details(), err.value.details()
    await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=name))


def test_filter_enums_are_the_contracts():
    """The filter's allowed states and backends (the domain's) are the contract's names without prefix and UNSPECIFIED."""
    from neuroweaver_deployer.domain.model import Backend, State

    for domain, names, prefix in ((State, dpb.Deployment.State.keys(), "STATE_"), (Backend, dpb.Backend.keys(), "BACKEND_")):
        assert {v.value for v in domain} == {n.removeprefix(prefix) for n in names} - {"UNSPECIFIED"}


def create(stack, deployment_id="bad", **fields):
    fields.setdefault("model_version", stack.versions[0])
    request_id = fields.pop("request_id", "")
    return dsvc.CreateDeploymentRequest(
        parent="projects/default", deployment_id=deployment_id, deployment=dpb.Deployment(**fields), request_id=request_id
    )


@pytest.mark.parametrize(
    "make, code, reason",
    [
        (lambda s: create(s, model_alias=f"{s.MODEL}/aliases/production"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (lambda s: create(s, model_version=""), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (lambda s: create(s, deployment_id="Bad_Id"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ID"),
        (lambda s: create(s, replicas=99), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (lambda s: create(s, resources=dpb.Resources(cpu="lots")), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (lambda s: create(s, resources=dpb.Resources(gpus=1)), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (
            lambda s: create(s, autoscaling=dpb.Autoscaling(min_replicas=3, max_replicas=2)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        ),
        (lambda s: create(s, model_version=f"{s.MODEL}/versions/9.9.9"), grpc.StatusCode.NOT_FOUND, "MODEL_VERSION_NOT_FOUND"),
        (
            lambda s: create(s, model_version="projects/default/models/nope/versions/1.0.0"),
            grpc.StatusCode.NOT_FOUND,
            "MODEL_VERSION_NOT_FOUND",
        ),
        (lambda s: create(s, request_id="not-a-uuid"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST_ID"),
        (
            lambda s: dsvc.CreateDeploymentRequest(parent="nope", deployment_id="x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "MALFORMED_NAME",
        ),
    ],
)
async def test_bad_create_requests(stack, make, code, reason):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.dep.CreateDeployment(make(stack))
    assert err.value.code() == code
    info = error_info(err.value)
    assert info.reason == reason and info.domain == "deployer.neuroweaver.v1"


async def test_a_reward_model_version_is_not_deployed(stack):
    """What a reward-model training job registers scores texts; serving it as a chat model is refused up front."""
    from neuroweaver.registry.v1 import registry_pb2 as rpb
    from neuroweaver.registry.v1 import registry_service_pb2 as rsvc

    model = "projects/default/models/advisor-scorer"
    await stack.reg.CreateModel(
        rsvc.CreateModelRequest(parent="projects/default", model_id="advisor-scorer", model=rpb.Model(base_model=str(stack.base)))
    )
    path, sha = stack.adapters[0]
    scorer = await stack.reg.CreateModelVersion(
        rsvc.CreateModelVersionRequest(
            parent=model, version="1.0.0",
            model_version=rpb.ModelVersion(
                artifact=rpb.Artifact(uri=path.as_uri(), sha256=sha, format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
                lineage=rpb.Lineage(base_model=str(stack.base), method="reward-model"),
            ),
        )
    )  # fmt: skip
    spec = gpu_spec(stack)
    spec.model_version = scorer.name
    for call in (stack.dep.CreateDeployment(create(stack, "scorer", model_version=scorer.name)),
                 stack.dep.RenderManifests(dsvc.RenderManifestsRequest(deployment=spec))):  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(err.value)
        assert info.reason == "NOT_A_GENERATIVE_MODEL" and info.metadata["model_version"] == scorer.name


async def test_bad_requests_on_other_methods(stack):
    dep = stack.dep
    missing = "projects/default/deployments/missing"
    cases = [
        (dep.GetDeployment(dsvc.GetDeploymentRequest(name=missing)), grpc.StatusCode.NOT_FOUND, "DEPLOYMENT_NOT_FOUND"),
        (dep.GetDeployment(dsvc.GetDeploymentRequest(name="projects/default/things/x")), grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_NAME"),
        (dep.ScaleDeployment(dsvc.ScaleDeploymentRequest(name=missing, replicas=1)), grpc.StatusCode.NOT_FOUND, "DEPLOYMENT_NOT_FOUND"),
        (dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=missing)), grpc.StatusCode.NOT_FOUND, "DEPLOYMENT_NOT_FOUND"),
        (dep.RollbackDeployment(dsvc.RollbackDeploymentRequest(name=missing, to_revision=-1)), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REVISION"),
        (dep.UpdateDeployment(dsvc.UpdateDeploymentRequest(deployment=dpb.Deployment(name=missing))), grpc.StatusCode.INVALID_ARGUMENT, "MISSING_UPDATE_MASK"),
        (dep.UpdateDeployment(dsvc.UpdateDeploymentRequest(deployment=dpb.Deployment(name=missing), update_mask=field_mask_pb2.FieldMask(paths=["state"]))),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_UPDATE_MASK"),
        (dep.ListDeployments(dsvc.ListDeploymentsRequest(parent="projects/default", page_size=-1)), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_SIZE"),
        (dep.ListDeployments(dsvc.ListDeploymentsRequest(parent="projects/default", filter="colour = red")), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FILTER"),
        (dep.ListDeployments(dsvc.ListDeploymentsRequest(parent="projects/default", page_token="garbage")), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"),
        (dep.RenderManifests(dsvc.RenderManifestsRequest()), grpc.StatusCode.INVALID_ARGUMENT, "MISSING_NAME"),
    ]  # fmt: skip
    for call, code, reason in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert (err.value.code(), error_info(err.value).reason) == (code, reason)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in dep.WatchDeployment(dsvc.WatchDeploymentRequest(name=missing)):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
