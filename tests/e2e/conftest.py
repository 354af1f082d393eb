"""Fixtures of the end-to-end tests that start service processes (tracing, OTLP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver_runtime.testing import free_port


class Proc:
    def __init__(self, popen: subprocess.Popen, port: int, log: Path, trace: Path | None) -> None:
        self.popen, self.port, self.log, self.trace = popen, port, log, trace
        self.target = f"127.0.0.1:{port}"

    def spans(self) -> list[dict]:
        if self.trace is None or not self.trace.exists():
            return []
        return [json.loads(line) for line in self.trace.read_text().splitlines() if line.strip()]

    def log_lines(self) -> list[dict]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # the plain "listening on" line
        return out


@pytest.fixture
def start(tmp_path):
    """Starts `python -m <module>` on a free port and waits (with a deadline) until its health is SERVING."""
    procs: list[Proc] = []

    def _start(module: str, service: str, name: str, *args: str, trace: bool = True, env: dict | None = None) -> Proc:
        port = free_port()
        data = tmp_path / name
        data.mkdir()
        log = tmp_path / f"{name}.log"
        trace_file = tmp_path / f"{name}-spans.jsonl" if trace else None
        cmd = [sys.executable, "-m", module, "--port", str(port), "--metrics-port", "-1", "--data-dir", str(data),
               "--shutdown-grace-seconds", "2", *args]  # fmt: skip
        if trace_file is not None:
            cmd += ["--trace-file", str(trace_file)]
        # Spans leave through a batch processor: a short schedule delay keeps the waits below short.
        environ = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "OTEL_BSP_SCHEDULE_DELAY": "100", **(env or {})}  # fmt: skip
        with open(log, "wb") as fh:
            popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=environ, cwd=data)
        proc = Proc(popen, port, log, trace_file)
        procs.append(proc)
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(proc.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if popen.poll() is not None:
                    raise AssertionError(f"{module} exited with {popen.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    if (
                        health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        return proc
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"{module} not SERVING after 60 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.05)  # polling interval while waiting for a condition

    yield _start
    for proc in reversed(procs):
        proc.popen.terminate()
    for proc in procs:
        try:
            proc.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()
