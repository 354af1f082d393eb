"""The TypeScript client (@neuroweaver/client, clients/typescript) against the real service processes.

Node talks gRPC over HTTP/2 (Connect's `createGrpcTransport`) to the Python grpc.aio servers, started here as
`python -m neuroweaver_<svc>` processes. The Node side is compiled with tsc from the committed sources first, so
the test covers the code as it is in the tree.

- test_registry_smoke: clients/typescript/test/smoke.ts — model, versions, alias, read through
  `versions/production`, NOT_FOUND / ABORTED / INVALID_ARGUMENT with ErrorInfo and BadRequest decoded from
  `grpc-status-details-bin`, bearer tokens (missing, viewer, admin), deadlines, paging.
- test_relaycore_flow: examples/relaycore — AssignVariant → the deployment's model server (gRPC Generate and the
  OpenAI-compatible HTTP endpoint) → RecordMetricEvents, against real registry, deployer (local backend, real
  model-server processes on a tiny random Llama with LoRA adapters) and experiments processes; the recorded
  metrics are then read back through GetExperimentResults in Python.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver_runtime.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "typescript"
EXAMPLE = ROOT / "examples" / "relaycore"
NODE = shutil.which("node")
NPM = shutil.which("npm")


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
            [sys.executable, "-m", f"neuroweaver_{service}", "--port", str(self.port), "--metrics-port", "-1",
             "--data-dir", str(data_dir), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, health_service: str, timeout: float = 60.0) -> None:
        """Polls grpc.health.v1 Check until SERVING, with an overall deadline (no fixed sleeps)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        with grpc.insecure_channel(self.target) as channel:
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

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run_node(script: Path, *args: str, timeout: float = 120.0) -> dict:
    done = subprocess.run([NODE, str(script), *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{script.name} failed ({done.returncode}):\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_registry_smoke(node_client: Path, tmp_path: Path) -> None:
    registry = ServiceProcess(
        "registry", tmp_path / "registry",
        "--auth-tokens", "adm-7f3a=default:admin:relaycore-smoke,view-91c2=default:viewer:dashboard",
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
