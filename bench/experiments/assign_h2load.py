"""AssignVariant over gRPC driven by `h2load` (nghttp2's C HTTP/2 load generator), so the client is not the limit.

The Python grpc.aio client of `service_bench.py` / `assign_overhead.py` tops out near the server's own rate on
this 2-core machine; h2load sends the same gRPC request (length-prefixed protobuf, `content-type:
application/grpc`) at a fraction of the CPU. Servers, each pinned to CPU 0 with `taskset`, h2load pinned to CPU 1:

- `service`: the real `python -m neuroweaver_experiments` (interceptor, metrics, auth, PostgreSQL), a returning
  unit (its reply is memoized in the experiment snapshot, the steady state of a sticky assignment);
- `echo`:    a grpc.aio + uvloop server whose AssignVariant returns a prebuilt reply (the floor of grpc.aio);
- `echo-sync`: the same reply from grpcio's synchronous server (thread pool), grpcio's other server;
- `sync-fastpath` (with `--sync-fastpath`): the service's returning-unit path and per-call instrumentation on
  grpcio's synchronous server (see `assign_overhead.py`), i.e. what that server would give the service.

For each: closed loop (`--streams` in flight) → requests/s and the server's CPU per request (utime + stime of
all its threads from /proc; 1e6 / that = requests/s one busy core sustains); then a fixed rate (`--rate`, h2load
`--rps`) with per-request latencies from h2load's log → p50 / p99. Every gRPC status is checked: h2load only sees
HTTP 200, so the service's own `grpc_server_handled_total` must count every request as OK.

    apt-get install nghttp2-client   # h2load
    .venv/bin/python bench/experiments/assign_h2load.py [--requests 40000] [--streams 16] [--rate 1000] [--sync-fastpath]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import grpc

from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as svc_grpc
from neuroweaver_runtime.testing import create_postgres_database, free_port

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import h2load_grpc  # noqa: E402
from assign_overhead import cpu_seconds  # noqa: E402
from service_bench import create_running  # noqa: E402

METHOD = "/neuroweaver.experiments.v1.ExperimentsService/AssignVariant"


def closed_loop(pid: int, port: int, body: Path, requests: int, streams: int) -> dict:
    c0 = cpu_seconds(pid)
    rate = h2load_grpc.closed_loop(f"127.0.0.1:{port}", METHOD, body, requests, streams, cpu=1)
    return {"closed_rate": rate, "cpu_us": (cpu_seconds(pid) - c0) / requests * 1e6}


def handled_ok(metrics_port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("grpc_server_handled_total{")]
    return int(sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if 'grpc_method="AssignVariant"' in ln and 'grpc_code="OK"' in ln))


async def main(args) -> None:
    if not h2load_grpc.available():
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    url, drop = await create_postgres_database("nwh2load")
    port, metrics_port = free_port(), free_port()
    service = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "neuroweaver_experiments", "--port", str(port), "--metrics-port",
         str(metrics_port), "--database-url", url, "--log-level", "WARNING"])  # fmt: skip
    echoes: list[subprocess.Popen] = []
    work = Path(tempfile.mkdtemp(prefix="nw-h2load-"))
    try:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = svc_grpc.ExperimentsServiceStub(channel)
        for _ in range(300):
            try:
                exp = await create_running(stub, "h2load")
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
        request = svc.AssignVariantRequest(experiment=exp.name, unit_id="returning-unit-1")
        await stub.AssignVariant(request)  # first exposure stored; later calls are the memoized steady state
        await channel.close()
        body = h2load_grpc.write_body(request, work / "request.bin")

        servers = [("service", service, port)]
        for mode in ("echo", "echo-sync", *(["sync-fastpath"] if args.sync_fastpath else [])):
            echo_port = free_port()
            echo = subprocess.Popen(["taskset", "-c", "0", sys.executable, os.path.join(os.path.dirname(__file__), "assign_overhead.py"),
                                     "--serve", mode, "--port", str(echo_port), "--url", url])  # fmt: skip
            echoes.append(echo)
            servers.append((mode, echo, echo_port))
            ch = grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}")
            await asyncio.wait_for(ch.channel_ready(), 60)
            if mode == "sync-fastpath":  # its first call stores nothing new but memoizes the reply
                await svc_grpc.ExperimentsServiceStub(ch).AssignVariant(request)
            await ch.close()

        ok_before = handled_ok(metrics_port)
        for _ in range(args.rounds):  # interleaved
            for name, proc, p in servers:
                r = closed_loop(proc.pid, p, body, args.requests, args.streams)
                r.update(h2load_grpc.fixed_rate(f"127.0.0.1:{p}", METHOD, body, args.rate, args.rate_seconds, cpu=1))
                print(f"{name}: {r['closed_rate']:.0f} req/s closed loop ({args.streams} in flight), server CPU {r['cpu_us']:.0f} us/request "
                      f"= {1e6 / r['cpu_us']:.0f} req/s per core; at {args.rate} req/s p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                      f"max {r['max_ms']:.1f} ms (load {os.getloadavg()[0]:.2f})", flush=True)  # fmt: skip
        sent = args.rounds * (args.requests + int(args.rate * args.rate_seconds))
        ok = handled_ok(metrics_port) - ok_before
        print(f"service answered {ok} of {sent} AssignVariant calls with OK")
        if ok != sent:
            raise SystemExit("not every call was answered OK")
    finally:
        for proc in (service, *echoes):
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
        await drop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=40_000)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--rate-seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sync-fastpath", action="store_true", help="also measure the sync-fastpath server")
    asyncio.run(main(parser.parse_args()))
