"""transformers engine (continuous batching) vs the former static batcher vs plain transformers `generate`, on one
mixed workload: prompt lengths, output lengths and sampling settings differ from request to request.

    .venv/bin/python bench/serve/bench_cbatch.py [--model builtin:smollm2-135m-instruct] [--scale 1] [--write]

- workload (the same list for every system): request i asks one of 8 short questions, every third one after a ~200-token
  context paragraph; max_tokens cycles 8/32/16/48; sampling cycles greedy / temperature 0.7 + top_p 0.9 + seed i /
  temperature 1.0 (unseeded) / greedy with stop "\\n\\n".
- continuous batching: `python -m neuroweaver_model_server --engine transformers --max-batch-size 32` (the product).
- static batcher: the same server running the former engine (`bench/serve/static_batcher.py`, bench only): it takes
  the oldest request and every waiting one with the same sampling key (a seeded sample decodes alone) and decodes
  them until the longest ends; newcomers wait for the whole batch.
- both servers (same base + LoRA adapter, merged at load as the product does) run side by side and each cell runs
  one after the other on them; clients: the official `openai` client (`/v1/chat/completions`, streaming with
  include_usage; TTFT = first content chunk) and gRPC `GenerateStream` (TTFT = first delta).
- plain transformers: `model.generate` in-process on the same base + adapter (PEFT), one request at a time behind a
  lock, `stop_strings` for the stop request; TTFT via `TextIteratorStreamer`.
- concurrency 1, 8, 32 with 6, 16, 32 requests (x --scale); tokens/s = completion tokens / wall time.
- cold start: a local deployment through the real registry + deployer (bench_serve.cold_start).
Prints a markdown section with the load average per cell; `--write` replaces the `## Serving: transformers engine`
section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import PROMPTS, cold_start, make_adapter  # noqa: E402
from bench_serve import summarize as serve_summarize  # noqa: E402

SECTION = "## Serving: transformers engine (continuous batching)"
CONTEXT = (
    "Context: our dealership services sedans, SUVs and pickups of every major brand. Service appointments run from 8am "
    "to 6pm on weekdays and 9am to 1pm on Saturdays. Brake work, tire rotation, oil changes and battery checks are done "
    "while you wait; transmission and engine repairs need the car for at least a day. The extended warranty covers the "
    "powertrain, electrical systems and air conditioning for five years or 100,000 miles, whichever comes first, but "
    "not wear items such as brake pads, wiper blades or tires. Financing is available for new and used vehicles with "
    "a trade-in credited at the appraised value. Loaner cars are offered for repairs that take more than four hours. "
)
MAX_TOKENS = (8, 32, 16, 48)


def workload(n: int) -> list[tuple[list[dict], dict]]:
    out = []
    for i in range(n):
        question = PROMPTS[i % len(PROMPTS)]
        content = CONTEXT + "\n\nQuestion: " + question if i % 3 == 2 else question
        kind = i % 4
        sampling: dict = {"max_tokens": MAX_TOKENS[(i // 2) % len(MAX_TOKENS)]}
        if kind == 1:
            sampling.update(temperature=0.7, top_p=0.9, seed=i)
        elif kind == 2:
            sampling.update(temperature=1.0)
        elif kind == 3:
            sampling.update(stop=["\n\n"])
        out.append(([{"role": "user", "content": content}], sampling))
    return out


def summarize(results: list[tuple[float, float, int]], wall: float) -> dict:
    """bench_serve's row plus the 1-minute load average (this bench runs beside other work)."""
    return {**serve_summarize(results, wall), "load": os.getloadavg()[0]}


async def drive(one, work, concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    results: list[tuple[float, float, int]] = []

    async def req(item):
        async with sem:
            results.append(await one(*item))

    t0 = time.perf_counter()
    await asyncio.gather(*(req(item) for item in work))
    return summarize(results, time.perf_counter() - t0)


# -- clients -------------------------------------------------------------------------------------


def http_client(port: int):
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=600)

    async def one(messages, sampling):
        started = time.perf_counter()
        ttft, tokens = None, 0
        stream = await client.chat.completions.create(
            model="bench", messages=messages, stream=True, stream_options={"include_usage": True}, **sampling
        )
        async for chunk in stream:
            if ttft is None and chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
                ttft = time.perf_counter() - started
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return time.perf_counter() - started, ttft or 0.0, tokens

    return one


