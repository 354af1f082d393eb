"""Training Jobs really run (issue 16 §5): the KUBERNETES executor on the API stand-in WITH its pod runner.

Everything runs as pods of `KubeApiStandIn(pods=PodRunner())` (bubblewrap sandboxes, one loopback address per pod,
DNS through /etc/hosts): the registry and the trainer from deploy/kubernetes/base (their Services, ServiceAccounts,
the shared claim `neuroweaver-artifacts` from config.yaml), plus the Secrets an operator creates. The trainer talks to
the API in-cluster (service-account token, HTTPS); the training Jobs it creates run the trainer image with the claim
at /var/lib/neuroweaver, where the tiny base model and the dataset were put, reach the registry through its headless
Service and write the job's progress to the trainer's database. The trainer itself runs in the cluster, not on the
host, because the paths a job names (base model, dataset, artifacts) must mean the same files to the trainer that
checks them and to the Job pods that read them — as they do on a cluster, where both mount the claim at one path.

The database is the documented one, an external PostgreSQL (NW_TEST_POSTGRES_URL, one fresh database per service):
pods reach it as a cluster reaches an outside address, through a Service without selector (`postgres`) and the
Endpoints object the operator writes for it, pointing at the host's server.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml

from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
from neuroweaver.trainer.v1 import trainer_service_pb2_grpc as tgrpc
from neuroweaver_kube import KubeClient, TrainingJobSpec
from neuroweaver_kube.testing import KubeApiStandIn
from neuroweaver_kube.testing.pods import PodRunner, bwrap_path
from neuroweaver_runtime.client import open_channel
from neuroweaver_runtime.testing import create_postgres_database, postgres_available

pytestmark = [pytest.mark.slow, pytest.mark.postgres]  # pods start the real services and train in Job pods

if bwrap_path() is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("bubblewrap (bwrap) is missing on CI: .ci/run installs the Debian package bubblewrap")
    pytest.skip("bubblewrap (bwrap) is not installed: apt-get install bubblewrap", allow_module_level=True)

REPO = Path(__file__).resolve().parents[4]
NS = "neuroweaver"  # the base package's namespace
CLAIM = "neuroweaver-artifacts"
MOUNT = "/var/lib/neuroweaver"  # where the trainer, its Jobs (and model servers) mount the claim
ADMIN_TOKEN = "pods-admin-token"
SERVICE_TOKEN = "pods-trainer-service-token"
BASE_MODEL = f"{MOUNT}/models/tiny-llama"
DATASET = Path(f"{MOUNT}/datasets/chat.jsonl")
POSTGRES_SERVICE = f"postgres.{NS}.svc.cluster.local"


def _secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS}, "stringData": data}


def external_postgres(admin_url: str) -> list[dict[str, Any]]:
    """A selectorless Service `postgres` and its Endpoints: the host's PostgreSQL as an address outside the cluster."""
    parts = urlsplit(admin_url)
    ip, port = socket.gethostbyname(parts.hostname or "127.0.0.1"), parts.port or 5432
    meta = {"name": "postgres", "namespace": NS}
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": meta,
        "spec": {"ports": [{"name": "postgres", "port": 5432, "protocol": "TCP"}]},
    }  # fmt: skip
    endpoints = {
        "apiVersion": "v1", "kind": "Endpoints", "metadata": meta,
        "subsets": [{"addresses": [{"ip": ip}], "ports": [{"name": "postgres", "port": port, "protocol": "TCP"}]}],
    }  # fmt: skip
    return [service, endpoints]


