"""The KUBERNETES backend's status while changes arrive mid-rollout, against the API STAND-IN (not a cluster).

The Deployment's status is set by the test (`KubeApiStandIn.set_status`, as the deployment controller would write
it): frozen at a generation, it shows the previous ReplicaSet complete while a newer template waits for its pods.
Each change (an update, a scale-up, then a rollback while the scale-up rolls out) arrives while the deployer's
status poller holds an answer it read before the change (a poll in flight, e.g. the one that sees the previous
rollout complete): that answer is about the previous spec and must not make the new revision AVAILABLE. Every
status written and every WatchDeployment message is checked: AVAILABLE at revision R serving V only while the live
Deployment's template is V's and rolled out with all of R's replicas ready.
"""

from __future__ import annotations

import asyncio
from typing import Any

from google.protobuf import field_mask_pb2

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver_deployer.domain.model import Backend, State
from neuroweaver_kube.manifests import dns1123_name

NAME = "projects/default/deployments/kube-mid-rollout"
NS = "serving"
OBJ = dns1123_name(NAME)
AVAILABLE = dpb.Deployment.STATE_AVAILABLE


def live(standin) -> dict[str, Any]:
    """The Deployment as the API answers it ({} before it exists): with auto_ready, one whose status was never set
    reads as rolled out."""
    obj = standin.get_object("apps/v1", "Deployment", NS, OBJ) or {}
    if obj and "status" not in obj and standin.auto_ready:
        n = obj["spec"]["replicas"]
        obj["status"] = {
            "observedGeneration": obj["metadata"]["generation"],
            "updatedReplicas": n, "readyReplicas": n, "availableReplicas": n,
        }  # fmt: skip
    return obj


def freeze_rolled_out(standin) -> None:
    """The current generation is rolled out with all its replicas ready, and the status stays so (a newer template's
    pods never become ready) until this is called again."""
    obj = live(standin)
    n = obj["spec"]["replicas"]
    standin.set_status(
        "apps/v1", "Deployment", NS, OBJ,
        {
            "observedGeneration": obj["metadata"]["generation"],
            "replicas": n, "updatedReplicas": n, "readyReplicas": n, "availableReplicas": n,
            "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
            ],
        },
    )  # fmt: skip


def serves(obj: dict[str, Any], version: str, replicas: int) -> bool:
    """The live Deployment runs `version` with `replicas` replicas, all of its current template and ready."""
    if not obj:
        return False
    st, spec = obj.get("status") or {}, obj["spec"]
    template = spec["template"]["metadata"]["annotations"]["neuroweaver.ai/model-version"]
    return (
        template == version
        and spec["replicas"] == replicas
        and st.get("observedGeneration", 0) >= obj["metadata"]["generation"]
        and st.get("updatedReplicas") == st.get("readyReplicas") == st.get("availableReplicas") == replicas
    )


class PollInFlight:
    """Holds the status poller's next read of the Deployment after it got its answer, until released."""

    def __init__(self, client) -> None:
        self.client, self.get = client, client.get
        self.parked, self.release = asyncio.Event(), asyncio.Event()
        client.get = self._get

    async def _get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        answer = await self.get(api_version, kind, namespace, name)
        if kind == "Deployment" and name == OBJ and not self.parked.is_set():
            self.parked.set()
            await self.release.wait()
        return answer

    async def __aenter__(self) -> PollInFlight:
        await asyncio.wait_for(self.parked.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        self.client.get = self.get


async def until(check, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def test_changes_mid_rollout_are_available_only_once_rolled_out(stack, kube_standin):
    dep, versions = stack.dep, stack.versions
    kube = stack.deployer.controller.backends[Backend.KUBERNETES]
    await dep.CreateDeployment(
        dsvc.CreateDeploymentRequest(
            parent="projects/default", deployment_id="kube-mid-rollout",
            deployment=dpb.Deployment(model_version=versions[0], backend=dpb.BACKEND_KUBERNETES, replicas=1, namespace=NS),
        )
    )  # fmt: skip
    written: list[tuple[Any, dict[str, Any]]] = []  # (stored right after a status write, the live Deployment then)
    messages: list[tuple[dpb.Deployment, dict[str, Any]]] = []  # (WatchDeployment message, the live Deployment then)
    report = kube.on_status

    async def recording(name: str, status) -> None:
        await report(name, status)
        if name == NAME:
            written.append((await stack.deployer.deployer.get(name), live(kube_standin)))

    async def watch() -> None:
        call = dep.WatchDeployment(dsvc.WatchDeploymentRequest(name=NAME))
        try:
            async for msg in call:
                messages.append((msg.deployment, live(kube_standin)))
        finally:
            call.cancel()

    watcher = asyncio.create_task(watch())
    kube.on_status = recording
    try:
        await until(lambda: any(m.state == AVAILABLE for m, _ in messages))  # auto_ready: rolled out at once
        freeze_rolled_out(kube_standin)  # from here on, each template's pods are ready when the test says so

        async def mid_rollout(change, applied) -> None:
            """`change` while a poll of the previous spec is in flight; released once the change is applied."""
            async with PollInFlight(kube.client):
                await change()
                await until(lambda: applied(live(kube_standin)))
            before = len(written)
            await until(lambda: len(written) >= before + 3)  # the held answer, then polls of the new spec
            stored = written[-1][0]
            assert stored.state is State.PROGRESSING, stored

        def template(version: str):
            return lambda obj: version in obj["spec"]["template"]["spec"]["containers"][0]["args"]

        update = dsvc.UpdateDeploymentRequest(
            deployment=dpb.Deployment(name=NAME, model_version=versions[1]),
            update_mask=field_mask_pb2.FieldMask(paths=["model_version"]),
        )
        await mid_rollout(lambda: dep.UpdateDeployment(update), template(versions[1]))  # the poll saw 1.0.0 rolled out
        freeze_rolled_out(kube_standin)
        await until(lambda: any(m.state == AVAILABLE and m.revision == 2 for m, _ in messages))
        scale = dsvc.ScaleDeploymentRequest(name=NAME, replicas=2)
        await mid_rollout(lambda: dep.ScaleDeployment(scale), lambda obj: obj["spec"]["replicas"] == 2)
        rollback = dsvc.RollbackDeploymentRequest(name=NAME, to_revision=1)  # while the scale-up rolls out
        await mid_rollout(lambda: dep.RollbackDeployment(rollback), template(versions[0]))
        freeze_rolled_out(kube_standin)
        await until(lambda: any(m.state == AVAILABLE and m.revision == 3 for m, _ in messages))
    finally:
        kube.on_status = report
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=NAME))

    for stored, obj in written:
        if stored.state is State.AVAILABLE:
            assert serves(obj, stored.served_version, stored.replicas), (stored.revision, stored.served_version, obj["status"])
    for msg, obj in messages:
        if msg.state == AVAILABLE:
            assert serves(obj, msg.served_version, msg.replicas), (msg.revision, msg.served_version, obj["status"])
    available = [(m.revision, m.served_version, m.ready_replicas) for m, _ in messages if m.state == AVAILABLE]
    assert available == [(1, versions[0], 1), (2, versions[1], 1), (3, versions[0], 2)], available
