"""Drive a unary gRPC method with `h2load` (nghttp2's C HTTP/2 load generator: `apt-get install nghttp2-client`).

A Python load generator on this 2-core machine costs about as much CPU per call as the server it measures, and its
own pauses (GC, scheduling) count as server latency in an open loop; h2load costs a fraction of that. It sends one
fixed request body (a length-prefixed protobuf) with gRPC's headers. It sees only HTTP statuses, so callers check
gRPC statuses another way (e.g. the server's `grpc_server_handled_total`).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path


def available() -> bool:
    return shutil.which("h2load") is not None


def write_body(message, path: Path) -> Path:
    payload = message.SerializeToString()
    path.write_bytes(b"\x00" + struct.pack(">I", len(payload)) + payload)
    return path


def run(target: str, method: str, body: Path, *args: str, cpu: int | None = None) -> str:
    """h2load against http://target/method; raises unless every request succeeded."""
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    cmd = [*pin, "h2load", *args, "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
           f"http://{target}{method}"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    if not re.search(r"(\d+) succeeded, 0 failed, 0 errored, 0 timeout", out):
        raise RuntimeError(f"h2load saw failures:\n{out}")
    return out


def closed_loop(target: str, method: str, body: Path, requests: int, streams: int, cpu: int | None = None) -> float:
    """`requests` calls with `streams` in flight over 2 connections; returns requests/s."""
    t0 = time.perf_counter()
    run(target, method, body, "-n", str(requests), "-c", "2", "-m", str(max(1, streams // 2)), cpu=cpu)
    return requests / (time.perf_counter() - t0)


def fixed_rate(target: str, method: str, body: Path, rate: int, seconds: float, cpu: int | None = None) -> dict:
    """`rate` requests/s (2 connections, `--rps` each) for `seconds`; latency percentiles from h2load's request log."""
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        run(target, method, body, "-n", str(int(rate * seconds)), "-c", "2", "-m", "64", "--rps", str(rate // 2),
            "--log-file", log.name, cpu=cpu)  # fmt: skip
        lat = sorted(int(line.split("\t")[2]) / 1000 for line in log if line.strip())
    return {"requests": len(lat), "p50_ms": lat[len(lat) // 2], "p99_ms": lat[int(len(lat) * 0.99)], "max_ms": lat[-1]}
