"""Helpers for cross-service tests: start real service processes, wait on health, build requests from descriptors.

Every wait polls a condition with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver_runtime.testing import free_port

ROOT = Path(__file__).resolve().parents[2]

SERVICES = {
    # short name: (python module, proto module, full service name)
    "registry": (
        "neuroweaver_registry",
        "neuroweaver.registry.v1.registry_service_pb2",
        "neuroweaver.registry.v1.RegistryService",
    ),
    "trainer": ("neuroweaver_trainer", "neuroweaver.trainer.v1.trainer_service_pb2", "neuroweaver.trainer.v1.TrainerService"),
    "deployer": (
        "neuroweaver_deployer",
        "neuroweaver.deployer.v1.deployer_service_pb2",
        "neuroweaver.deployer.v1.DeployerService",
    ),
    "experiments": (
        "neuroweaver_experiments",
        "neuroweaver.experiments.v1.experiments_service_pb2",
        "neuroweaver.experiments.v1.ExperimentsService",
    ),
}

# Example resource names in project `default`, by service and request field.
NAMES = {
    "registry": {
        "parent": "projects/default/models/m1",
        "name": "projects/default/models/m1",
        "model": "projects/default/models/m1",
        "base_version": "projects/default/models/m1/versions/1.0.0",
        "candidate_version": "projects/default/models/m1/versions/1.0.1",
    },
    "trainer": {"parent": "projects/default", "name": "projects/default/trainingJobs/j1"},
    "deployer": {"parent": "projects/default", "name": "projects/default/deployments/d1"},
    "experiments": {
        "parent": "projects/default",
        "name": "projects/default/experiments/e1",
        "experiment": "projects/default/experiments/e1",
    },
}
# Methods whose `parent` is the project itself, or a resource other than the default guess.
PARENT_OVERRIDES = {
    ("registry", "CreateModel"): "projects/default",
    ("registry", "ListModels"): "projects/default",
    ("registry", "CreateJudge"): "projects/default",
    ("registry", "ListJudges"): "projects/default",
    ("registry", "ListModelEvents"): "projects/default",
    ("registry", "WatchModelEvents"): "projects/default",
    ("registry", "CreateJudgeVersion"): "projects/default/judges/j1",
    ("registry", "ListJudgeVersions"): "projects/default/judges/j1",
    ("registry", "GetJudge"): "projects/default/judges/j1",
    ("registry", "GetJudgeVersion"): "projects/default/judges/j1/versions/1",
    ("registry", "GetModelVersion"): "projects/default/models/m1/versions/1.0.0",
    ("registry", "SetModelVersionState"): "projects/default/models/m1/versions/1.0.0",
    ("registry", "AppendModelVersionMetrics"): "projects/default/models/m1/versions/1.0.0",
    ("registry", "GetModelAlias"): "projects/default/models/m1/aliases/prod",
    ("registry", "DeleteModelAlias"): "projects/default/models/m1/aliases/prod",
    ("registry", "RollbackModelAlias"): "projects/default/models/m1/aliases/prod",
    ("registry", "ListModelAliasHistory"): "projects/default/models/m1/aliases/prod",
    ("trainer", "ListTrainingJobEvents"): "projects/default/trainingJobs/j1",
    ("deployer", "ListDeploymentRevisions"): "projects/default/deployments/d1",
}


def service_descriptor(svc: str):
    _, proto_module, full_name = SERVICES[svc]
    module = importlib.import_module(proto_module)
    return next(s for s in module.DESCRIPTOR.services_by_name.values() if s.full_name == full_name)


def message_class(descriptor):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def minimal_request(svc: str, method) -> object:
    """A request naming a resource in project `default` in every top-level resource-name field."""
    request = message_class(method.input_type)()
    names = NAMES[svc]
    for f in method.input_type.fields:
        if f.type == f.TYPE_STRING and not f.is_repeated and f.name in names:
            value = names[f.name]
            if f.name in ("parent", "name") and (svc, method.name) in PARENT_OVERRIDES:
                value = PARENT_OVERRIDES[(svc, method.name)]
            setattr(request, f.name, value)
        elif f.type == f.TYPE_MESSAGE and not f.is_repeated and "name" in f.message_type.fields_by_name:
            getattr(request, f.name).name = names["name"]
    if (svc, method.name) == ("experiments", "IngestEvents"):  # names its experiments only inside the batch
        request.exposures.add(experiment=names["experiment"], unit_id="u1", variant="control", epoch=0)
    return request


def call(channel: grpc.Channel, svc: str, method, request, *, metadata=(), timeout: float = 5.0):
    """Invokes any RPC generically (unary, server- or client-streaming); returns the final status code and the error."""
    _, _, full_name = SERVICES[svc]
    path = f"/{full_name}/{method.name}"
    ser = type(request).SerializeToString
    des = message_class(method.output_type).FromString
    try:
        if method.client_streaming and not method.server_streaming:
            stub = channel.stream_unary(path, request_serializer=ser, response_deserializer=des)
            stub(iter([request]), metadata=metadata, timeout=timeout)
        elif method.server_streaming:
            stub = channel.unary_stream(path, request_serializer=ser, response_deserializer=des)
            for _ in stub(request, metadata=metadata, timeout=timeout):
                pass
        else:
            stub = channel.unary_unary(path, request_serializer=ser, response_deserializer=des)
            stub(request, metadata=metadata, timeout=timeout)
    except grpc.RpcError as err:
        return err.code(), err
    return grpc.StatusCode.OK, None


def reason_of(err) -> str | None:
    from neuroweaver_runtime.grpc_errors import error_info

    if err is None:
        return None
    info = error_info(err)
    return info.reason if info else None


def health_status(port: int, service: str = "", timeout: float = 2.0):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Polls `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling; report the last failure
            last_exc = exc
        time.sleep(interval)  # polling interval while waiting for a condition
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")


@dataclass
class ServiceProcess:
    svc: str
    port: int
    proc: subprocess.Popen
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_serving(self, timeout: float = 90.0) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.svc} exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            return health_status(self.port, SERVICES[self.svc][2], timeout=1.0) == health_pb2.HealthCheckResponse.SERVING

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)  # polling interval while waiting for a condition
        raise AssertionError(f"{self.svc} not SERVING after {timeout}s:\n{self.log_text()[-4000:]}")

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_service(svc: str, workdir: Path, *extra: str, port: int | None = None, env: dict | None = None) -> ServiceProcess:
    """Starts `python -m neuroweaver_<svc>` on a free port with its own data dir and log file (not yet waited on)."""
    port = port or free_port()
    data_dir = workdir / svc
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{svc}.log"
    args = [
        sys.executable,
        "-m",
        SERVICES[svc][0],
        "--port",
        str(port),
        "--metrics-port",
        "-1",
        "--data-dir",
        str(data_dir),
        *extra,
    ]
    proc_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=proc_env, cwd=str(data_dir))
    return ServiceProcess(svc, port, proc, log_path, args)


@contextlib.contextmanager
def service_databases(kind: str, prefix: str):
    """{service: database URL} for a stack on `kind` ("sqlite": {} — each service's default file; "postgres": a fresh
    database per service, dropped on exit). Skips the test when PostgreSQL is not reachable."""
    if kind == "sqlite":
        yield {}
        return
    import asyncio

    import pytest

    from neuroweaver_runtime.testing import create_postgres_database, postgres_available

    if not postgres_available():
        pytest.skip("PostgreSQL is not reachable at NW_TEST_POSTGRES_URL")

    async def create():
        return {svc: await create_postgres_database(f"{prefix}{svc[:3]}") for svc in SERVICES}

    made = asyncio.run(create())
    try:
        yield {svc: url for svc, (url, _) in made.items()}
    finally:

        async def drop_all():
            for _, drop in made.values():
                await drop()

        asyncio.run(drop_all())
