"""The KUBERNETES backend with pods that really run: the deployer applies its manifests to the API stand-in, whose
pod runner (neuroweaver_kube.testing.pods) starts model-server pods from the model-server image's entry point in
sandboxes that see the artifact store only through the claim the manifests mount. Readiness comes from the pods'
own gRPC probes; requests go through the Service's ClusterIP proxy. Not a cluster: see deploy/README.md."""

from __future__ import annotations

import os
import shutil

import grpc
import pytest
from helpers import Stack, watch_until

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.inference.v1 import inference_pb2 as ipb
from neuroweaver.inference.v1 import inference_service_pb2 as isvc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as igrpc
from neuroweaver_kube.manifests import dns1123_name
from neuroweaver_kube.testing import KubeApiStandIn
from neuroweaver_kube.testing.pods import PodRunner, bwrap_path

pytestmark = pytest.mark.slow  # model-server pods load a model

if bwrap_path() is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("bubblewrap (bwrap) is missing on CI: .ci/run installs the Debian package bubblewrap")
    pytest.skip("bubblewrap (bwrap) is not installed: apt-get install bubblewrap", allow_module_level=True)

NS = "serving"
AVAILABLE = dpb.Deployment.STATE_AVAILABLE


@pytest.fixture
async def kube_stack(tmp_path, tiny_base, adapters):
    runner = PodRunner(state_dir=tmp_path / "standin")
    with KubeApiStandIn(pods=runner) as standin:
        claim = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "neuroweaver-artifacts", "namespace": NS},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
        }
        standin.put(claim)
        # The artifact store as the trainer leaves it: the base model and an adapter on the shared claim. Pods
        # mount the claim where the deployer says it is mounted, here its own directory on this machine, so the
        # registry (in this process) and the pods read the same paths.
        store = runner.claim_dir(NS, "neuroweaver-artifacts")
        base = shutil.copytree(tiny_base, store / "models" / "tiny-llama")
        adapter_dir, sha = adapters[0]
        adapter = shutil.copytree(adapter_dir, store / "adapters" / "advisor-1")
        stack = Stack(
            tmp_path / "stack",
            base,
            [(adapter, sha)],
            standin.url,
            deployer_extra={"kube_artifacts_mount_path": str(store), "kube_namespace": NS},
        )
        (tmp_path / "stack").mkdir()
        await stack.start()
        try:
            yield stack, standin
        finally:
            await stack.stop()


async def test_model_server_pods_serve_through_their_service(kube_stack):
    stack, standin = kube_stack
    runner = standin.pods
    name = "projects/default/deployments/advisor-pods"
    spec = dpb.Deployment(model_version=stack.versions[0], backend=dpb.BACKEND_KUBERNETES, replicas=1, namespace=NS)
    await stack.dep.CreateDeployment(
        dsvc.CreateDeploymentRequest(parent="projects/default", deployment_id="advisor-pods", deployment=spec)
    )
    try:
        d = await watch_until(stack.dep, name, lambda d: d.state == AVAILABLE and d.ready_replicas == 1, timeout=120)
    except TimeoutError as e:
        pytest.fail(f"{e}\n{runner.describe()}")
    obj = dns1123_name(name)
    (pod,) = [p for p in standin.objects("Pod", NS) if p["metadata"]["name"].startswith(obj)]
    assert pod["status"]["containerStatuses"][0]["ready"] and pod["status"]["podIP"] != "127.0.0.1"
    ip = runner.service_ip(NS, obj)
    async with grpc.aio.insecure_channel(f"{ip}:50051") as channel:
        reply = await igrpc.InferenceServiceStub(channel).Generate(
            isvc.GenerateRequest(
                messages=[ipb.ChatMessage(role="user", content="Hello!")], sampling=ipb.SamplingParams(max_tokens=3)
            ),
            timeout=60,
        )
    assert reply.model_version == stack.versions[0]
    assert reply.usage.completion_tokens > 0

    # In the cluster, a client dials the endpoint the deployer reports (the Service's DNS name).
    assert d.endpoint == f"{obj}.{NS}.svc.cluster.local:50051"
    client = f"""
import grpc, sys
from neuroweaver.inference.v1 import inference_pb2 as ipb, inference_service_pb2 as isvc, inference_service_pb2_grpc as ig
with grpc.insecure_channel({d.endpoint!r}) as channel:
    reply = ig.InferenceServiceStub(channel).Generate(
        isvc.GenerateRequest(messages=[ipb.ChatMessage(role="user", content="Hi")], sampling=ipb.SamplingParams(max_tokens=2)),
        timeout=60,
    )
print(reply.model_version)
sys.exit(reply.model_version != {stack.versions[0]!r})
"""
    container = {"name": "client", "image": "python:3.11-slim-bookworm", "command": ["python3", "-c", client]}
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "client", "namespace": NS},
        "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [container]}}},
    }
    standin.put(job)

    def finished() -> str | None:
        status = (standin.get_object("batch/v1", "Job", NS, "client") or {}).get("status") or {}
        done = [c["type"] for c in status.get("conditions") or () if c["type"] in ("Complete", "Failed")]
        return done[0] if done else None

    assert runner.wait_for(finished, 60, "the client Job") == "Complete", runner.describe()

    await stack.dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=name))
    runner.wait_for(
        lambda: not [p for p in standin.objects("Pod", NS) if p["metadata"]["name"].startswith(obj)],
        30,
        "the model-server pods to go",
    )