def in_cluster(url: str) -> str:
    """A database URL of the host's server as pods name it: the `postgres` Service instead of the host address."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{POSTGRES_SERVICE}:5432" if user else f"{POSTGRES_SERVICE}:5432"))


def platform_objects(registry_db: str, trainer_db: str) -> list[dict[str, Any]]:
    """The base package's namespace, config (ConfigMap + claim), registry and trainer as they are, with what an
    operator adds (deploy/README): the Secrets neuroweaver-auth, neuroweaver-database and neuroweaver-trainer (read by
    the Job pods), and the external database's Service."""
    docs: list[dict[str, Any]] = []
    for name in ("namespace", "config", "registry", "trainer"):
        docs += [d for d in yaml.safe_load_all((REPO / f"deploy/kubernetes/base/{name}.yaml").read_text()) if d]
    keep = {"Namespace", "ConfigMap", "PersistentVolumeClaim", "ServiceAccount", "Service", "Deployment"}
    docs = [d for d in docs if d["kind"] in keep]
    tokens = {
        "tokens": [
            {"token": ADMIN_TOKEN, "project": "*", "role": "admin", "subject": "tester"},
            {"token": SERVICE_TOKEN, "project": "*", "role": "service", "subject": "svc-trainer"},
        ]
    }
    auth = {
        "auth-tokens.json": json.dumps(tokens),
        "page-token-secret": "pods-page-token-secret",
        "trainer-service-token": SERVICE_TOKEN,
    }
    secrets = [
        _secret("neuroweaver-auth", auth),
        _secret("neuroweaver-database", {"registry-url": in_cluster(registry_db), "trainer-url": in_cluster(trainer_db)}),
        _secret("neuroweaver-trainer", {"database-url": in_cluster(trainer_db), "registry-token": SERVICE_TOKEN}),
    ]
    return docs[:1] + secrets + docs[1:]


def _condition(obj: dict[str, Any], ctype: str) -> str | None:
    for c in (obj.get("status") or {}).get("conditions") or ():
        if c["type"] == ctype:
            return str(c["status"])
    return None


async def _wait(runner: PodRunner, h, predicate, timeout: float, what: str, interval: float = 0.05):
    try:
        return await h.wait_for(predicate, timeout, interval, what)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{runner.describe()}") from None


@pytest.fixture(scope="module")
async def cluster(h, tiny_model):
    from neuroweaver_runtime.testing import ADMIN_URL

    if not await asyncio.to_thread(postgres_available):
        pytest.skip("PostgreSQL is not reachable at NW_TEST_POSTGRES_URL")
    registry_db, drop_registry_db = await create_postgres_database("nwpods_registry")
    trainer_db, drop_trainer_db = await create_postgres_database("nwpods_trainer")
    try:
        runner = PodRunner()
        with KubeApiStandIn(pods=runner) as standin:
            claim = runner.claim_dir(NS, CLAIM)  # the claim's host directory, filled before any pod mounts it
            await asyncio.to_thread(shutil.copytree, tiny_model, claim / "models" / "tiny-llama")
            (claim / "datasets").mkdir()
            h.write_jsonl(claim / "datasets" / "chat.jsonl", h.chat_rows(40))
            kube = KubeClient.from_config(host=standin.url)
            channels = []
            try:
                # kubectl apply --server-side, as an operator would
                await kube.apply(external_postgres(ADMIN_URL) + platform_objects(registry_db, trainer_db))

                def available(name: str) -> bool:
                    dep = standin.get_object("apps/v1", "Deployment", NS, name) or {}
                    return bool(dep) and (dep.get("status") or {}).get("availableReplicas") == dep["spec"].get("replicas", 1)

                await _wait(
                    runner,
                    h,
                    lambda: available("neuroweaver-registry") and available("neuroweaver-trainer"),
                    120,
                    "the registry and trainer pods to be ready",
                )
                # from the host (the test is outside the cluster) through the Services' ClusterIPs
                registry_channel = open_channel(f"{runner.service_ip(NS, 'neuroweaver-registry')}:50051", token=ADMIN_TOKEN)
                trainer_channel = open_channel(
                    f"{runner.service_ip(NS, 'neuroweaver-trainer')}:50052", token=ADMIN_TOKEN, deadline=60
                )
                channels += [registry_channel, trainer_channel]
                registry = rgrpc.RegistryServiceStub(registry_channel)
                await registry.CreateModel(
                    rsvc.CreateModelRequest(
                        parent="projects/default", model_id="advisor", model=rpb.Model(display_name="Advisor")
                    )
                )
                yield SimpleNamespace(
                    standin=standin, runner=runner, kube=kube, claim=claim, registry=registry,
                    trainer=tgrpc.TrainerServiceStub(trainer_channel),
                )  # fmt: skip
            finally:
                for channel in channels:
                    await channel.close()
                kube.close()
    finally:
        await drop_registry_db()  # the pods (and their connections) are gone with the stand-in
        await drop_trainer_db()


