"""The TypeScript client (@neuroweaver/client, clients/typescript) against the real service processes.

Node talks gRPC over HTTP/2 (Connect's `createGrpcTransport`) to the Python grpc.aio servers, started here as
`python -m neuroweaver_<svc>` processes. The Node side is compiled with tsc from the committed sources first, so
the test covers the code as it is in the tree.

- test_registry_smoke: clients/typescript/test/smoke.ts — model, versions, alias, read through
  `versions/production`, NOT_FOUND / ABORTED / INVALID_ARGUMENT with ErrorInfo and BadRequest decoded from
  `grpc-status-details-bin`, bearer tokens (missing, viewer, admin), deadlines, paging.
- test_relaycore_flow: examples/relaycore — AssignVariant → the deployment's model server (gRPC Generate and the
  OpenAI-compatible HTTP endpoint) → RecordMetricEvents → RecordAnswers (scored by the experiments service with a
  registered LLM judge: neuroweaver_ml's OpenAI-compatible judge server), against real registry, deployer (local backend, real
  model-server processes on a tiny random Llama with LoRA adapters) and experiments processes; the recorded
  metrics are then read back through GetExperimentResults in Python. Every service runs as `python -m`, as
  operators run it: the deployer under uvloop, spawning its model servers from a threaded grpc.aio process.
  Plaintext and auth off (the embedded default); test_relaycore_mtls.py runs the same steps (the helpers below) in
  the production shape.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
from neuroweaver_runtime.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "typescript"
EXAMPLE = ROOT / "examples" / "relaycore"
NODE = shutil.which("node")
NPM = shutil.which("npm")
HEALTH = {
    "registry": "neuroweaver.registry.v1.RegistryService",
    "trainer": "neuroweaver.trainer.v1.TrainerService",
    "deployer": "neuroweaver.deployer.v1.DeployerService",
    "experiments": "neuroweaver.experiments.v1.ExperimentsService",
}
PROJECT = "projects/default"
MODEL = f"{PROJECT}/models/advisor"


def npm_ci_if_missing(package_dir: Path) -> None:
    # Not a skip: without Node the RelayCore contract is untested, so the test fails.
    assert NODE is not None and NPM is not None, "node and npm (Node.js 20) are required for the TypeScript client tests"
    if not (package_dir / "node_modules" / ".package-lock.json").exists():
        subprocess.run([NPM, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=package_dir, check=True)


def run_tsc(package_dir: Path, *projects: str) -> None:
    tsc = CLIENT / "node_modules" / ".bin" / "tsc"
    for project in projects:
        done = subprocess.run([str(tsc), "-p", project], cwd=package_dir, capture_output=True, text=True)
        assert done.returncode == 0, f"tsc -p {project} in {package_dir}:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def relaycore_example(node_client: Path) -> Path:
    """Builds examples/relaycore (links @neuroweaver/client from clients/typescript)."""
    npm_ci_if_missing(EXAMPLE)
    run_tsc(EXAMPLE, "tsconfig.json")
    return EXAMPLE


@pytest.fixture(scope="module")
def node_client() -> Path:
    """Builds clients/typescript (dist/ and dist-test/) from the committed sources."""
    npm_ci_if_missing(CLIENT)
    run_tsc(CLIENT, "tsconfig.json", "test/tsconfig.json")
    return CLIENT


class ServiceProcess:
    """`python -m neuroweaver_<svc>` on a free port, stopped with SIGTERM (then SIGKILL) at the end."""

    def __init__(self, service: str, data_dir: Path, *args: str) -> None:
        self.service = service
        self.port = free_port()
        self.log_path = data_dir / f"{service}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")  # noqa: SIM115
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                f"neuroweaver_{service}",
                "--port",
                str(self.port),
                "--metrics-port",
                "-1",
                "--data-dir",
                str(data_dir),
                *args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(
        self, health_service: str, timeout: float = 60.0, credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        """Polls grpc.health.v1 Check until SERVING, with an overall deadline (no fixed sleeps); `credentials`: the
        TLS/mTLS a service with --tls-* needs."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        with open_grpc(self.target, credentials) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.service} exited with {self.proc.returncode}:\n{self.logs()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.service} not SERVING after {timeout}s (last: {last}):\n{self.logs()}")
                try:
                    # wait_for_ready blocks until the port accepts connections (or the per-try deadline passes).
                    reply = stub.Check(
                        health_pb2.HealthCheckRequest(service=health_service), timeout=min(left, 2.0), wait_for_ready=True
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as exc:
                    last = f"{exc.code().name}: {exc.details()}"
                    if exc.code() not in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.NOT_FOUND,
                    ):
                        raise
                time.sleep(0.05)  # polling interval between health checks, bounded by the deadline above

    def logs(self, tail: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text()[-tail:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def open_grpc(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """Plaintext, or TLS/mTLS (and per-call credentials such as a bearer token) with `credentials`."""
    return grpc.secure_channel(target, credentials) if credentials is not None else grpc.insecure_channel(target)


@contextmanager
def stopped_at_exit(procs: list[ServiceProcess]) -> Iterator[list[ServiceProcess]]:
    """Stops every process started into `procs`; on failure first prints their logs (the servers' own logs hold the
    traceback behind an INTERNAL status; pytest shows this output on failure)."""
    try:
        yield procs
    except BaseException:
        for proc in procs:
            print(f"----- {proc.service} log (last 20,000 characters) -----\n{proc.logs(20_000)}")
        raise
    finally:
        for proc in reversed(procs):
            proc.stop()


def run_node(script: Path, *args: str, timeout: float = 120.0) -> dict:
    done = subprocess.run([NODE, str(script), *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{script.name} failed ({done.returncode}):\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_registry_smoke(node_client: Path, tmp_path: Path) -> None:
    registry = ServiceProcess(
        "registry", tmp_path / "registry",
        "--auth-tokens", "adm-7f3a=default:admin:relaycore-smoke,view-91c2=default:viewer:dashboard",
        "--page-token-secret", "smoke-page-token-secret",
    )  # fmt: skip
    try:
        registry.wait_serving("neuroweaver.registry.v1.RegistryService")
        out = run_node(
            node_client / "dist-test" / "smoke.js",
            "--registry", registry.target, "--admin-token", "adm-7f3a", "--viewer-token", "view-91c2",
        )  # fmt: skip
    finally:
        registry.stop()
    assert out["ok"] is True
    assert out["model"]["creator"] == "relaycore-smoke"
    assert out["production"].endswith("/versions/1.0.0")
    assert out["notFound"] == {
        "code": "NotFound",
        "reason": "MODEL_NOT_FOUND",
        "domain": "registry.neuroweaver.v1",
        "metadata": {"model": "projects/default/models/does-not-exist"},
    }
    assert {"field": "model_version.artifact.sha256", "description": "required: 64 lowercase hex characters"} in out[
        "invalidArgument"
    ]["fieldViolations"]
    assert out["auth"]["noToken"] == "MISSING_TOKEN" and out["auth"]["viewerWrite"] == "ROLE_TOO_LOW"
    assert out["deadline"] == "DeadlineExceeded"


def test_vendored_protos_match_their_sources(tmp_path: Path) -> None:
    """clients/typescript/proto holds copies (google/rpc) and a re-statement (grpc/health) of upstream protos."""
    import grpc_tools
    from google.protobuf import descriptor_pb2
    from google.rpc import status_pb2
    from grpc_tools import protoc

    rpc_dir = Path(status_pb2.__file__).parent
    for name in ("status.proto", "error_details.proto"):
        assert (CLIENT / "proto" / "google" / "rpc" / name).read_bytes() == (rpc_dir / name).read_bytes(), name

    # health.proto: the descriptor compiled from our file equals the one grpcio-health-checking ships.
    out = tmp_path / "health.pb"
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main(
        ["protoc", f"-I{CLIENT / 'proto'}", f"-I{include}", f"--descriptor_set_out={out}", "grpc/health/v1/health.proto"]
    )
    assert rc == 0
    ours = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    theirs = descriptor_pb2.FileDescriptorProto()
    health_pb2.DESCRIPTOR.CopyToProto(theirs)
    assert theirs.name == "grpc_health/v1/health.proto"  # the Python package's path; upstream's is ours
    theirs.name = ours.name

    def drop_json_names(messages) -> None:  # protoc fills json_name in descriptor sets; the embedded one has none
        for message in messages:
            for f in message.field:
                f.ClearField("json_name")
            drop_json_names(message.nested_type)

    drop_json_names(ours.message_type)
    assert ours == theirs


def make_adapter(base_dir: Path, out_dir: Path, seed: int) -> str:
    """A PEFT LoRA adapter on the tiny base (random non-zero B, so it changes outputs); returns its sha256."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from neuroweaver_ml import digest_path

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(out_dir))
    return digest_path(out_dir)[0]


def wait_available(deployer, name: str, timeout: float = 180.0):
    """Follows WatchDeployment until the deployment is AVAILABLE with a ready replica (deadline, no sleeps)."""
    last = None
    for msg in deployer.WatchDeployment(dsvc.WatchDeploymentRequest(name=name), timeout=timeout):
        last = msg.deployment
        if last.state == dpb.Deployment.STATE_AVAILABLE and last.ready_replicas >= 1:
            return last
    raise AssertionError(f"watch of {name} ended before it was available: {last}")


# The RelayCore flow in steps, shared by test_relaycore_flow (plaintext, auth off) and test_relaycore_mtls.py
# (mTLS and auth on everywhere): the stubs passed in carry whatever credentials the shape needs.


def tiny_base_and_adapters(tmp_path: Path, count: int) -> tuple[Path, list[tuple[Path, str]]]:
    """A tiny random Llama and `count` LoRA adapters on it: (path, sha256) each."""
    from neuroweaver_ml.models import build_tiny_llama

    base = build_tiny_llama(tmp_path / "tiny-llama")
    return base, [(tmp_path / f"adapter-{i}", make_adapter(base, tmp_path / f"adapter-{i}", seed=i)) for i in range(count)]


def register_versions(reg, base: Path, adapters: list[tuple[Path, str]]) -> list[str]:
    """MODEL with versions 1.0.0, 1.1.0, ... from `adapters`; `production` → 1.0.0. Returns the version names."""
    reg.CreateModel(rsvc.CreateModelRequest(parent=PROJECT, model_id="advisor", model=rpb.Model(base_model=str(base))))
    versions = []
    for i, (path, sha) in enumerate(adapters):
        mv = reg.CreateModelVersion(
            rsvc.CreateModelVersionRequest(
                parent=MODEL,
                version=f"1.{i}.0",
                model_version=rpb.ModelVersion(
                    artifact=rpb.Artifact(uri=path.as_uri(), sha256=sha, format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
                    lineage=rpb.Lineage(base_model=str(base), method="sft-lora"),
                ),
            )
        )
        versions.append(mv.name)
    reg.SetModelAlias(rsvc.SetModelAliasRequest(model=MODEL, alias="production", version="1.0.0", reason="initial"))
    return versions


def start_experiment(dep, exp, versions: list[str], judge_version: str = "") -> tuple[str, dict[str, dpb.Deployment]]:
    """Two local deployments, control following `production` and treatment pinned to the candidate, each AVAILABLE;
    then an A/B experiment over them, started (judging answers with `judge_version` when given). Returns (experiment
    name, deployments by variant)."""
    targets = {
        "control": dpb.Deployment(model_alias=f"{MODEL}/aliases/production", replicas=1, backend=dpb.BACKEND_LOCAL),
        "treatment": dpb.Deployment(model_version=versions[1], replicas=1, backend=dpb.BACKEND_LOCAL),
    }
    for variant, target in targets.items():
        dep.CreateDeployment(dsvc.CreateDeploymentRequest(parent=PROJECT, deployment_id=f"advisor-{variant}", deployment=target))
    deployments = {v: wait_available(dep, f"{PROJECT}/deployments/advisor-{v}") for v in targets}
    return start_ab_experiment(exp, versions, deployments, judge_version), deployments


def start_ab_experiment(exp, versions: list[str], deployments: dict[str, dpb.Deployment], judge_version: str = "") -> str:
    """The A/B experiment `advisor-ab` over the control and treatment deployments, started; returns its name. With
    `judge_version` the service scores the answers the gateway records into `judge_score` (the primary metric)."""
    mean, prop = epb.METRIC_KIND_MEAN, epb.METRIC_KIND_PROPORTION
    experiment = exp.CreateExperiment(
        esvc.CreateExperimentRequest(
            parent=PROJECT,
            experiment_id="advisor-ab",
            experiment=epb.Experiment(
                variants=[
                    epb.Variant(id=v, model_version=version, deployment=deployments[v].name, weight=0.5)
                    for v, version in zip(("control", "treatment"), versions, strict=True)
                ],
                promote_alias="production",
                primary_metric=epb.MetricSpec(name="judge_score", kind=mean, direction=cpb.METRIC_DIRECTION_HIGHER_IS_BETTER),
                guardrail_metrics=[
                    epb.MetricSpec(name="latency_ms", kind=mean, direction=cpb.METRIC_DIRECTION_LOWER_IS_BETTER, tolerance=10.0)
                ],
                secondary_metrics=[
                    epb.MetricSpec(name="completion_tokens", kind=mean, direction=cpb.METRIC_DIRECTION_HIGHER_IS_BETTER),
                    epb.MetricSpec(name="thumbs_up", kind=prop, direction=cpb.METRIC_DIRECTION_HIGHER_IS_BETTER),
                ],
                min_sample_size=1,
                answer_judging=epb.AnswerJudging(judge_version=judge_version, metric="judge_score") if judge_version else None,
            ),
        )
    )
    exp.StartExperiment(esvc.StartExperimentRequest(name=experiment.name))
    return experiment.name


def run_relaycore(example: Path, experiments: ServiceProcess, experiment: str, users: int, *args: str) -> dict:
    """examples/relaycore for `users` users over both transports (`args`: its --token and --tls-* flags); its summary."""
    done = subprocess.run(
        [NODE, str(example / "dist" / "main.js"), "--experiments", experiments.target,
         "--experiment", experiment, "--users", str(users), "--transport", "both", "--max-tokens", "6", *args],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, f"relaycore example failed:\n{done.stdout}\n{done.stderr}\n{experiments.logs()}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_relaycore_run(out: dict, exp, experiment: str, deployments: dict, versions: list[str], users: int) -> None:
    """What Node saw, and what the experiments service recorded from its reports (read back in Python)."""
    # Every request went to the assigned variant's deployment under its stable name (the deployment's resource name),
    # and the model server said which version served it.
    assert out["ok"] is True and out["requests"] == 2 * users
    served = {v: d.name for v, d in deployments.items()}
    for r in out["results"]:
        assert r["model"] == served[r["variant"]], r
        assert r["modelVersion"] == r["servedVersion"] == versions[0 if r["variant"] == "control" else 1], r
        assert r["completionTokens"] > 0 and r["latencyMs"] > 0
        assert r["recorded"] == {"accepted": 2, "duplicates": 0}  # latency_ms, completion_tokens: no client-side score
    assert {r["transport"] for r in out["results"]} == {"grpc", "openai"}
    # Sticky: both transports of a user landed on the same variant.
    for i in range(1, users + 1):
        assert out["assignments"][f"req-user-{i}-grpc"] == out["assignments"][f"req-user-{i}-openai"]
    # Assigned in-process by the TS SDK (one phase, coverage 1: no AssignVariant call): each user's first request a
    # local first exposure sent over IngestEvents, the second sticky.
    assert [r["assignedBy"] for r in out["results"]] == ["local", "sticky"] * users
    local = out["localEvaluation"]
    assert local["serverAssignments"] == 0 and local["exposuresAccepted"] == users and local["pending"] == 0
    assert out["feedback"] == {"accepted": users, "duplicates": 0}
    assert out["retry"] == {"accepted": 0, "duplicates": 2}
    assert out["missingExperiment"] == {
        "code": "NotFound", "reason": "EXPERIMENT_NOT_FOUND", "domain": "experiments.neuroweaver.v1",
    }  # fmt: skip

    results = exp.GetExperimentResults(esvc.GetExperimentResultsRequest(name=experiment))
    by_variant = {s.variant: s for s in results.primary.variants}
    expected_units = {v: sum(1 for i in range(1, users + 1) if out["assignments"][f"req-user-{i}-grpc"] == v) for v in served}
    secondary = {m.metric.name: m for m in results.secondary}
    tokens = {s.variant: s.units for s in secondary["completion_tokens"].variants}
    assert {v: tokens.get(v, 0) for v in served} == expected_units
    # judge_score comes only from the experiments service's judge (RecordAnswers), never from the gateway
    judging = out["judging"]
    if judging is None:
        assert all(r["answerRecorded"] is None for r in out["results"])
        assert {v: by_variant[v].units for v in served} == {v: 0 for v in served}
    else:
        assert {v: by_variant[v].units for v in served} == expected_units
        assert all(r["answerRecorded"] == {"accepted": 1, "duplicates": 0, "sampled": 1} for r in out["results"])
        assert out["answerRetry"] == {"accepted": 0, "duplicates": 1, "sampled": 0}
        assert (judging["received"], judging["sampled"], judging["scored"], judging["failed"]) == (2 * users,) * 3 + (0,)
        assert judging["metric"] == "judge_score" and results.judging.scored == 2 * users
        assert all(1.0 <= by_variant[v].mean <= 10.0 for v in served if by_variant[v].units)
    assert sum(s.units for s in secondary["thumbs_up"].variants) == users
    assert sum(s.units for s in secondary["completion_tokens"].variants) == users


def conclude_and_roll_over(exp, reg, dep, experiment: str, deployments: dict, versions: list[str]):
    """The operator concludes with the treatment as winner and promotes it: the alias moves (compare-and-set, history
    names the experiment) and the deployment following it rolls over. Returns the alias history's newest entry."""
    concluded = exp.ConcludeExperiment(
        esvc.ConcludeExperimentRequest(
            name=experiment, winner="treatment", promote=True, expected_current_version="1.0.0", reason="e2e"
        )
    )
    assert concluded.state == epb.Experiment.STATE_CONCLUDED and concluded.winner == "treatment"
    history = reg.ListModelAliasHistory(rsvc.ListModelAliasHistoryRequest(parent=f"{MODEL}/aliases/production"))
    latest = history.entries[0]
    assert (latest.from_version, latest.to_version) == ("1.0.0", versions[1].rsplit("/", 1)[1])
    assert experiment in latest.reason
    rolled = None
    for msg in dep.WatchDeployment(dsvc.WatchDeploymentRequest(name=deployments["control"].name), timeout=180):
        d = msg.deployment
        if d.served_version == versions[1] and d.state == dpb.Deployment.STATE_AVAILABLE and d.ready_replicas >= 1:
            rolled = d
            break
    assert rolled is not None and rolled.revision == 2
    revisions = dep.ListDeploymentRevisions(dsvc.ListDeploymentRevisionsRequest(parent=rolled.name))
    assert revisions.revisions[0].cause == f"alias:1.0.0->{latest.to_version}"
    return latest


def delete_deployments(dep, deployments: dict) -> None:
    for d in deployments.values():
        dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=d.name))


def test_relaycore_flow(relaycore_example: Path, tmp_path: Path) -> None:
    """AssignVariant → model server (gRPC Generate and OpenAI HTTP) → RecordMetricEvents, all from Node; then
    ConcludeExperiment(promote) moves `production` and the deployment following it rolls over."""
    from neuroweaver_ml.rlaif.judge_server import JudgeServer

    base, adapters = tiny_base_and_adapters(tmp_path, 2)
    with stopped_at_exit([]) as procs, JudgeServer() as judge_server:
        registry = ServiceProcess("registry", tmp_path / "registry")
        procs.append(registry)
        deployer = ServiceProcess(
            "deployer", tmp_path / "deployer", "--registry-target", registry.target, "--replica-grace-seconds", "2"
        )
        procs.append(deployer)
        experiments = ServiceProcess(
            "experiments", tmp_path / "experiments",
            "--deployer-target", deployer.target, "--registry-target", registry.target,
        )  # fmt: skip
        procs.append(experiments)
        for proc in procs:
            proc.wait_serving(HEALTH[proc.service])

        with open_grpc(registry.target) as rch, open_grpc(deployer.target) as dch, open_grpc(experiments.target) as ech:
            reg, dep, exp = rgrpc.RegistryServiceStub(rch), dgrpc.DeployerServiceStub(dch), egrpc.ExperimentsServiceStub(ech)
            versions = register_versions(reg, base, adapters)
            # the answers' judge: an OpenAI-compatible LLM judge registered in the registry (a real local HTTP server)
            judge = reg.CreateJudge(
                rsvc.CreateJudgeRequest(
                    parent=PROJECT, judge_id="advisor-judge", judge=rpb.Judge(),
                    judge_version=rpb.JudgeVersion(
                        kind=rpb.JUDGE_KIND_OPENAI_COMPATIBLE, mode=rpb.JUDGE_MODE_POINTWISE, score_min=1, score_max=10,
                        openai=rpb.OpenAICompatibleJudge(base_url=judge_server.base_url, model="nw-judge"),
                    ),
                )
            )  # fmt: skip
            experiment, deployments = start_experiment(dep, exp, versions, f"{judge.name}/versions/1")
            users = 8
            out = run_relaycore(relaycore_example, experiments, experiment, users)
            check_relaycore_run(out, exp, experiment, deployments, versions, users)
            assert len(judge_server.state.contents()) == 2 * users  # each answer judged once, by the service
            conclude_and_roll_over(exp, reg, dep, experiment, deployments, versions)
            delete_deployments(dep, deployments)