def grpc_client(stub):
    from neuroweaver.inference.v1 import inference_pb2 as pb
    from neuroweaver.inference.v1 import inference_service_pb2 as svc

    async def one(messages, sampling):
        started = time.perf_counter()
        ttft, tokens = None, 0
        request = svc.GenerateStreamRequest(
            messages=[pb.ChatMessage(**m) for m in messages], sampling=pb.SamplingParams(**sampling)
        )
        async for msg in stub.GenerateStream(request):
            if ttft is None and (msg.delta or msg.finish_reason):
                ttft = time.perf_counter() - started
            if msg.finish_reason:
                tokens = msg.usage.completion_tokens
        return time.perf_counter() - started, ttft or 0.0, tokens

    return one


class PlainTransformers:
    def __init__(self, base_dir: Path, adapter_dir: Path) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(base_dir))
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        self.model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
        self.lock = threading.Lock()

    def one_blocking(self, messages, sampling) -> tuple[float, float, int]:
        import torch
        from transformers import TextIteratorStreamer

        started = time.perf_counter()
        with self.lock:
            ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            streamer = TextIteratorStreamer(self.tok, skip_prompt=True)
            kw: dict = {"max_new_tokens": sampling["max_tokens"], "pad_token_id": self.tok.eos_token_id}
            if sampling.get("temperature"):
                kw.update(do_sample=True, temperature=sampling["temperature"], top_p=sampling.get("top_p", 1.0))
                if "seed" in sampling:
                    torch.manual_seed(sampling["seed"])
            else:
                kw.update(do_sample=False)
            if sampling.get("stop"):
                kw.update(stop_strings=sampling["stop"], tokenizer=self.tok)
            out: dict = {}

            def run():
                with torch.inference_mode():
                    out["seq"] = self.model.generate(**ids, streamer=streamer, **kw)

            t = threading.Thread(target=run)
            t.start()
            ttft = None
            for _ in streamer:
                if ttft is None:
                    ttft = time.perf_counter() - started
            t.join()
        tokens = int(out["seq"].shape[1] - ids["input_ids"].shape[1])
        return time.perf_counter() - started, ttft or 0.0, tokens

    async def one(self, messages, sampling):
        return await asyncio.to_thread(self.one_blocking, messages, sampling)


# -- servers -------------------------------------------------------------------------------------


async def start_server(prefix: list[str], base_dir: Path, adapter: tuple[Path, str]):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from neuroweaver_runtime.testing import free_port

    port, http = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        *prefix, "--grpc-port", str(port), "--http-port", str(http), "--metrics-port", str(free_port()),
        "--base-model", str(base_dir), "--served-model-name", "bench", "--adapter-uri", adapter[0].as_uri(),
        "--adapter-sha256", adapter[1], "--engine", "transformers", "--max-batch-size", "32", "--max-queue", "64",
        "--log-level", "WARNING",
    )  # fmt: skip
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_reconnect_backoff_ms", 250)])
    call = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service="neuroweaver.inference.v1.InferenceService"), wait_for_ready=True
    )
    async for msg in call:
        if msg.status == health_pb2.HealthCheckResponse.SERVING:
            call.cancel()
            break
    return proc, channel, http


