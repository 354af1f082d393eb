"""GetModelVersion / CreateModelVersion: NeuroWeaver registry (gRPC) vs MLflow's model registry (REST), same run.

Both servers run as their own single process on the same PostgreSQL; one async client drives both with the
same closed-loop pattern (C concurrent callers share a fixed count of requests), then an open-loop test sends
GetModelVersion to the registry at a fixed rate and reports latency measured from each request's scheduled time.

    .venv/bin/python bench/registry/bench_registry.py --mlflow /tmp/mlflow-venv/bin/mlflow
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.registry.v1 import registry_pb2 as pb
from neuroweaver.registry.v1 import registry_service_pb2 as rs
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rs_grpc
from neuroweaver_runtime.testing import ADMIN_URL, free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import h2load_grpc  # noqa: E402

SHA = "ab" * 32


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.contextmanager
def client_gc_paused():
    """The load generator's own garbage collector must not show up as server latency: a gen-2 collection of this
    client's heap paused it for 40-55 ms once per 10 s open-loop window (and latency counts from the schedule)."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


async def closed_loop(call, total: int, concurrency: int) -> dict:
    latencies: list[float] = []
    remaining = total

    async def worker():
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    with client_gc_paused():
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"rps": total / elapsed, "p50_ms": pct(latencies, 0.5) * 1e3, "p99_ms": pct(latencies, 0.99) * 1e3}


async def open_loop(call, rate: float, seconds: float) -> dict:
    """Requests start on a fixed schedule whatever the server does; latency counts from the scheduled start.

    Times come from time.perf_counter: uvloop's loop.time() is libuv's cached millisecond clock.
    """
    n = int(rate * seconds)
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def one(at: float):
        try:
            await call()
        except Exception as exc:  # noqa: BLE001 - counted by kind and reported
            kind = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
            errors[kind] = errors.get(kind, 0) + 1
            return
        latencies.append(time.perf_counter() - at)

    tasks = []
    with client_gc_paused():
        start = time.perf_counter() + 0.05  # after the client's collection, which takes tens of ms
        for i in range(n):  # a dispatcher starts each request at its scheduled time (no pile of sleeping tasks)
            at = start + i / rate
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(at)))
        await asyncio.gather(*tasks)
        achieved = n / (time.perf_counter() - start)
    return {
        "target_rps": rate, "achieved_rps": achieved, "errors": sum(errors.values()), "error_kinds": errors,
        "p50_ms": pct(latencies, 0.5) * 1e3 if latencies else None, "p99_ms": pct(latencies, 0.99) * 1e3 if latencies else None,
    }  # fmt: skip


async def create_db(prefix: str) -> tuple[str, str]:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(ADMIN_URL)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    return name, ADMIN_URL.rsplit("/", 1)[0] + "/" + name


