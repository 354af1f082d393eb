"""The whole RelayCore flow in the production shape: mTLS on every hop and auth on everywhere.

Real processes (`python -m neuroweaver_<svc>`): registry, trainer, deployer (local backend: real model servers on a
tiny random Llama) and experiments, and the RelayCore TypeScript gateway (examples/relaycore). A throw-away CA
(neuroweaver_runtime.testing.TestCA, `cryptography`) issues one certificate per service (served and presented when
it calls the others) and client certificates for the test and for the gateway; an unrelated CA issues the ones that
must be refused. Every service and model server requires client certificates (`--tls-client-ca`), every service has
the same token table and a page-token secret:

- people in project `default`: alice (admin) registers the model, olivia (operator) trains, deploys, runs and
  concludes the experiment; the gateway has its own operator token;
- service identities (role `service`: they act only on behalf of a caller): the trainer and the deployer call the
  registry with their tokens; the experiments service has no token at all, the registry and the deployer know it
  by its client certificate (`--cert-identities experiments=*:service:experiments`).

Hops: trainer worker → registry (registers the trained candidate as olivia), deployer → registry (resolves
versions, the alias watch), experiments → deployer (variant endpoints) and → registry (promotion), gateway →
experiments (AssignVariant, RecordMetricEvents) and → model servers (gRPC Generate and the OpenAI API over HTTPS,
through the deployer's router, with its bearer token); the deployment following `production` rolls over after the
promotion. Then: plaintext and wrong-CA connections to every service and to a model server (the router and a replica
itself) are refused, and the model server's HTTPS API answers 401 to a request without a token.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import sys
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as dgrpc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as egrpc
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
from neuroweaver.trainer.v1 import trainer_service_pb2 as tsvc
from neuroweaver.trainer.v1 import trainer_service_pb2_grpc as tgrpc
from neuroweaver.trainer.v1 import training_job_pb2 as tpb
from neuroweaver_runtime.testing import TestCA

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_node_client import (  # noqa: E402 - the plaintext flow's steps, reused
    HEALTH,
    MODEL,
    PROJECT,
    ServiceProcess,
    check_relaycore_run,
    conclude_and_roll_over,
    delete_deployments,
    node_client,  # noqa: F401 - relaycore_example's own fixture
    open_grpc,
    register_versions,
    relaycore_example,  # noqa: F401 - the fixture that builds examples/relaycore
    run_relaycore,
    start_experiment,
    stopped_at_exit,
    tiny_base_and_adapters,
)

ALICE, OLIVIA, GATEWAY = "tok-alice-admin", "tok-olivia-operator", "tok-relaycore-gateway"
SVC_TRAINER, SVC_DEPLOYER = "tok-svc-trainer", "tok-svc-deployer"
TOKENS = ",".join([
    f"{ALICE}=default:admin:alice",
    f"{OLIVIA}=default:operator:olivia",
    f"{GATEWAY}=default:operator:relaycore-gateway",
    f"{SVC_TRAINER}=*:service:trainer",
    f"{SVC_DEPLOYER}=*:service:deployer",
])  # fmt: skip
CERT_IDENTITIES = "experiments=*:service:experiments"


class Pki:
    def __init__(self, root: Path) -> None:
        self.ca = TestCA(root / "ca")
        self.certs = {svc: self.ca.issue(svc) for svc in HEALTH}  # SANs 127.0.0.1 and localhost
        for person in ("operator", "relaycore"):  # the test's people, the gateway
            self.certs[person] = self.ca.issue(person, hosts=(), server=False)
        self.other_ca = TestCA(root / "other", name="unrelated CA")
        self.certs["stranger"] = self.other_ca.issue("stranger", hosts=(), server=False)  # must be refused

    def files(self, name: str) -> tuple[str, str]:
        cert, key = self.certs[name]
        return str(cert), str(key)

    def service_args(self, svc: str) -> list[str]:
        """Serve mTLS with auth on; call the other services with this service's own certificate."""
        cert, key = self.files(svc)
        ca = str(self.ca.cert)
        return [
            "--tls-cert", cert, "--tls-key", key, "--tls-client-ca", ca,
            "--client-tls-ca", ca, "--client-tls-cert", cert, "--client-tls-key", key,
            "--auth-tokens", TOKENS, "--cert-identities", CERT_IDENTITIES, "--page-token-secret", f"{svc}-page-secret",
        ]  # fmt: skip

    def grpc_credentials(self, name: str = "operator", ca: Path | None = None) -> grpc.ChannelCredentials:
        cert, key = self.certs[name]
        return grpc.ssl_channel_credentials((ca or self.ca.cert).read_bytes(), key.read_bytes(), cert.read_bytes())

    def as_person(self, token: str) -> grpc.ChannelCredentials:
        """The test's client certificate plus a person's bearer token on every call."""
        return grpc.composite_channel_credentials(self.grpc_credentials(), grpc.access_token_call_credentials(token))

    def https_context(self, name: str = "operator", ca: Path | None = None) -> ssl.SSLContext:
        cert, key = self.files(name)
        ctx = ssl.create_default_context(cafile=str(ca or self.ca.cert))
        ctx.load_cert_chain(cert, key)
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def sft_candidate(trainer, base: Path, tmp_path: Path) -> str:
    """A tiny SFT run as olivia; its worker registers the adapter as MODEL's next minor version. Returns its name."""
    chat = [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]}
        for i in range(8)
    ]
    dataset = tmp_path / "chat.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in chat))
    job = trainer.CreateTrainingJob(
        tsvc.CreateTrainingJobRequest(
            parent=PROJECT, training_job_id="sft-candidate",
            training_job=tpb.TrainingJob(
                base_model=str(base), dataset_uri=dataset.as_uri(), method=tpb.TRAINING_METHOD_SFT_LORA,
                target_model=MODEL, lora=tpb.LoraConfig(r=4, alpha=8),
                hyperparameters=tpb.Hyperparameters(
                    max_steps=2, batch_size=2, max_seq_length=64, eval_every_steps=2, checkpoint_every_steps=2
                ),
            ),
        )
    )  # fmt: skip
    last = None
    for event in trainer.WatchTrainingJob(tsvc.WatchTrainingJobRequest(name=job.name), timeout=120):
        last = event
    done = trainer.GetTrainingJob(tsvc.GetTrainingJobRequest(name=job.name))
    assert done.state == tpb.TrainingJob.STATE_SUCCEEDED, (done.error, last)
    return done.model_version


