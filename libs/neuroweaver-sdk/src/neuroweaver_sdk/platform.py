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
import urllib.request
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


CONSOLE_PORT = 8090  # the web console (HTTP), when started (`make up`)


def console_installed() -> bool:
    try:
        return importlib.util.find_spec("neuroweaver_console.__main__") is not None
    except ModuleNotFoundError:
        return False


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


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
    console: bool = False  # also the web console (services/console) on CONSOLE_PORT, once the services are healthy

    def targets(self) -> dict[str, str]:
        return {name: DEFAULT_TARGETS[name] for name in self.services}

    @property
    def console_url(self) -> str:
        return f"http://127.0.0.1:{CONSOLE_PORT}"

    def start(self, timeout: float = 120.0) -> None:
        for name in self.services:
            host, port = DEFAULT_TARGETS[name].rsplit(":", 1)
            if port_in_use(int(port), host):
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
            if self.console:
                self._start_console(env, logs, timeout)
        except BaseException:
            self.stop()  # never leave half a platform running
            raise

    def _start_console(self, env: dict[str, str], logs: Path, timeout: float) -> None:
        """The console dials the services as the CLI does: their default targets, TLS from `NW_TLS_*` unless its own
        `NW_CONSOLE_CLIENT_TLS_*` are set."""
        if port_in_use(CONSOLE_PORT):
            raise RuntimeError(f"port {CONSOLE_PORT} (console) is already in use")
        env = dict(env)
        for part in ("ca", "cert", "key", "server_name"):
            value = getattr(self.tls, part)
            if value:
                env.setdefault(f"NW_CONSOLE_CLIENT_TLS_{part.upper()}", value)
        log = open(logs / "console.log", "ab")  # noqa: SIM115 - kept open for the child's lifetime
        proc = self.processes["console"] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "neuroweaver_console",
                "--port",
                str(CONSOLE_PORT),
                "--registry-target",
                DEFAULT_TARGETS["registry"],
                "--trainer-target",
                DEFAULT_TARGETS["trainer"],
                "--deployer-target",
                DEFAULT_TARGETS["deployer"],
                "--experiments-target",
                DEFAULT_TARGETS["experiments"],
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"console exited with {proc.returncode}; see {logs}/console.log")
            try:
                with urllib.request.urlopen(f"{self.console_url}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the console did not answer within {timeout:.0f}s")
            time.sleep(0.2)

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
