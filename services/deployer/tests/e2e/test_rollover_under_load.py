"""Zero failed requests while a deployment rolls over twice and scales down, under load (issue 16 §3).

A real registry and deployer, real model-server processes on the LOCAL backend. Eight clients call the deployment
all the time, every call naming the model by the stable name `advisor@<alias>`: four over gRPC `Generate`, four
through the official `openai` SDK (no SDK retries, so a failure is seen). The alias moves 1.0.0 → 1.1.0 → 1.2.0
(each move rolls the deployment's two replicas over) and then the deployment scales 2 → 1. Not one call may fail,
and each client's sequence of serving versions (`GenerateResponse.model_version`, the `x-neuroweaver-model-version`
header) must switch exactly once per rollover: 1.0.0 ... 1.1.0 ... 1.2.0, never back.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

import grpc
import openai
import pytest
from helpers import model_server_processes, watch_until

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.inference.v1 import inference_pb2 as ipb
from neuroweaver.inference.v1 import inference_service_pb2 as isvc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as igrpc
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc

pytestmark = pytest.mark.slow  # model-server processes

AVAILABLE = dpb.Deployment.STATE_AVAILABLE
ALIAS = "rollover"
NAME = "projects/default/deployments/advisor-rollover"
MODEL = f"advisor@{ALIAS}"  # a stable name: what a caller that wants "whatever the alias serves" sends
HEADER = "x-neuroweaver-model-version"
CLIENT_DEADLINE = 240.0  # every client loop ends by then at the latest, whatever happens to the test


class Load:
    """Eight clients calling until `stop`; per client the versions that served its calls, in order, and failures."""

    def __init__(self, endpoint: str, openai_base_url: str) -> None:
        self.endpoint, self.openai_base_url = endpoint, openai_base_url
        self.served: dict[str, list[str]] = {f"grpc-{i}": [] for i in range(4)} | {f"openai-{i}": [] for i in range(4)}
        self.failures: list[tuple[str, str]] = []
        self.stop = asyncio.Event()
        self._until = time.monotonic() + CLIENT_DEADLINE

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self._until

    async def _pace(self) -> None:
        await asyncio.sleep(0.05)  # pacing only: eight busy loops would starve the replicas' start on a small machine

    async def grpc_client(self, key: str) -> None:
        async with grpc.aio.insecure_channel(self.endpoint) as channel:
            stub = igrpc.InferenceServiceStub(channel)
            request = isvc.GenerateRequest(
                model=MODEL, messages=[ipb.ChatMessage(role="user", content="Hi")], sampling=ipb.SamplingParams(max_tokens=2)
            )
            while self.running():
                try:
                    reply = await stub.Generate(request, timeout=60)
                except grpc.aio.AioRpcError as exc:
                    self.failures.append((key, f"{exc.code().name}: {exc.details()}"))
                else:
                    if reply.model != MODEL or not (reply.served_model and reply.system_fingerprint):
                        self.failures.append((key, f"unexpected answer {reply.model!r} {reply.served_model!r}"))
                    self.served[key].append(reply.model_version)
                await self._pace()

    async def openai_client(self, key: str) -> None:
        async with openai.AsyncOpenAI(base_url=self.openai_base_url, api_key="-", max_retries=0, timeout=60) as client:
            while self.running():
                try:
                    raw = await client.chat.completions.with_raw_response.create(
                        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
                    )
                except openai.APIError as exc:
                    self.failures.append((key, f"{type(exc).__name__}: {exc}"))
                else:
                    chat, version = raw.parse(), raw.headers.get(HEADER, "")
                    fingerprint = "nw-" + version.rsplit("/", 1)[-1].replace(".", "-") + "-"
                    if chat.model != MODEL or not (chat.system_fingerprint or "").startswith(fingerprint):
                        self.failures.append((key, f"unexpected answer {chat.model!r} {chat.system_fingerprint!r}"))
                    self.served[key].append(version)
                await self._pace()

    def start(self) -> list[asyncio.Task]:
        return [asyncio.create_task(self.grpc_client(k) if k.startswith("grpc") else self.openai_client(k)) for k in self.served]

    async def until(self, condition: Callable[[str, list[str]], bool], what: str, timeout: float = 90.0) -> None:
        """Waits until `condition(client, versions)` holds for every client (failed calls are recorded, not raised)."""
        deadline = time.monotonic() + timeout
        while not all(condition(k, v) for k, v in self.served.items()):
            if time.monotonic() > deadline:
                counts = {k: len(v) for k, v in self.served.items()}
                raise AssertionError(f"timed out waiting until every client {what}: {counts}, failures {self.failures[:3]}")
            await asyncio.sleep(0.05)


async def test_two_rollovers_and_a_scale_down_under_load_fail_no_request(stack):
    dep, reg = stack.dep, stack.reg
    versions = stack.versions  # 1.0.0, 1.1.0, 1.2.0
    await reg.SetModelAlias(rsvc.SetModelAliasRequest(model=stack.MODEL, alias=ALIAS, version="1.0.0"))
    await dep.CreateDeployment(
        dsvc.CreateDeploymentRequest(
            parent="projects/default",
            deployment_id="advisor-rollover",
            deployment=dpb.Deployment(
                model_alias=f"{stack.MODEL}/aliases/{ALIAS}",
                replicas=2,
                backend=dpb.BACKEND_LOCAL,
                serving=dpb.ServingConfig(max_new_tokens_limit=16),
            ),
        )  # fmt: skip
    )
    try:
        d = await watch_until(dep, NAME, lambda d: d.state == AVAILABLE and d.ready_replicas == 2)
        assert list(d.model_names) == [NAME, "advisor-rollover", MODEL, f"{stack.MODEL}@{ALIAS}"]
        load = Load(d.endpoint, d.openai_base_url)
        clients = load.start()
        try:
            await load.until(lambda _, v: versions[0] in v, "was served by 1.0.0")
            for version in versions[1:]:  # two rollovers, each by moving the alias
                old_pids = {p.pid for p in model_server_processes()}
                await reg.SetModelAlias(
                    rsvc.SetModelAliasRequest(model=stack.MODEL, alias=ALIAS, version=version.rsplit("/", 1)[1])
                )

                def rolled(d, version=version, old_pids=old_pids) -> bool:
                    current = {p.pid for p in model_server_processes()}
                    return (
                        d.state == AVAILABLE and d.served_version == version and d.ready_replicas == 2 and not old_pids & current
                    )

                await watch_until(dep, NAME, rolled)
                await load.until(lambda _, v, version=version: bool(v) and v[-1] == version, f"was served by {version}")
            # scale down 2 → 1: the stopped replica leaves the rotation first, then drains
            await dep.ScaleDeployment(dsvc.ScaleDeploymentRequest(name=NAME, replicas=1))
            await watch_until(dep, NAME, lambda d: d.replicas == 1 and d.ready_replicas == 1 and d.state == AVAILABLE)
            assert len(model_server_processes()) == 1
            calls = {k: len(v) for k, v in load.served.items()}
            await load.until(lambda k, v: len(v) >= calls[k] + 3, "made 3 more calls on one replica")
        finally:
            load.stop.set()
            await asyncio.gather(*clients)
        assert load.failures == [], load.failures[:10]
        for key, served in load.served.items():
            switches = [v for v, _ in itertools.groupby(served)]
            assert switches == versions, f"{key} saw {switches} ({len(served)} calls)"
    finally:
        await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=NAME))
    assert model_server_processes() == []
