"""Serving benchmark: the NeuroWeaver model server vs plain transformers `generate` on the same model and prompts.

    .venv/bin/python bench/serve/bench_serve.py [--model builtin:smollm2-135m-instruct] [--requests 16] [--max-tokens 32]

- model server: `python -m neuroweaver_model_server` in its own process (LoRA adapter on the base,
  bounded queue, dynamic batcher); clients call gRPC `GenerateStream` (TTFT = first delta at the client).
- peer: plain transformers `model.generate` with the same base + adapter (PEFT), greedy, in-process, one request
  at a time behind a lock (what a naive transformers server does); TTFT via `TextIteratorStreamer`.
- concurrency 1 and 8; tokens/s = completion tokens / wall time; latency p50/p99 per request.
- cold start: a local deployment created through the deployer (real registry) until AVAILABLE.
Prints a markdown section; `--write` replaces the `## Serving` section of bench/RESULTS.md.
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


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def make_adapter(base_dir: Path, out: Path) -> tuple[Path, str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from neuroweaver_ml import digest_path

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).save_pretrained(str(out))
    return out, digest_path(out)[0]


# -- plain transformers peer ---------------------------------------------------------------------


class PlainTransformers:
    def __init__(self, base_dir: Path, adapter_dir: Path) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(base_dir))
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        self.model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
        self.lock = threading.Lock()

    def one(self, prompt: str, max_tokens: int) -> tuple[float, float, int]:
        import torch
        from transformers import TextIteratorStreamer

        started = time.perf_counter()
        with self.lock:
            ids = self.tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            streamer = TextIteratorStreamer(self.tok, skip_prompt=True)
            out: dict = {}

            def run():
                with torch.inference_mode():
                    out["seq"] = self.model.generate(
                        **ids, max_new_tokens=max_tokens, do_sample=False, streamer=streamer, pad_token_id=self.tok.eos_token_id
                    )

            t = threading.Thread(target=run)
            t.start()
            ttft = None
            for _ in streamer:
                if ttft is None:
                    ttft = time.perf_counter() - started
            t.join()
        tokens = int(out["seq"].shape[1] - ids["input_ids"].shape[1])
        return time.perf_counter() - started, ttft or 0.0, tokens


async def run_peer(peer: PlainTransformers, n: int, concurrency: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    results = []

    async def req(i):
        async with sem:
            results.append(await asyncio.to_thread(peer.one, PROMPTS[i % len(PROMPTS)], max_tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(req(i) for i in range(n)))
    return summarize(results, time.perf_counter() - t0)


# -- model server --------------------------------------------------------------------------------


async def run_server(stub, n: int, concurrency: int, max_tokens: int) -> dict:
    from neuroweaver.inference.v1 import inference_pb2 as pb
    from neuroweaver.inference.v1 import inference_service_pb2 as svc

    sem = asyncio.Semaphore(concurrency)
    results = []

    async def req(i):
        async with sem:
            started = time.perf_counter()
            ttft, tokens = None, 0
            request = svc.GenerateStreamRequest(
                messages=[pb.ChatMessage(role="user", content=PROMPTS[i % len(PROMPTS)])],
                sampling=pb.SamplingParams(max_tokens=max_tokens),
            )
            async for msg in stub.GenerateStream(request):
                if ttft is None and (msg.delta or msg.finish_reason):
                    ttft = time.perf_counter() - started
                if msg.finish_reason:
                    tokens = msg.usage.completion_tokens
            results.append((time.perf_counter() - started, ttft or 0.0, tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(req(i) for i in range(n)))
    return summarize(results, time.perf_counter() - t0)


def summarize(results, wall: float) -> dict:
    lat = [r[0] for r in results]
    ttft = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return {
        "tok_s": tokens / wall,
        "p50": pct(lat, 0.5),
        "p99": pct(lat, 0.99),
        "ttft50": pct(ttft, 0.5),
        "ttft99": pct(ttft, 0.99),
        "tokens": tokens,
    }


async def start_model_server(base_dir: Path, adapter: tuple[Path, str], max_batch: int):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from neuroweaver_runtime.testing import free_port

    port, http = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "neuroweaver_model_server", "--grpc-port", str(port), "--http-port", str(http),
        "--base-model", str(base_dir), "--served-model-name", "bench", "--adapter-uri", adapter[0].as_uri(),
        "--adapter-sha256", adapter[1], "--max-batch-size", str(max_batch), "--log-level", "WARNING",
    )  # fmt: skip
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_reconnect_backoff_ms", 250)])
    call = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service="neuroweaver.inference.v1.InferenceService"), wait_for_ready=True
    )
    async for msg in call:
        if msg.status == health_pb2.HealthCheckResponse.SERVING:
            call.cancel()
            break
    return proc, channel


async def cold_start(base_ref: str, adapter: tuple[Path, str], root: Path) -> float:
    """CreateDeployment → AVAILABLE for a local deployment (process start, model load, health) through the real services."""
    sys.path.insert(0, str(ROOT / "services" / "deployer" / "tests"))
    import grpc
    from helpers import watch_until

    from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
    from neuroweaver.deployer.v1 import deployer_service_pb2_grpc as dgrpc
    from neuroweaver.deployer.v1 import deployment_pb2 as dpb
    from neuroweaver.registry.v1 import registry_pb2 as rpb
    from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
    from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
    from neuroweaver_deployer.app import DeployerConfig
    from neuroweaver_deployer.app import build as build_deployer
    from neuroweaver_registry.app import RegistryConfig
    from neuroweaver_registry.app import build as build_registry
    from neuroweaver_runtime.testing import free_port

    registry = build_registry(
        RegistryConfig(port=free_port(), metrics_port=-1, data_dir=str(root), database_url=f"sqlite:///{root / 'r.db'}")
    )
    await registry.start()
    deployer = build_deployer(
        DeployerConfig(
            port=free_port(),
            metrics_port=-1,
            database_url=f"sqlite:///{root / 'd.db'}",
            registry_target=f"127.0.0.1:{registry.port}",
        )
    )
    await deployer.start()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{registry.port}") as rc,
            grpc.aio.insecure_channel(f"127.0.0.1:{deployer.port}") as dc,
        ):
            reg, dep = rgrpc.RegistryServiceStub(rc), dgrpc.DeployerServiceStub(dc)
            await reg.CreateModel(
                rsvc.CreateModelRequest(parent="projects/default", model_id="smol", model=rpb.Model(base_model=base_ref))
            )
            mv = await reg.CreateModelVersion(rsvc.CreateModelVersionRequest(parent="projects/default/models/smol", version="1.0.0", model_version=rpb.ModelVersion(
                artifact=rpb.Artifact(uri=adapter[0].as_uri(), sha256=adapter[1], format=rpb.ARTIFACT_FORMAT_LORA_ADAPTER),
                lineage=rpb.Lineage(base_model=base_ref))))  # fmt: skip
            t0 = time.perf_counter()
            await dep.CreateDeployment(
                dsvc.CreateDeploymentRequest(
                    parent="projects/default", deployment_id="smol", deployment=dpb.Deployment(model_version=mv.name, replicas=1)
                )
            )
            await watch_until(
                dep, "projects/default/deployments/smol", lambda d: d.state == dpb.Deployment.STATE_AVAILABLE, timeout=600
            )
            seconds = time.perf_counter() - t0
            await dep.DeleteDeployment(dsvc.DeleteDeploymentRequest(name="projects/default/deployments/smol"))
            return seconds
    finally:
        await deployer.stop()
        await registry.stop()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    from neuroweaver.inference.v1 import inference_service_pb2_grpc as svc_grpc
    from neuroweaver_ml import resolve_base_model

    base_dir = resolve_base_model(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="nw-bench-serve-"))
    adapter = make_adapter(base_dir, tmp / "adapter")
    rows = []
    peer = PlainTransformers(base_dir, adapter[0])
    await asyncio.to_thread(peer.one, PROMPTS[0], 4)  # warm-up
    proc, channel = await start_model_server(base_dir, adapter, 8)
    stub = svc_grpc.InferenceServiceStub(channel)
    await run_server(stub, 2, 1, 4)  # warm-up
    try:
        for c in (1, 8):
            s = await run_server(stub, args.requests, c, args.max_tokens)
            p = await run_peer(peer, args.requests, c, args.max_tokens)
            rows.append((c, s, p))
            print(c, s, p, flush=True)
    finally:
        proc.terminate()
        await proc.wait()
        await channel.close()
    del peer
    cold = await cold_start(args.model, adapter, tmp / "cold")
    cpu = platform.processor() or platform.machine()
    lines = [
        "## Serving",
        "",
        f"`bench/serve/bench_serve.py`: {args.model} + a LoRA adapter (r=8, q/v), greedy, {args.max_tokens} new tokens, "
        f"{args.requests} chat requests per row; {os.cpu_count()} CPU cores ({cpu}), torch CPU; same machine, same run. "
        "Peer: plain transformers `generate` (PEFT adapter, in-process, one request at a time). Model server: gRPC "
        "`GenerateStream` over localhost to `python -m neuroweaver_model_server` (dynamic batcher, max batch 8).",
        "",
        "| concurrency | system | tokens/s | p50 latency s | p99 latency s | TTFT p50 s | TTFT p99 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, s, p in rows:
        lines.append(
            f"| {c} | model server | {s['tok_s']:.1f} | {s['p50']:.2f} | {s['p99']:.2f} | {s['ttft50']:.3f} | {s['ttft99']:.3f} |"
        )
        lines.append(
            f"| {c} | plain transformers | {p['tok_s']:.1f} | {p['p50']:.2f} | {p['p99']:.2f} | {p['ttft50']:.3f} | {p['ttft99']:.3f} |"
        )
    for c, s, p in rows:
        lines.append("")
        lines.append(
            f"Concurrency {c}: model server / plain transformers tokens/s = {s['tok_s'] / p['tok_s']:.2f}x, p50 latency ratio {s['p50'] / p['p50']:.2f}x."
        )
    lines += [
        "",
        f"Cold start of a local deployment (CreateDeployment → AVAILABLE: process start, imports, model + adapter load, health): {cold:.1f} s.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        path = ROOT / "bench" / "RESULTS.md"
        old = path.read_text() if path.exists() else "# Benchmark results\n"
        start = old.find("## Serving")
        if start >= 0:
            end = old.find("\n## ", start + 3)
            old = old[:start] + (old[end + 1 :] if end >= 0 else "")
        path.write_text(old.rstrip() + "\n\n" + text)


if __name__ == "__main__":
    asyncio.run(main())
