"""ListModelVersions (filter + order + page tokens) vs MLflow's `search_model_versions`, same PostgreSQL, same run.

Data: one model with `--versions` (100,000) versions and `--models` (1,000) more models with
`--versions-per-model` (100) each, in both stores. Seeding is bulk SQL into each product's own schema (created by
the product itself: the registry's Alembic migrations, MLflow's `mlflow server` migrations, so each has exactly
its own indexes); every measured call goes through the product's real API: the registry's gRPC ListModelVersions
with page tokens, MLflow's `MlflowClient.search_model_versions` with max_results / page_token against
`mlflow server` (REST, SQLAlchemy store on PostgreSQL). Walks are checked: every item of the model is seen once,
in order.

Workloads (the same filter, order and page size on both sides):
  big-all       the 100k-version model, newest version first (registry `version desc`; MLflow `version_number DESC`)
  big-filtered  the same model, label/tag tier=gold (1 in 4 versions), newest first by creation time
  models        the first page of each of the 1,000 other models, newest version first

Rounds are interleaved (registry and MLflow alternate who goes first); the RSS of each server process is read from
/proc after every page.

    .venv/bin/python bench/registry/bench_list.py --mlflow /tmp/mlflow-venv/bin/mlflow [--versions 10000 --models 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import semver
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neuroweaver.registry.v1 import registry_service_pb2 as rs
from neuroweaver.registry.v1 import registry_service_pb2_grpc as rs_grpc
from neuroweaver_registry.domain.versions import sort_key
from neuroweaver_runtime.testing import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_registry import client_gc_paused, create_db, drop_db, machine, pct, wait_for  # noqa: E402

BIG = "big"
SHA = "ab" * 32
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def version_of(i: int) -> str:
    """The i-th version (0-based) of a model: 1.0.0, 1.0.1, ... 1.0.999, 1.1.0, ..."""
    return f"1.{i // 1000}.{i % 1000}"


def model_ids(args) -> list[str]:
    return [BIG] + [f"m-{j:04d}" for j in range(args.models)]


def counts(args) -> dict[str, int]:
    return {BIG: args.versions, **{f"m-{j:04d}": args.versions_per_model for j in range(args.models)}}


def tier(i: int) -> str:
    return "gold" if i % 4 == 0 else "standard"


async def seed_registry(url: str, args) -> None:
    conn = await asyncpg.connect(url)
    try:
        sizes = counts(args)
        await conn.executemany(
            "INSERT INTO models (name, project, display_name, description, specialization, base_model, labels, state,"
            " latest_version, version_count, creator, create_time, update_time, revision)"
            " VALUES ($1, 'default', '', '', '', 'base', '{}', 'ACTIVE', $2, $3, 'bench', $4, $4, 1)",
            [(f"projects/default/models/{m}", version_of(n - 1), n, T0) for m, n in sizes.items()],
        )
        ids = dict(await conn.fetch("SELECT name, id FROM models"))
        lineage = json.dumps({"base_model": "base"})
        for m, n in sizes.items():
            model_id = ids[f"projects/default/models/{m}"]
            rows = []
            for i in range(n):
                v = version_of(i)
                at = T0 + timedelta(seconds=i)
                rows.append((
                    model_id, v, sort_key(semver.Version.parse(v)), "REGISTERED", "s3://bench/adapter", SHA, 1,
                    "LORA_ADAPTER", lineage, "", "base", json.dumps({"tier": tier(i)}), "", "bench", at, at, 1,
                ))  # fmt: skip
            await conn.copy_records_to_table(
                "model_versions",
                records=rows,
                columns=[
                    "model_id", "version", "sort_key", "state", "artifact_uri", "artifact_sha256", "artifact_size",
                    "artifact_format", "lineage", "training_job", "base_model", "labels", "notes", "creator",
                    "create_time", "update_time", "revision",
                ],
            )  # fmt: skip
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


async def seed_mlflow(url: str, args) -> None:
    """MLflow's rows as its SqlAlchemyStore writes them (versions numbered 1..n, stage 'None', status READY)."""
    conn = await asyncpg.connect(url)
    epoch_ms = int(T0.timestamp() * 1000)
    try:
        for m, n in counts(args).items():
            await conn.execute(
                "INSERT INTO registered_models (name, creation_time, last_updated_time, description, workspace)"
                " VALUES ($1, $2::bigint, $2::bigint, '', 'default')",
                m,
                epoch_ms,
            )
            await conn.execute(
                "INSERT INTO model_versions (name, version, creation_time, last_updated_time, description, user_id,"
                " current_stage, source, run_id, status, status_message, run_link, storage_location, workspace)"
                " SELECT $1, g, $2::bigint + (g - 1) * 1000, $2::bigint + (g - 1) * 1000, '', 'bench', 'None', 's3://bench/adapter',"
                " NULL, 'READY', '', '', 's3://bench/adapter', 'default' FROM generate_series(1, $3) g",
                m,
                epoch_ms,
                n,
            )
            await conn.execute(
                "INSERT INTO model_version_tags (key, value, name, version, workspace)"
                " SELECT 'tier', CASE WHEN (g - 1) % 4 = 0 THEN 'gold' ELSE 'standard' END, $1, g, 'default'"
                " FROM generate_series(1, $2) g",
                m,
                n,
            )
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