async def _create(cluster, h, job_id: str, *, max_steps: int, checkpoint_every: int):
    job = h.job_pb(
        BASE_MODEL,
        DATASET,
        method=h.tpb.TRAINING_METHOD_SFT_LORA,
        executor=h.tpb.EXECUTOR_KUBERNETES,
        max_steps=max_steps,
        checkpoint_every=checkpoint_every,
        eval_every=max_steps,
    )
    return await cluster.trainer.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job_id=job_id, training_job=job)
    )


def _job_object(name: str) -> str:
    return TrainingJobSpec(job=name, namespace=NS, image="unused").object_name


def _checkpoints_dir(cluster, job_object: str) -> Path:
    """Where the Job's worker checkpoints (NW_TRAINER_CHECKPOINT_DIR = <mount>/checkpoints/<Job>), on the host."""
    return cluster.claim / "checkpoints" / job_object / "run" / "checkpoints"


def _complete_checkpoint(directory: Path) -> Path | None:
    """The oldest complete checkpoint, read only (neuroweaver_ml's find_resume_checkpoint deletes partial ones, which
    would race with the worker writing one)."""
    from neuroweaver_ml.training import is_complete_checkpoint

    found = sorted(directory.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    return next((p for p in found if is_complete_checkpoint(p)), None)


def _on_claim(cluster, uri: str) -> Path:
    """The host file behind a file:// URI under the claim's mount path."""
    assert uri.startswith(f"file://{MOUNT}/"), uri
    return cluster.claim / uri.removeprefix(f"file://{MOUNT}/")


async def _finished(cluster, h, name: str, timeout: float = 240):
    try:
        return await h.wait_state(cluster.trainer, name, timeout=timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{cluster.runner.describe()}") from None


def _pods_of(cluster, job_object: str) -> list[dict[str, Any]]:
    return [p for p in cluster.standin.objects("Pod", NS) if p["metadata"].get("labels", {}).get("job-name") == job_object]


async def _completed_job(cluster, h, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The Job object and its pods once the Job is Complete and its pods read as ended (they stay: the Job's TTL is a
    day)."""

    def done() -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        job, pods = cluster.standin.get_object("batch/v1", "Job", NS, name) or {}, _pods_of(cluster, name)
        ended = all((p.get("status") or {}).get("phase") in ("Succeeded", "Failed") for p in pods)
        return (job, pods) if _condition(job, "Complete") == "True" and ended else None

    return await _wait(cluster.runner, h, done, 30, f"Job {name} Complete and its pods ended")


async def _check_version(cluster, h, final) -> None:
    """One version registered for the job; its adapter is on the claim with the digest the registry holds."""
    from neuroweaver_ml import digest_path

    versions = await h.registry_versions_of(cluster.registry, final.name)
    assert [v.name for v in versions] == [final.model_version]
    adapter = _on_claim(cluster, versions[0].artifact.uri)
    assert (adapter / "adapter_config.json").is_file()
    assert (await asyncio.to_thread(digest_path, adapter))[0] == versions[0].artifact.sha256


async def test_a_training_job_runs_in_a_job_pod_and_registers(cluster, h):
    created = await _create(cluster, h, "pods-succeeds", max_steps=4, checkpoint_every=2)
    final = await _finished(cluster, h, created.name)
    assert final.state == h.tpb.TrainingJob.STATE_SUCCEEDED, f"{final.error}\n{cluster.runner.describe()}"
    assert final.attempts == 1 and final.current_step == 4 and final.resumed_from_step == 0
    await _check_version(cluster, h, final)
    # the worker's files are on the claim: its checkpoints under checkpoints/<Job>, the adapter under artifacts/
    name = _job_object(created.name)
    checkpoints = sorted(p.name for p in _checkpoints_dir(cluster, name).glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"], list((cluster.claim / "checkpoints").rglob("*"))
    assert _on_claim(cluster, final.output_uri).is_dir()

    # the Job ran one pod of the trainer image to completion: Complete, exit code 0
    job, pods = await _completed_job(cluster, h, name)
    assert job["status"]["succeeded"] == 1 and "failed" not in job["status"]
    (pod,) = pods
    container = pod["spec"]["containers"][0]
    assert container["image"] == "neuroweaver/trainer:0.1.0"  # neuroweaver-config's trainer-image
    assert container["args"][:4] == ["-m", "neuroweaver_trainer.worker", "--job", created.name]
    (status,) = pod["status"]["containerStatuses"]
    assert pod["status"]["phase"] == "Succeeded" and status["state"]["terminated"]["exitCode"] == 0
    assert '"service": "trainer-worker"' in cluster.runner.pod_log(NS, pod["metadata"]["name"])  # the worker's log


@pytest.mark.parametrize("how", ["sigkill", "delete"])
async def test_a_killed_job_pod_is_replaced_and_resumes_from_its_checkpoint(cluster, h, how):
    """Once the worker's first checkpoint is on the claim its pod goes away — `sigkill`: the container is SIGKILLed (as
    the OOM killer or a node failure would) and the pod fails with 137; `delete`: the pod is deleted through the API
    (kubectl delete pod: gone from the API at once, the worker gets SIGTERM, ends its step and exits to be resumed; a
    replacement may start meanwhile, as with the default podReplacementPolicy). The Job controller starts another pod
    within backoffLimit and that worker resumes from the newest complete checkpoint on the claim: same trainer
    attempt, no step trained twice after the resume, one version."""
    created = await _create(cluster, h, f"pods-{how}", max_steps=30, checkpoint_every=3)
    name = _job_object(created.name)
    checkpoints = _checkpoints_dir(cluster, name)
    first = await _wait(
        cluster.runner, h, lambda: _complete_checkpoint(checkpoints), 180, f"a complete checkpoint in {checkpoints}",
        interval=0.02,
    )  # fmt: skip
    (pod,) = _pods_of(cluster, name)
    victim = pod["metadata"]["name"]
    if how == "sigkill":
        cluster.runner.kill_container(NS, victim)
    else:
        await cluster.kube.delete([{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": victim, "namespace": NS}}])

    final = await _finished(cluster, h, created.name)
    assert final.state == h.tpb.TrainingJob.STATE_SUCCEEDED, f"{final.error}\n{cluster.runner.describe()}"
    events = await h.watch_all(cluster.trainer, created.name)
    h.assert_gap_free(events)
    resumed = [e for e in events if e.type == h.tpb.EVENT_TYPE_RESUMED]
    assert len(resumed) == 1, [e.message for e in resumed]
    start = int(resumed[0].metrics["step"])
    first_step = int(first.name.rsplit("-", 1)[1])
    assert 3 <= first_step <= start < 30, (first.name, start)
    after = [e.step.step for e in events[events.index(resumed[0]) :] if e.type == h.tpb.EVENT_TYPE_STEP]
    assert after == list(range(start + 1, 31))  # not from zero
    # the Job retried the pod within the trainer's attempt: the trainer saw one Kubernetes Job throughout
    assert final.attempts == 1 and final.resumed_from_step == start and final.current_step == 30
    await _check_version(cluster, h, final)

    job, pods = await _completed_job(cluster, h, name)
    assert job["status"]["failed"] == 1 and job["status"]["succeeded"] == 1  # a deleted pod counts as failed too
    (replacement,) = [p for p in pods if p["metadata"]["name"] != victim]
    assert replacement["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    if how == "sigkill":
        (killed,) = [p for p in pods if p["metadata"]["name"] == victim]
        assert killed["status"]["phase"] == "Failed"
        assert killed["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 128 + signal.SIGKILL
    else:
        assert [p["metadata"]["name"] for p in pods] == [replacement["metadata"]["name"]]  # gone from the API
        # the worker got SIGTERM and its grace period: it stopped after its step and exited to be resumed
        assert "the job will resume from its last checkpoint" in cluster.runner.pod_log(NS, victim)
