"""Replicas starting together on a fresh PostgreSQL database migrate one at a time (the runtime's advisory lock):
both become SERVING, the schema reaches head once, neither log shows a failed migration."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from alembic.script import ScriptDirectory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from neuroweaver_registry.app import MIGRATIONS, SERVICE_NAME
from neuroweaver_runtime import migrations
from neuroweaver_runtime.testing import create_postgres_database, free_port

pytestmark = pytest.mark.postgres

HEAD = ScriptDirectory.from_config(migrations.alembic_config("sqlite://", MIGRATIONS)).get_current_head()
# What a lost race leaves in a log: Alembic creating a table or stamping a revision the other replica already did.
RACE_SIGNS = ("already exists", "DuplicateTable", "UniqueViolation", "Traceback")


async def _versions(url: str) -> list[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return [r[0] for r in await conn.execute(text("SELECT version_num FROM alembic_version"))]
    finally:
        await engine.dispose()


async def _serving(port: int, proc: subprocess.Popen, deadline: float) -> bool:
    """Polls grpc.health.v1 until SERVING; False when the process exits or the deadline passes."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)  # polling interval while waiting for a condition
    return False


async def _start_two_replicas(url: str, tmp: Path) -> list[str]:
    """Starts two registry processes on `url` at once; returns their logs after both were SERVING (or failed)."""
    procs, ports, logs = [], [], []
    tmp.mkdir()
    for i in range(2):
        port, log = free_port(), tmp / f"replica-{i}.log"
        ports.append(port)
        logs.append(log)
        with log.open("w") as out:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "neuroweaver_registry",
                        "--database-url",
                        url,
                        "--port",
                        str(port),
                        "--metrics-port",
                        str(free_port()),
                        "--data-dir",
                        str(tmp / f"data-{i}"),
                        "--shutdown-grace-seconds",
                        "2",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    cwd=tmp,
                )  # fmt: skip
            )
    try:
        deadline = time.monotonic() + 90
        serving = await asyncio.gather(*(_serving(port, proc, deadline) for port, proc in zip(ports, procs, strict=True)))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    texts = [log.read_text(errors="replace") for log in logs]
    for ok, log_text in zip(serving, texts, strict=True):
        assert ok, f"a replica did not become SERVING:\n{log_text[-4000:]}"
    return texts


async def test_two_replicas_starting_together_migrate_a_fresh_database_once(tmp_path):
    for round_ in range(3):  # every round is a fresh database: a race, if there were one, gets three chances
        url, drop = await create_postgres_database("nwmiglock")
        try:
            logs = await _start_two_replicas(url, tmp_path / f"round-{round_}")
            for log_text in logs:
                assert not [sign for sign in RACE_SIGNS if sign in log_text], log_text[-4000:]
            assert await _versions(url) == [HEAD]
        finally:
            await drop()


UPGRADE_AFTER_GO = """
import sys
from neuroweaver_runtime import migrations
print("ready", flush=True)
sys.stdin.readline()
migrations.upgrade(sys.argv[1], sys.argv[2])
"""


async def test_upgrades_released_at_the_same_instant_wait_for_each_other():
    """Four processes import everything, then start `upgrade` together (tighter than server starts; Alembic's
    module-global context rules out threads): all succeed, head is stamped once."""
    url, drop = await create_postgres_database("nwmiglock")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", UPGRADE_AFTER_GO, url, MIGRATIONS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for _ in range(4)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:  # the barrier: every process is blocked on stdin until now
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [await asyncio.to_thread(proc.communicate, timeout=90) for proc in procs]
        for proc, (out, _) in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, out[-4000:]
        assert await _versions(url) == [HEAD]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        await drop()


def test_the_lock_key_is_stable_and_per_service():
    key = migrations.migration_lock_key(MIGRATIONS)
    assert key == migrations.migration_lock_key(str(Path(MIGRATIONS) / ".." / "migrations"))
    assert -(2**63) <= key < 2**63
    assert key != migrations.migration_lock_key("/elsewhere/neuroweaver_trainer/migrations")