def replica_ports(deployer: ServiceProcess) -> dict[str, int]:
    """The gRPC and HTTP ports of one of the deployer's local model-server processes (from its command line)."""
    for child in psutil.Process(deployer.proc.pid).children(recursive=True):
        cmdline = " ".join(child.cmdline())
        if "neuroweaver_model_server" in cmdline:
            return {k: int(re.search(rf"--{k}-port (\d+)", cmdline).group(1)) for k in ("grpc", "http")}  # type: ignore[union-attr]
    raise AssertionError("the deployer runs no model server")


def assert_grpc_refused(target: str, pki: Pki) -> None:
    """Plaintext, a client certificate from another CA, and a client that trusts another CA: all fail in the
    handshake (UNAVAILABLE), before any handler, so even health is out of reach."""
    refused = {
        "plaintext": None,
        "client certificate from another CA": pki.grpc_credentials("stranger"),
        "server certificate checked against another CA": pki.grpc_credentials(ca=pki.other_ca.cert),
    }
    for what, credentials in refused.items():
        with open_grpc(target, credentials) as channel, pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (target, what, err.value)


def post_chat(port: int, context: ssl.SSLContext | None) -> tuple[int, dict]:
    """POST /v1/chat/completions without a token (HTTPS with `context`, plain HTTP without); (status, JSON body)."""
    if context is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    headers = {"Content-Type": "application/json"}
    body = {"model": "any", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def assert_https_refused(port: int, pki: Pki) -> None:
    """Plaintext HTTP and another CA's client certificate never get an answer; the CA's client without a token gets
    401 (TLS is no substitute for the token)."""
    for what, context in {"plaintext": None, "client certificate from another CA": pki.https_context("stranger")}.items():
        try:
            status, _ = post_chat(port, context)
        except (OSError, http.client.HTTPException):  # ssl.SSLError and connection resets are OSErrors
            continue
        raise AssertionError(f"{what} to port {port} got an answer: HTTP {status}")
    status, body = post_chat(port, pki.https_context("relaycore"))
    assert (status, body["error"]["code"]) == (401, "MISSING_TOKEN"), body


def test_relaycore_flow_with_mtls_and_auth_on_every_hop(relaycore_example: Path, pki: Pki, tmp_path: Path) -> None:  # noqa: F811
    base, adapters = tiny_base_and_adapters(tmp_path, 1)
    with stopped_at_exit([]) as procs:
        registry = ServiceProcess("registry", tmp_path / "registry", *pki.service_args("registry"))
        procs.append(registry)
        trainer = ServiceProcess(
            "trainer", tmp_path / "trainer", *pki.service_args("trainer"),
            "--registry-target", registry.target, "--registry-token", SVC_TRAINER,
            "--dataset-roots", str(tmp_path), "--model-roots", str(tmp_path), "--queue-poll-seconds", "0.2",
        )  # fmt: skip
        procs.append(trainer)
        deployer = ServiceProcess(
            "deployer", tmp_path / "deployer", *pki.service_args("deployer"),
            "--registry-target", registry.target, "--registry-token", SVC_DEPLOYER,
            "--artifact-roots", str(tmp_path), "--replica-grace-seconds", "2",
        )  # fmt: skip
        procs.append(deployer)
        experiments = ServiceProcess(
            "experiments", tmp_path / "experiments", *pki.service_args("experiments"),  # no --service-token
            "--deployer-target", deployer.target, "--registry-target", registry.target,
        )  # fmt: skip
        procs.append(experiments)
        for proc in procs:
            proc.wait_serving(HEALTH[proc.service], credentials=pki.grpc_credentials())

        alice, olivia = pki.as_person(ALICE), pki.as_person(OLIVIA)
        with (
            open_grpc(registry.target, alice) as admin_ch,
            open_grpc(registry.target, olivia) as rch,
            open_grpc(trainer.target, olivia) as tch,
            open_grpc(deployer.target, olivia) as dch,
            open_grpc(experiments.target, olivia) as ech,
        ):
            reg, trn = rgrpc.RegistryServiceStub(rch), tgrpc.TrainerServiceStub(tch)
            dep, exp = dgrpc.DeployerServiceStub(dch), egrpc.ExperimentsServiceStub(ech)
            versions = register_versions(rgrpc.RegistryServiceStub(admin_ch), base, adapters)
            # trainer worker → registry: the candidate registers with the trainer's token, on olivia's behalf.
            versions.append(sft_candidate(trn, base, tmp_path))
            candidate = reg.GetModelVersion(rsvc.GetModelVersionRequest(name=versions[1]))
            assert (candidate.version, candidate.creator) == ("1.1.0", "olivia")
            assert candidate.lineage.training_job == f"{PROJECT}/trainingJobs/sft-candidate"

            # deployer → registry (token) and experiments → deployer (its client certificate) as olivia.
            experiment, deployments = start_experiment(dep, exp, versions)
            assert all(d.openai_base_url.startswith("https://") for d in deployments.values())

            # The gateway: its own client certificate and operator token on every hop, model servers included.
            users = 6
            cert, key = pki.files("relaycore")
            out = run_relaycore(
                relaycore_example, experiments, experiment, users,
                "--token", GATEWAY, "--tls-ca", str(pki.ca.cert), "--tls-cert", cert, "--tls-key", key,
            )  # fmt: skip
            check_relaycore_run(out, exp, experiment, deployments, versions, users)

            # Refused: plaintext and wrong-CA connections to every service and to a model server, the router the
            # gateway dials and a replica behind it; HTTPS without a token is 401 on both.
            for proc in procs:
                assert_grpc_refused(proc.target, pki)
            replica = replica_ports(deployer)
            for target in (deployments["control"].endpoint, f"127.0.0.1:{replica['grpc']}"):
                assert_grpc_refused(target, pki)
            for port in (urlsplit(deployments["control"].openai_base_url).port, replica["http"]):
                assert_https_refused(port, pki)
            # A certificate is an identity only where --cert-identities names it: the gateway's, without a token, is not.
            with open_grpc(registry.target, pki.grpc_credentials("relaycore")) as channel, pytest.raises(grpc.RpcError) as err:
                rgrpc.RegistryServiceStub(channel).ListModels(rsvc.ListModelsRequest(parent=PROJECT), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

            # experiments → registry (its certificate) promotes on olivia's behalf: the history names her.
            latest = conclude_and_roll_over(exp, reg, dep, experiment, deployments, versions)
            assert latest.actor == "olivia"
            delete_deployments(dep, deployments)
