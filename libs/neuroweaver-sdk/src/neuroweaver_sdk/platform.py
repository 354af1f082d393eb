"""Starts the NeuroWeaver services as local processes (embedded default: SQLite, local executors).

Used by `make up` (foreground until Ctrl-C) and by the demo; every child gets SIGTERM on exit, so
nothing is left running. With TLS on (the services' `NW_<SVC>_TLS_*` in the environment), the health
checks dial with `NW_TLS_*` like the CLI.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver_runtime.client import ClientTLS, ServiceClient

from .clients import DEFAULT_TARGETS

SERVICES = {
    "registry": "neuroweaver.registry.v1.RegistryService",
    "trainer": "neuroweaver.trainer.v1.TrainerService",
    "deployer": "neuroweaver.deployer.v1.DeployerService",
    "experiments": "neuroweaver.experiments.v1.ExperimentsService",
}


def installed_services() -> list[str]:
    """Services whose package has a `__main__` (so `python -m neuroweaver_<name>` runs)."""
    found = []
    for name in SERVICES:
        try:
            if importlib.util.find_spec(f"neuroweaver_{name}.__main__") is not None:
                found.append(name)
        except ModuleNotFoundError:
            pass
    return found


@dataclass
class LocalPlatform:
    data_dir: Path
    services: list[str] = field(default_factory=installed_services)
    extra_env: dict[str, str] = field(default_factory=dict)  # environment of every service, e.g. NW_<SVC>_* settings
    tls: ClientTLS = field(default_factory=lambda: ClientTLS.from_env("NW_"))  # how the health checks dial
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def targets(self) -> dict[str, str]:
        return {name: DEFAULT_TARGETS[name] for name in self.services}

    def start(self, timeout: float = 120.0) -> None:
        for name in self.services:
            host, port = DEFAULT_TARGETS[name].rsplit(":", 1)
            with socket.socket() as sock:
                if sock.connect_ex((host, int(port))) == 0:
                    raise RuntimeError(
                        f"port {port} ({name}) is already in use: is another NeuroWeaver running? (`make up` stops with Ctrl-C)"
                    )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        logs = self.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        env = {**os.environ, "NW_DATA_DIR": str(self.data_dir), **self.extra_env}
        for name in self.services:
            port = DEFAULT_TARGETS[name].rsplit(":", 1)[1]
            log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - kept open for the child's lifetime
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", f"neuroweaver_{name}", "--port", port],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            asyncio.run(self._wait_healthy(timeout))
        except BaseException:
            self.stop()  # never leave half a platform running
            raise

    async def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for name in self.services:
            async with ServiceClient(DEFAULT_TARGETS[name], deadline=None, tls=self.tls) as client:
                stub = client.stub(health_pb2_grpc.HealthStub)
                while True:
                    proc = self.processes[name]
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.data_dir}/logs/{name}.log")
                    try:
                        resp = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICES[name]), timeout=2)
                        if resp.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.aio.AioRpcError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{name} did not become healthy within {timeout:.0f}s")
                    await asyncio.sleep(0.2)

    def stop(self, grace: float = 20.0) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.processes.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.processes.clear()

    def __enter__(self) -> LocalPlatform:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
