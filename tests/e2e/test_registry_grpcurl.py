"""End to end: the real registry process driven by the real grpcurl binary, then SIGTERM."""

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

from neuroweaver_runtime.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
GRPCURL = ROOT / ".venv" / "bin" / "grpcurl"


def wait_serving(port: int, proc: subprocess.Popen, deadline_s: float = 30.0) -> None:
    """Polls grpc.health.v1 until SERVING (a condition with a deadline, not a fixed sleep)."""
    deadline = time.monotonic() + deadline_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else "registry exited"
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service="neuroweaver.registry.v1.RegistryService"), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)  # polling interval while waiting for a condition
    raise AssertionError("registry did not become SERVING in time")


@pytest.fixture
def registry_process(tmp_path):
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuroweaver_registry", "--port", str(port), "--metrics-port", str(metrics_port),
         "--data-dir", str(tmp_path), "--shutdown-grace-seconds", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        wait_serving(port, proc)
        yield proc, port, metrics_port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def grpcurl(port: int, *args: str, data: dict | None = None, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [str(GRPCURL), "-plaintext", *flags]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    cmd += [f"127.0.0.1:{port}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def test_registry_with_grpcurl_metrics_and_sigterm(registry_process):
    proc, port, metrics_port = registry_process
    listed = grpcurl(port, "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"neuroweaver.registry.v1.RegistryService", "grpc.health.v1.Health"} <= services

    described = grpcurl(port, "describe", "neuroweaver.registry.v1.RegistryService")
    assert described.returncode == 0, described.stderr
    assert "rpc CreateModelVersion" in described.stdout and "rpc WatchModelEvents" in described.stdout

    created = grpcurl(
        port, "neuroweaver.registry.v1.RegistryService/CreateModel",
        data={"parent": "projects/default", "modelId": "service-advisor", "model": {"specialization": "service", "labels": {"team": "ml"}}},
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    model = json.loads(created.stdout)
    assert model["name"] == "projects/default/models/service-advisor" and model["state"] == "STATE_ACTIVE"

    got = grpcurl(port, "neuroweaver.registry.v1.RegistryService/GetModel", data={"name": model["name"]})
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["etag"] == model["etag"]

    bad = grpcurl(port, "neuroweaver.registry.v1.RegistryService/CreateModelVersion", flags=("-format-error",),
                  data={"parent": model["name"], "version": "1.0", "modelVersion": {"artifact": {"uri": "file:///a", "sha256": "ab" * 32}}})  # fmt: skip
    assert bad.returncode != 0
    error = json.loads(bad.stdout + bad.stderr)
    assert error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    info = next(d for d in error["details"] if d["@type"].endswith("google.rpc.ErrorInfo"))
    assert info["reason"] == "INVALID_VERSION" and info["domain"] == "registry.neuroweaver.v1"

    missing = grpcurl(port, "neuroweaver.registry.v1.RegistryService/GetModel", data={"name": "projects/default/models/nope"})
    assert missing.returncode != 0 and "NotFound" in missing.stderr

    # The audit trail newest first, filtered by the registry (services/registry/README.md's example).
    events = grpcurl(
        port, "neuroweaver.registry.v1.RegistryService/ListModelEvents",
        data={"parent": "projects/default", "order_by": "sequence desc", "page_size": 5,
              "filter": 'type = TYPE_MODEL_CREATED AND actor = "anonymous"'},
    )  # fmt: skip
    assert events.returncode == 0, events.stderr
    assert [(e["type"], e["resource"]) for e in json.loads(events.stdout)["events"]] == [("TYPE_MODEL_CREATED", model["name"])]
    bad_filter = grpcurl(port, "neuroweaver.registry.v1.RegistryService/ListModelEvents", flags=("-format-error",),
                         data={"parent": "projects/default", "filter": "kind = x"})  # fmt: skip
    request = next(d for d in json.loads(bad_filter.stdout + bad_filter.stderr)["details"] if d["@type"].endswith("BadRequest"))
    assert [v["field"] for v in request["field_violations"]] == ["filter"]

    health = grpcurl(port, "grpc.health.v1.Health/Check", data={"service": "neuroweaver.registry.v1.RegistryService"})
    assert health.returncode == 0 and json.loads(health.stdout)["status"] == "SERVING"

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()

    def series(name: str) -> dict[str, float]:
        return {
            line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith(name + "{")
        }

    handled = series("grpc_server_handled_total")

    def count(method: str, code: str) -> float:
        return sum(v for labels, v in handled.items() if f'grpc_method="{method}"' in labels and f'grpc_code="{code}"' in labels)

    # go-grpc-prometheus code names, which community alerts match
    assert count("CreateModel", "OK") == 1
    assert count("GetModel", "OK") == 1 and count("GetModel", "NotFound") == 1
    assert count("CreateModelVersion", "InvalidArgument") == 1

    def messages(name: str, method: str) -> float:
        return sum(v for labels, v in series(name).items() if f'grpc_method="{method}"' in labels)

    # unary calls: every request is received, only successful ones send a response
    assert messages("grpc_server_msg_received_total", "GetModel") == 2
    assert messages("grpc_server_msg_sent_total", "GetModel") == 1
    assert "grpc_server_handling_seconds_bucket" in metrics

    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=5 + 10)  # within the 5 s grace plus process teardown
    except subprocess.TimeoutExpired:
        pytest.fail("registry did not exit after SIGTERM")
    assert rc == 0, proc.stdout.read()
