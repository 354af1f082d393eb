"""In-process ingest rate on PostgreSQL (no gRPC): `ExperimentsServicer.StreamMetricEvents` fed from a list of
prebuilt messages, so protobuf decoding into domain events, validation, idempotency and the database work are
all in; the network and the client are not. Same data shape as `service_bench.py` (units assigned first,
3 metrics, every event with an idempotency key). Prints events/s and checks the statistics against a direct
SQL recomputation from the per-unit aggregates.

    .venv/bin/python bench/experiments/ingest_bench.py [--events 300000] [--batch 5000] [--units 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from neuroweaver.experiments.v1 import experiment_pb2 as pb  # noqa: E402
from neuroweaver.experiments.v1 import experiments_service_pb2 as svc  # noqa: E402
from neuroweaver_runtime import migrations  # noqa: E402
from neuroweaver_runtime.testing import create_postgres_database  # noqa: E402


async def main(args) -> None:
    import service_bench

    from neuroweaver_experiments.api.servicer import ExperimentsServicer
    from neuroweaver_experiments.app import MIGRATIONS, ExperimentsConfig, build

    url, drop = await create_postgres_database("nwbench")
    try:
        await asyncio.to_thread(migrations.upgrade, url, MIGRATIONS)
        built = build(ExperimentsConfig(database_url=url, metrics_port=-1, migrate=False))
        service, db = built.experiments, built.db  # type: ignore[attr-defined]
        servicer = ExperimentsServicer(service)

        class Stub:  # what create_running needs, in-process
            async def CreateExperiment(self, r):
                return await servicer.CreateExperiment(r, None)

            async def StartExperiment(self, r):
                return await servicer.StartExperiment(r, None)

        exp = await service_bench.create_running(Stub(), "bench-ingest")
        units = [f"u-{i}" for i in range(args.units)]
        for i in range(0, len(units), 10_000):
            await servicer.BatchAssignVariants(
                svc.BatchAssignVariantsRequest(experiment=exp.name, unit_ids=units[i : i + 10_000]), None
            )
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
            messages.append(svc.StreamMetricEventsRequest(experiment=exp.name, events=evs).SerializeToString())

        async def gen():
            for m in messages:
                yield svc.StreamMetricEventsRequest.FromString(m)

        t0 = time.perf_counter()
        resp = await servicer.StreamMetricEvents(gen(), None)
        elapsed = time.perf_counter() - t0
        assert resp.accepted == args.events, resp
        again = await servicer.StreamMetricEvents(gen(), None)  # every key again: all duplicates
        assert again.accepted == 0 and again.duplicates == args.events, again
        async with db.transaction() as s:
            from sqlalchemy import text

            bad = (
                await s.execute(
                    text(
                        """WITH u AS (SELECT metric, variant, CASE WHEN metric = 'thumbs_up' THEN (positives > 0)::int::float8
                                                       ELSE total / count END AS x FROM unit_metrics)
                   SELECT count(*) FROM (SELECT metric, variant, count(*) AS n, avg(x) AS m, var_pop(x) * count(*) AS q
                                         FROM u GROUP BY metric, variant) r
                   JOIN variant_stats v USING (metric, variant)
                   WHERE r.n <> v.n OR abs(r.m - v.mean) > 1e-6 * greatest(1, abs(r.m)) OR abs(r.q - v.m2) > 1e-6 * greatest(1, abs(r.q))"""
                    )
                )
            ).scalar()
        assert bad == 0, f"{bad} (metric, variant) statistics disagree with the per-unit aggregates"
        print(
            f"ingest in-process: {args.events / elapsed:.0f} events/s ({args.events} events in {elapsed:.2f} s, {args.batch} per "
            f"message, {args.units} units, load {os.getloadavg()[0]:.2f}); duplicates resend ok; statistics consistent"
        )
        await db.dispose()
    finally:
        await drop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--units", type=int, default=100_000)
    asyncio.run(main(parser.parse_args()))
