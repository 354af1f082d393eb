"""Cold start of the model server (issue 17 §5: "cold start of a local deployment < 10 s").

    .venv/bin/python bench/serve/bench_cold_start.py [--model builtin:smollm2-135m-instruct] [--repeats 3]

- process: `python -m neuroweaver_model_server` started until its gRPC health turns SERVING (what the deployer's
  local backend waits for), split into the model load the server logs ("model loaded", `seconds`) and the rest
  (interpreter, imports, ports), for the transformers engine (the base + a LoRA adapter, merged at load: what
  `bench_serve.cold_start` deploys) and the llama.cpp engine (the base's GGUF, `--engine auto`);
- deployment: CreateDeployment → AVAILABLE through the real registry + deployer (`bench_serve.cold_start`, the
  transformers case), the issue's number.
Each measurement `--repeats` times, alternating; the 1-minute load average next to each (the machine is shared).
`--baseline-pythonpath DIRS` also starts each model-server case with those source directories first on PYTHONPATH
(an exported older tree: `git archive <commit> libs services | tar -x -C /tmp/base`), alternating with the current
code, for an A/B in the same minutes. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import cold_start, make_adapter  # noqa: E402


async def server_start(args: list[str], pythonpath: str = "") -> tuple[float, float]:
    """Seconds from spawning the model server to SERVING, and the load it logs."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from neuroweaver_runtime.testing import free_port

    port, http = free_port(), free_port()
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "neuroweaver_model_server", "--grpc-port", str(port), "--http-port", str(http),
        "--metrics-port", "-1", "--served-model-name", "bench", "--log-level", "INFO", *args,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None,
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_reconnect_backoff_ms", 100)]) as ch:
            call = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(service="neuroweaver.inference.v1.InferenceService"), wait_for_ready=True
            )
            async for msg in call:
                if msg.status == health_pb2.HealthCheckResponse.SERVING:
                    call.cancel()
                    break
        seconds = time.perf_counter() - t0
    finally:
        proc.terminate()
        _, err = await proc.communicate()
    load = next((json.loads(line)["seconds"] for line in err.decode().splitlines() if '"model loaded"' in line), float("nan"))
    return seconds, load


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-deployment", action="store_true", help="only the model-server process starts")
    ap.add_argument("--baseline-pythonpath", default="", help="also start each case with this PYTHONPATH (A/B)")
    args = ap.parse_args()
    from neuroweaver_ml import resolve_base_model

    base_dir = resolve_base_model(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="nw-bench-cold-"))
    adapter = make_adapter(base_dir, tmp / "adapter")
    cases = {
        "transformers + LoRA adapter": [
            "--base-model", str(base_dir), "--adapter-uri", adapter[0].as_uri(), "--adapter-sha256", adapter[1],
            "--engine", "transformers",
        ],
        "llama.cpp (the base's GGUF)": ["--base-model", args.model, "--engine", "auto"],
    }  # fmt: skip
    if args.baseline_pythonpath:
        cases = {f"{name}, {code}": case for name, case in cases.items() for code in ("baseline", "current")}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cases}
    deployments: list[tuple[float, float]] = []
    for i in range(args.repeats):
        for name, case in cases.items():
            total, load = await server_start(case, args.baseline_pythonpath if name.endswith("baseline") else "")
            results[name].append((total, load, os.getloadavg()[0]))
            print(name, f"{total:.2f} s (load {load:.2f} s)", f"loadavg {os.getloadavg()[0]:.1f}", flush=True)
        if not args.no_deployment:
            seconds = await cold_start(args.model, adapter, tmp / f"cold-{i}")
            deployments.append((seconds, os.getloadavg()[0]))
            print("deployment", f"{seconds:.2f} s", f"loadavg {os.getloadavg()[0]:.1f}", flush=True)

    lines = [
        "| what | runs (s) | median s | of which model load s (median) | load average |",
        "|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        lines.append(
            f"| model server start → SERVING, {name} | {', '.join(f'{t:.1f}' for t, _, _ in runs)} | "
            f"{statistics.median(t for t, _, _ in runs):.1f} | {statistics.median(x for _, x, _ in runs):.1f} | "
            f"{', '.join(f'{la:.1f}' for _, _, la in runs)} |"
        )
    if deployments:
        lines.append(
            f"| local deployment CreateDeployment → AVAILABLE (transformers + LoRA adapter) | "
            f"{', '.join(f'{t:.1f}' for t, _ in deployments)} | {statistics.median(t for t, _ in deployments):.1f} | — | "
            f"{', '.join(f'{la:.1f}' for _, la in deployments)} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
