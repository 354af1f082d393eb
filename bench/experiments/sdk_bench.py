"""Local evaluation SDK (neuroweaver_sdk.experiments.LocalExperiments) vs the GrowthBook Python SDK, and end-to-end
exposure logging through IngestEvents.

1. Evaluation: the same experiment config (seed, weights, coverage, hash v2) and the same units in both SDKs, in one
   run. Every unit's (variant, in_experiment) is checked identical before anything is reported. Timed per call
   (perf_counter_ns around each evaluation): evaluations/s over the loop and p50/p99 per evaluation. Our SDK's first
   evaluation of an in-coverage unit also queues its exposure (what it must do); GrowthBook runs without a tracking
   callback. Returning units (sticky) are timed separately.
2. Exposure logging: a producer paced at `--rate` new units/s (default 50,000) for `--seconds`, every unit a first
   exposure (coverage 1), sent in batches over IngestEvents to the real `python -m neuroweaver_experiments` process;
   after the flush the store must hold exactly one assignment per unit (no loss, no double count).
3. Server capacity: `--capacity-batches` prebuilt batches of `--batch` first exposures sent over one IngestEvents
   stream as fast as the server acknowledges them (no SDK producer sharing the machine); every one must be stored.

The server runs pinned to CPU 0 and this process to CPU 1 when the machine has 2+ cores.

    .venv/bin/python bench/experiments/sdk_bench.py [--units 50000] [--rate 50000] [--seconds 10] [--postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid

import growthbook
import grpc
from growthbook import Experiment, GrowthBook
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.experiments.v1 import experiment_pb2 as pb
from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as svc_grpc
from neuroweaver_runtime.assignment import PhasedPlan
from neuroweaver_runtime.client import open_channel
from neuroweaver_runtime.testing import create_postgres_database, free_port
from neuroweaver_sdk.experiments import LocalExperiments

SEED = "bench-experiment"
WEIGHTS = [0.2, 0.3, 0.5]
COVERAGE = 0.9
IDS = ["control", "t1", "t2"]


def _pin(cpu: int) -> None:
    try:
        os.sched_setaffinity(0, {cpu % (os.cpu_count() or 1)})
    except (AttributeError, OSError):
        pass


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def start_server(work: str, database_url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "neuroweaver_experiments", "--port", str(port), "--metrics-port", "-1",
           "--data-dir", work, "--database-url", database_url, "--deployer-target", f"127.0.0.1:{free_port()}",
           "--registry-target", f"127.0.0.1:{free_port()}"]  # fmt: skip
    if (os.cpu_count() or 1) < 2:
        cmd = cmd[3:]
    log = open(os.path.join(work, "experiments.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    target = f"127.0.0.1:{port}"
    with grpc.insecure_channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for _ in range(1200):
            try:
                if health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == 1:
                    return proc, target
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise SystemExit("experiments server did not start")


async def create(stub, weights, coverage, seed) -> pb.Experiment:
    exp = pb.Experiment(
        hash_seed=seed,
        coverage=coverage,
        variants=[
            pb.Variant(id=IDS[i], model_version=f"projects/default/models/m/versions/1.0.{i}", weight=w)
            for i, w in enumerate(weights)
        ],
        primary_metric=pb.MetricSpec(name="score", kind=pb.METRIC_KIND_MEAN, direction=cpb.METRIC_DIRECTION_HIGHER_IS_BETTER),
    )
    created = await stub.CreateExperiment(
        svc.CreateExperimentRequest(parent="projects/default", experiment_id="b-" + uuid.uuid4().hex[:10], experiment=exp)
    )
    return await stub.StartExperiment(svc.StartExperimentRequest(name=created.name))


def pct(samples: list[int], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] / 1000.0  # ns -> µs


def growthbook_eval(units: list[str]) -> tuple[list[tuple[str, bool]], list[int], float]:
    gb = GrowthBook(attributes={})
    exp = Experiment(key=SEED, variations=IDS, weights=WEIGHTS, coverage=COVERAGE, hashVersion=2, seed=SEED)
    out, lat = [], []
    clock = time.perf_counter_ns
    t0 = time.perf_counter()
    for u in units:
        a = clock()
        gb.set_attributes({"id": u})
        r = gb.run(exp)
        lat.append(clock() - a)
        out.append((r.value, r.inExperiment))
    return out, lat, time.perf_counter() - t0


async def sdk_eval(sdk: LocalExperiments, name: str, units: list[str]) -> tuple[list[tuple[str, bool]], list[int], float]:
    out, lat = [], []
    clock = time.perf_counter_ns
    t0 = time.perf_counter()
    for u in units:
        a = clock()
        r = await sdk.assign(name, u)
        lat.append(clock() - a)
        out.append((r.variant, r.in_experiment))
    return out, lat, time.perf_counter() - t0


async def run(args) -> None:
    work = tempfile.mkdtemp(prefix="nw-sdk-bench-")
    drop = None
    db_path = None
    if args.postgres:
        url, drop = await create_postgres_database("nwsdkbench")
        args.pg_dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    else:
        db_path = os.path.join(work, "experiments.db")
        url = f"sqlite+aiosqlite:///{db_path}"
    proc, target = start_server(work, url)
    _pin(1)
    channel = open_channel(target)
    stub = svc_grpc.ExperimentsServiceStub(channel)
    try:
        # -- 1. evaluation vs GrowthBook --------------------------------------------------------------------
        exp = await create(stub, WEIGHTS, COVERAGE, SEED)
        units = [f"user-{i:08d}" for i in range(args.units)]
        rows = []
        async with LocalExperiments(stub, batch_size=5000) as sdk:
            await sdk.wait_for_config(lambda s: s.config(exp.name) is not None)
            rounds = []
            exposed = 0
            for r in range(args.rounds):
                prefix = f"r{r}-"
                batch = [prefix + u for u in units]
                gb_out, gb_lat, gb_s = growthbook_eval(batch)
                sdk_out, sdk_lat, sdk_s = await sdk_eval(sdk, exp.name, batch)
                assert sdk_out == gb_out, "SDK and GrowthBook disagree"
                ret_out, ret_lat, ret_s = await sdk_eval(sdk, exp.name, batch)  # returning units
                assert ret_out == gb_out
                exposed += sum(1 for _, inside in gb_out if inside)
                rounds.append((len(batch) / gb_s, pct(gb_lat, 0.5), pct(gb_lat, 0.99),
                               len(batch) / sdk_s, pct(sdk_lat, 0.5), pct(sdk_lat, 0.99),
                               len(batch) / ret_s, pct(ret_lat, 0.5), pct(ret_lat, 0.99)))  # fmt: skip
            await sdk.flush()
            stored = await count_assignments(args, db_path, exp.name)
            assert stored == exposed, (stored, exposed)
        rows = rounds

        # -- 2. exposure logging at a paced rate ----------------------------------------------------------
        exp2 = await create(stub, [0.5, 0.5], 1.0, "bench-ingest")
        total = int(args.rate * args.seconds)
        async with LocalExperiments(stub, batch_size=args.batch, max_queue=args.max_queue, flush_interval=0.02) as sdk:
            await sdk.wait_for_config(lambda s: s.config(exp2.name) is not None)
            tick = 0.01
            per_tick = max(1, int(args.rate * tick))
            t0 = time.perf_counter()
            i = 0
            behind = 0.0
            while i < total:
                due = t0 + (i / args.rate)
                now = time.perf_counter()
                if now < due:
                    await asyncio.sleep(due - now)
                else:
                    behind = max(behind, now - due)
                for _ in range(min(per_tick, total - i)):
                    await sdk.assign(exp2.name, f"x-{i}")
                    i += 1
            produced_s = time.perf_counter() - t0
            await sdk.flush()
            drained_s = time.perf_counter() - t0
            stats = sdk.stats
        stored2 = await count_assignments(args, db_path, exp2.name)
        print_report(args, rows, total, produced_s, drained_s, behind, stored2, stats)
        assert stored2 == total and stats.exposures_accepted == total and not stats.rejected

        # -- 3. the server's store capacity: prebuilt batches of first exposures over one stream, no producer --------
        if args.capacity_batches:
            await server_capacity(args, stub, db_path)
    finally:
        await channel.close()
        proc.terminate()
        proc.wait(timeout=30)
        if drop:
            await drop()


async def server_capacity(args, stub, db_path: str | None) -> None:
    exp = await create(stub, [0.5, 0.5], 1.0, "bench-capacity")
    plan = PhasedPlan(exp.hash_seed, [[0.5, 0.5]], 1.0)
    ids = [v.id for v in exp.variants]
    batches = []
    for b in range(args.capacity_batches):
        units = [f"c-{i}" for i in range(b * args.batch, (b + 1) * args.batch)]
        batches.append(
            svc.IngestEventsRequest(
                batch_id=b + 1,
                exposures=[pb.Exposure(experiment=exp.name, unit_id=u, variant=ids[plan.evaluate(u)[1]], epoch=0) for u in units],
            )
        )

    async def requests():
        for r in batches:
            yield r

    t0 = time.perf_counter()
    accepted = 0
    async for ack in stub.IngestEvents(requests()):
        accepted += ack.exposures_accepted
    took = time.perf_counter() - t0
    total = args.capacity_batches * args.batch
    stored = await count_assignments(args, db_path, exp.name)
    assert accepted == stored == total, (accepted, stored, total)
    print(f"server capacity: {total:,} first exposures in {args.capacity_batches} prebuilt batches over one stream: "
          f"all acknowledged after {took:.2f} s ({total / took:,.0f}/s); stored {stored:,}")  # fmt: skip


async def count_assignments(args, db_path: str | None, name: str) -> int:
    if db_path is not None:
        with sqlite3.connect(db_path) as conn:
            (key,) = conn.execute("SELECT id FROM experiments WHERE name = ?", (name,)).fetchone()
            return conn.execute("SELECT COUNT(*) FROM assignments WHERE experiment_id = ?", (key,)).fetchone()[0]
    import asyncpg

    conn = await asyncpg.connect(args.pg_dsn)
    try:
        key = await conn.fetchval("SELECT id FROM experiments WHERE name = $1", name)
        return await conn.fetchval("SELECT COUNT(*) FROM assignments WHERE experiment_id = $1", key)
    finally:
        await conn.close()


def print_report(args, rows, total, produced_s, drained_s, behind, stored, stats) -> None:
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} logical cores; Python {platform.python_version()}; "
        f"growthbook {getattr(growthbook, '__version__', '?')}; grpcio {grpc.__version__}; "
        f"store {'PostgreSQL' if args.postgres else 'SQLite'}"
    )
    print(f"evaluation: {args.units} units x {args.rounds} rounds, seed={SEED!r}, weights={WEIGHTS}, coverage={COVERAGE}; "
          "every unit's (variant, in_experiment) identical in both SDKs; stored exposures == in-coverage units")  # fmt: skip
    print(f"{'round':>5} | {'GrowthBook evals/s':>18} {'p50 µs':>7} {'p99 µs':>7} | {'SDK new evals/s':>15} {'p50 µs':>7} "
          f"{'p99 µs':>7} | {'SDK returning evals/s':>21} {'p50 µs':>7} {'p99 µs':>7}")  # fmt: skip
    for r, row in enumerate(rows):
        g, g50, g99, n, n50, n99, s, s50, s99 = row
        print(f"{r:>5} | {g:18,.0f} {g50:7.2f} {g99:7.2f} | {n:15,.0f} {n50:7.2f} {n99:7.2f} | {s:21,.0f} {s50:7.2f} {s99:7.2f}")
    print(
        f"exposure logging: {total:,} new units paced at {args.rate:,}/s: produced in {produced_s:.2f} s "
        f"({total / produced_s:,.0f}/s, at most {behind * 1000:.0f} ms behind schedule), all acknowledged after "
        f"{drained_s:.2f} s; stored {stored:,}; acked accepted {stats.exposures_accepted:,} duplicate "
        f"{stats.exposures_duplicate:,}; batches {stats.batches_acked}; reconnects {stats.reconnects}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=int, default=50_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=5_000)
    ap.add_argument("--max-queue", type=int, default=200_000)
    ap.add_argument("--postgres", action="store_true", help="the server on a fresh PostgreSQL database (else SQLite)")
    ap.add_argument("--capacity-batches", type=int, default=100, help="prebuilt batches for the server capacity (0: skip)")
    args = ap.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
