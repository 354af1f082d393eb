"""PostgreSQL restarts under load: registry and experiments (real processes) on a throw-away PostgreSQL cluster.

A client loop keeps creating (with request_id, retried with the same id until acknowledged) and reading; the
cluster is stopped mid-loop and started again. The services are never restarted: health must come back SERVING,
calls must succeed again within a bound, every acknowledged write must be there afterwards, and every failure
during the outage must be UNAVAILABLE (retryable), never INTERNAL.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from nwstack import SERVICES, health_status, start_service, wait_for

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.experiments.v1 import experiment_pb2 as epb
from neuroweaver.experiments.v1 import experiments_service_pb2 as es
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as eg
from neuroweaver.registry.v1 import registry_service_pb2 as rs
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rg
from neuroweaver_runtime.testing import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
RECOVERY_BOUND_S = 30.0


def _as_postgres(*cmd: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)


@pytest.fixture(scope="module")
def cluster():
    if not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL 15 binaries not installed")
    base = Path(tempfile.mkdtemp(prefix="nw-pgrestart-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    port = free_port()
    subprocess.run(_as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-N"),
                   check=True, capture_output=True)  # fmt: skip
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"

    def pg_ctl(*args: str) -> None:
        subprocess.run(_as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(base / "pg.log"), "-w", *args),
                       check=True, capture_output=True, timeout=60)  # fmt: skip

    pg_ctl("start")

    async def create_dbs():
        import asyncpg

        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres")
        for db in ("registry", "experiments"):
            await conn.execute(f'CREATE DATABASE "{db}"')
        await conn.close()

    asyncio.run(create_dbs())
    try:
        yield port, pg_ctl
    finally:
        subprocess.run(
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"), capture_output=True, timeout=60
        )
        shutil.rmtree(base, ignore_errors=True)


class Load:
    """Creates models and experiments one after another; an unacknowledged create is retried with the same request_id."""

    def __init__(self, registry_target: str, experiments_target: str) -> None:
        self.reg = rg.RegistryServiceStub(grpc.insecure_channel(registry_target))
        self.exp = eg.ExperimentsServiceStub(grpc.insecure_channel(experiments_target))
        self.acked_models: list[str] = []
        self.acked_experiments: list[str] = []
        self.failures: list[tuple[str, grpc.StatusCode, str]] = []
        self.successes_after: dict[str, float] = {}
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def _op(self, what: str, fn):
        try:
            result = fn()
        except grpc.RpcError as err:
            with self.lock:
                self.failures.append((what, err.code(), err.details() or ""))
            return None
        return result

    def run(self) -> None:
        i = 0
        pending_model = pending_exp = None
        while not self.stop.is_set():
            i += 1
            if pending_model is None:
                pending_model = (f"m-{i}", str(uuid.uuid4()))
            model_id, rid = pending_model
            created = self._op("CreateModel", lambda model_id=model_id, rid=rid: self.reg.CreateModel(
                rs.CreateModelRequest(parent="projects/default", model_id=model_id, request_id=rid), timeout=5))  # fmt: skip
            if created is not None:
                with self.lock:
                    self.acked_models.append(created.name)
                pending_model = None
                self._op("GetModel", lambda name=created.name: self.reg.GetModel(rs.GetModelRequest(name=name), timeout=5))
            if pending_exp is None:
                pending_exp = (f"e-{i}", str(uuid.uuid4()))
            exp_id, erid = pending_exp
            exp = epb.Experiment(
                display_name="restart",
                variants=[epb.Variant(id="control", model_version="projects/default/models/m/versions/1.0.0", weight=0.5),
                          epb.Variant(id="treatment", model_version="projects/default/models/m/versions/1.0.1", weight=0.5)],
                primary_metric=epb.MetricSpec(name="score", kind=epb.METRIC_KIND_MEAN, direction=cpb.METRIC_DIRECTION_HIGHER_IS_BETTER),
            )  # fmt: skip
            made = self._op("CreateExperiment", lambda exp_id=exp_id, exp=exp, erid=erid: self.exp.CreateExperiment(
                es.CreateExperimentRequest(parent="projects/default", experiment_id=exp_id, experiment=exp, request_id=erid), timeout=5))  # fmt: skip
            if made is not None:
                with self.lock:
                    self.acked_experiments.append(made.name)
                pending_exp = None
                self._op(
                    "ListExperiments",
                    lambda: self.exp.ListExperiments(
                        es.ListExperimentsRequest(parent="projects/default", page_size=5), timeout=5
                    ),
                )


@pytest.fixture(scope="module")
def restart_run(cluster, tmp_path_factory):
    """Runs the scenario once; the tests below assert on its outcome."""
    port, pg_ctl = cluster
    tmp_path = tmp_path_factory.mktemp("pgrestart")
    base = f"postgresql+asyncpg://postgres@127.0.0.1:{port}"
    registry = start_service("registry", tmp_path, "--database-url", f"{base}/registry")
    experiments = start_service(
        "experiments", tmp_path, "--database-url", f"{base}/experiments", "--registry-target", registry.target
    )
    load = None
    try:
        registry.wait_serving()
        experiments.wait_serving()
        load = Load(registry.target, experiments.target)
        worker = threading.Thread(target=load.run, daemon=True)
        worker.start()
        wait_for(lambda: len(load.acked_models) >= 5 and len(load.acked_experiments) >= 5, 60, "writes before the outage")

        pg_ctl("-m", "fast", "stop")
        before = len(load.failures)
        wait_for(lambda: len(load.failures) >= before + 4, 30, "calls failing during the outage")
        pg_ctl("start")
        restarted = time.monotonic()
        models_then, exps_then = len(load.acked_models), len(load.acked_experiments)
        wait_for(lambda: len(load.acked_models) > models_then + 3 and len(load.acked_experiments) > exps_then + 3,
                 RECOVERY_BOUND_S, "writes succeeding again after the restart")  # fmt: skip
        recovered_in = time.monotonic() - restarted
        load.stop.set()
        worker.join(30)
        print(f"acked {len(load.acked_models)} models, {len(load.acked_experiments)} experiments; "
              f"{len(load.failures)} failed calls during the outage; recovered {recovered_in:.1f}s after PostgreSQL restarted")  # fmt: skip
        yield load, registry, experiments
    finally:
        if load is not None:
            load.stop.set()
        registry.stop()
        experiments.stop()


def test_services_recover_without_restart_and_keep_every_acknowledged_write(restart_run):
    load, registry, experiments = restart_run
    for p in (registry, experiments):
        assert p.proc.poll() is None, f"{p.svc} exited:\n{p.log_text()[-3000:]}"
        assert wait_for(
            lambda p=p: health_status(p.port, SERVICES[p.svc][2]) == health_pb2.HealthCheckResponse.SERVING, 10, "SERVING"
        )
    assert load.failures, "the outage produced no failed call: the test did not test anything"
    # Never a client-error code for a database outage (that would tell clients not to retry).
    allowed = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL}
    assert {code for _, code, _ in load.failures} <= allowed, load.failures[:10]
    for name in load.acked_models:
        assert load.reg.GetModel(rs.GetModelRequest(name=name), timeout=10).name == name
    for name in load.acked_experiments:
        assert load.exp.GetExperiment(es.GetExperimentRequest(name=name), timeout=10).name == name


def test_outage_failures_are_unavailable_not_internal(restart_run):
    load, _, _ = restart_run
    bad = [(what, code.name, details) for what, code, details in load.failures if code != grpc.StatusCode.UNAVAILABLE]
    assert not bad, f"{len(bad)} of {len(load.failures)} outage failures were not UNAVAILABLE: {bad[:5]}"
