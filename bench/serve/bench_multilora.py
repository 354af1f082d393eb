"""Several versions on one base (multi-LoRA): one model-server process serving 2 versions (the base loaded once, two
PEFT adapters unmerged, each request decoded with its version's adapter, mixed in one batch) vs 2 processes serving one
version each (each loads the base; the adapter merged at load, as a one-version server does).

    .venv/bin/python bench/serve/bench_multilora.py [--model builtin:smollm2-135m-instruct] [--requests 32] [--repeats 2] [--write]

- adapters: two LoRA adapters (r=4 on q_proj/v_proj, different random non-zero weights) on the base.
- memory: RSS and PSS (/proc/<pid>/smaps_rollup) of the model-server processes once SERVING, summed over processes.
- throughput: the same requests for both layouts, alternating between the two versions (greedy, max_tokens 32, 8 chat
  questions), gRPC GenerateStream at concurrency 8 (4 per version), tokens/s = completion tokens / wall time; the
  layouts run one after the other (never side by side).
Prints a markdown section; `--write` replaces the `## Serving: several versions on one base` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import PROMPTS, pct  # noqa: E402

SECTION = "## Serving: several versions on one base (multi-LoRA)"
NAMES = ("advisor-ab/1.0.0", "advisor-ab/1.1.0")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (load-independent work, unlike wall time on a shared machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in ("Rss:", "Pss:"):
            values[parts[0]] = int(parts[1])
    return values["Rss:"], values["Pss:"]


async def start(base_dir: Path, adapters: list[tuple[Path, str]], names: list[str]):
    """A model server serving `adapters` (the first as its own version, the others via --extra-versions)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from neuroweaver_runtime.testing import free_port

    port = free_port()
    args = [
        sys.executable, "-m", "neuroweaver_model_server", "--grpc-port", str(port), "--http-port", str(free_port()),
        "--metrics-port", "-1", "--base-model", str(base_dir), "--served-model-name", f"v{len(names)}-{names[0][-5:].replace('.', '-')}",
        "--model-names", names[0], "--adapter-uri", adapters[0][0].as_uri(), "--adapter-sha256", adapters[0][1],
        "--engine", "transformers", "--max-batch-size", "16", "--log-level", "WARNING", "--device", "cpu",
    ]  # fmt: skip
    if len(adapters) > 1:
        extra = [
            {"served_model_name": f"extra-{i}", "model_names": [name], "adapter_uri": path.as_uri(), "adapter_sha256": sha}
            for i, ((path, sha), name) in enumerate(zip(adapters[1:], names[1:], strict=True))
        ]
        args += ["--extra-versions", json.dumps(extra)]
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*args)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_reconnect_backoff_ms", 250)])
    call = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service="neuroweaver.inference.v1.InferenceService"), wait_for_ready=True
    )
    async for msg in call:
        if msg.status == health_pb2.HealthCheckResponse.SERVING:
            call.cancel()
            break
    return proc, channel, time.perf_counter() - started


async def drive(stubs: dict[str, object], n: int, concurrency: int) -> dict:
    from neuroweaver.inference.v1 import inference_pb2 as pb
    from neuroweaver.inference.v1 import inference_service_pb2 as svc

    sem = asyncio.Semaphore(concurrency)
    results: list[tuple[float, int, str]] = []

    async def one(i: int) -> None:
        name = NAMES[i % 2]
        request = svc.GenerateStreamRequest(
            model=name,
            messages=[pb.ChatMessage(role="user", content=PROMPTS[(i // 2) % len(PROMPTS)])],
            sampling=pb.SamplingParams(max_tokens=32),
        )
        async with sem:
            started = time.perf_counter()
            text, tokens = "", 0
            async for msg in stubs[name].GenerateStream(request):  # type: ignore[attr-defined]
                text += msg.delta
                if msg.finish_reason:
                    tokens = msg.usage.completion_tokens
            results.append((time.perf_counter() - started, tokens, text))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    lat = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {"tok_s": tokens / wall, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "tokens": tokens, "load": os.getloadavg()[0]}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each layout, alternating (the machine is shared)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    from neuroweaver.inference.v1 import inference_service_pb2_grpc as svc_grpc
    from neuroweaver_ml import resolve_base_model
    from neuroweaver_ml.testing import make_lora_adapter

    base_dir = Path(resolve_base_model(args.model))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [make_lora_adapter(base_dir, Path(tmp, f"adapter-{i}"), seed=i) for i in range(2)]
        layouts = {
            "1 process, 2 versions (multi-LoRA)": [(adapters, list(NAMES))],
            "2 processes, 1 version each": [([adapters[0]], [NAMES[0]]), ([adapters[1]], [NAMES[1]])],
        }
        for layout, servers in [item for _ in range(args.repeats) for item in layouts.items()]:
            started = [await start(base_dir, a, n) for a, n in servers]
            try:
                rss = sum(memory_kib(p.pid)[0] for p, _, _ in started)
                pss = sum(memory_kib(p.pid)[1] for p, _, _ in started)
                stubs = {}
                for (_, names), (_, channel, _) in zip(servers, started, strict=True):
                    for name in names:
                        stubs[name] = svc_grpc.InferenceServiceStub(channel)
                await drive(stubs, 4, 4)  # warm-up
                cpu0 = sum(cpu_seconds(p.pid) for p, _, _ in started)
                r = await drive(stubs, args.requests, args.concurrency)
                cpu = sum(cpu_seconds(p.pid) for p, _, _ in started) - cpu0
                # memory again after decoding (KV caches, allocator)
                rss_after = sum(memory_kib(p.pid)[0] for p, _, _ in started)
                cold = max(s for _, _, s in started)
                rows.append(
                    f"| {layout} | {len(servers)} | {rss / 1024:.0f} | {pss / 1024:.0f} | {rss_after / 1024:.0f} | "
                    f"{r['tok_s']:.1f} | {1000 * cpu / max(1, r['tokens']):.0f} | {r['p50']:.2f} | {r['p99']:.2f} | "
                    f"{r['tokens']} | {cold:.1f} | {r['load']:.1f} |"
                )
                print(rows[-1], flush=True)
            finally:
                for proc, channel, _ in started:
                    await channel.close()
                    proc.terminate()
                    await proc.wait()

    section = "\n".join(
        [
            SECTION,
            "",
            f"`bench/serve/bench_multilora.py --model {args.model} --requests {args.requests}` — {platform.machine()}, "
            f"{os.cpu_count()} CPUs (shared with other work: load average per row), torch CPU float32, transformers engine. "
            "Two versions of one base (two LoRA adapters r=4 on q/v): one model-server process serving both "
            "(`--extra-versions`; base loaded once, adapters unmerged, rows of both versions in one batch through PEFT "
            "`adapter_names`) vs one process per version (each loads the base and merges its adapter). Memory once "
            "SERVING (RSS, PSS summed over the processes) and after the run; requests alternate between the versions "
            f"(greedy, max_tokens 32), gRPC GenerateStream at concurrency {args.concurrency}; the layouts alternate, "
            f"{args.repeats} runs each (one row per run).",
            "",
            "| layout | processes | RSS MiB | PSS MiB | RSS after run MiB | tokens/s | server CPU ms/token | p50 s | p99 s "
            "| tokens | start s | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(section)
    if args.write:
        path = ROOT / "bench" / "RESULTS.md"
        text = path.read_text()
        if SECTION in text:
            head, rest = text.split(SECTION, 1)
            tail = rest.split("\n## ", 1)
            text = head + section + ("\n## " + tail[1] if len(tail) > 1 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + section
        path.write_text(text)


if __name__ == "__main__":
    asyncio.run(main())
