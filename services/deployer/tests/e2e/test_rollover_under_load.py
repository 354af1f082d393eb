"""Zero failed requests while a deployment rolls over twice and scales down, under load (issue 16 §3).

A real registry and deployer, real model-server processes on the LOCAL backend. Eight clients call the deployment
all the time, every call naming the model by the stable name `advisor@<alias>`: four over gRPC `Generate`, four
through the official `openai` SDK (no SDK retries, so a failure is seen). The alias moves 1.0.0 → 1.1.0 → 1.2.0
(each move rolls the deployment's two replicas over) and then the deployment scales 2 → 1. Not one call may fail,
and each client's sequence of serving versions (`GenerateResponse.model_version`, the `x-neuroweaver-model-version`
header) must switch exactly once per rollover: 1.0.0 ... 1.1.0 ... 1.2.0, never back.

Two more clients stream all the time, each stream long (seconds) next to the short calls: gRPC `GenerateStream`
and the openai SDK with `stream=True`. A replica being retired is drained first (the router waits for its calls to
end before it stops), so every stream ends with a finish_reason and no error, on the version it started on (the
`x-neuroweaver-model-version` initial metadata / header at its start = the version its last message names), and at
least one stream that started on an old version was still open after a call had been served by the new one.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

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

pytestmark = [pytest.mark.slow, pytest.mark.postgres]  # model-server processes, the production database

AVAILABLE = dpb.Deployment.STATE_AVAILABLE
ALIAS = "rollover"
NAME = "projects/default/deployments/advisor-rollover"
MODEL = f"advisor@{ALIAS}"  # a stable name: what a caller that wants "whatever the alias serves" sends
HEADER = "x-neuroweaver-model-version"
CLIENT_DEADLINE = 240.0  # every client loop ends by then at the latest, whatever happens to the test
STREAM_TOKEN_LIMIT = 128  # the deployment's max_new_tokens_limit; longer streams would only slow the rollovers
STREAM_SECONDS = 1.0  # about how long a stream lasts next to the short calls (longer while replicas start)


@dataclass(frozen=True)
class Call:
    """One answered call: the version that served it and when it started and ended (time.monotonic())."""

    key: str
    version: str
    started: float
    ended: float


class Load:
    """Eight short-call clients and two streaming ones calling until `stop`; per short-call client the versions that
    served its calls, in order; every answered call and stream (`calls`, `streams`); failures."""

    def __init__(self, endpoint: str, openai_base_url: str) -> None:
        self.endpoint, self.openai_base_url = endpoint, openai_base_url
        self.stream_tokens = 0  # max_tokens of each stream, sized by `start_streams`
        self.served: dict[str, list[str]] = {f"grpc-{i}": [] for i in range(4)} | {f"openai-{i}": [] for i in range(4)}
        self.calls: list[Call] = []
        self.streams: list[Call] = []
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
                started = time.monotonic()
                try:
                    reply = await stub.Generate(request, timeout=60)
                except grpc.aio.AioRpcError as exc:
                    self.failures.append((key, f"{exc.code().name}: {exc.details()}"))
                else:
                    if reply.model != MODEL or not (reply.served_model and reply.system_fingerprint):
                        self.failures.append((key, f"unexpected answer {reply.model!r} {reply.served_model!r}"))
                    self.served[key].append(reply.model_version)
                    self.calls.append(Call(key, reply.model_version, started, time.monotonic()))
                await self._pace()

    async def openai_client(self, key: str) -> None:
        async with openai.AsyncOpenAI(base_url=self.openai_base_url, api_key="-", max_retries=0, timeout=60) as client:
            while self.running():
                started = time.monotonic()
                try:
                    raw = await client.chat.completions.with_raw_response.create(
                        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
                    )
                except openai.APIError as exc:
                    self.failures.append((key, f"{type(exc).__name__}: {exc}"))
                else:
                    chat, version = raw.parse(), raw.headers.get(HEADER, "")
                    if chat.model != MODEL or not (chat.system_fingerprint or "").startswith(_fingerprint(version)):
                        self.failures.append((key, f"unexpected answer {chat.model!r} {chat.system_fingerprint!r}"))
                    self.served[key].append(version)
                    self.calls.append(Call(key, version, started, time.monotonic()))
                await self._pace()

    async def grpc_stream_client(self, key: str) -> None:
        async with grpc.aio.insecure_channel(self.endpoint) as channel:
            stub = igrpc.InferenceServiceStub(channel)
            request = isvc.GenerateStreamRequest(
                model=MODEL, messages=[ipb.ChatMessage(role="user", content="Tell me a story")],
                sampling=ipb.SamplingParams(max_tokens=self.stream_tokens),
            )  # fmt: skip
            while self.running():
                started = time.monotonic()
                call = stub.GenerateStream(request, timeout=120)
                try:
                    version = dict(await call.initial_metadata()).get(HEADER, "")  # the version the stream started on
                    messages = [m async for m in call]
                except grpc.aio.AioRpcError as exc:
                    self.failures.append((key, f"{exc.code().name}: {exc.details()}"))
                    await self._pace()
                else:
                    last = messages[-1] if messages else isvc.GenerateStreamResponse()
                    if last.finish_reason == ipb.FINISH_REASON_UNSPECIFIED or last.model_version != version or not version:
                        self.failures.append((key, f"stream started on {version!r} ended with {last}"))
                    self.streams.append(Call(key, version, started, time.monotonic()))
                # No pause after a stream: one is open (almost) all the time, so also at each switch.

    async def openai_stream_client(self, key: str) -> None:
        async with openai.AsyncOpenAI(base_url=self.openai_base_url, api_key="-", max_retries=0, timeout=120) as client:
            while self.running():
                started = time.monotonic()
                try:
                    async with client.chat.completions.with_streaming_response.create(
                        model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}],
                        max_tokens=self.stream_tokens, temperature=0, stream=True,
                    ) as streamed:  # fmt: skip
                        version = streamed.headers.get(HEADER, "")
                        chunks = [c async for c in await streamed.parse()]
                except openai.APIError as exc:  # an error event mid-stream too
                    self.failures.append((key, f"{type(exc).__name__}: {exc}"))
                    await self._pace()
                else:
                    finish = chunks[-1].choices[0].finish_reason if chunks and chunks[-1].choices else None
                    fingerprints = {c.system_fingerprint or "" for c in chunks}  # every chunk: the version serving it
                    same = len(fingerprints) == 1 and fingerprints.pop().startswith(_fingerprint(version))
                    if finish is None or not version or not same:
                        self.failures.append((key, f"stream started on {version!r} ended {finish!r} {chunks[-1:]}"))
                    self.streams.append(Call(key, version, started, time.monotonic()))
                # No pause after a stream: one is open (almost) all the time, so also at each switch.

    def start(self) -> list[asyncio.Task]:
        """The eight short-call clients."""
        return [asyncio.create_task(self.grpc_client(k) if k.startswith("grpc") else self.openai_client(k)) for k in self.served]

    async def start_streams(self) -> list[asyncio.Task]:
        """The two streaming clients, their streams sized next to the running short calls."""
        self.stream_tokens = await stream_tokens(self.endpoint)
        return [
            asyncio.create_task(self.grpc_stream_client("grpc-stream")),
            asyncio.create_task(self.openai_stream_client("openai-stream")),
        ]

    async def until(self, condition: Callable[[str, list[str]], bool], what: str, timeout: float = 90.0) -> None:
        """Waits until `condition(client, versions)` holds for every client (failed calls are recorded, not raised)."""
        deadline = time.monotonic() + timeout
        while not all(condition(k, v) for k, v in self.served.items()):
            if time.monotonic() > deadline:
                counts = {k: len(v) for k, v in self.served.items()}
                raise AssertionError(f"timed out waiting until every client {what}: {counts}, failures {self.failures[:3]}")
            await asyncio.sleep(0.05)


async def stream_tokens(endpoint: str) -> int:
    """How many tokens make a stream last about STREAM_SECONDS on this machine under the short-call load, so that
    streams span the switch on a fast machine as on a slow one (greedy decoding of the tiny model never stops early).
    Sizing only: nothing is asserted on time."""
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = igrpc.InferenceServiceStub(channel)
        request = isvc.GenerateStreamRequest(
            model=MODEL, messages=[ipb.ChatMessage(role="user", content="Tell me a story")],
            sampling=ipb.SamplingParams(max_tokens=32),
        )  # fmt: skip
        for _ in range(2):  # two replicas, each warmed up by the short calls already
            started = time.monotonic()
            last = [m async for m in stub.GenerateStream(request, timeout=60)][-1]
            rate = last.usage.completion_tokens / max(time.monotonic() - started, 1e-3)
    return max(16, min(STREAM_TOKEN_LIMIT, round(rate * STREAM_SECONDS)))


def _fingerprint(version: str) -> str:
    """The start of `system_fingerprint` for a version: nw-<version id with dashes>-<sha8>."""
    return "nw-" + version.rsplit("/", 1)[-1].replace(".", "-") + "-"


@pytest.fixture
def postgres_server() -> None:
    from neuroweaver_runtime.testing import postgres_available

    if not postgres_available():
        pytest.skip("PostgreSQL is not reachable at NW_TEST_POSTGRES_URL")


@pytest.fixture
async def stack(tmp_path, tiny_base, adapters, kube_standin, postgres_server):
    """This test's own registry + deployer on PostgreSQL, the production database (skips without a server)."""
    from helpers import Stack

    from neuroweaver_runtime.testing import create_postgres_database

    (registry_url, drop_registry), (deployer_url, drop_deployer) = [
        await create_postgres_database(f"nwroll{svc}") for svc in ("reg", "dep")
    ]
    stack = Stack(
        tmp_path, tiny_base, adapters, kube_standin.url, database_urls={"registry": registry_url, "deployer": deployer_url}
    )
    try:
        await stack.start()
        yield stack
    finally:
        await stack.stop()
        await drop_registry()
        await drop_deployer()


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
                serving=dpb.ServingConfig(max_new_tokens_limit=STREAM_TOKEN_LIMIT),
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
            clients += await load.start_streams()
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
        assert {s.key for s in load.streams} == {"grpc-stream", "openai-stream"}
        # A stream open across a switch: served by an old version, still open when a call that the new version
        # served had ended (so the router had switched before the stream ended), and it finished, drained.
        spanning = [
            s
            for s in load.streams
            for old, new in itertools.pairwise(versions)
            if s.version == old and any(c.version == new and c.ended < s.ended for c in load.calls)
        ]
        assert spanning, f"no stream was open across a rollover: {load.streams}"
    finally:
        await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=NAME))
    assert model_server_processes() == []