def descendants(pid: int) -> list[int]:
    """pid and every process below it (the MLflow CLI forks its server)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096
        except OSError:
            pass
    return total


def workloads(args) -> dict[str, list[dict]]:
    """Each workload is a list of walks; a walk pages through one listing to its end (or --max-pages)."""
    others = [m for m in model_ids(args) if m != BIG]
    return {
        "big-all": [{
            "model": BIG, "expect": args.versions, "registry": {"filter": "", "order_by": "version desc"},
            "mlflow": {"filter": f"name = '{BIG}'", "order_by": ["version_number DESC"], "check_version_desc": True},
        }],
        "big-filtered": [{
            "model": BIG, "expect": (args.versions + 3) // 4,
            "registry": {"filter": 'labels.tier = "gold"', "order_by": "create_time desc"},
            "mlflow": {"filter": f"name = '{BIG}' AND tags.tier = 'gold'", "order_by": ["creation_timestamp DESC"]},
        }],
        "models": [{
            "model": m, "expect": min(args.page_size, args.versions_per_model), "max_pages": 1,
            "registry": {"filter": "", "order_by": "version desc"},
            "mlflow": {"filter": f"name = '{m}'", "order_by": ["version_number DESC"]},
        } for m in others],
    }  # fmt: skip


async def registry_walk(stub, walk: dict, page_size: int, max_pages: int, pid: int) -> dict:
    latencies: list[float] = []
    rss = [rss_bytes([pid])]
    items, token, previous = 0, "", None
    parent = f"projects/default/models/{walk['model']}"
    started = time.perf_counter()
    while len(latencies) < max_pages:
        req = rs.ListModelVersionsRequest(
            parent=parent, page_size=page_size, page_token=token, filter=walk["registry"]["filter"],
            order_by=walk["registry"]["order_by"],
        )  # fmt: skip
        t0 = time.perf_counter()
        resp = await stub.ListModelVersions(req)
        latencies.append(time.perf_counter() - t0)
        rss.append(rss_bytes([pid]))
        items += len(resp.model_versions)
        if walk["registry"]["order_by"] == "version desc":  # strictly descending precedence, no repeats
            for mv in resp.model_versions:
                v = semver.Version.parse(mv.version)
                if previous is not None and v >= previous:
                    raise RuntimeError(f"registry pages out of order: {v} after {previous}")
                previous = v
        token = resp.next_page_token
        if not token:
            break
    return {"latencies": latencies, "wall": time.perf_counter() - started, "items": items, "rss": rss}


class MlflowDriver:
    """The persistent MLflow client process (bench/registry/mlflow_search_driver.py in MLflow's virtualenv)."""

    def __init__(self, python: str, uri: str) -> None:
        script = Path(__file__).resolve().parent / "mlflow_search_driver.py"
        self.proc = subprocess.Popen(
            [python, str(script), uri], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/tmp"
        )

    def run(self, walks: list[dict], page_size: int, max_pages: int, pids: list[int]) -> list[dict]:
        command = {"walks": walks, "page_size": page_size, "max_pages": max_pages, "pids": pids}
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the MLflow driver exited (see its stderr above)")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def summarize(walks: list[dict], expected: list[int]) -> dict:
    for w, n in zip(walks, expected, strict=True):
        if w["items"] != n:
            raise RuntimeError(f"a walk returned {w['items']} items, expected {n}")
    latencies = [x for w in walks for x in w["latencies"]]
    rss = [x for w in walks for x in w["rss"]]
    wall = sum(w["wall"] for w in walks)
    mib = 1 / 2**20
    return {
        "pages": len(latencies), "items": sum(w["items"] for w in walks), "pages_per_s": len(latencies) / wall,
        "p50_ms": pct(latencies, 0.5) * 1e3, "p99_ms": pct(latencies, 0.99) * 1e3, "max_ms": max(latencies) * 1e3,
        "last_page_ms": walks[-1]["latencies"][-1] * 1e3,
        "rss_start_mib": rss[0] * mib, "rss_max_mib": max(rss) * mib, "rss_end_mib": rss[-1] * mib,
    }  # fmt: skip


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mlflow", default="/tmp/mlflow-venv/bin/mlflow", help="the mlflow CLI; its python runs the driver")
    ap.add_argument("--no-mlflow", action="store_true", help="registry only")
    ap.add_argument("--versions", type=int, default=100_000, help="versions of the one big model")
    ap.add_argument("--models", type=int, default=1_000, help="further models")
    ap.add_argument("--versions-per-model", type=int, default=100)
    ap.add_argument("--page-size", type=int, default=100)
    ap.add_argument("--max-pages", type=int, default=1_000_000, help="stop each walk after this many pages")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (one MLflow round takes ~5 minutes)")
    ap.add_argument("--only", default="", help="comma-separated workloads (big-all, big-filtered, models)")
    ap.add_argument("--keep", action="store_true", help="keep both databases (for EXPLAIN); prints their names")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.versions > 1_000_000 or args.versions_per_model > 1_000_000:
        ap.error("at most 1,000,000 versions per model (version_of numbers minor.patch in thousands)")

    load = {"start": os.getloadavg()}
    reg_db, reg_url = await create_db("bench_list_reg")
    ml_db, ml_url = await create_db("bench_list_mlflow")
    procs: list[subprocess.Popen] = []
    driver = None
    try:
        reg_port, ml_port = free_port(), free_port()
        registry = subprocess.Popen(
            [sys.executable, "-m", "neuroweaver_registry", "--port", str(reg_port), "--metrics-port", "-1",
             "--database-url", reg_url, "--log-level", "WARNING"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(registry)
        if not args.no_mlflow:
            procs.append(subprocess.Popen(
                [args.mlflow, "server", "--backend-store-uri", ml_url.replace("postgresql://", "postgresql+psycopg2://", 1),
                 "--host", "127.0.0.1", "--port", str(ml_port), "--workers", "1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/tmp",
                # no background job runner (huey consumers): the registry's search does not use it
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            ))  # fmt: skip
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{reg_port}")
        stub = rs_grpc.RegistryServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        async def reg_up():
            r = await health.Check(health_pb2.HealthCheckRequest(service="neuroweaver.registry.v1.RegistryService"), timeout=1)
            return r.status == health_pb2.HealthCheckResponse.SERVING

        await wait_for(reg_up, "registry")
        t = time.perf_counter()
        await seed_registry(reg_url, args)
        seed = {"registry_s": time.perf_counter() - t}
        if not args.no_mlflow:

            async def ml_up():  # the server answers once its migrations have created the schema
                conn = await asyncpg.connect(ml_url)
                try:
                    return await conn.fetchval("SELECT to_regclass('model_version_tags') IS NOT NULL")
                finally:
                    await conn.close()

            await wait_for(ml_up, "mlflow", 240)
            t = time.perf_counter()
            await seed_mlflow(ml_url, args)
            seed["mlflow_s"] = time.perf_counter() - t
            driver = MlflowDriver(str(Path(args.mlflow).parent / "python"), f"http://127.0.0.1:{ml_port}")
            # RSS of the process that serves (uvicorn under the `mlflow server` launcher), as the registry's is
            tree = descendants(procs[1].pid)
            ml_pids = [pid for pid in tree if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()] or tree
            seed["mlflow_processes"] = [
                [pid, Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120], rss_bytes([pid]) >> 20]
                for pid in tree
            ]
        print("seeded", seed, file=sys.stderr)

        chosen = workloads(args)
        if args.only:
            chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}

        async def run_registry(walks: list[dict]) -> dict:
            with client_gc_paused():
                out = [
                    await registry_walk(stub, w, args.page_size, w.get("max_pages", args.max_pages), registry.pid) for w in walks
                ]
            return summarize(out, [expected(w) for w in walks])

        async def run_mlflow(walks: list[dict]) -> dict:
            assert driver is not None
            specs = [w["mlflow"] for w in walks]
            max_pages = min(w.get("max_pages", args.max_pages) for w in walks)
            # in a thread, so the loop (and Ctrl-C) stays responsive during a minutes-long MLflow walk
            out = await asyncio.to_thread(driver.run, specs, args.page_size, max_pages, ml_pids)
            return summarize(out, [expected(w) for w in walks])

        def expected(w: dict) -> int:
            return min(w["expect"], args.page_size * w.get("max_pages", args.max_pages))

        # warm-up: a few pages of each workload on both sides (connections, caches, imports)
        for walks in chosen.values():
            warm = [{**w, "max_pages": 3, "expect": min(w["expect"], 3 * args.page_size)} for w in walks[:20]]
            await run_registry(warm)
            if driver:
                await run_mlflow(warm)

        results: dict[str, dict[str, list[dict]]] = {k: {"registry": [], "mlflow": []} for k in chosen}
        for r in range(args.rounds):
            for name, walks in chosen.items():
                sides = ["registry", "mlflow"] if r % 2 == 0 else ["mlflow", "registry"]
                for side in sides:
                    if side == "mlflow" and driver is None:
                        continue
                    res = await (run_registry(walks) if side == "registry" else run_mlflow(walks))
                    res["load_1min"] = os.getloadavg()[0]
                    results[name][side].append(res)
                    print(f"round {r + 1} {name} {side}", json.dumps(res), file=sys.stderr)
        load["end"] = os.getloadavg()
        await channel.close()

        def med(runs: list[dict]) -> dict:
            keys = [k for k in runs[0] if isinstance(runs[0][k], int | float)]
            return {k: statistics.median(r[k] for r in runs) for k in keys}

        summary = {
            "medians": {k: {side: med(runs) for side, runs in v.items() if runs} for k, v in results.items()},
            "runs": results,
            "seed_s": seed,
            "machine": {**(machine(args.mlflow) if not args.no_mlflow else {}), "load_average": load},
            "settings": vars(args),
        }
        text = json.dumps(summary, indent=2)
        print(text)
        if args.json:
            Path(args.json).write_text(text)
    finally:
        if driver:
            driver.close()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        if args.keep:
            print(f"kept databases: {reg_db} {ml_db}", file=sys.stderr)
        else:
            await drop_db(reg_db)
            await drop_db(ml_db)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
