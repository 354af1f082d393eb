"""The platform's own Kustomize package on the Kubernetes API stand-in with its pod runner: the RelayCore flow end to
end, with every service and every model server running as a pod.

What is applied: ``deploy/kubernetes/base`` rendered by the project's Python kustomize renderer
(tests/packaging/nwpack.py), the package a real cluster gets (overlays/dev is not used: it binds 0.0.0.0 for
port-forward, and pods here share one network namespace, so its second registry replica could not bind), plus what
the base says a user creates: the Secrets ``neuroweaver-auth`` (token table, page-token secret, service tokens),
``neuroweaver-database`` (one fresh PostgreSQL database per service, dropped after) and ``neuroweaver-trainer``,
and the external PostgreSQL named the Kubernetes way: a Service ``postgres`` without selector plus an Endpoints
object pointing at this machine's server. Everything goes through the project's KubeClient (server-side apply, as
``kubectl apply --server-side``). Replicas are the base's own (registry and experiments 2, checked; the deployer as
the base sets it, its replicas sharing the deployments by lease; trainer 1); the deployer's Kubernetes backend is on
(in-cluster config against the stand-in's HTTPS listener) and creates the model-server Deployments; the trainer runs
with its Kubernetes executor configured (no training Job is started here).

The flow, from outside the cluster through the Services' ClusterIPs (read from ``spec.clusterIP``): register the
base model (the tiny random Llama on the artifacts claim) and two LoRA versions whose files lie on the claim's host
directory; two KUBERNETES deployments (control follows ``production``, treatment pinned to the candidate); an A/B
experiment; the RelayCore gateway (examples/relaycore, TypeScript) runs IN the cluster as a Job pod in namespace
``relaycore`` (Node from the install, the built example on a hostPath) and does AssignVariant -> Generate/OpenAI HTTP
by the stable name -> RecordMetricEvents; then ConcludeExperiment promotes, ``production`` moves, and the control's
model-server pod rolls over (new pod ready, old one gone) while a small bounded background loop (gRPC Generate by the
stable name through the control's ClusterIP, AssignVariant, GetModelAlias) sees no failed call. Finally both
registry pods and both experiments pods served application RPCs (their own /metrics on the pod IP).

Not a cluster: see deploy/README.md "Pods on the Kubernetes stand-in" (no RBAC or NetworkPolicy enforcement, no
scheduling, one network namespace). Pod logs stay under the test's tmp dir (standin/pods/*/logs) and their tails
are printed on failure.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as dgrpc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.experiments.v1 import experiments_service_pb2 as esvc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as egrpc
from neuroweaver.inference.v1 import inference_pb2 as ipb
from neuroweaver.inference.v1 import inference_service_pb2 as isvc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as igrpc
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
from neuroweaver_kube.client import KubeClient
from neuroweaver_kube.testing import KubeApiStandIn
from neuroweaver_kube.testing.pods import PodRunner, bwrap_path
from neuroweaver_runtime.client import channel_options

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_node_client import (  # noqa: E402 - the RelayCore flow's steps, reused
    MODEL,
    PROJECT,
    check_relaycore_run,
    conclude_and_roll_over,
    make_adapter,
    node_client,  # noqa: F401 - relaycore_example's own fixture
    register_versions,
    relaycore_example,  # noqa: F401 - the fixture that builds examples/relaycore
    start_ab_experiment,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.skipif(bwrap_path() is None, reason="bubblewrap (bwrap) is not installed; .ci/run installs it"),
]

ROOT = Path(__file__).resolve().parents[2]
NS = "neuroweaver"
GATEWAY_NS = "relaycore"  # the namespace the base's NetworkPolicy admits gateways from
CLAIM = "neuroweaver-artifacts"
MOUNT = Path("/var/lib/neuroweaver")  # where the package mounts the claim (trainer, deployer, model servers)
SERVICES = ("registry", "trainer", "deployer", "experiments")
PORTS = {"registry": 50051, "trainer": 50052, "deployer": 50053, "experiments": 50054}
METRICS_PORTS = {"registry": 9451, "experiments": 9454}
ALICE, GATEWAY, LOADGEN = "tok-alice-admin", "tok-relaycore-gateway", "tok-loadgen-viewer"
SVC_TOKENS = {svc: f"tok-svc-{svc}" for svc in ("trainer", "deployer", "experiments")}
START_TIMEOUT = 240.0  # every pod of the package on 2 shared cores, migrations racing on empty databases
LOAD_PACE_SECONDS = 0.1  # pause between one load client's calls (keeps the shared cores usable), not a synchronisation
LOAD_MAX_CALLS = 3000  # the background loop is bounded even if the test never stops it


def render_package() -> list[dict[str, Any]]:
    """deploy/kubernetes/base through the packaging tests' kustomize renderer (checked against kubectl there)."""
    spec = importlib.util.spec_from_file_location("nwpack_for_e2e", ROOT / "tests" / "packaging" / "nwpack.py")
    assert spec is not None and spec.loader is not None
    nwpack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nwpack)
    return nwpack.render(nwpack.K8S / "base")


