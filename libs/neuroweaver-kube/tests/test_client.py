import pytest
import yaml
from test_manifests import cpu_spec, gpu_spec, multi_gpu_job

from neuroweaver_kube.client import APPLY_PATCH, KubeApiError, KubeClient, KubeConflict, KubeNotFound, resource_path
from neuroweaver_kube.manifests import model_server_manifests, training_job
from neuroweaver_kube.testing import KubeApiStandIn


@pytest.fixture
def standin():
    with KubeApiStandIn() as s:
        yield s


@pytest.fixture
def kube(standin):
    c = KubeClient.from_config(host=standin.url, token="t0ken")
    yield c
    c.close()


async def test_apply_uses_server_side_apply_at_real_paths(standin, kube):
    objs = model_server_manifests(gpu_spec())
    stored = await kube.apply(objs)
    name = objs[0]["metadata"]["name"]
    patches = standin.requests_to("PATCH")
    assert [r.path for r in patches] == [
        f"/api/v1/namespaces/neuroweaver/services/{name}",
        f"/apis/apps/v1/namespaces/neuroweaver/deployments/{name}",
        f"/apis/autoscaling/v2/namespaces/neuroweaver/horizontalpodautoscalers/{name}",
        f"/apis/policy/v1/namespaces/neuroweaver/poddisruptionbudgets/{name}",
        f"/apis/monitoring.coreos.com/v1/namespaces/neuroweaver/servicemonitors/{name}",
        f"/apis/monitoring.coreos.com/v1/namespaces/neuroweaver/prometheusrules/{name}",
    ]
    for r in patches:
        assert r.content_type == APPLY_PATCH == "application/apply-patch+yaml"
        assert r.query["fieldManager"] == ["neuroweaver"] and r.query["force"] == ["true"]
        assert r.headers["authorization"] == "Bearer t0ken"
    assert patches[1].body == objs[1]  # the manifest travels unchanged
    for s in stored:
        md = s["metadata"]
        assert md["uid"] and md["resourceVersion"] and md["generation"] == 1
    dep = standin.get_object("apps/v1", "Deployment", "neuroweaver", name)
    assert dep["spec"]["template"] == objs[1]["spec"]["template"]


async def test_reapply_is_idempotent(standin, kube):
    objs = model_server_manifests(cpu_spec())
    first = await kube.apply(objs)
    second = await kube.apply(objs)
    for a, b in zip(first, second, strict=True):
        assert a["metadata"]["uid"] == b["metadata"]["uid"]
        assert a["metadata"]["resourceVersion"] == b["metadata"]["resourceVersion"]
        assert a["metadata"]["generation"] == b["metadata"]["generation"] == 1
    # A real change bumps generation once.
    changed = model_server_manifests(cpu_spec(image="ghcr.io/neuroweaver/model-server:0.2.0"))
    third = await kube.apply(changed)
    assert third[1]["metadata"]["generation"] == 2 and third[0]["metadata"]["generation"] == 1


async def test_without_pods_a_deployment_is_progressing_never_available(standin, kube):
    spec = gpu_spec()
    await kube.apply(model_server_manifests(spec))
    name = spec.object_name
    st = await kube.read_deployment_status("neuroweaver", name)
    # What the deployment controller leaves on a cluster with no kubelet: pods created, none ready.
    assert st.observed_generation == st.generation == 1 and (st.desired_replicas, st.replicas) == (1, 1)
    assert (st.ready_replicas, st.available_replicas) == (0, 0) and not st.available and not st.rolled_out
    assert st.condition("Available").reason == "MinimumReplicasUnavailable"
    assert (st.condition("Progressing").status, st.condition("Progressing").reason) == ("True", "ReplicaSetUpdated")
    obj = standin.get_object("apps/v1", "Deployment", "neuroweaver", name)
    assert obj["status"]["unavailableReplicas"] == 1
    status_entry = [e for e in obj["metadata"]["managedFields"] if e.get("subresource") == "status"]
    assert [e["manager"] for e in status_entry] == ["kube-controller-manager"]  # written like a controller would


async def test_scale_subresource_owns_replicas_and_apply_keeps_them(standin, kube):
    spec = gpu_spec()
    objs = model_server_manifests(spec)
    assert "replicas" not in objs[1]["spec"]  # autoscaled: the manifest leaves the count to the HPA
    await kube.apply(objs)
    name = spec.object_name
    assert await kube.scale("neuroweaver", name, 3) == 3
    scale_req = standin.requests_to("PATCH", "/scale")[-1]
    assert scale_req.path == f"/apis/apps/v1/namespaces/neuroweaver/deployments/{name}/scale"
    assert scale_req.body == {"spec": {"replicas": 3}}
    st = await kube.read_deployment_status("neuroweaver", name)
    assert (st.desired_replicas, st.generation, st.observed_generation) == (3, 2, 2) and not st.available
    # The scale write is an Update of spec.replicas by the client's User-Agent manager, subresource "scale".
    obj = standin.get_object("apps/v1", "Deployment", "neuroweaver", name)
    (scaler,) = [e for e in obj["metadata"]["managedFields"] if e.get("subresource") == "scale"]
    assert (scaler["manager"], scaler["operation"]) == ("OpenAPI-Generator", "Update")
    assert scaler["fieldsV1"] == {"f:spec": {"f:replicas": {}}}
    # Re-applying the manifest that omits replicas keeps the scaled value: another manager owns it.
    await kube.apply(objs)
    assert (await kube.read_deployment_status("neuroweaver", name)).desired_replicas == 3


