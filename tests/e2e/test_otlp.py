"""Traces reach an OTLP collector: one trace across the CLI, experiments, registry, deployer and model server.

The collector is this test: an OTLP/gRPC TraceService (opentelemetry-proto) on a free port that keeps every
ExportTraceServiceRequest. The services export to it with `--otlp-endpoint` (the registry through the standard
OTEL_EXPORTER_OTLP_ENDPOINT instead), the deployer's model-server replica inherits the setting, and `nw` exports
through OTEL_EXPORTER_OTLP_ENDPOINT. The flow runs under one W3C trace that the test starts (TRACEPARENT for each
`nw` command, a `traceparent` header on the chat completion):

  nw deploy create --watch → deployer CreateDeployment → registry GetModelVersion; replica start → model load
  nw ab start             → experiments StartExperiment → deployer GetDeployment
  POST /v1/chat/completions on the deployment's router (deployer) → model server
  nw ab conclude --promote → experiments ConcludeExperiment → registry SetModelAlias

Every process runs with a 60 s batch delay, so its spans leave only when it shuts down (SIGTERM for the services,
exit for `nw`): that every expected span arrived shows that nothing is dropped on shutdown.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from concurrent import futures

import grpc
import pytest
import requests
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
from neuroweaver_runtime.testing import free_port

pytestmark = pytest.mark.slow  # a model-server process

REGISTRY = "neuroweaver.registry.v1.RegistryService"
EXPERIMENTS = "neuroweaver.experiments.v1.ExperimentsService"
DEPLOYER = "neuroweaver.deployer.v1.DeployerService"
SERVICES = {
    "neuroweaver-cli",
    "neuroweaver-experiments",
    "neuroweaver-registry",
    "neuroweaver-deployer",
    "neuroweaver-model-server",
}


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps what it is sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):
        with self._lock:
            self._requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[dict]:
        with self._lock:
            requests_ = list(self._requests)
        out = []
        for request in requests_:
            for rs in request.resource_spans:
                resource = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
                for scope in rs.scope_spans:
                    for span in scope.spans:
                        out.append({
                            "name": span.name,
                            "kind": trace_pb2.Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex() or None,
                            "service": resource.get("service.name"),
                            "resource": resource,
                            "attributes": {kv.key: kv.value for kv in span.attributes},
                        })  # fmt: skip
        return out


@pytest.fixture
def collector():
    receiver = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    server.start()
    receiver.endpoint = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield receiver
    server.stop(None)


def test_one_trace_from_the_cli_through_every_service_reaches_the_collector(start, collector, tmp_path):
    from neuroweaver_ml.models import build_tiny_llama
    from neuroweaver_ml.testing import make_lora_adapter

    base = build_tiny_llama(tmp_path / "tiny-llama")
    adapters = [make_lora_adapter(base, tmp_path / f"adapter-{i}", seed=i) for i in range(2)]
    batch_until_exit = {"OTEL_BSP_SCHEDULE_DELAY": "60000"}
    otlp = ["--otlp-endpoint", collector.endpoint]
    registry = start("neuroweaver_registry", REGISTRY, "registry", trace=False,
                     env={**batch_until_exit, "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint})  # fmt: skip
    deployer = start("neuroweaver_deployer", DEPLOYER, "deployer", "--registry-target", registry.target,
                     "--replica-grace-seconds", "2", "--local-replica-threads", "1", *otlp, trace=False,
                     env=batch_until_exit)  # fmt: skip
    experiments = start("neuroweaver_experiments", EXPERIMENTS, "experiments", "--registry-target", registry.target,
                        "--deployer-target", deployer.target, *otlp, trace=False, env=batch_until_exit)  # fmt: skip

    # set-up, outside the trace: a model with two versions, alias production → 1.0.0
    model = "projects/default/models/advisor"
    with grpc.insecure_channel(registry.target) as channel:
        reg = rgrpc.RegistryServiceStub(channel)
        reg.CreateModel(
            rsvc.CreateModelRequest(parent="projects/default", model_id="advisor", model=rpb.Model(base_model=str(base))),
            timeout=10,
        )
        for i, (path, sha) in enumerate(adapters):
            reg.CreateModelVersion(rsvc.CreateModelVersionRequest(parent=model, version=f"1.0.{i}", model_version=rpb.ModelVersion(
                artifact=rpb.Artifact(uri=path.as_uri(), sha256=sha, format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
                lineage=rpb.Lineage(base_model=str(base), method="sft-lora"),
            )), timeout=10)  # fmt: skip
        reg.SetModelAlias(rsvc.SetModelAliasRequest(model=model, alias="production", version="1.0.0"), timeout=10)

    trace_id, root = secrets.token_hex(16), secrets.token_hex(8)
    traceparent = f"00-{trace_id}-{root}-01"
    cli_env = {**os.environ, **batch_until_exit, "TRACEPARENT": traceparent, "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
               "NW_REGISTRY_TARGET": registry.target, "NW_DEPLOYER_TARGET": deployer.target,
               "NW_EXPERIMENTS_TARGET": experiments.target}  # fmt: skip

    def nw(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "neuroweaver_sdk.cli", "--json", *args], capture_output=True,
                              text=True, env=cli_env, timeout=240)  # fmt: skip
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    nw("deploy", "create", "web", "--model", "advisor", "--version", "1.0.0", "--watch")
    deployment = json.loads(nw("deploy", "get", "web"))
    assert deployment["state"] == "STATE_AVAILABLE", deployment
    nw("ab", "create", "tone", "--variant", "control=advisor@1.0.0,web", "--variant", "treatment=advisor@1.0.1,web",
       "--metric", "score", "--promote-alias", "production")  # fmt: skip
    nw("ab", "start", "tone")
    chat = requests.post(
        deployment["openai_base_url"] + "/chat/completions",
        json={"model": deployment["served_model_name"], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        headers={"traceparent": traceparent}, timeout=120,
    )  # fmt: skip
    assert chat.status_code == 200, chat.text
    nw("ab", "conclude", "tone", "--winner", "treatment", "--promote", "--expect", "1.0.0")

    for proc in (experiments, deployer, registry):  # SIGTERM: each flushes its spans before it exits
        proc.popen.terminate()
        assert proc.popen.wait(timeout=60) == 0, proc.log.read_text()[-3000:]

    spans = [s for s in collector.spans() if s["trace_id"] == trace_id]
    by_id = {s["span_id"]: s for s in spans}
    assert {s["service"] for s in spans} == SERVICES, sorted({(s["service"], s["name"]) for s in spans})
    # nothing missing: every parent is the flow's root or a span the collector got
    dangling = [(s["service"], s["name"]) for s in spans if s["parent_span_id"] not in by_id and s["parent_span_id"] != root]
    assert dangling == [], dangling
    for s in spans:
        assert s["resource"]["service.version"] and s["resource"]["service.instance.id"], s

    def one(service: str, name: str, kind: str) -> dict:
        found = [s for s in spans if (s["service"], s["name"], s["kind"]) == (service, name, kind)]
        assert len(found) == 1, (service, name, kind, sorted((s["service"], s["name"], s["kind"]) for s in spans))
        return found[0]

    def served_by(server: dict, client_service: str) -> None:
        """A server span's parent is the caller's client span for the same method."""
        parent = by_id[server["parent_span_id"]]
        assert (parent["service"], parent["name"], parent["kind"]) == (client_service, server["name"], "CLIENT"), (server, parent)

    commands = {s["name"]: s for s in spans if s["service"] == "neuroweaver-cli" and s["parent_span_id"] == root}
    assert {"nw deploy create", "nw ab start", "nw ab conclude"} <= set(commands), sorted(commands)

    create = one("neuroweaver-deployer", f"{DEPLOYER}/CreateDeployment", "SERVER")
    served_by(create, "neuroweaver-cli")
    assert by_id[create["parent_span_id"]]["parent_span_id"] == commands["nw deploy create"]["span_id"]
    lookup = [s for s in spans if s["service"] == "neuroweaver-registry" and s["name"] == f"{REGISTRY}/GetModelVersion"]
    assert lookup, "the deployer resolved the version in the registry"
    for s in lookup:
        served_by(s, "neuroweaver-deployer")

    start_exp = one("neuroweaver-experiments", f"{EXPERIMENTS}/StartExperiment", "SERVER")
    served_by(start_exp, "neuroweaver-cli")
    resolve = [s for s in spans if s["parent_span_id"] == start_exp["span_id"] and s["name"] == f"{DEPLOYER}/GetDeployment"]
    assert resolve, "StartExperiment resolved the variants' endpoints in the deployer"
    for client in resolve:
        (server,) = [s for s in spans if s["parent_span_id"] == client["span_id"]]
        assert (server["service"], server["kind"]) == ("neuroweaver-deployer", "SERVER")
        served_by(server, "neuroweaver-experiments")

    conclude = one("neuroweaver-experiments", f"{EXPERIMENTS}/ConcludeExperiment", "SERVER")
    served_by(conclude, "neuroweaver-cli")
    set_alias = one("neuroweaver-registry", f"{REGISTRY}/SetModelAlias", "SERVER")
    served_by(set_alias, "neuroweaver-experiments")
    assert by_id[set_alias["parent_span_id"]]["parent_span_id"] == conclude["span_id"]

    # the chat completion: router (deployer) SERVER span under the caller, its CLIENT span, the model server's span
    routed = one("neuroweaver-deployer", "POST /v1/chat/completions", "SERVER")
    assert routed["parent_span_id"] == root
    completion = one("neuroweaver-model-server", "POST /v1/chat/completions", "SERVER")
    hop = by_id[completion["parent_span_id"]]
    assert hop["service"] == "neuroweaver-deployer" and hop["kind"] == "CLIENT" and hop["parent_span_id"] == routed["span_id"]
    assert completion["attributes"]["http.response.status_code"].int_value == 200

    # the replica's model load hangs under the deployer span that started the replica (in the trace of whatever
    # converged the deployment: the create call here, or the deployer's own reconcile loop)
    everything = {s["span_id"]: s for s in collector.spans()}
    loads = [s for s in everything.values() if (s["service"], s["name"]) == ("neuroweaver-model-server", "ModelServer/load")]
    assert len(loads) == 1, loads
    replica = everything[loads[0]["parent_span_id"]]
    assert (replica["service"], replica["name"], replica["trace_id"]) == (
        "neuroweaver-deployer",
        "LocalReplica/start",
        loads[0]["trace_id"],
    )
