"""Where the time of one AssignVariant (returning unit, sticky-cache hit) goes, on PostgreSQL.

Runs the same client (one process pinned to CPU 1, grpc.aio, `--concurrency` calls in flight) against server
processes pinned to CPU 0, one configuration at a time, interleaved `--rounds` times (the machine is shared):

- `echo`:  grpc.aio + uvloop, a handler that returns a prebuilt AssignVariantResponse (gRPC + client ceiling);
- `echo-sync`: the same reply from grpcio's synchronous server (thread pool of 4), the other server grpcio has
           (only as `--serve echo-sync`, for `assign_h2load.py`);
- `sync-fastpath`: grpcio's synchronous server (thread pool of 16) answering a returning unit from the real
           service's snapshot in the calling thread, with the interceptor's per-call work (metadata, request id,
           trace context, auth, metrics), other units through an asyncio loop in a second thread: what moving
           the service to the synchronous server could give (only as `--serve sync-fastpath`, for
           `assign_h2load.py --sync-fastpath`; a measurement, not how the service runs);
- `bare`:  the real ExperimentsServicer on the real service (cache hits), no interceptor;
- `full`:  the same plus the shared ServiceInterceptor (tracing context, metrics, auth, error mapping), as
           `python -m neuroweaver_experiments` runs it.

For each run the server's CPU time per request (utime + stime of all its threads, from /proc) is printed too:
1e6 / that is the request rate one fully used core would sustain, whatever limits the client (on this 2-core
machine the grpc.aio client on CPU 1 saturates first).

And in-process (no gRPC): µs per `ExperimentsServicer.AssignVariant` call for a returning unit.

    .venv/bin/python bench/experiments/assign_overhead.py [--seconds 5] [--rounds 2] [--concurrency 48]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import grpc

from neuroweaver.experiments.v1 import experiment_pb2 as pb
from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as svc_grpc
from neuroweaver_runtime.testing import create_postgres_database, free_port

sys.path.insert(0, os.path.dirname(__file__))
from service_bench import create_running, run_assign  # noqa: E402

UNITS = 10_000


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _service(url: str):
    from neuroweaver_experiments.app import ExperimentsConfig, build

    config = ExperimentsConfig(database_url=url, metrics_port=-1, migrate=False)
    return build(config).experiments  # type: ignore[attr-defined]


ECHO_REPLY = svc.AssignVariantResponse(
    variant=pb.Variant(id="control", model_version="projects/default/models/m/versions/1.0.0"), in_experiment=True, bucket=42
)


def serve_sync_echo(port: int) -> None:
    from concurrent import futures

    class Echo(svc_grpc.ExperimentsServiceServicer):
        def AssignVariant(self, request, context):
            return ECHO_REPLY

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    svc_grpc.add_ExperimentsServiceServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def serve_sync_fastpath(port: int, url: str) -> None:
    import threading
    from concurrent import futures

    from opentelemetry import trace

    from neuroweaver_experiments.api.servicer import METHOD_ROLES, ExperimentsServicer
    from neuroweaver_runtime.auth import Role, TokenAuthenticator
    from neuroweaver_runtime.interceptors import ServiceInterceptor, _MethodMetrics

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def build():
        return _service(url)

    service = asyncio.run_coroutine_threadsafe(build(), loop).result()
    servicer = ExperimentsServicer(service)
    interceptor = ServiceInterceptor(
        error_domain="experiments.neuroweaver.v1", method_roles=METHOD_ROLES, authenticator=TokenAuthenticator.from_setting("")
    )
    service_name = "neuroweaver.experiments.v1.ExperimentsService"
    metrics = _MethodMetrics("unary", service_name, "AssignVariant")

    class SyncFastPath(svc_grpc.ExperimentsServiceServicer):
        def AssignVariant(self, request, context):
            started = time.perf_counter()
            md, span = interceptor._begin(context, metrics, service_name, "AssignVariant")
            try:
                with trace.use_span(span, end_on_exit=False):
                    interceptor._check_auth(md, request, Role.VIEWER)
                    snap = service.assigner.fresh(request.experiment)
                    reply = snap.replies.get(request.unit_id) if snap is not None else None
                    if reply is not None:
                        return reply
                    return asyncio.run_coroutine_threadsafe(servicer.AssignVariant(request, None), loop).result()
            finally:
                interceptor._finish(context, span, metrics, started, grpc.StatusCode.OK)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    svc_grpc.add_ExperimentsServiceServicer_to_server(SyncFastPath(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


async def serve(mode: str, port: int, url: str) -> None:
    from neuroweaver_experiments.api.servicer import METHOD_ROLES, ExperimentsServicer
    from neuroweaver_runtime.auth import TokenAuthenticator
    from neuroweaver_runtime.interceptors import ServiceInterceptor

    interceptors = []
    if mode == "full":
        interceptors = [
            ServiceInterceptor(
                error_domain="experiments.neuroweaver.v1",
                method_roles=METHOD_ROLES,
                authenticator=TokenAuthenticator.from_setting(""),
            )
        ]
    server = grpc.aio.server(interceptors=interceptors)
    if mode == "echo":

        class Echo(svc_grpc.ExperimentsServiceServicer):
            async def AssignVariant(self, request, context):
                return ECHO_REPLY

        svc_grpc.add_ExperimentsServiceServicer_to_server(Echo(), server)
    else:
        svc_grpc.add_ExperimentsServiceServicer_to_server(ExperimentsServicer(_service(url)), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def in_process(url: str, name: str, n: int = 50_000) -> float:
    from neuroweaver_experiments.api.servicer import ExperimentsServicer

    service = _service(url)
    servicer = ExperimentsServicer(service)
    reqs = [svc.AssignVariantRequest(experiment=name, unit_id=f"ret-{i % UNITS}") for i in range(n)]
    for r in reqs[:UNITS]:
        await servicer.AssignVariant(r, None)  # warm the sticky cache
    t0 = time.perf_counter()
    for r in reqs:
        await servicer.AssignVariant(r, None)
    us = (time.perf_counter() - t0) / n * 1e6
    await service.db.dispose()
    return us


async def main(args) -> None:
    import uvloop  # noqa: F401 - servers use it

    url, drop = await create_postgres_database("nwbench")
    port = free_port()
    setup = subprocess.Popen(
        [sys.executable, "-m", "neuroweaver_experiments", "--port", str(port), "--metrics-port", "-1", "--database-url", url],
        env=dict(os.environ, NW_EXPERIMENTS_LOG_LEVEL="WARNING"),
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = svc_grpc.ExperimentsServiceStub(channel)
        for _ in range(300):
            try:
                exp = await create_running(stub, "bench-overhead")
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
        await stub.BatchAssignVariants(
            svc.BatchAssignVariantsRequest(experiment=exp.name, unit_ids=[f"ret-{i}" for i in range(UNITS)])
        )
        await channel.close()
        setup.terminate()
        setup.wait(30)
        print(
            f"in-process ExperimentsServicer.AssignVariant (returning unit): {await in_process(url, exp.name):.1f} us/call",
            flush=True,
        )
        results: dict[str, list] = {m: [] for m in args.modes}
        for rnd in range(args.rounds):
            for mode in args.modes:
                port = free_port()
                server = subprocess.Popen(
                    ["taskset", "-c", "0", sys.executable, __file__, "--serve", mode, "--port", str(port), "--url", url]
                )
                try:
                    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
                    await asyncio.wait_for(ch.channel_ready(), 60)
                    # warm: first calls fill the server's sticky cache from the store
                    await svc_grpc.ExperimentsServiceStub(ch).BatchAssignVariants(
                        svc.BatchAssignVariantsRequest(experiment=exp.name, unit_ids=[f"ret-{i}" for i in range(UNITS)])
                    ) if mode != "echo" else None
                    await ch.close()
                    cpu0 = cpu_seconds(server.pid)
                    r = run_assign(f"127.0.0.1:{port}", exp.name, args.seconds, args.concurrency, "ret", UNITS)
                    # server CPU per request (all its threads): the per-core capacity, whatever limits the client
                    r["cpu_us"] = (cpu_seconds(server.pid) - cpu0) / r["requests"] * 1e6
                finally:
                    server.terminate()
                    server.wait(30)
                results[mode].append(r)
                print(
                    f"round {rnd} {mode}: {r['rate']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms; server CPU "
                    f"{r['cpu_us']:.0f} us/request = {1e6 / r['cpu_us']:.0f} req/s per core (load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
        for mode, rs in results.items():
            best = max(rs, key=lambda r: r["rate"])
            print(
                f"{mode}: best {best['rate']:.0f} req/s (p50 {best['p50_ms']:.2f} ms, p99 {best['p99_ms']:.2f} ms); "
                f"all {[round(r['rate']) for r in rs]}; server CPU us/request {[round(r['cpu_us']) for r in rs]}"
            )
    finally:
        if setup.poll() is None:
            setup.terminate()
        await drop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--modes", nargs="+", default=["echo", "bare", "full"])
    parser.add_argument("--serve")
    parser.add_argument("--port", type=int)
    parser.add_argument("--url")
    a = parser.parse_args()
    if a.serve == "echo-sync":
        serve_sync_echo(a.port)
    elif a.serve == "sync-fastpath":
        serve_sync_fastpath(a.port, a.url)
    elif a.serve:
        import uvloop

        uvloop.install()
        asyncio.run(serve(a.serve, a.port, a.url))
    else:
        asyncio.run(main(a))
