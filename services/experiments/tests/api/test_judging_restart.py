"""Recorded answers survive a crash of the experiments process (SQLite and PostgreSQL).

Process A accepts answers while its judge's endpoint hangs (a socket that accepts and never answers), so A holds
some answers under lease with their judge calls in flight; A is killed (SIGKILL: no clean-up). The real judge server
then comes up on that endpoint and process B starts on the same database: B judges every answer, the ones A had
claimed once their lease expires, and each becomes exactly one score.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver.experiments.v1 import experiment_pb2 as pb
from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as svc_grpc
from neuroweaver_runtime.testing import create_postgres_database, free_port

from .test_judging import llm_judge, make_judge

SERVICE = "neuroweaver.experiments.v1.ExperimentsService"


class Hang:
    """Accepts connections on a port and never answers (a judge that hangs); counts the connections."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the blocked accept (else the listening socket lives on)
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)
        for c in self.conns:
            c.close()


async def start_process(url: str, registry: str, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [
        sys.executable, "-m", "neuroweaver_experiments", "--port", str(port), "--metrics-port", str(free_port()),
        "--database-url", url, "--registry-target", registry, "--deployer-target", "127.0.0.1:1",
        "--judge-lease-seconds", "2",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    target = f"127.0.0.1:{port}"
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):  # until SERVING (migrations included); at most ~60 s
            assert proc.poll() is None, "the experiments process exited"
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return proc, target
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("the experiments process did not become SERVING")


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_killed_process_loses_no_accepted_answer(kind, registry):
    from neuroweaver_ml.rlaif.judge_server import JudgeServer

    drop = None
    if kind == "postgres":
        url, drop = await create_postgres_database("nwexpjr")
    else:
        url = f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='nw-exp-jr-')}/experiments.db"
    judge_port = free_port()
    hang = Hang(judge_port)
    log = tempfile.TemporaryFile()
    procs: list[subprocess.Popen] = []
    try:
        version = llm_judge(f"http://127.0.0.1:{judge_port}/v1")
        version.openai.timeout_seconds = 600
        judge = await make_judge(registry, version)
        a, target = await start_process(url, registry.target, log)
        procs.append(a)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = svc_grpc.ExperimentsServiceStub(channel)
            exp = await stub.CreateExperiment(
                svc.CreateExperimentRequest(
                    parent="projects/default",
                    experiment_id="restart",
                    experiment=pb.Experiment(
                        variants=[
                            pb.Variant(id="control", model_version="projects/default/models/m/versions/1", weight=0.5),
                            pb.Variant(id="treatment", model_version="projects/default/models/m/versions/2", weight=0.5),
                        ],
                        primary_metric=pb.MetricSpec(name="score", kind=pb.METRIC_KIND_MEAN),
                        answer_judging=pb.AnswerJudging(judge_version=f"{judge}/versions/1", metric="score", max_concurrency=2),
                    ),
                )
            )
            await stub.StartExperiment(svc.StartExperimentRequest(name=exp.name))
            units = [f"u{i}" for i in range(6)]
            await stub.BatchAssignVariants(svc.BatchAssignVariantsRequest(experiment=exp.name, unit_ids=units))
            reply = await stub.RecordAnswers(
                svc.RecordAnswersRequest(
                    experiment=exp.name,
                    answers=[
                        svc.Answer(unit_id=u, prompt="How often do I rotate tires?", answer="every 5,000 miles", reference="every 5,000 miles")
                        for u in units
                    ],
                )
            )  # fmt: skip
            assert (reply.accepted, reply.sampled) == (6, 6)
            for _ in range(600):  # A's judge calls reach the hanging endpoint: A holds those answers under lease
                if len(hang.conns) >= 2:
                    break
                await asyncio.sleep(0.1)
            assert len(hang.conns) >= 2
        a.send_signal(signal.SIGKILL)
        a.wait(30)
        hang.close()

        with JudgeServer(port=judge_port) as server:
            b, target = await start_process(url, registry.target, log)
            procs.append(b)
            async with grpc.aio.insecure_channel(target) as channel:
                stub = svc_grpc.ExperimentsServiceStub(channel)
                for _ in range(1200):  # B judges all six (A's leased ones after their lease expires)
                    status = (await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))).judging
                    if status.scored + status.failed == 6:
                        break
                    await asyncio.sleep(0.1)
                assert (status.received, status.sampled, status.scored, status.failed, status.pending) == (6, 6, 6, 0, 0)
                results = await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))
                assert sum(v.units for v in results.primary.variants) == 6
            assert len(server.state.contents()) == 6  # each answer judged once by the live judge
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        hang.close()
        log.seek(0)
        output = log.read().decode(errors="replace")
        log.close()
        if drop:
            await drop()
    assert "Traceback" not in output, output[-3000:]