def secret(name: str, data: dict[str, str], namespace: str = NS) -> dict[str, Any]:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    md = {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "neuroweaver"}}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": md, "type": "Opaque", "data": encoded}


def user_objects(databases: dict[str, str], postgres: tuple[str, int]) -> list[dict[str, Any]]:
    """What deploy/README.md has the user create next to the base: the two Secrets the services read, the one the
    training Jobs read, and the external database as a selectorless Service + Endpoints."""
    table = [
        {"token": ALICE, "project": "default", "role": "admin", "subject": "alice"},
        {"token": GATEWAY, "project": "default", "role": "operator", "subject": "relaycore-gateway"},
        {"token": LOADGEN, "project": "default", "role": "viewer", "subject": "loadgen"},
        *({"token": t, "project": "*", "role": "service", "subject": f"svc-{s}"} for s, t in SVC_TOKENS.items()),
    ]
    auth = {
        "auth-tokens.json": json.dumps({"tokens": table}),
        "page-token-secret": "e2e-page-token-secret",
        **{f"{s}-service-token": t for s, t in SVC_TOKENS.items()},
    }
    host, port = postgres
    external_db = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "postgres", "namespace": NS},
            "spec": {"ports": [{"name": "postgres", "port": 5432, "targetPort": port, "protocol": "TCP"}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": "postgres", "namespace": NS},
            "subsets": [{"addresses": [{"ip": host}], "ports": [{"name": "postgres", "port": port, "protocol": "TCP"}]}],
        },
    ]
    return [
        secret("neuroweaver-auth", auth),
        secret("neuroweaver-database", {f"{svc}-url": databases[svc] for svc in SERVICES}),
        secret("neuroweaver-trainer", {"database-url": databases["trainer"], "registry-token": SVC_TOKENS["trainer"]}),
        *external_db,
    ]


@contextlib.contextmanager
def service_databases() -> Iterator[tuple[dict[str, str], tuple[str, int]]]:
    """A fresh database per service, named through the in-cluster Service `postgres` ({svc: URL}), and the real
    server's address for the Endpoints; dropped at the end."""
    from neuroweaver_runtime.testing import create_postgres_database, postgres_available

    if not postgres_available():
        pytest.skip("PostgreSQL is not reachable at NW_TEST_POSTGRES_URL")

    async def create() -> dict[str, tuple[str, Callable]]:
        return {svc: await create_postgres_database(f"nwkust{svc[:3]}") for svc in SERVICES}

    made = asyncio.run(create())
    try:
        real = urlsplit(next(iter(made.values()))[0])
        assert real.hostname is not None
        server = (real.hostname, real.port or 5432)
        in_cluster = {}
        for svc, (url, _) in made.items():
            parts = urlsplit(url)
            user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
            in_cluster[svc] = urlunsplit(parts._replace(netloc=f"{user}postgres:5432"))
        yield in_cluster, server
    finally:

        async def drop_all() -> None:
            for _, drop in made.values():
                await drop()

        asyncio.run(drop_all())


