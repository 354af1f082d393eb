"""The production profile: replicated services on PostgreSQL with auth on, the RelayCore flow under load, replicas
killed mid-flow, and not one failed request.

Shape: every service on its own fresh PostgreSQL database (dropped after); two replicas each of registry, deployer
and experiments, started at the same moment on the empty databases (their migrations race under the advisory lock),
one trainer. Auth is on everywhere with one token table (people: alice admin, olivia operator, the RelayCore
gateway and a load generator; service identities: trainer, deployer, experiments, which act only on behalf of a
caller) and a page-token secret per service. Plaintext: a static `ipv4:` list has no host name a certificate could
be checked against, and services have no outbound server-name override (test_relaycore_mtls.py covers mTLS on
every hop). Every inter-service target and every Python client names both replicas,
`ipv4:127.0.0.1:P1,127.0.0.1:P2`, dialled round_robin with UNAVAILABLE retries (`neuroweaver_runtime.client`); the
TypeScript gateway dials one experiments replica (the Node client takes one `host:port`, as a Service VIP).

Flow: alice registers the model and 1.0.0 (`production`); olivia trains the 1.1.0 candidate (trainer worker →
registry on her behalf); deployment `advisor-control` follows `production`, `advisor-treatment` pins 1.1.0; an A/B
experiment over both; the gateway (examples/relaycore) assigns variants, calls the model servers and records
metrics; olivia concludes with promotion, `production` moves (experiments → registry on her behalf) and the
control deployment rolls over to 1.1.0.

Background load during all of it: gRPC Generate and the official `openai` SDK (no SDK retries) against the control
deployment's stable endpoint, naming the model by stable names that survive the rollover (gRPC `advisor@production`;
the SDK the deployment's resource name, as `Variant.model` gives it), AssignVariant on the experiments replicas,
GetModelAlias on the registry replicas and GetDeployment on the deployer replicas. The test asserts 0 failed requests and that each inference client sees the served version switch exactly
once, 1.0.0 → 1.1.0.

Killed mid-flow, before the promotion (SIGKILL, no goodbye): one registry replica (every client carries on through
the other; so does the deployer's alias watch, which re-subscribes when its stream was on the dead one) and the deployer replica that owns the treatment deployment but
NOT the control deployment under load. Why not the control's owner: with the local backend a deployment's endpoint
is a router inside the deployer process that holds its lease (its replicas are that process's children and die with
it), so killing that process necessarily breaks the endpoint until another replica takes the lease over and starts
new model servers behind a new router port. On Kubernetes the endpoint is a Service in front of model-server pods
that do not belong to any deployer process: a deployer replica dying changes nothing on the data path, and the
survivor's takeover only resumes reconciling. What this test shows instead: the survivor takes over the killed
replica's deployment (its lease expires on the database clock; the treatment comes back AVAILABLE behind a router in
the survivor) while the deployment it already owned keeps serving, follows the promotion and rolls over without a
failed request. The test steers the ownership so (control on one replica, treatment on the other) by pausing the
control's owner (SIGSTOP, well under the lease time) while the treatment is created through the other replica.

Finally the registry's audit trail (ListModelEvents) names the people behind every write, never a service identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import openai
import psutil
import pytest

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as dgrpc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.experiments.v1 import experiments_service_pb2 as esvc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as egrpc
from neuroweaver.inference.v1 import inference_pb2 as ipb
from neuroweaver.inference.v1 import inference_service_pb2 as isvc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as igrpc
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
from neuroweaver.trainer.v1 import trainer_service_pb2_grpc as tgrpc
from neuroweaver_runtime.client import channel_options, open_channel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "security"))
from nwstack import service_databases, wait_for  # noqa: E402
from test_node_client import (  # noqa: E402 - the RelayCore flow's steps, reused
    HEALTH,
    MODEL,
    PROJECT,
    ServiceProcess,
    check_relaycore_run,
    conclude_and_roll_over,
    delete_deployments,
    node_client,  # noqa: F401 - relaycore_example's own fixture
    register_versions,
    relaycore_example,  # noqa: F401 - the fixture that builds examples/relaycore
    run_relaycore,
    start_ab_experiment,
    stopped_at_exit,
    tiny_base_and_adapters,
)
from test_relaycore_mtls import sft_candidate  # noqa: E402

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ALICE, OLIVIA, GATEWAY, LOADGEN = "tok-alice-admin", "tok-olivia-operator", "tok-relaycore-gateway", "tok-loadgen-viewer"
SVC_TRAINER, SVC_DEPLOYER, SVC_EXPERIMENTS = "tok-svc-trainer", "tok-svc-deployer", "tok-svc-experiments"
TOKENS = ",".join([
    f"{ALICE}=default:admin:alice",
    f"{OLIVIA}=default:operator:olivia",
    f"{GATEWAY}=default:operator:relaycore-gateway",
    f"{LOADGEN}=default:viewer:loadgen",
    f"{SVC_TRAINER}=*:service:trainer",
    f"{SVC_DEPLOYER}=*:service:deployer",
    f"{SVC_EXPERIMENTS}=*:service:experiments",
])  # fmt: skip
SERVICE_IDENTITIES = {"trainer", "deployer", "experiments"}
LEASE_SECONDS, LEASE_RENEW_SECONDS = 10, 1  # short, so the takeover after the SIGKILL comes within seconds
LOAD_PACE_SECONDS = 0.1  # pause between one load client's calls (keeps 2 shared cores usable), not a synchronisation
LOAD_MAX_SECONDS = 400  # the load stops by itself even if the test never stops it
START_TIMEOUT = 180.0


def auth_args(svc: str, databases: dict[str, str]) -> list[str]:
    return ["--database-url", databases[svc], "--auth-tokens", TOKENS, "--page-token-secret", f"{svc}-page-token-secret"]


def both(replicas: list[ServiceProcess]) -> str:
    """The static multi-address target naming every replica (a headless Service's DNS answer, spelled out)."""
    return "ipv4:" + ",".join(r.target for r in replicas)


def channel(target: str, token: str) -> grpc.Channel:
    """A synchronous channel as the runtime dials (round_robin, UNAVAILABLE retries) with a bearer token on every
    call. Local credentials: plaintext TCP to loopback, which may carry call credentials."""
    local = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    credentials = grpc.composite_channel_credentials(local, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(target, credentials, options=channel_options())


def model_server_version(proc: psutil.Process) -> str | None:
    """The `--model-version` of a model-server process, None for any other process."""
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return None
    if not any("neuroweaver_model_server" in part for part in cmdline) or "--model-version" not in cmdline:
        return None
    return cmdline[cmdline.index("--model-version") + 1]


def runs_model_server(deployer: ServiceProcess, version: str) -> bool:
    """Whether one of `deployer`'s local replicas serves `version` (its own children only)."""
    return any(model_server_version(p) == version for p in psutil.Process(deployer.proc.pid).children(recursive=True))


def listens_on(deployer: ServiceProcess, endpoint: str) -> bool:
    """Whether `deployer`'s own process listens on the port of `endpoint` (`host:port` or a URL): the router of a
    local deployment lives in the process that holds its lease."""
    port = urlsplit(endpoint if "//" in endpoint else f"//{endpoint}").port
    return any(
        c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in psutil.Process(deployer.proc.pid).net_connections("tcp")
    )


@contextlib.contextmanager
def paused(proc: ServiceProcess) -> Iterator[None]:
    """SIGSTOP … SIGCONT (a long GC pause, as far as the others can tell); always resumed."""
    os.kill(proc.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)


def get_deployment(dep, name: str) -> dpb.Deployment:
    return dep.GetDeployment(dsvc.GetDeploymentRequest(name=name), timeout=10)


def available(dep, name: str) -> dpb.Deployment | None:
    d = get_deployment(dep, name)
    return d if d.state == dpb.Deployment.STATE_AVAILABLE and d.ready_replicas >= 1 else None


def sigkill(proc: ServiceProcess) -> None:
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(timeout=30)


# -- background load ------------------------------------------------------------------------------


@dataclass
class LoadClient:
    """One sequential client of the background load: its successes (with the version each answer names, where it
    names one) and its failures."""

    name: str
    call: Callable[[], Awaitable[str | None]]
    ok: int = 0
    versions: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    finish: threading.Event = field(default_factory=threading.Event)  # set: no further calls
    finished: threading.Event = field(default_factory=threading.Event)  # set: its last call has returned


class BackgroundLoad:
    """Concurrent sequential clients in one asyncio loop on a thread of its own, until `stop()` (or LOAD_MAX_SECONDS)."""

    def __init__(self) -> None:
        self.clients: list[LoadClient] = []
        self._setup: list[Callable[[], Awaitable[None]]] = []
        self._teardown: list[Callable[[], Awaitable[None]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="background-load", daemon=True)

    def add(self, name: str, call: Callable[[], Awaitable[str | None]]) -> None:
        self.clients.append(LoadClient(name, call))

    def on_close(self, close: Callable[[], Awaitable[None]]) -> None:
        self._teardown.append(close)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "the background load did not stop"

    def finish(self, names: list[str]) -> None:
        """Ends the named clients and returns once none of their calls is in flight."""
        chosen = [c for c in self.clients if c.name in names]
        assert len(chosen) == len(names), names
        for c in chosen:
            c.finish.set()
        for c in chosen:
            assert c.finished.wait(timeout=120), f"load client {c.name} did not finish"

    def ok_counts(self) -> dict[str, int]:
        return {c.name: c.ok for c in self.clients}

    def failures(self) -> dict[str, list[str]]:
        return {c.name: c.failures for c in self.clients if c.failures}

    def wait_progress(self, names: list[str] | None, more: int, timeout: float, what: str) -> None:
        """Until each named client (all by default) has `more` successes beyond now."""
        start = self.ok_counts()
        chosen = names or list(start)
        wait_for(lambda: all(self.ok_counts()[n] >= start[n] + more for n in chosen), timeout, what)

    async def _run(self, client: LoadClient) -> None:
        deadline = time.monotonic() + LOAD_MAX_SECONDS
        try:
            while not (self._stop.is_set() or client.finish.is_set()) and time.monotonic() < deadline:
                try:
                    version = await client.call()
                except Exception as exc:  # noqa: BLE001 - every failure is recorded, the test asserts there is none
                    client.failures.append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}"[:600])
                else:
                    client.ok += 1
                    if version is not None:
                        client.versions.append(version)
                await asyncio.sleep(LOAD_PACE_SECONDS)
        finally:
            client.finished.set()

    async def _main(self) -> None:
        try:
            await asyncio.gather(*(self._run(c) for c in self.clients))
        finally:
            for close in self._teardown:
                with contextlib.suppress(Exception):
                    await close()


def background_load(
    *,
    control: dpb.Deployment,
    grpc_model: str,
    openai_model: str,
    experiment: str,
    experiments: str,
    registry: str,
    deployer: str,
) -> BackgroundLoad:
    """Inference on the control deployment's stable endpoint under stable names (2 gRPC, 2 OpenAI SDK
    clients), and the platform reads a gateway and a dashboard make (AssignVariant ×2, GetModelAlias, GetDeployment),
    all as the `loadgen` viewer. Channels are opened inside the load's own event loop."""
    load = BackgroundLoad()
    bearer = (("authorization", f"Bearer {LOADGEN}"),)
    messages = [ipb.ChatMessage(role="user", content="Which oil does my sedan need?")]
    state: dict[str, object] = {}

    def lazily(key: str, make: Callable[[], object]) -> object:
        if key not in state:
            state[key] = make()
        return state[key]

    def inference() -> igrpc.InferenceServiceStub:
        # A plain channel (no retry policy): a failed Generate must show as a failure, not be retried away.
        def make() -> igrpc.InferenceServiceStub:
            ch = grpc.aio.insecure_channel(control.endpoint)
            load.on_close(ch.close)
            return igrpc.InferenceServiceStub(ch)

        return lazily("inference", make)  # type: ignore[return-value]

    def openai_client() -> openai.AsyncOpenAI:
        def make() -> openai.AsyncOpenAI:
            client = openai.AsyncOpenAI(base_url=control.openai_base_url, api_key=LOADGEN, max_retries=0, timeout=60)
            load.on_close(client.close)
            return client

        return lazily("openai", make)  # type: ignore[return-value]

    def platform(key: str, target: str, stub_type):
        def make():
            ch = open_channel(target, token=LOADGEN, deadline=30)
            load.on_close(ch.close)
            return stub_type(ch)

        return lazily(key, make)

    async def generate() -> str:
        request = isvc.GenerateRequest(
            model=grpc_model, messages=messages, sampling=ipb.SamplingParams(max_tokens=4, temperature=0)
        )
        reply = await inference().Generate(request, metadata=bearer, timeout=60)
        assert reply.model == grpc_model and reply.model_version and reply.system_fingerprint, reply
        return reply.model_version

    async def chat() -> str:
        raw = await openai_client().chat.completions.with_raw_response.create(
            model=openai_model,
            messages=[{"role": "user", "content": "Which oil does my sedan need?"}],
            max_tokens=4,
            temperature=0,
        )
        completion = raw.parse()
        version = raw.headers.get("x-neuroweaver-model-version")
        assert completion.model == openai_model and version and completion.system_fingerprint, (completion, raw.headers)
        assert completion.choices and completion.usage is not None and completion.usage.completion_tokens > 0, completion
        return version

    def assign(unit: int) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            stub = platform("experiments", experiments, egrpc.ExperimentsServiceStub)
            reply = await stub.AssignVariant(esvc.AssignVariantRequest(experiment=experiment, unit_id=f"load-unit-{unit}"))
            assert reply.variant.id in ("control", "treatment"), reply

        return call

    async def production_alias() -> str:
        stub = platform("registry", registry, rgrpc.RegistryServiceStub)
        alias = await stub.GetModelAlias(rsvc.GetModelAliasRequest(name=f"{MODEL}/aliases/production"))
        return alias.version

    async def read_control() -> None:
        stub = platform("deployer", deployer, dgrpc.DeployerServiceStub)
        d = await stub.GetDeployment(dsvc.GetDeploymentRequest(name=control.name))
        assert d.endpoint == control.endpoint, d  # the stable endpoint never moves while its owner lives

    load.add("generate-1", generate)
    load.add("generate-2", generate)
    load.add("openai-1", chat)
    load.add("openai-2", chat)
    load.add("assign-1", assign(1))
    load.add("assign-2", assign(2))
    load.add("registry-alias", production_alias)
    load.add("deployer-get", read_control)
    return load


def switches(values: list[str]) -> list[str]:
    """`values` without consecutive repeats: [a, a, b, b] → [a, b]."""
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


def all_events(reg) -> list[rpb.ModelEvent]:
    events, token = [], ""
    while True:
        page = reg.ListModelEvents(rsvc.ListModelEventsRequest(parent=PROJECT, model=MODEL, page_size=100, page_token=token))
        events.extend(page.events)
        token = page.next_page_token
        if not token:
            return events


def test_production_profile(relaycore_example: Path, tmp_path: Path) -> None:  # noqa: F811
    base, adapters = tiny_base_and_adapters(tmp_path, 1)
    with service_databases("postgres", "nwprod") as databases, stopped_at_exit([]) as procs:
        # Started back to back, waited on together: each pair migrates its empty database at the same moment.
        registries = [ServiceProcess("registry", tmp_path / f"registry-{i}", *auth_args("registry", databases)) for i in (1, 2)]
        procs.extend(registries)
        deployers = [
            ServiceProcess(
                "deployer", tmp_path / f"deployer-{i}", *auth_args("deployer", databases),
                "--registry-target", both(registries), "--registry-token", SVC_DEPLOYER,
                "--artifact-roots", str(tmp_path), "--replica-grace-seconds", "2",
                "--lease-seconds", str(LEASE_SECONDS), "--lease-renew-seconds", str(LEASE_RENEW_SECONDS),
            )
            for i in (1, 2)
        ]  # fmt: skip
        procs.extend(deployers)
        experiments = [
            ServiceProcess(
                "experiments", tmp_path / f"experiments-{i}", *auth_args("experiments", databases),
                "--deployer-target", both(deployers), "--registry-target", both(registries),
                "--service-token", SVC_EXPERIMENTS,
            )
            for i in (1, 2)
        ]  # fmt: skip
        procs.extend(experiments)
        trainer = ServiceProcess(
            "trainer", tmp_path / "trainer", *auth_args("trainer", databases),
            "--registry-target", both(registries), "--registry-token", SVC_TRAINER,
            "--dataset-roots", str(tmp_path), "--model-roots", str(tmp_path), "--queue-poll-seconds", "0.2",
        )  # fmt: skip
        procs.append(trainer)
        for proc in procs:
            proc.wait_serving(HEALTH[proc.service], timeout=START_TIMEOUT)

        with (
            channel(both(registries), ALICE) as admin_ch,
            channel(both(registries), OLIVIA) as rch,
            channel(trainer.target, OLIVIA) as tch,
            channel(both(deployers), OLIVIA) as dch,
            channel(both(experiments), OLIVIA) as ech,
        ):
            reg, dep, exp = rgrpc.RegistryServiceStub(rch), dgrpc.DeployerServiceStub(dch), egrpc.ExperimentsServiceStub(ech)
            versions = register_versions(rgrpc.RegistryServiceStub(admin_ch), base, adapters)
            versions.append(sft_candidate(tgrpc.TrainerServiceStub(tch), base, tmp_path))  # 1.1.0, registered as olivia

            # Control follows `production`; whichever deployer replica claims its lease runs it.
            control_name, treatment_name = f"{PROJECT}/deployments/advisor-control", f"{PROJECT}/deployments/advisor-treatment"
            local = dpb.BACKEND_LOCAL
            dep.CreateDeployment(
                dsvc.CreateDeploymentRequest(
                    parent=PROJECT, deployment_id="advisor-control",
                    deployment=dpb.Deployment(model_alias=f"{MODEL}/aliases/production", replicas=1, backend=local),
                )
            )  # fmt: skip
            owner = wait_for(
                lambda: next((d for d in deployers if runs_model_server(d, versions[0])), None), 30, "the control's owner"
            )
            other = next(d for d in deployers if d is not owner)
            # The treatment goes to the other replica: its owner-to-be is the only one awake when it is created.
            with paused(owner), channel(other.target, OLIVIA) as other_ch:
                dgrpc.DeployerServiceStub(other_ch).CreateDeployment(
                    dsvc.CreateDeploymentRequest(
                        parent=PROJECT, deployment_id="advisor-treatment",
                        deployment=dpb.Deployment(model_version=versions[1], replicas=1, backend=local),
                    ),
                    timeout=20,
                )  # fmt: skip
                wait_for(lambda: runs_model_server(other, versions[1]), 20, "the other replica running the treatment")
            deployments = {
                "control": wait_for(lambda: available(dep, control_name), 180, "control AVAILABLE"),
                "treatment": wait_for(lambda: available(dep, treatment_name), 180, "treatment AVAILABLE"),
            }
            control = deployments["control"]
            # Each router lives in its owner: the control's in `owner`, the treatment's in `other`.
            assert listens_on(owner, control.endpoint) and not listens_on(other, control.endpoint), "control moved"
            assert listens_on(other, deployments["treatment"].endpoint), "the treatment is not the other replica's"
            stable = f"{MODEL.rsplit('/', 1)[1]}@production"
            assert {stable, control.name} <= set(control.model_names), control.model_names

            experiment = start_ab_experiment(exp, versions, deployments)
            load = background_load(
                control=control, grpc_model=stable, openai_model=control.name, experiment=experiment,
                experiments=both(experiments), registry=both(registries), deployer=both(deployers),
            )  # fmt: skip
            load.start()
            try:
                load.wait_progress(None, 3, 90, "every load client answering")

                # The gateway: AssignVariant → the variant's model server (gRPC and OpenAI HTTP) → RecordMetricEvents.
                users = 6
                out = run_relaycore(relaycore_example, experiments[0], experiment, users, "--token", GATEWAY)
                check_relaycore_run(out, exp, experiment, deployments, versions, users)

                # A registry replica dies: every client (the deployer's alias watch too) carries on through the other.
                sigkill(registries[0])
                load.wait_progress(["registry-alias"], 10, 60, "registry reads after a registry replica died")

                # The treatment's owner dies; the survivor takes its lease over and runs the treatment behind a router
                # of its own, while the control (already the survivor's) keeps serving.
                sigkill(other)
                old_endpoint = deployments["treatment"].endpoint
                taken = wait_for(
                    lambda: (d := available(dep, treatment_name)) and d.endpoint != old_endpoint and listens_on(owner, d.endpoint) and d,
                    120, "the surviving deployer serving the treatment",
                )  # fmt: skip
                assert taken.served_version == versions[1]
                load.wait_progress(["deployer-get", "generate-1", "openai-1"], 5, 60, "load after a deployer replica died")

                # Promotion: `production` moves on olivia's behalf, the control deployment rolls over to 1.1.0. The
                # gateway stops assigning first: a concluded experiment assigns nobody (FAILED_PRECONDITION).
                load.finish(["assign-1", "assign-2"])
                latest = conclude_and_roll_over(exp, reg, dep, experiment, deployments, versions)
                assert latest.actor == "olivia"
                wait_for(
                    lambda: all(
                        c.versions[-3:] == [versions[1]] * 3 for c in load.clients if c.name.startswith(("generate", "openai"))
                    ),
                    60, "every inference client answered by 1.1.0",
                )  # fmt: skip
            finally:
                load.stop()

            print(f"background load, successful calls per client: {load.ok_counts()}")
            assert load.failures() == {}, load.failures()
            for client in load.clients:
                assert client.ok > 0, client.name
                if client.name.startswith(("generate", "openai")):
                    assert switches(client.versions) == versions, (client.name, switches(client.versions))
                elif client.name == "registry-alias":
                    assert switches(client.versions) == ["1.0.0", "1.1.0"], switches(client.versions)

            # The audit trail names the people behind every write, also when a service relayed the call.
            events = all_events(rgrpc.RegistryServiceStub(admin_ch))
            by_type = {(rpb.ModelEvent.Type.Name(e.type), e.resource): e.actor for e in events}
            assert by_type[("TYPE_MODEL_CREATED", MODEL)] == "alice"
            assert by_type[("TYPE_VERSION_CREATED", versions[0])] == "alice"
            assert by_type[("TYPE_VERSION_CREATED", versions[1])] == "olivia"  # the trainer's worker registered it
            alias_moves = [e for e in events if e.type == rpb.ModelEvent.TYPE_ALIAS_SET]
            assert [e.actor for e in alias_moves] == ["alice", "olivia"], alias_moves  # initial, then the promotion
            assert {e.actor for e in events} <= {"alice", "olivia"}, {e.actor for e in events} & SERVICE_IDENTITIES

            delete_deployments(dep, deployments)
