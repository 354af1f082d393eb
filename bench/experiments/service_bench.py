"""Experiments service over gRPC on PostgreSQL: AssignVariant rate/latency, StreamMetricEvents ingest rate, and
GetExperimentResults time at small and at 10 million events.

The server is the real `python -m neuroweaver_experiments` process pinned to CPU 0 (`taskset`); the load
generators are separate processes pinned to CPU 1. PostgreSQL is the machine's server on 127.0.0.1:5432
(a throw-away database per run).

    .venv/bin/python bench/experiments/service_bench.py [--assign-seconds 10] [--concurrency 48] [--events 1000000]

The 10-million-event experiment's aggregates are loaded with SQL (unit_metrics for 100k units x 3 metrics
whose counts sum to 10M, and the variant_stats derived from them: the same tables and meanings the ingest
path writes; the raw audit rows are left out) because pushing 10M events through gRPC takes minutes here;
results read only the per-variant sufficient statistics, so this measures what it should.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.experiments.v1 import experiment_pb2 as pb
from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as svc_grpc
from neuroweaver_runtime.testing import create_postgres_database, free_port


def _pin(cpu: int) -> None:
    try:
        os.sched_setaffinity(0, {cpu % (os.cpu_count() or 1)})
    except (AttributeError, OSError):
        pass


# ------------------------------------------------------------------------------------------ load generators


def _assign_worker(target: str, name: str, seconds: float, concurrency: int, prefix: str, repeat: int, out) -> None:
    _pin(1)

    async def run():
        channel = grpc.aio.insecure_channel(target)
        stub = svc_grpc.ExperimentsServiceStub(channel)
        lat: list[float] = []
        deadline = time.perf_counter() + seconds
        counter = iter(range(10**9))

        async def one(worker: int):
            while time.perf_counter() < deadline:
                i = next(counter)
                unit = f"{prefix}-{i % repeat if repeat else i}"
                t0 = time.perf_counter()
                await stub.AssignVariant(svc.AssignVariantRequest(experiment=name, unit_id=unit))
                lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - t0
        await channel.close()
        return lat, elapsed

    lat, elapsed = asyncio.run(run())
    lat.sort()
    out.put(
        dict(
            requests=len(lat),
            rate=len(lat) / elapsed,
            p50_ms=lat[len(lat) // 2] * 1000,
            p99_ms=lat[int(len(lat) * 0.99)] * 1000,
        )
    )


def run_assign(target, name, seconds, concurrency, prefix, repeat):
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=_assign_worker, args=(target, name, seconds, concurrency, prefix, repeat, q))
    p.start()
    result = q.get()
    p.join()
    return result


# --------------------------------------------------------------------------------------------------- main


async def create_running(stub, exp_id: str) -> pb.Experiment:
    exp = pb.Experiment(
        variants=[
            pb.Variant(id="control", model_version="projects/default/models/m/versions/1.0.0", weight=0.5),
            pb.Variant(id="treatment", model_version="projects/default/models/m/versions/1.0.1", weight=0.5),
        ],
        primary_metric=pb.MetricSpec(name="score", kind=pb.METRIC_KIND_MEAN, direction=cpb.METRIC_DIRECTION_HIGHER_IS_BETTER),
        guardrail_metrics=[
            pb.MetricSpec(
                name="latency_ms", kind=pb.METRIC_KIND_MEAN, direction=cpb.METRIC_DIRECTION_LOWER_IS_BETTER, tolerance=0.1
            )
        ],
        secondary_metrics=[
            pb.MetricSpec(name="thumbs_up", kind=pb.METRIC_KIND_PROPORTION, direction=cpb.METRIC_DIRECTION_HIGHER_IS_BETTER)
        ],
        analysis=pb.ANALYSIS_METHOD_SEQUENTIAL,
    )
    created = await stub.CreateExperiment(
        svc.CreateExperimentRequest(parent="projects/default", experiment_id=exp_id, experiment=exp)
    )
    return await stub.StartExperiment(svc.StartExperimentRequest(name=created.name))


async def assign_units(stub, name: str, units: list[str]) -> None:
    for i in range(0, len(units), 10_000):
        await stub.BatchAssignVariants(svc.BatchAssignVariantsRequest(experiment=name, unit_ids=units[i : i + 10_000]))


async def time_results(stub, name: str, looks: int = 15) -> float:
    times = []
    for _ in range(looks):
        t0 = time.perf_counter()
        await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=name))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


async def main(args) -> None:
    url, drop = await create_postgres_database("nwbench")
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = dict(os.environ, NW_EXPERIMENTS_LOG_LEVEL="WARNING")
    server = subprocess.Popen(
        [
            "taskset",
            "-c",
            "0",
            sys.executable,
            "-m",
            "neuroweaver_experiments",
            "--port",
            str(port),
            "--metrics-port",
            "-1",
            "--database-url",
            url,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    _pin(1)
    channel = grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
    try:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(300):
            try:
                r = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
        stub = svc_grpc.ExperimentsServiceStub(channel)
        report: dict = {}

        # AssignVariant: every request a new unit (group-committed insert), then returning units (cache hits)
        exp = await create_running(stub, "bench-assign")
        print("assign: new units", flush=True)
        report["assign_new"] = run_assign(target, exp.name, args.assign_seconds, args.concurrency, "new", 0)
        print(report, flush=True)
        await assign_units(stub, exp.name, [f"ret-{i}" for i in range(10_000)])
        report["assign_returning"] = run_assign(target, exp.name, args.assign_seconds, args.concurrency, "ret", 10_000)

        # StreamMetricEvents: units assigned first, then events streamed in messages of `--batch`
        print("ingest", flush=True)
        exp = await create_running(stub, "bench-ingest")
        units = [f"u-{i}" for i in range(args.units)]
        await assign_units(stub, exp.name, units)
        metrics = ["score", "latency_ms", "thumbs_up"]
        messages = []
        for start in range(0, args.events, args.batch):
            evs = [
                pb.MetricEvent(
                    unit_id=units[(start + j) * 7919 % len(units)],
                    metric=metrics[(start + j) % 3],
                    value=float((start + j) % 13),
                    idempotency_key=f"k{start + j}",
                )
                for j in range(min(args.batch, args.events - start))
            ]
            messages.append(svc.StreamMetricEventsRequest(experiment=exp.name, events=evs))

        async def gen(share):
            for m in share:
                yield m

        # `--streams` concurrent StreamMetricEvents calls (as several gateway replicas would send), messages dealt
        # round-robin; each message is still one atomic batch.
        shares = [messages[i :: args.streams] for i in range(args.streams)]
        t0 = time.perf_counter()
        responses = await asyncio.gather(*(stub.StreamMetricEvents(gen(share), timeout=3600) for share in shares))
        elapsed = time.perf_counter() - t0
        assert sum(r.accepted for r in responses) == args.events, responses
        report["ingest"] = dict(
            events=args.events, batch=args.batch, seconds=elapsed, rate=args.events / elapsed, streams=args.streams
        )
        report["results_ms_at_ingested"] = await time_results(stub, exp.name)
        print(report, flush=True)

        # Results at 10M events: load the tables in SQL, then time GetExperimentResults
        print("results", flush=True)
        exp = await create_running(stub, "bench-results")
        big_units = [f"b-{i}" for i in range(args.big_units)]
        await assign_units(stub, exp.name, big_units)
        report["results_ms_small"] = await time_results(stub, exp.name)
        t0 = time.perf_counter()
        await load_big(url, exp.name, args.big_events)
        report["load_seconds"] = time.perf_counter() - t0
        report["results_ms_10m"] = await time_results(stub, exp.name)
        print_report(report, args)
    finally:
        await channel.close()
        server.terminate()
        server.wait(30)
        await drop()


async def load_big(url: str, name: str, n_events: int) -> None:
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        exp_id = await conn.fetchval("SELECT id FROM experiments WHERE name = $1", name)
        async with conn.transaction():
            # Aggregates of n_events spread evenly over the assigned units and 3 metrics (what the ingest path
            # would have written), without the raw audit rows: results never read metric_events.
            await conn.execute(
                """WITH a AS (SELECT unit_id, variant, row_number() OVER (ORDER BY unit_id) AS rn, count(*) OVER () AS cnt
                              FROM assignments WHERE experiment_id = $1)
                   INSERT INTO unit_metrics (experiment_id, metric, unit_id, variant, count, total, positives)
                   SELECT $1, m.metric, a.unit_id, a.variant, c.n,
                          c.n * (1.0 + (a.rn % 17) / 10.0 + CASE WHEN a.variant = 'treatment' THEN 0.05 ELSE 0 END),
                          CASE WHEN a.rn % 3 = 0 THEN 0 ELSE c.n END
                   FROM a CROSS JOIN (VALUES (0, 'score'), (1, 'latency_ms'), (2, 'thumbs_up')) AS m(i, metric)
                   CROSS JOIN LATERAL (SELECT $2 / (3 * a.cnt)
                                              + CASE WHEN (a.rn - 1) * 3 + m.i < $2 % (3 * a.cnt) THEN 1 ELSE 0 END AS n) c
                   WHERE c.n > 0""",
                exp_id,
                n_events,
            )
            await conn.execute(
                """INSERT INTO variant_stats (experiment_id, metric, variant, n, mean, m2)
                   SELECT experiment_id, metric, variant, count(*), avg(x), var_pop(x) * count(*)
                   FROM (SELECT experiment_id, metric, variant,
                                CASE WHEN metric = 'thumbs_up' THEN (positives > 0)::int::float8 ELSE total / count END AS x
                         FROM unit_metrics WHERE experiment_id = $1) u
                   GROUP BY experiment_id, metric, variant""",
                exp_id,
            )
        assert await conn.fetchval("SELECT sum(count) FROM unit_metrics WHERE experiment_id = $1", exp_id) == n_events
    finally:
        await conn.close()


def print_report(r: dict, args) -> None:
    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {os.cpu_count()} cores, {cpu}; server pinned to CPU 0, clients to CPU 1; PostgreSQL 15 local")
    for key in ("assign_new", "assign_returning"):
        a = r[key]
        print(
            f"{key}: {a['rate']:.0f} req/s, p50 {a['p50_ms']:.2f} ms, p99 {a['p99_ms']:.2f} ms "
            f"({a['requests']} requests, concurrency {args.concurrency})"
        )
    i = r["ingest"]
    print(
        f"ingest: {i['rate']:.0f} events/s ({i['events']} events in {i['seconds']:.1f} s, {i['streams']} streams, {i['batch']} per message, "
        f"{args.units} units, 3 metrics, all with idempotency keys)"
    )
    print(
        f"results: {r['results_ms_small']:.1f} ms with 0 events, {r['results_ms_at_ingested']:.1f} ms at {args.events} events, "
        f"{r['results_ms_10m']:.1f} ms at {args.big_events} events (SQL load took {r['load_seconds']:.0f} s)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--assign-seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--units", type=int, default=100_000)
    parser.add_argument("--big-events", type=int, default=10_000_000)
    parser.add_argument("--big-units", type=int, default=100_000)
    asyncio.run(main(parser.parse_args()))
