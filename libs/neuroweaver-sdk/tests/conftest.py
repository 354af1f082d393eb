"""A real experiments server process (SQLite file) that tests can kill and start again on the same port and database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver_runtime.testing import free_port

SERVICE = "neuroweaver.experiments.v1.ExperimentsService"


class ExperimentsProcess:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.db = work / "experiments.db"
        self.popen: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.work / f"experiments-{self.starts}.log"
        unused = f"127.0.0.1:{free_port()}"  # no deployments in these tests: the deployer and registry are never called
        cmd = [sys.executable, "-m", "neuroweaver_experiments", "--port", str(self.port), "--metrics-port", "-1",
               "--data-dir", str(self.work), "--database-url", f"sqlite+aiosqlite:///{self.db}",
               "--deployer-target", unused, "--registry-target", unused, "--shutdown-grace-seconds", "2"]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as fh:
            self.popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=self.work)
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.popen.poll() is not None:
                    raise AssertionError(f"experiments exited with {self.popen.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"experiments not SERVING after 60 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.05)  # polling interval while waiting for the process

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """SIGKILL: no graceful stop, transactions in flight are lost (what a crash does); SIGTERM: a graceful stop
        (open streams end UNAVAILABLE)."""
        assert self.popen is not None
        self.popen.send_signal(sig)
        self.popen.wait(timeout=30)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@pytest.fixture(scope="module")
def experiments_server(tmp_path_factory):
    proc = ExperimentsProcess(tmp_path_factory.mktemp("nw-sdk-exp"))
    proc.start()
    yield proc
    proc.stop()