async def test_auto_ready_is_an_explicit_opt_in():
    with KubeApiStandIn(auto_ready=True) as s:
        kube = KubeClient.from_config(host=s.url, token="t")
        try:
            spec = gpu_spec()
            await kube.apply(model_server_manifests(spec))
            st = await kube.read_deployment_status("neuroweaver", spec.object_name)
            assert st.available and st.rolled_out and st.ready_replicas == st.desired_replicas == 1
        finally:
            kube.close()


async def test_status_reports_a_stuck_rollout(standin, kube):
    objs = model_server_manifests(cpu_spec())
    await kube.apply(objs)
    name = objs[1]["metadata"]["name"]
    standin.set_status(
        "apps/v1",
        "Deployment",
        "neuroweaver",
        name,
        {
            "observedGeneration": 1,
            "replicas": 2,
            "updatedReplicas": 1,
            "readyReplicas": 0,
            "availableReplicas": 0,
            "conditions": [
                {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"},
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"},
            ],
        },
    )
    st = await kube.read_deployment_status("neuroweaver", name)
    assert not st.available and not st.rolled_out and st.progress_deadline_exceeded


async def test_delete_is_foreground_and_tolerates_404(standin, kube):
    objs = model_server_manifests(gpu_spec())
    await kube.apply(objs)
    assert await kube.delete(objs) == [True] * len(objs)
    deletes = standin.requests_to("DELETE")
    assert deletes[0].path.endswith("/prometheusrules/" + objs[0]["metadata"]["name"])  # reverse apply order
    assert all(r.body["propagationPolicy"] == "Foreground" for r in deletes)
    with pytest.raises(KubeNotFound) as e:
        await kube.read_deployment_status("neuroweaver", objs[1]["metadata"]["name"])
    assert e.value.code == 404 and e.value.reason == "NotFound"
    assert await kube.delete(objs) == [False] * len(objs)


async def test_job_create_status_delete(standin, kube):
    job = training_job(multi_gpu_job())
    ns, name = "neuroweaver", job["metadata"]["name"]
    created = await kube.create_job(job)
    assert created["metadata"]["uid"]
    post = standin.requests_to("POST")[-1]
    assert post.path == "/apis/batch/v1/namespaces/neuroweaver/jobs" and post.body == job
    with pytest.raises(KubeConflict):
        await kube.create_job(job)
    st = await kube.read_job_status(ns, name)
    assert st.phase == "Running" and st.active == 1
    standin.finish_job(ns, name)
    st = await kube.read_job_status(ns, name)
    assert st.phase == "Succeeded" and st.succeeded == 1 and st.completion_time
    assert await kube.delete_job(ns, name) is True
    assert standin.requests_to("DELETE")[-1].body["propagationPolicy"] == "Foreground"
    assert await kube.delete_job(ns, name) is False
    with pytest.raises(KubeNotFound):
        await kube.read_job_status(ns, name)


async def test_failed_job(standin, kube):
    job = training_job(multi_gpu_job(gpus=1))
    await kube.create_job(job)
    standin.finish_job("neuroweaver", job["metadata"]["name"], succeeded=False, reason="DeadlineExceeded")
    st = await kube.read_job_status("neuroweaver", job["metadata"]["name"])
    assert st.phase == "Failed" and st.failure_reason == "DeadlineExceeded"


async def test_standin_rejects_apply_without_field_manager(standin, kube):
    obj = model_server_manifests(cpu_spec())[0]
    path = resource_path("v1", "Service", "neuroweaver", obj["metadata"]["name"])
    with pytest.raises(KubeApiError) as e:
        kube.request("PATCH", path, body=obj, content_type=APPLY_PATCH)
    assert e.value.code == 422 and "fieldManager: Required value" in e.value.message  # ValidatePatchOptions


async def test_client_from_kubeconfig(standin, tmp_path):
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "standin",
        "clusters": [{"name": "standin", "cluster": {"server": standin.url}}],
        "users": [{"name": "u", "user": {"token": "from-kubeconfig"}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "u"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    kube = KubeClient.from_config(kubeconfig=str(path))
    try:
        await kube.apply(model_server_manifests(cpu_spec(monitoring=False)))
        assert standin.requests[-1].headers["authorization"] == "Bearer from-kubeconfig"
    finally:
        kube.close()