def row(c: int, system: str, r: dict) -> str:
    return (
        f"| {c} | {system} | {r['tok_s']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['ttft50']:.3f} | {r['ttft99']:.3f} "
        f"| {r['tokens']} | {r['load']:.1f} |"
    )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--no-plain", action="store_true")
    ap.add_argument("--no-servers", action="store_true", help="only plain generate (and the cold start)")
    ap.add_argument("--plain-concurrency", default="", help="levels for plain generate (default: --concurrency)")
    ap.add_argument("--no-cold-start", action="store_true")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    from neuroweaver.inference.v1 import inference_service_pb2_grpc as svc_grpc
    from neuroweaver_ml import resolve_base_model

    levels = [int(c) for c in args.concurrency.split(",")]
    count = {1: 6, 8: 16, 32: 32}
    base_dir = resolve_base_model(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="nw-bench-cbatch-"))
    adapter = make_adapter(base_dir, tmp / "adapter")
    results: dict[tuple[str, str, int], dict] = {}
    systems = {}
    if not args.no_servers:
        cb = await start_server([sys.executable, "-m", "neuroweaver_model_server"], base_dir, adapter)
        static = await start_server([sys.executable, str(ROOT / "bench" / "serve" / "static_batcher.py")], base_dir, adapter)
        systems = {"continuous batching": cb, "static batcher": static}
    try:
        for _, channel, http in systems.values():  # warm-up
            await drive(http_client(http), workload(2), 2)
            await drive(grpc_client(svc_grpc.InferenceServiceStub(channel)), workload(2), 2)
        for c in levels if systems else []:
            work = workload(max(c, int(count.get(c, 2 * c) * args.scale)))
            for front in ("HTTP (openai)", "gRPC"):
                for name, (_, channel, http) in systems.items():
                    one = http_client(http) if front.startswith("HTTP") else grpc_client(svc_grpc.InferenceServiceStub(channel))
                    r = await drive(one, work, c)
                    results[(front, name, c)] = r
                    print(front, name, c, r, flush=True)
    finally:
        for proc, channel, _ in systems.values():
            proc.terminate()
            await proc.wait()
            await channel.close()
    if not args.no_plain:
        peer = PlainTransformers(base_dir, adapter[0])
        await peer.one(*workload(1)[0])  # warm-up
        for c in [int(c) for c in args.plain_concurrency.split(",")] if args.plain_concurrency else levels:
            work = workload(max(c, int(count.get(c, 2 * c) * args.scale)))
            r = await drive(peer.one, work, c)
            results[("in-process", "plain transformers generate", c)] = r
            print("plain", c, r, flush=True)
        del peer
    cold = None if args.no_cold_start else await cold_start(args.model, adapter, tmp / "cold")
    cpu = platform.processor() or platform.machine()
    lines = [
        SECTION,
        "",
        f"`bench/serve/bench_cbatch.py`: {args.model} + a LoRA adapter (r=8, q/v), {os.cpu_count()} CPU cores ({cpu}), "
        f"torch CPU, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; same machine, same run. Mixed workload: short "
        "questions and ~200-token contexts, max_tokens 8/16/32/48, greedy / seeded temperature 0.7 + top_p 0.9 / "
        "unseeded temperature 1.0 / greedy with a stop string. Both servers: `--max-batch-size 32`, side by side, each "
        "cell run on one then the other. The load column is the 1-minute load average at the end of the cell (the "
        "machine is shared with other jobs).",
        "",
        "| concurrency | system | tokens/s | p50 latency s | p99 latency s | TTFT p50 s | TTFT p99 s | tokens | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for front in ("HTTP (openai)", "gRPC", "in-process"):
        cells = [(k, v) for k, v in results.items() if k[0] == front]
        if not cells:
            continue
        lines.append(f"| **{front}** | | | | | | | | |")
        for (_, name, c), r in sorted(cells, key=lambda kv: (kv[0][2], kv[0][1])):
            lines.append(row(c, name, r))
    lines.append("")
    for front in ("HTTP (openai)", "gRPC"):
        ratios = []
        for c in levels:
            a, b = results.get((front, "continuous batching", c)), results.get((front, "static batcher", c))
            if a and b:
                ratios.append(f"{c}: {a['tok_s'] / b['tok_s']:.2f}x")
        if ratios:
            lines.append(f"Continuous / static batcher tokens/s over {front}, by concurrency: {', '.join(ratios)}.")
            lines.append("")
    if cold is not None:
        lines += [
            f"Cold start of a local deployment (CreateDeployment → AVAILABLE: process start, imports, model + adapter "
            f"load, health): {cold:.1f} s (load average {os.getloadavg()[0]:.1f}).",
            "",
        ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        path = ROOT / "bench" / "RESULTS.md"
        old = path.read_text()
        start = old.find(SECTION)
        if start >= 0:
            end = old.find("\n## ", start + 3)
            old = old[:start] + (old[end + 1 :] if end >= 0 else "")
        path.write_text(old.rstrip() + "\n\n" + text)


if __name__ == "__main__":
    asyncio.run(main())
