"""A running experiment survives a deployer restart (issue 16): the experiments service follows its variants'
deployments (WatchDeployment) instead of keeping the endpoint StartExperiment resolved.

Service processes: registry, experiments and a deployer on a fixed port (its LOCAL backend runs a real model-server
replica of a tiny model behind the deployment's router). The experiment's variant is served at the router's
endpoint; the deployer is stopped (SIGTERM) and started again on the same port and database: it starts the
deployment again behind a new router, on new ports. Without restarting the experiments service, AssignVariant then
answers with the new endpoint (once its watch has seen the deployer's report), and a real Generate through it, and
a chat completion through the new OpenAI base URL, succeed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as dgrpc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.experiments.v1 import experiment_pb2 as epb
from neuroweaver.experiments.v1 import experiments_service_pb2 as esvc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as egrpc
from neuroweaver.inference.v1 import inference_pb2 as ipb
from neuroweaver.inference.v1 import inference_service_pb2 as isvc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as igrpc
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
from neuroweaver_runtime.testing import free_port

pytestmark = pytest.mark.slow  # a model-server process, started twice

REGISTRY = "neuroweaver.registry.v1.RegistryService"
DEPLOYER = "neuroweaver.deployer.v1.DeployerService"
EXPERIMENTS = "neuroweaver.experiments.v1.ExperimentsService"
P = "projects/default"
DEPLOYMENT = f"{P}/deployments/advisor"
EXPERIMENT = f"{P}/experiments/restart"


def wait_for(predicate, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)  # polling interval while waiting for a condition


class Deployer:
    """`python -m neuroweaver_deployer` on a fixed port and data dir, so a restart comes back at the same address
    with the same database."""

    def __init__(self, work: Path, registry: str) -> None:
        self.port, self.work, self.registry = free_port(), work, registry
        self.target = f"127.0.0.1:{self.port}"
        self.popen: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "neuroweaver_deployer", "--port", str(self.port), "--metrics-port", "-1",
               "--data-dir", str(self.work), "--registry-target", self.registry, "--local-replica-threads", "1"]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(self.work / "deployer.log", "ab") as log:
            self.popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.work)
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                assert self.popen is not None and self.popen.poll() is None, self.log_tail()
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service=DEPLOYER), timeout=1)
                except grpc.RpcError:
                    return False
                return reply.status == health_pb2.HealthCheckResponse.SERVING

            wait_for(serving, "the deployer to serve", 60)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)  # graceful: its replicas stop, its leases are released
            try:
                self.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def log_tail(self) -> str:
        return (self.work / "deployer.log").read_text(errors="replace")[-3000:]


def available(stub, seen: set[str] | None = None):
    def check():
        d = stub.GetDeployment(dsvc.GetDeploymentRequest(name=DEPLOYMENT), timeout=10)
        if d.state == dpb.Deployment.STATE_AVAILABLE and d.ready_replicas == 1 and d.endpoint not in (seen or set()):
            return d
        return None

    return check


def generate(endpoint: str) -> isvc.GenerateResponse:
    with grpc.insecure_channel(endpoint) as channel:
        request = isvc.GenerateRequest(
            model=DEPLOYMENT, messages=[ipb.ChatMessage(role="user", content="Hi")], sampling=ipb.SamplingParams(max_tokens=2)
        )
        return igrpc.InferenceServiceStub(channel).Generate(request, timeout=60)


def test_assign_variant_follows_a_restarted_deployer(start, tmp_path):
    from neuroweaver_ml.models import build_tiny_llama
    from neuroweaver_ml.testing import make_lora_adapter

    base = build_tiny_llama(tmp_path / "tiny-llama")
    adapter, sha = make_lora_adapter(base, tmp_path / "adapter", seed=0)
    registry = start("neuroweaver_registry", REGISTRY, "registry", trace=False)
    (tmp_path / "deployer").mkdir()
    deployer = Deployer(tmp_path / "deployer", registry.target)
    deployer.start()
    try:
        experiments = start(
            "neuroweaver_experiments", EXPERIMENTS, "experiments", "--deployer-target", deployer.target,
            "--registry-target", registry.target, trace=False,
        )  # fmt: skip
        with (
            grpc.insecure_channel(registry.target) as reg_channel,
            grpc.insecure_channel(deployer.target) as dep_channel,
            grpc.insecure_channel(experiments.target) as exp_channel,
        ):
            reg, dep, exp = rgrpc.RegistryServiceStub(reg_channel), dgrpc.DeployerServiceStub(dep_channel), egrpc.ExperimentsServiceStub(exp_channel)  # fmt: skip
            reg.CreateModel(rsvc.CreateModelRequest(parent=P, model_id="advisor", model=rpb.Model(base_model=str(base))))
            version = reg.CreateModelVersion(
                rsvc.CreateModelVersionRequest(
                    parent=f"{P}/models/advisor",
                    version="1.0.0",
                    model_version=rpb.ModelVersion(
                        artifact=rpb.Artifact(uri=adapter.as_uri(), sha256=sha, format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
                        lineage=rpb.Lineage(base_model=str(base), method="sft-lora"),
                    ),
                )  # fmt: skip
            ).name
            dep.CreateDeployment(
                dsvc.CreateDeploymentRequest(
                    parent=P,
                    deployment_id="advisor",
                    deployment=dpb.Deployment(model_version=version, replicas=1, backend=dpb.BACKEND_LOCAL),
                )  # fmt: skip
            )
            before = wait_for(available(dep), "the deployment to be AVAILABLE")
            exp.CreateExperiment(
                esvc.CreateExperimentRequest(
                    parent=P,
                    experiment_id="restart",
                    experiment=epb.Experiment(
                        variants=[
                            epb.Variant(id="control", model_version=version, deployment=DEPLOYMENT, weight=0.5),
                            epb.Variant(id="treatment", model_version=version, deployment=DEPLOYMENT, weight=0.5),
                        ],
                        primary_metric=epb.MetricSpec(name="score", kind=epb.METRIC_KIND_MEAN),
                    ),
                )  # fmt: skip
            )
            exp.StartExperiment(esvc.StartExperimentRequest(name=EXPERIMENT))
            assign = esvc.AssignVariantRequest(experiment=EXPERIMENT, unit_id="user-1")
            variant = exp.AssignVariant(assign).variant
            assert variant.endpoint == before.endpoint and generate(variant.endpoint).model_version == version

            deployer.stop()
            deployer.start()  # same port and database: the deployment comes back behind a new router
            after = wait_for(available(dep, {before.endpoint}), "the deployment AVAILABLE on its new router")

            def assigned_now():
                v = exp.AssignVariant(assign).variant
                return v if v.endpoint == after.endpoint else None

            variant = wait_for(assigned_now, "AssignVariant to carry the new endpoint", 30)
            assert variant.openai_base_url == after.openai_base_url and variant.model == DEPLOYMENT
            assert generate(variant.endpoint).model_version == version  # reachable: a real call through it
            body = {"model": variant.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            chat = urllib.request.Request(
                variant.openai_base_url + "/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(chat, timeout=60) as answer:  # noqa: S310 - the deployment's own http:// URL
                assert answer.status == 200 and answer.headers["x-neuroweaver-model-version"] == version
            got = exp.GetExperiment(esvc.GetExperimentRequest(name=EXPERIMENT))
            assert got.variants[0].endpoint == after.endpoint
            assert experiments.popen.poll() is None  # the same experiments process throughout
            dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name=DEPLOYMENT))
    finally:
        deployer.stop()