class Cluster:
    """The stand-in with its pod runner, read the way a user reads a cluster (objects, statuses, logs)."""

    def __init__(self, standin: KubeApiStandIn, runner: PodRunner) -> None:
        self.standin, self.runner = standin, runner

    def get(self, api_version: str, kind: str, name: str, namespace: str = NS) -> dict[str, Any]:
        return self.standin.get_object(api_version, kind, namespace, name) or {}

    def cluster_ip(self, service: str, namespace: str = NS) -> str:
        ip = self.get("v1", "Service", service, namespace).get("spec", {}).get("clusterIP")
        assert ip and ip != "None", f"Service {namespace}/{service} has no clusterIP"
        return str(ip)

    def outside(self, endpoint: str) -> str:
        """An in-cluster `host:port` (`<svc>.<ns>.svc.cluster.local:port`, as the deployer reports endpoints) as this
        process reaches it: the Service's ClusterIP and port."""
        host, _, port = endpoint.rpartition(":")
        svc, ns = host.split(".")[:2]
        return f"{self.cluster_ip(svc, ns)}:{port}"

    def deployment_ready(self, name: str) -> bool:
        obj = self.get("apps/v1", "Deployment", name)
        want, st = obj.get("spec", {}).get("replicas", 1), obj.get("status") or {}
        available = any(c["type"] == "Available" and c["status"] == "True" for c in st.get("conditions") or ())
        return bool(
            available
            and st.get("observedGeneration") == obj["metadata"].get("generation")
            and st.get("availableReplicas") == st.get("updatedReplicas") == st.get("replicas") == want
        )

    def pods(self, **labels: str) -> list[dict[str, Any]]:
        return [
            p
            for p in self.standin.objects("Pod", NS)
            if all((p["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())
        ]

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        return self.runner.wait_for(predicate, timeout, what)


def grpc_channel(target: str, token: str, *, retries: bool = True) -> grpc.Channel:
    """Plaintext to a loopback address with a bearer token on every call (local credentials carry call credentials);
    `retries`: the runtime's channel arguments (UNAVAILABLE retries), else none, so every failure shows."""
    local = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    credentials = grpc.composite_channel_credentials(local, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(target, credentials, options=channel_options() if retries else None)


class BackgroundLoop:
    """Sequential bounded calls on a thread until stopped: per client its successes, failures and the versions seen."""

    def __init__(self, calls: dict[str, Callable[[], str | None]]) -> None:
        self.calls = calls
        self.ok = dict.fromkeys(calls, 0)
        self.failures: dict[str, list[str]] = {name: [] for name in calls}
        self.versions: dict[str, list[str]] = {name: [] for name in calls}
        self.finished: set[str] = set()
        self._round = threading.Lock()  # held while a round of calls is in flight
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="background-loop", daemon=True)

    def _run(self) -> None:
        for _ in range(LOAD_MAX_CALLS):
            if self._stop.is_set():
                return
            with self._round:
                self._one_round()
            self._stop.wait(LOAD_PACE_SECONDS)

    def _one_round(self) -> None:
        for name, call in self.calls.items():
            if name not in self.finished:
                try:
                    version = call()
                except Exception as exc:  # noqa: BLE001 - every failure is recorded, the test asserts there is none
                    self.failures[name].append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}"[:500])
                else:
                    self.ok[name] += 1
                    if version is not None:
                        self.versions[name].append(version)

    def finish(self, names: list[str]) -> None:
        """No further calls of `names`; returns once none of them is in flight."""
        with self._round:
            self.finished.update(names)

    def start(self) -> BackgroundLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "the background loop did not stop"

    def wait_progress(self, cluster: Cluster, more: int, timeout: float, what: str) -> None:
        start = dict(self.ok)
        try:
            cluster.wait_for(lambda: all(self.ok[n] >= start[n] + more for n in self.ok if n not in self.finished), timeout, what)
        except TimeoutError as e:
            failures = {n: f[-3:] for n, f in self.failures.items() if f}
            raise AssertionError(f"{what}: successes {start} -> {self.ok}, last failures {failures}") from e


def served_application_rpcs(pod_ip: str, metrics_port: int, grpc_service: str) -> float:
    """RPCs of `grpc_service` (not the health checks the probes make) a pod handled, from its own /metrics."""
    with urllib.request.urlopen(f"http://{pod_ip}:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("grpc_server_handled_total{") and f'grpc_service="{grpc_service}"' in line
    )


def gateway_job(example: Path, experiment: str, users: int) -> list[dict[str, Any]]:
    """examples/relaycore as a Job in the gateway namespace: Node from the image's /usr, the built example and the
    client it links on read-only hostPaths at their own paths (the link is relative)."""
    client = (example / "node_modules" / "@neuroweaver" / "client").resolve()
    mounts = {"relaycore": example.resolve(), "client": client}
    container = {
        "name": "gateway",
        "image": "python:3.11-slim-bookworm",
        "command": ["node", str(example.resolve() / "dist" / "main.js")],
        "args": [
            "--experiments",
            f"neuroweaver-experiments.{NS}:{PORTS['experiments']}",
            "--experiment",
            experiment,
            "--users",
            str(users),
            "--transport",
            "both",
            "--max-tokens",
            "6",
            "--token",
            GATEWAY,
        ],  # fmt: skip
        "volumeMounts": [{"name": n, "mountPath": str(p), "readOnly": True} for n, p in mounts.items()],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "readOnlyRootFilesystem": True},
    }
    pod_spec = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [{"name": n, "hostPath": {"path": str(p), "type": "Directory"}} for n, p in mounts.items()],
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": GATEWAY_NS, "labels": {"kubernetes.io/metadata.name": GATEWAY_NS}},
        },
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "relaycore-gateway", "namespace": GATEWAY_NS},
            "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": {"app": "relaycore"}}, "spec": pod_spec}},
        },
    ]


