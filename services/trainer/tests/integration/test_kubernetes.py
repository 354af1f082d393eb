"""KUBERNETES executor against neuroweaver_kube's local STAND-IN of the Kubernetes API (not a real cluster):
the job becomes a batch/v1 Job through the client, its status is polled into the job state, a cancel deletes
it, and the Job's own container command (run here as a local process, as the pod would) trains and registers."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from neuroweaver_kube.testing import KubeApiStandIn


@pytest.fixture
def standin():
    with KubeApiStandIn() as s:
        yield s


async def _created_job(h, standin, index: int) -> dict:
    posts = await h.wait_for(
        lambda: len(standin.requests_to("POST")) > index and standin.requests_to("POST"), 30, what="Job POST"
    )
    body = posts[index].body
    return standin.get_object("batch/v1", "Job", body["metadata"]["namespace"], body["metadata"]["name"])


def create(h, stub, job_id, tiny_model, data_root, **kw):
    job = h.job_pb(
        tiny_model,
        data_root / "chat.jsonl",
        method=h.tpb.TRAINING_METHOD_SFT_LORA,
        executor=h.tpb.EXECUTOR_KUBERNETES,
        **{"max_steps": 2, "eval_every": 2, **kw},
    )
    job.resources.image = "registry.example/neuroweaver-trainer:1.0"
    job.resources.gpus = 1
    return stub.CreateTrainingJob(
        h.tsvc.CreateTrainingJobRequest(parent="projects/default", training_job_id=job_id, training_job=job)
    )


@pytest.mark.slow
async def test_kubernetes_executor_against_standin(trainers, registry, standin, tiny_model, data_root, h):
    trainer = await trainers(kube_api=standin.url, kube_namespace="training", kube_token="t0ken")
    stub = trainer.stub

    # 1. A job becomes a batch/v1 Job whose container runs the worker for it; a failed Job fails the job.
    failing = await create(h, stub, "k8s-fails", tiny_model, data_root)
    obj = await _created_job(h, standin, 0)
    container = obj["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/neuroweaver-trainer:1.0"
    assert container["args"][:4] == ["-m", "neuroweaver_trainer.worker", "--job", failing.name]
    assert container["resources"]["limits"]["nvidia.com/gpu"] in ("1", 1)
    assert (
        standin.requests_to("POST")[0].headers.get("Authorization", standin.requests_to("POST")[0].headers.get("authorization"))
        == "Bearer t0ken"
    )
    running = await h.wait_state(stub, failing.name, {h.tpb.TrainingJob.STATE_RUNNING}, 30)
    assert running.attempts == 1
    standin.finish_job("training", obj["metadata"]["name"], succeeded=False, reason="BackoffLimitExceeded")
    failed = await h.wait_state(stub, failing.name, timeout=30)
    assert failed.state == h.tpb.TrainingJob.STATE_FAILED and "BackoffLimitExceeded" in failed.error

    # 2. Cancel deletes the Job.
    cancelled = await create(h, stub, "k8s-cancel", tiny_model, data_root)
    obj2 = await _created_job(h, standin, 1)
    await h.wait_state(stub, cancelled.name, {h.tpb.TrainingJob.STATE_RUNNING}, 30)
    await stub.CancelTrainingJob(h.tsvc.CancelTrainingJobRequest(name=cancelled.name))
    done = await h.wait_state(stub, cancelled.name, timeout=30)
    assert done.state == h.tpb.TrainingJob.STATE_CANCELLED
    assert standin.get_object("batch/v1", "Job", "training", obj2["metadata"]["name"]) is None
    assert standin.requests_to("DELETE")

    # 3. The Job's container command, run as the pod would (a local process here), trains and registers.
    ok = await create(h, stub, "k8s-succeeds", tiny_model, data_root)
    obj3 = await _created_job(h, standin, 2)
    await h.wait_state(stub, ok.name, {h.tpb.TrainingJob.STATE_RUNNING}, 30)
    c3 = obj3["spec"]["template"]["spec"]["containers"][0]
    env = {**os.environ, **{e["name"]: e["value"] for e in c3["env"] if "value" in e}}
    env["NW_TRAINER_DATABASE_URL"] = trainer.service.db.url  # the Secret's database-url
    env["NW_TRAINER_DATA_DIR"] = trainer.config["data_dir"]
    proc = await asyncio.create_subprocess_exec(sys.executable, *c3["args"], env=env)
    assert await asyncio.wait_for(proc.wait(), 180) == 0
    standin.finish_job("training", obj3["metadata"]["name"], succeeded=True)
    final = await h.wait_state(stub, ok.name, timeout=30)
    assert final.state == h.tpb.TrainingJob.STATE_SUCCEEDED, final.error
    versions = await h.registry_versions_of(registry.stub, ok.name)
    assert [v.name for v in versions] == [final.model_version]

    # 4. Pause: the pod's worker (it gets no signal) reads PAUSING from the job's row, saves a checkpoint and writes
    # PAUSED; the trainer deletes the finished Job. Resume creates a new Job whose worker resumes from that checkpoint.
    async def run_pod(index: int):
        obj = await _created_job(h, standin, index)
        c = obj["spec"]["template"]["spec"]["containers"][0]
        pod_env = {**os.environ, **{e["name"]: e["value"] for e in c["env"] if "value" in e}}
        pod_env.update(NW_TRAINER_DATABASE_URL=trainer.service.db.url, NW_TRAINER_DATA_DIR=trainer.config["data_dir"])
        pod_env["NW_TRAINER_STOP_POLL_SECONDS"] = "0.2"  # reads its row often: the pause lands well before the end
        return obj, await asyncio.create_subprocess_exec(sys.executable, *c["args"], env=pod_env)

    long = await create(h, stub, "k8s-pause", tiny_model, data_root, max_steps=100, checkpoint_every=1000, eval_every=1000)
    obj4, pod = await run_pod(3)

    async def stepped():
        return (await stub.GetTrainingJob(h.tsvc.GetTrainingJobRequest(name=long.name))).current_step >= 3

    await h.wait_for(stepped, 120, what="the pod to train a few steps")
    await stub.PauseTrainingJob(h.tsvc.PauseTrainingJobRequest(name=long.name))
    paused = await h.wait_state(stub, long.name, {h.tpb.TrainingJob.STATE_PAUSED}, 60)
    assert await asyncio.wait_for(pod.wait(), 60) == 0
    await h.wait_for(lambda: standin.get_object("batch/v1", "Job", "training", obj4["metadata"]["name"]) is None, 30,
                     what="the paused Job to be deleted")  # fmt: skip
    await stub.ResumeTrainingJob(h.tsvc.ResumeTrainingJobRequest(name=long.name))
    _, pod = await run_pod(4)
    assert await asyncio.wait_for(pod.wait(), 300) == 0
    standin.finish_job("training", obj4["metadata"]["name"], succeeded=True)
    final = await h.wait_state(stub, long.name, timeout=30)
    assert final.state == h.tpb.TrainingJob.STATE_SUCCEEDED, final.error
    assert final.attempts == 2 and final.resumed_from_step == paused.current_step > 0


def test_client_tls_reaches_the_workers_and_kube_jobs_need_a_tls_secret(tmp_path):
    """Local workers get the trainer's --client-tls-* as flags; with the KUBERNETES executor and client TLS on,
    the trainer refuses to start without a Secret for the worker pods (they would fail only at registration)."""
    from neuroweaver_runtime.client import ClientTLS
    from neuroweaver_runtime.config import load_config
    from neuroweaver_runtime.testing import TestCA
    from neuroweaver_trainer.adapters.executors import WorkerSettings
    from neuroweaver_trainer.app import TrainerConfig, build
    from neuroweaver_trainer.worker import WorkerConfig

    ca = TestCA(tmp_path / "pki")
    cert, key = ca.issue("trainer", server=False)
    tls = ClientTLS(str(ca.cert), str(cert), str(key))
    settings = WorkerSettings(
        database_url="sqlite+aiosqlite:///unused.db", data_dir=str(tmp_path), artifacts_dir=str(tmp_path),
        registry_target="127.0.0.1:1", client_tls=tls,
    )  # fmt: skip
    assert ClientTLS.from_config(load_config(WorkerConfig, "trainer", settings.args())) == tls
    with pytest.raises(SystemExit, match="set kube_tls_secret"):
        build(TrainerConfig(data_dir=str(tmp_path), kube_api="http://127.0.0.1:1", client_tls_ca=str(ca.cert)))
