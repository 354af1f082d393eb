"""What WatchDeployment reports while changes arrive mid-rollout, on the LOCAL backend with real model-server processes.

A deployment of 1.0.0 is created with one replica; before that replica is ready (a model-server start takes
seconds) it is updated to 1.1.0 and scaled to 2. The first rollout then ends with one 1.0.0 replica ready while
revision 2 (1.1.0, two replicas) is stored. Every WatchDeployment message is recorded, and each one that says
AVAILABLE is checked against the endpoint: a Generate naming the deployment must be answered by its served version.
A watch can miss a state that lasts milliseconds, so every status the local backend writes is also checked at the
moment it is written against what the backend runs (its replicas' target and readiness).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import field_mask_pb2
from helpers import model_server_processes

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.inference.v1 import inference_pb2 as ipb
from neuroweaver.inference.v1 import inference_service_pb2 as isvc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as igrpc
from neuroweaver_deployer.domain.model import Backend, Deployment, State
from neuroweaver_deployer.service.controller import target_of

pytestmark = pytest.mark.slow  # model-server processes

NAME = "projects/default/deployments/mid-rollout"
AVAILABLE = dpb.Deployment.STATE_AVAILABLE


@dataclass
class Written:
    """A status the local backend wrote, as stored right after, beside what the backend ran at that moment."""

    stored: Deployment
    rollout_key: str  # the key of the target the backend's current replicas run
    version: str
    ready: int


async def served_by(endpoint: str) -> tuple[str, str]:
    """The version a Generate naming the deployment is answered by, and the version ListModels names first."""
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = igrpc.InferenceServiceStub(channel)
        request = isvc.GenerateRequest(
            model=NAME, messages=[ipb.ChatMessage(role="user", content="Hi")], sampling=ipb.SamplingParams(max_tokens=1)
        )
        reply = await stub.Generate(request, timeout=30)
        models = await stub.ListModels(isvc.ListModelsRequest(), timeout=30)
    return reply.model_version, models.models[0].model_version


async def test_update_and_scale_accepted_mid_rollout_are_available_only_once_served(stack):
    dep = stack.dep
    local = stack.deployer.controller.backends[Backend.LOCAL]
    written: list[Written] = []
    report = local.on_status

    async def recording(name: str, status) -> None:  # runs under the deployment's publishing lock: in order
        await report(name, status)
        if name == NAME:
            running = local.deployments[name]
            stored = await stack.deployer.deployer.get(name)
            ready = sum(r.state == "ready" for r in running.replicas)
            assert running.target is not None
            written.append(Written(stored, running.target.rollout_key(), running.target.version.name, ready))

    local.on_status = recording
    messages: list[dpb.Deployment] = []
    probes: list[tuple[int, str, tuple[str, str]]] = []  # (message index, its served version, what answered)

    async def watch() -> None:
        call = dep.WatchDeployment(dsvc.WatchDeploymentRequest(name=NAME))
        try:
            async for msg in call:
                d = msg.deployment
                messages.append(d)
                if d.state == AVAILABLE:
                    probes.append((len(messages) - 1, d.served_version, await served_by(d.endpoint)))
                    if d.revision == 2 and d.ready_replicas == 2:
                        return
        finally:
            call.cancel()

    try:
        await dep.CreateDeployment(
            dsvc.CreateDeploymentRequest(
                parent="projects/default",
                deployment_id="mid-rollout",
                deployment=dpb.Deployment(model_version=stack.versions[0], replicas=1, backend=dpb.BACKEND_LOCAL),
            )
        )
        watcher = asyncio.create_task(watch())
        async with asyncio.timeout(30):  # the first rollout started its replica (which needs seconds to be ready)
            while not model_server_processes():
                await asyncio.sleep(0.02)
        updated = await dep.UpdateDeployment(
            dsvc.UpdateDeploymentRequest(
                deployment=dpb.Deployment(name=NAME, model_version=stack.versions[1]),
                update_mask=field_mask_pb2.FieldMask(paths=["model_version"]),
            )
        )
        scaled = await dep.ScaleDeployment(dsvc.ScaleDeploymentRequest(name=NAME, replicas=2))
        assert (updated.revision, scaled.replicas) == (2, 2)
        await asyncio.wait_for(watcher, 150)
    finally:
        local.on_status = report
        try:
            await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=NAME))
        except grpc.aio.AioRpcError as exc:  # not created: the failure above says why
            assert exc.code() == grpc.StatusCode.NOT_FOUND
    assert model_server_processes() == []

    for index, version, answered in probes:  # every AVAILABLE message: the endpoint serves what it says
        assert answered == (version, version), (messages[index], answered)
    # The first rollout (1.0.0, one replica) ended after both changes were stored (revision 2, two replicas): the
    # report of its ready replica said PROGRESSING, not AVAILABLE.
    first = [w for w in written if w.version == stack.versions[0] and w.ready == 1]
    assert first and all((w.stored.revision, w.stored.replicas) == (2, 2) for w in first), first
    assert all(w.stored.state is State.PROGRESSING for w in first), first
    for w in written:  # every status written: AVAILABLE only with the stored spec's replicas all ready
        if w.stored.state is State.AVAILABLE:
            assert w.stored.target is not None
            assert w.rollout_key == target_of(w.stored, w.stored.target).rollout_key(), w
            assert (w.version, w.ready) == (w.stored.served_version, w.stored.replicas), w
    last = messages[-1]
    assert (last.revision, last.served_version, last.ready_replicas) == (2, stack.versions[1], 2)
    assert all(m.state != AVAILABLE for m in messages[:-1])
