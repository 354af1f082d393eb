"""End to end: the real registry process driven by `buf curl` (gRPC over HTTP/2 prior knowledge, schema from reflection)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver_runtime.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"
SERVICE = "neuroweaver.registry.v1.RegistryService"


def buf_command() -> list[str]:
    if BUF.exists():
        return [str(BUF)]
    npx = shutil.which("npx")
    if npx is None:
        pytest.fail("buf is not installed: run `npm ci` at the repository root (buf comes from @bufbuild/buf)")
    return [npx, "--no-install", "buf"]


def wait_serving(port: int, proc: subprocess.Popen, deadline_s: float = 30.0) -> None:
    """Polls grpc.health.v1 until SERVING (a condition with a deadline, not a fixed sleep)."""
    deadline = time.monotonic() + deadline_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"registry exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)  # polling interval while waiting for a condition
    raise AssertionError("registry did not become SERVING in time")


@pytest.fixture
def registry_port(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuroweaver_registry", "--port", str(port), "--metrics-port", "-1", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=tmp_path,
    )  # fmt: skip
    try:
        wait_serving(port, proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def buf_curl(port: int, method: str, data: dict) -> subprocess.CompletedProcess:
    cmd = [*buf_command(), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--data", json.dumps(data),
           f"http://127.0.0.1:{port}/{SERVICE}/{method}"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)


def parse_error(result: subprocess.CompletedProcess) -> tuple[str, error_details_pb2.ErrorInfo]:
    """buf curl prints a failed RPC as JSON on stderr: {"code": "not_found", "message": ..., "details": [...]}."""
    assert result.returncode != 0, result.stdout
    start = result.stderr.index("{")  # npm may print warnings before the JSON
    error = json.loads(result.stderr[start:])
    detail = next(d for d in error["details"] if d["type"] == "google.rpc.ErrorInfo")
    info = error_details_pb2.ErrorInfo()
    info.ParseFromString(base64.b64decode(detail["value"] + "=" * (-len(detail["value"]) % 4)))
    return error["code"], info


def test_registry_with_buf_curl(registry_port):
    port = registry_port
    created = buf_curl(port, "CreateModel", {"parent": "projects/default", "modelId": "parts-advisor",
                                             "model": {"displayName": "Parts advisor", "labels": {"team": "parts"}}})  # fmt: skip
    assert created.returncode == 0, created.stderr
    model = json.loads(created.stdout)
    assert model["name"] == "projects/default/models/parts-advisor"
    assert model["state"] == "STATE_ACTIVE" and model["labels"] == {"team": "parts"} and model["etag"]

    got = buf_curl(port, "GetModel", {"name": model["name"]})
    assert got.returncode == 0, got.stderr
    fetched = json.loads(got.stdout)
    assert fetched["etag"] == model["etag"] and fetched["displayName"] == "Parts advisor"

    second = buf_curl(port, "CreateModel", {"parent": "projects/default", "modelId": "sales-assistant"})
    assert second.returncode == 0, second.stderr
    listed = buf_curl(port, "ListModels", {"parent": "projects/default", "pageSize": 1})
    assert listed.returncode == 0, listed.stderr
    page = json.loads(listed.stdout)
    assert len(page["models"]) == 1 and page["nextPageToken"]
    rest = buf_curl(port, "ListModels", {"parent": "projects/default", "pageToken": page["nextPageToken"]})
    assert rest.returncode == 0, rest.stderr
    names = {m["name"] for m in page["models"] + json.loads(rest.stdout)["models"]}
    assert names == {"projects/default/models/parts-advisor", "projects/default/models/sales-assistant"}

    code, info = parse_error(buf_curl(port, "GetModel", {"name": "projects/default/models/nope"}))
    assert code == "not_found"
    assert info.reason == "MODEL_NOT_FOUND" and info.domain == "registry.neuroweaver.v1"

    code, info = parse_error(buf_curl(port, "CreateModel", {"parent": "projects/default", "modelId": "parts-advisor"}))
    assert code == "already_exists" and info.domain == "registry.neuroweaver.v1"
    assert info.reason == "MODEL_ALREADY_EXISTS"

    code, info = parse_error(buf_curl(port, "ListModels", {"parent": "projects/default", "pageSize": -1}))
    assert code == "invalid_argument" and info.domain == "registry.neuroweaver.v1"