async def drop_db(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


async def wait_for(check, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{what} did not start")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mlflow", default="/tmp/mlflow-venv/bin/mlflow")
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--create-requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--open-rate", type=float, default=1000)
    ap.add_argument("--open-seconds", type=float, default=10)
    ap.add_argument("--open-repeats", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    reg_db, reg_url = await create_db("bench_reg")
    ml_db, ml_url = await create_db("bench_mlflow")
    reg_port, nocache_port, ml_port = free_port(), free_port(), free_port()
    procs = []
    load = {"start": os.getloadavg()}
    try:
        # `python -m neuroweaver_registry` installs uvloop (its __main__). A second replica on the same database
        # (started once the first has migrated it) runs without the version cache: the uncached read path.
        def start_registry(port: int, *extra: str) -> None:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "neuroweaver_registry", "--port", str(port), "--metrics-port", "-1",
                 "--database-url", reg_url, "--log-level", "WARNING", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip

        start_registry(reg_port)
        procs.append(subprocess.Popen(
            [args.mlflow, "server", "--backend-store-uri", ml_url.replace("postgresql://", "postgresql+psycopg2://", 1), "--host", "127.0.0.1", "--port", str(ml_port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/tmp",
        ))  # fmt: skip
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{reg_port}")
        stub = rs_grpc.RegistryServiceStub(channel)
        nocache_channel = grpc.aio.insecure_channel(f"127.0.0.1:{nocache_port}")
        nocache_stub = rs_grpc.RegistryServiceStub(nocache_channel)

        def reg_up_on(ch):
            health = health_pb2_grpc.HealthStub(ch)

            async def up():
                r = await health.Check(
                    health_pb2.HealthCheckRequest(service="neuroweaver.registry.v1.RegistryService"), timeout=1
                )
                return r.status == health_pb2.HealthCheckResponse.SERVING

            return up

        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        base = f"http://127.0.0.1:{ml_port}/api/2.0/mlflow"

        async def ml_up():
            async with http.get(f"http://127.0.0.1:{ml_port}/health") as r:
                return r.status == 200

        await wait_for(reg_up_on(channel), "registry")
        start_registry(nocache_port, "--version-cache-size", "0", "--no-migrate")
        await wait_for(reg_up_on(nocache_channel), "registry (no cache)")
        await wait_for(ml_up, "mlflow", 240)

        # seed: one model with one version on each side
        model = await stub.CreateModel(rs.CreateModelRequest(parent="projects/default", model_id="bench", model=pb.Model()))
        art = pb.Artifact(uri="file:///tmp/adapter", sha256=SHA, size_bytes=1)
        await stub.CreateModelVersion(
            rs.CreateModelVersionRequest(parent=model.name, version="1.0.0", model_version=pb.ModelVersion(artifact=art))
        )
        async with http.post(f"{base}/registered-models/create", json={"name": "bench"}) as r:
            assert r.status == 200, await r.text()
        async with http.post(f"{base}/model-versions/create", json={"name": "bench", "source": "s3://bench/adapter"}) as r:
            assert r.status == 200, await r.text()

        get_req = rs.GetModelVersionRequest(name=model.name + "/versions/1.0.0")

        async def reg_get():
            await stub.GetModelVersion(get_req)

        async def reg_get_nocache():
            await nocache_stub.GetModelVersion(get_req)

        async def ml_get():
            async with http.get(f"{base}/model-versions/get", params={"name": "bench", "version": "1"}) as r:
                if r.status != 200:
                    raise RuntimeError(await r.text())
                await r.read()

        create_req = rs.CreateModelVersionRequest(
            parent=model.name, bump=cpb.VERSION_BUMP_PATCH, model_version=pb.ModelVersion(artifact=art)
        )

        async def reg_create():
            await stub.CreateModelVersion(create_req)

        async def ml_create():
            async with http.post(f"{base}/model-versions/create", json={"name": "bench", "source": "s3://bench/adapter"}) as r:
                if r.status != 200:
                    raise RuntimeError(await r.text())
                await r.read()

        # warm up both
        await closed_loop(reg_get, 500, args.concurrency)
        await closed_loop(reg_get_nocache, 500, args.concurrency)
        await closed_loop(ml_get, 200, args.concurrency)

        kinds = ("registry_get", "registry_get_nocache", "mlflow_get", "registry_create", "mlflow_create")
        results: dict[str, list[dict]] = {k: [] for k in kinds}
        for _ in range(args.repeats):  # interleaved so drift hits both peers alike
            results["registry_get"].append(await closed_loop(reg_get, args.requests, args.concurrency))
            print("registry get", results["registry_get"][-1], file=sys.stderr)
            results["registry_get_nocache"].append(await closed_loop(reg_get_nocache, args.requests, args.concurrency))
            print("registry get (no cache)", results["registry_get_nocache"][-1], file=sys.stderr)
            results["mlflow_get"].append(await closed_loop(ml_get, args.requests // 4, args.concurrency))
            results["registry_create"].append(await closed_loop(reg_create, args.create_requests, args.concurrency))
            results["mlflow_create"].append(await closed_loop(ml_create, args.create_requests // 4, args.concurrency))
            print("mlflow get", results["mlflow_get"][-1], file=sys.stderr)
            print(
                "registry create", results["registry_create"][-1], "mlflow create", results["mlflow_create"][-1], file=sys.stderr
            )
        load["after_closed_loop"] = os.getloadavg()
        open_runs, open_nocache = [], []
        # Cached repeats first: the uncached replica is overloaded at this rate and its backlog would spill into them.
        for _ in range(args.open_repeats):
            open_runs.append(await open_loop(reg_get, args.open_rate, args.open_seconds))
            print("open loop", open_runs[-1], file=sys.stderr)
        # The same open loop from h2load (C, a fraction of the client CPU, no client GC): what the server does.
        h2_runs: list[dict] = []
        if h2load_grpc.available():
            body = h2load_grpc.write_body(get_req, Path(tempfile.mkdtemp(prefix="nw-bench-reg-")) / "get.bin")
            method = "/neuroweaver.registry.v1.RegistryService/GetModelVersion"
            for _ in range(args.open_repeats):
                h2_runs.append(
                    h2load_grpc.fixed_rate(f"127.0.0.1:{reg_port}", method, body, int(args.open_rate), args.open_seconds)
                )
                print("open loop (h2load)", h2_runs[-1], file=sys.stderr)
        for _ in range(args.repeats):
            open_nocache.append(await open_loop(reg_get_nocache, args.open_rate, args.open_seconds))
            print("open loop (no cache)", open_nocache[-1], file=sys.stderr)
        load["end"] = os.getloadavg()

        await http.close()
        await channel.close()
        await nocache_channel.close()

        def med(runs: list[dict], key: str) -> float:
            return statistics.median(r[key] for r in runs)

        summary = {k: {m: med(v, m) for m in ("rps", "p50_ms", "p99_ms")} for k, v in results.items()}
        open_keys = ("target_rps", "achieved_rps", "p50_ms", "p99_ms", "errors")
        summary["registry_get_open_loop"] = {m: med(open_runs, m) for m in open_keys}
        summary["registry_get_nocache_open_loop"] = {m: med(open_nocache, m) for m in open_keys}
        if h2_runs:
            summary["registry_get_open_loop_h2load"] = {m: med(h2_runs, m) for m in ("requests", "p50_ms", "p99_ms", "max_ms")}
        summary["ratios"] = {
            "get_throughput_registry_over_mlflow": summary["registry_get"]["rps"] / summary["mlflow_get"]["rps"],
            "get_throughput_registry_nocache_over_mlflow": summary["registry_get_nocache"]["rps"] / summary["mlflow_get"]["rps"],
            "create_throughput_registry_over_mlflow": summary["registry_create"]["rps"] / summary["mlflow_create"]["rps"],
        }
        summary["runs"] = {
            **results,
            "registry_get_open_loop": open_runs,
            "registry_get_nocache_open_loop": open_nocache,
            "registry_get_open_loop_h2load": h2_runs,
        }
        summary["machine"] = {**machine(args.mlflow), "load_average": load}
        summary["settings"] = vars(args)
        text = json.dumps(summary, indent=2)
        print(text)
        if args.json:
            Path(args.json).write_text(text)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        await drop_db(reg_db)
        await drop_db(ml_db)


def machine(mlflow_bin: str) -> dict:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "?"
    )
    mlflow_version = subprocess.run([mlflow_bin, "--version"], capture_output=True, text=True).stdout.strip()
    pg = subprocess.run(["psql", ADMIN_URL, "-Atc", "show server_version"], capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "grpcio": grpc.__version__,
        "mlflow": mlflow_version, "postgresql": pg or "15",
    }  # fmt: skip


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
