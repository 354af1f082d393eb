"""The model server's command line: it offers and accepts only the settings it uses, and each port flag means what
it says (a real `python -m neuroweaver_model_server` process on three chosen ports)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver_model_server.app import DEFAULT_GRPC_PORT, ModelServer, ModelServerConfig
from neuroweaver_runtime.config import load_config
from neuroweaver_runtime.ports import free_port


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "neuroweaver_model_server", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_help_lists_only_the_settings_the_model_server_uses():
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.stdout))
    assert {"--grpc-port", "--http-port", "--metrics-port", "--base-model", "--auth-tokens", "--tls-cert"} <= flags
    assert not flags & {"--port", "--database-url", "--page-token-secret", "--data-dir", "--project-grants", "--client-tls-ca"}
    assert DEFAULT_GRPC_PORT != 50051  # the registry's port


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--port", "7000"], {}, "unrecognized arguments: --port"),
        (["--database-url", "sqlite://"], {}, "unrecognized arguments: --database-url"),
        (["--page-token-secret", "x"], {}, "unrecognized arguments: --page-token-secret"),
        ([], {"NW_MODEL_SERVER_PORT": "7000"}, "NW_MODEL_SERVER_PORT is set, but model_server has no port setting"),
        (["--grpc-port", "7000", "--http-port", "7000"], {}, "must differ"),
        (["--metrics-port", "7001", "--http-port", "7001"], {}, "must differ"),
        (["--grpc-port", "-2"], {}, "ports must be >= 0"),
    ],
)
def test_a_setting_it_would_ignore_or_a_bad_port_combination_fails_at_start(tiny_base, args, env, message):
    out = _run("--base-model", str(tiny_base), *args, env=env)
    assert out.returncode != 0
    assert message in out.stderr


def test_config_is_not_rewritten_by_the_server(tiny_base):
    config = load_config(ModelServerConfig, "model_server", ["--base-model", str(tiny_base), "--metrics-port", "9999"])
    server = ModelServer(config)
    assert config.metrics_port == 9999 and server.metrics_port == 9999  # the ops port, as given
    assert server.grpc.port == DEFAULT_GRPC_PORT


def _get(url: str) -> int:
    """The HTTP status of a GET, 0 while nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_each_port_flag_serves_what_it_names(tiny_base):
    grpc_port, http_port, ops_port = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuroweaver_model_server", "--base-model", str(tiny_base), "--grpc-port", str(grpc_port),
         "--http-port", str(http_port), "--metrics-port", str(ops_port), "--shutdown-drain-seconds", "0",
         "--shutdown-grace-seconds", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while _get(f"http://127.0.0.1:{ops_port}/healthz") != 200:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the model server did not become ready"
            time.sleep(0.1)  # polling a condition with a deadline
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=5) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/metrics", timeout=5) as response:
            assert b"nw_inference_model_load_seconds" in response.read()
        assert _get(f"http://127.0.0.1:{http_port}/metrics") == 404  # metrics only on the ops port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