def job_result(cluster: Cluster, namespace: str, name: str) -> str | None:
    status = cluster.get("batch/v1", "Job", name, namespace).get("status") or {}
    for c in status.get("conditions") or ():
        if c["type"] in ("Complete", "Failed") and c["status"] == "True":
            return str(c["type"])
    return None


def test_the_kustomize_package_runs_the_relaycore_flow_on_pods(relaycore_example: Path, tmp_path: Path) -> None:  # noqa: F811
    # Honour the manifests' terminationGracePeriodSeconds (30) instead of the runner's 5 s cap: a model server keeps
    # serving its open connections for its 5 s drain after SIGTERM and only then sends GOAWAY; killed at 5 s, the
    # rollover would cut the call in flight on the old pod, which a cluster does not do.
    runner = PodRunner(state_dir=tmp_path / "standin", grace_cap=35.0)
    with service_databases() as (databases, postgres), KubeApiStandIn(pods=runner) as standin:
        cluster = Cluster(standin, runner)
        try:
            run_flow(cluster, relaycore_example, databases, postgres)
        except BaseException:
            print(f"----- pods (logs under {runner.state_dir / 'pods'}) -----\n{runner.describe(tail=60)}")
            raise


def run_flow(cluster: Cluster, example: Path, databases: dict[str, str], postgres: tuple[str, int]) -> None:
    standin, runner = cluster.standin, cluster.runner
    package = render_package()
    replicas = {o["metadata"]["name"]: o["spec"]["replicas"] for o in package if o["kind"] == "Deployment"}
    # the base itself runs registry and experiments replicated (no patch here); the web console comes along
    assert set(replicas) == {f"neuroweaver-{svc}" for svc in (*SERVICES, "console")}
    assert replicas["neuroweaver-registry"] == replicas["neuroweaver-experiments"] == 2, replicas
    kube = KubeClient.from_config(host=standin.url, token="e2e-cluster-admin")
    try:
        kube.apply_sync(package + user_objects(databases, postgres))
    finally:
        kube.close()

    # While the pods start: the tiny base model and two LoRA versions on the artifacts claim, where the trainer's
    # Jobs would leave them (the claim is this host directory; pods see it at MOUNT).
    from neuroweaver_ml.models import build_tiny_llama

    store = runner.claim_dir(NS, CLAIM)
    build_tiny_llama(store / "models" / "tiny-llama")
    adapters = []
    for i in range(2):
        out = store / "artifacts" / "advisor" / f"1.{i}.0"
        adapters.append((MOUNT / out.relative_to(store), make_adapter(store / "models" / "tiny-llama", out, seed=i)))

    cluster.wait_for(
        lambda: all(cluster.deployment_ready(name) for name in replicas), START_TIMEOUT, "every Deployment Available"
    )
    for name, want in replicas.items():
        pods = cluster.pods(**{"app.kubernetes.io/name": name})
        assert len(pods) == want and all(p["status"]["podIP"] for p in pods), (name, pods)

    target = {svc: f"{cluster.cluster_ip(f'neuroweaver-{svc}')}:{port}" for svc, port in PORTS.items()}
    with (
        grpc_channel(target["registry"], ALICE) as rch,
        grpc_channel(target["deployer"], ALICE) as dch,
        grpc_channel(target["experiments"], ALICE) as ech,
    ):
        reg, dep, exp = rgrpc.RegistryServiceStub(rch), dgrpc.DeployerServiceStub(dch), egrpc.ExperimentsServiceStub(ech)
        versions = register_versions(reg, MOUNT / "models" / "tiny-llama", adapters)

        specs = {
            "control": dpb.Deployment(model_alias=f"{MODEL}/aliases/production", replicas=1, backend=dpb.BACKEND_KUBERNETES),
            "treatment": dpb.Deployment(model_version=versions[1], replicas=1, backend=dpb.BACKEND_KUBERNETES),
        }
        for variant, spec in specs.items():
            dep.CreateDeployment(
                dsvc.CreateDeploymentRequest(parent=PROJECT, deployment_id=f"advisor-{variant}", deployment=spec)
            )
        deployments = {v: wait_available(dep, f"{PROJECT}/deployments/advisor-{v}") for v in specs}
        objects = {v: d.endpoint.split(".", 1)[0] for v, d in deployments.items()}  # the model-server Deployments
        # the deployer pod created these through its in-cluster config (the stand-in's HTTPS listener)
        for variant, d in deployments.items():
            assert d.endpoint.endswith(f".{NS}.svc.cluster.local:{d.endpoint.rsplit(':', 1)[1]}"), d.endpoint
            assert cluster.deployment_ready(objects[variant]), objects[variant]
        experiment = start_ab_experiment(exp, versions, deployments)

        # The gateway, in the cluster: AssignVariant -> the variant's model server by its stable name (gRPC and the
        # OpenAI HTTP API) -> RecordMetricEvents, resolved through the pod's cluster DNS.
        users = 4
        kube = KubeClient.from_config(host=standin.url, token="e2e-cluster-admin")
        try:
            kube.apply_sync(gateway_job(example, experiment, users))
        finally:
            kube.close()
        outcome = cluster.wait_for(lambda: job_result(cluster, GATEWAY_NS, "relaycore-gateway"), 180, "the gateway Job")
        (pod,) = [p for p in standin.objects("Pod", GATEWAY_NS) if p["metadata"]["labels"].get("app") == "relaycore"]
        log = runner.pod_log(GATEWAY_NS, pod["metadata"]["name"])
        assert outcome == "Complete", log
        out = json.loads([line for line in log.splitlines() if line.startswith("{")][-1])
        check_relaycore_run(out, exp, experiment, deployments, versions, users)

        # Promotion under a small background loop from outside: Generate by the control's stable name through its
        # ClusterIP (no retries: every failure shows), AssignVariant and GetModelAlias on new connections, which the
        # Services spread over the replicas.
        control = deployments["control"]
        old_pods = {p["metadata"]["name"] for p in cluster.pods(**{"app.kubernetes.io/instance": objects["control"]})}
        assert len(old_pods) == 1, old_pods
        inference = grpc_channel(cluster.outside(control.endpoint), LOADGEN, retries=False)
        assigners = [grpc_channel(target["experiments"], LOADGEN) for _ in range(2)]
        readers = [grpc_channel(target["registry"], LOADGEN) for _ in range(2)]
        try:
            loop = BackgroundLoop(
                {
                    "generate": generate_call(igrpc.InferenceServiceStub(inference), control.name),
                    **{
                        f"assign-{i}": assign_call(egrpc.ExperimentsServiceStub(ch), experiment, i)
                        for i, ch in enumerate(assigners)
                    },
                    **{f"alias-{i}": alias_call(rgrpc.RegistryServiceStub(ch)) for i, ch in enumerate(readers)},
                }
            ).start()
            try:
                loop.wait_progress(cluster, 3, 60, "the background loop before the promotion")
                loop.finish([n for n in loop.calls if n.startswith("assign-")])  # units are assigned while RUNNING
                conclude_and_roll_over(exp, reg, dep, experiment, deployments, versions)

                def rolled_over() -> bool:
                    pods = cluster.pods(**{"app.kubernetes.io/instance": objects["control"]})
                    return (
                        len(pods) == 1
                        and not {p["metadata"]["name"] for p in pods} & old_pods
                        and all(
                            p["metadata"]["annotations"]["neuroweaver.ai/model-version"] == versions[1]
                            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or ())
                            for p in pods
                        )
                        and cluster.deployment_ready(objects["control"])
                    )

                cluster.wait_for(rolled_over, 120, "the control's model-server pod to roll over")
                # The old pod drains its open connections (5 s) before GOAWAY moves the client to the new pod.
                cluster.wait_for(lambda: loop.versions["generate"][-1] == versions[1], 90, "Generate answered by the new version")
                loop.wait_progress(cluster, 3, 60, "the background loop after the rollover")
            finally:
                loop.stop()
        finally:
            for ch in [inference, *assigners, *readers]:
                ch.close()
        assert {n: f for n, f in loop.failures.items() if f} == {}, loop.failures
        assert switches(loop.versions["generate"]) == [versions[0], versions[1]], loop.versions["generate"]
        for reader in ("alias-0", "alias-1"):
            assert switches(loop.versions[reader]) == ["1.0.0", "1.1.0"], loop.versions[reader]

        # Both replicas of registry and experiments served application calls (the Services spread connections).
        for svc, grpc_service in (
            ("registry", "neuroweaver.registry.v1.RegistryService"),
            ("experiments", "neuroweaver.experiments.v1.ExperimentsService"),
        ):
            pods = cluster.pods(**{"app.kubernetes.io/name": f"neuroweaver-{svc}"})
            served = {
                p["metadata"]["name"]: served_application_rpcs(p["status"]["podIP"], METRICS_PORTS[svc], grpc_service)
                for p in pods
            }
            assert len(served) == 2 and all(n > 0 for n in served.values()), (svc, served)

        for d in deployments.values():
            dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=d.name))
        cluster.wait_for(
            lambda: not any(cluster.get("apps/v1", "Deployment", name) for name in objects.values()),
            60,
            "the model-server Deployments to be deleted",
        )


def wait_available(dep: dgrpc.DeployerServiceStub, name: str, timeout: float = 240.0) -> dpb.Deployment:
    """Follows WatchDeployment until AVAILABLE with a ready replica (the model-server pod's own readiness)."""
    last = None
    for msg in dep.WatchDeployment(dsvc.WatchDeploymentRequest(name=name), timeout=timeout):
        last = msg.deployment
        if last.state == dpb.Deployment.STATE_AVAILABLE and last.ready_replicas >= 1:
            return last
    raise AssertionError(f"watch of {name} ended before it was available: {last}")


def generate_call(stub: igrpc.InferenceServiceStub, model: str) -> Callable[[], str]:
    request = isvc.GenerateRequest(
        model=model,
        messages=[ipb.ChatMessage(role="user", content="Which oil does my sedan need?")],
        sampling=ipb.SamplingParams(max_tokens=4, temperature=0),
    )

    def call() -> str:
        reply = stub.Generate(request, timeout=60)
        assert reply.model == model and reply.model_version, reply
        return reply.model_version

    return call


def assign_call(stub: egrpc.ExperimentsServiceStub, experiment: str, unit: int) -> Callable[[], None]:
    def call() -> None:
        reply = stub.AssignVariant(esvc.AssignVariantRequest(experiment=experiment, unit_id=f"load-{unit}"), timeout=30)
        assert reply.variant.id in ("control", "treatment"), reply

    return call


def alias_call(stub: rgrpc.RegistryServiceStub) -> Callable[[], str]:
    def call() -> str:
        alias = stub.GetModelAlias(rsvc.GetModelAliasRequest(name=f"{MODEL}/aliases/production"), timeout=30)
        return alias.version

    return call


def switches(values: list[str]) -> list[str]:
    """`values` without consecutive repeats: [a, a, b, b] -> [a, b]."""
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]
