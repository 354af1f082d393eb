"""GPU serving bench: the model server's vLLM engine vs raw vLLM (its own OpenAI server) vs the transformers engine,
one base with two LoRA adapters, at concurrency 1/8/32. Run it through `bench/serve/gpu.sh` (sets PYTHONPATH,
checks packages); `--smoke` runs the same flow on CPU with a tiny model.

- base: random weights of a Llama-3-8B shape (32 layers, hidden 4096, MLP 14336, 32 heads / 8 KV heads, rope 500000)
  built with `LlamaConfig` on the GPU in bf16 and saved locally (no model hub on the GPU machine); the vocabulary is
  the repo's tiny test tokenizer's (`build_tiny_tokenizer`), so the embeddings are smaller than Llama-3's (~7.0B
  parameters instead of 8.0B). Two random PEFT LoRA adapters (r=16 on q/k/v/o, seeds 1 and 2) named `a` and `b`.
- systems, each run alone (one after the other), through the same official `openai` client (`/v1/chat/completions`,
  streaming, include_usage), requests alternating between `a` and `b`, greedy, `--max-tokens`:
  `ours vllm`: `python -m neuroweaver_model_server --engine vllm` (version `a` + `--extra-versions` `b`);
  `vllm serve`: `python -m vllm.entrypoints.openai.api_server --enable-lora --lora-modules a=... b=...`;
  `ours transformers`: `--engine transformers` (continuous batching, PEFT adapters unmerged, mixed in a batch).
- per concurrency C: max(--requests, 2*C) requests with at most C in flight after one warm-up request; tokens/s =
  completion tokens / wall time, p50/p99 latency per request, p50 TTFT (first content chunk at the client).
- without vLLM installed (the GPU machine this project is lent has none) the vLLM rows say so and the transformers
  rows still run.
Writes gpu_serve.json and gpu_serve.md (a markdown section for bench/RESULTS.md) to --out (default: $OUT, else
/tmp/nw-gpu-bench/out).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from bench_llamacpp import cell, free_port, openai_call, wait_http  # noqa: E402

SECTION = "## Serving: GPU, vLLM engine vs vLLM vs transformers engine (multi-LoRA)"
LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
)  # fmt: skip
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=1024, tie_word_embeddings=True,
)  # fmt: skip
# import name -> pip distribution: what the model server (at start), the model builder and the client import
NEEDED = {
    "torch": "torch", "transformers": "transformers", "peft": "peft", "accelerate": "accelerate",
    "safetensors": "safetensors", "tokenizers": "tokenizers", "psutil": "psutil",
    "grpc": "grpcio", "grpc_health": "grpcio-health-checking", "grpc_reflection": "grpcio-reflection",
    "grpc_status": "grpcio-status", "google.protobuf": "protobuf", "google.rpc": "googleapis-common-protos",
    "prometheus_client": "prometheus-client", "aiohttp": "aiohttp", "yaml": "pyyaml", "kubernetes": "kubernetes",
    "opentelemetry.sdk": "opentelemetry-sdk", "opentelemetry.trace": "opentelemetry-api",
    "openai": "openai", "pydantic": "pydantic",
}  # fmt: skip
IMPORTED = ("openai", "neuroweaver_model_server.app", "neuroweaver_model_server.engines.transformers_engine")


def missing_packages() -> list[str]:
    """Distributions whose import name is not found, each pinned to the version this repo's venv uses when known."""
    out = []
    for module, dist in NEEDED.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(dist)
    if not out:  # the names above are there: import for real, a dependency of theirs may still be missing
        for module in IMPORTED:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as e:
                out.append(f"{e.name} (module, needed by {module})")
    return out


def check(args) -> bool:
    missing = missing_packages()
    if missing:
        print("MISSING Python packages: " + " ".join(missing), flush=True)
        print(
            "Carry them as wheels (README of the device tool), from the repo root on a machine with pip:\n"
            "  echo /.whl/ >> .git/info/exclude\n"
            "  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
            "--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 "
            "--platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl " + " ".join(missing) + "\n"
            "(pin each to the version `.venv/bin/pip list` shows here; name .whl in carry: gpu.sh installs .whl/*.whl)",
            flush=True,
        )
        return False
    print("packages: all found", flush=True)
    return True


def vllm_version() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return None
    from importlib.metadata import version

    return version("vllm")


def make_base_and_adapters(work: Path, smoke: bool) -> tuple[Path, list[tuple[str, Path, str]]]:
    """The base checkpoint (random weights, saved in bf16 on GPU / float32 on CPU) and two random LoRA adapters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from neuroweaver_ml.artifacts import digest_path
    from neuroweaver_ml.models import CHATML_TEMPLATE, build_tiny_tokenizer

    base = work / ("tiny-llama" if smoke else "llama3-8b-shape-random")
    names = [("a", 1), ("b", 2)]
    if not (base / "config.json").is_file() or not all((work / n / "adapter_config.json").is_file() for n, _ in names):
        t0 = time.perf_counter()
        tok = build_tiny_tokenizer()
        tok.chat_template = tok.chat_template or CHATML_TEMPLATE
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        cfg = LlamaConfig(
            vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, **(TINY if smoke else LLAMA3_8B),
        )  # fmt: skip
        device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
        torch.manual_seed(0)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in bf16 on the GPU: no float32 copy of 7B parameters
        try:
            with torch.device(device):
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(default_dtype)
        base.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(base))
        tok.save_pretrained(str(base))
        for name, seed in names:
            torch.manual_seed(seed)
            peft_model = get_peft_model(
                model,
                LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False),
            )
            peft_model.save_pretrained(str(work / name))
            model = peft_model.unload()
        del model, peft_model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"base + adapters written to {work} in {time.perf_counter() - t0:.0f} s", flush=True)
    adapters = [(n, work / n, digest_path(work / n)[0]) for n, _ in names]
    return base, adapters


def alternating(base_url: str, names: list[str], max_tokens: int):
    calls = [openai_call(base_url, n, max_tokens) for n in names]

    async def call(i: int):
        return await calls[i % len(calls)](i)

    return call


async def serve_and_measure(label: str, cmd: list[str], ready_url: str, base_url: str, args, env=None) -> list[dict]:
    log = Path(args.out) / f"{label.replace(' ', '_')}.log"
    print(f"{label}: starting ({' '.join(cmd[:4])} ...), log {log}", flush=True)
    started = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    rows = []
    try:
        await wait_http(ready_url, timeout=args.start_timeout)
        cold = time.perf_counter() - started
        print(f"{label}: ready in {cold:.0f} s", flush=True)
        for c in args.concurrency:
            r = await cell(alternating(base_url, ["a", "b"], args.max_tokens), max(args.requests, 2 * c), c)
            rows.append({"system": label, "concurrency": c, "start_s": cold, **r})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return rows


def ours_cmd(engine: str, base: Path, adapters, args, http_port: int) -> list[str]:
    (_, a_dir, a_sha), (_, b_dir, b_sha) = adapters
    extra = [{"served_model_name": "b-srv", "model_names": ["b"], "adapter_uri": b_dir.as_uri(), "adapter_sha256": b_sha}]
    return [
        sys.executable, "-m", "neuroweaver_model_server", "--engine", engine, "--device", args.device,
        "--base-model", str(base), "--served-model-name", "a-srv", "--model-names", "a",
        "--adapter-uri", a_dir.as_uri(), "--adapter-sha256", a_sha, "--extra-versions", json.dumps(extra),
        "--max-batch-size", str(max(args.concurrency)), "--max-queue", "256",
        "--max-new-tokens-limit", str(max(1024, args.max_tokens)),
        "--grpc-port", str(free_port()), "--http-port", str(http_port), "--metrics-port", "-1", "--log-level", "WARNING",
    ]  # fmt: skip


def vllm_serve_cmd(base: Path, adapters, args, port: int) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--served-model-name", "base",
        "--enable-lora", "--lora-modules", *[f"{n}={d}" for n, d, _ in adapters], "--max-lora-rank", "16",
        "--max-loras", "2", "--max-num-seqs", str(max(args.concurrency)), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def fmt(r: dict) -> str:
    if "skipped" in r:
        return f"| {r['system']} | {r['concurrency']} | — | — | — | — | — | {r['skipped']} |"
    return (
        f"| {r['system']} | {r['concurrency']} | {r['tok_s']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['ttft']:.3f} | "
        f"{r['tokens']} | started in {r['start_s']:.0f} s |"
    )


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, transformers engine (+ vLLM if importable)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/nw-gpu-bench/out")
    ap.add_argument("--work", default="/tmp/nw-gpu-bench", help="where the base and adapters are written (reused)")
    ap.add_argument("--systems", default="ours vllm,vllm serve,ours transformers")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=64, help="requests per cell (at least 2x the concurrency)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--check-only", action="store_true", help="only check the packages")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.smoke:
        args.requests = min(args.requests, 4)
        args.max_tokens = min(args.max_tokens, 16)
        args.work = str(Path(args.work) / "smoke")
    args.device = "cpu" if args.smoke else "cuda"
    if not check(args):
        return 2
    if args.check_only:
        return 0
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on a CPU machine", flush=True)
        return 2
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "none (CPU smoke)"
    vver = vllm_version()
    if vver is None:
        print(
            "vLLM is NOT installed here (python: " + sys.executable + "): the 'ours vllm' and 'vllm serve' rows are "
            "skipped; the transformers engine rows still run.",
            flush=True,
        )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    base, adapters = make_base_and_adapters(Path(args.work), args.smoke)

    rows: list[dict] = []
    for system in [s.strip() for s in args.systems.split(",") if s.strip()]:
        if system in ("ours vllm", "vllm serve") and vver is None:
            rows += [{"system": system, "concurrency": c, "skipped": "not run: vLLM not installed"} for c in args.concurrency]
            continue
        port = free_port()
        if system == "vllm serve":
            cmd = vllm_serve_cmd(base, adapters, args, port)
            ready = f"http://127.0.0.1:{port}/v1/models"
        elif system.startswith("ours "):
            cmd = ours_cmd(system.split(" ", 1)[1], base, adapters, args, port)
            ready = f"http://127.0.0.1:{port}/healthz"
        else:
            raise SystemExit(f"unknown system {system!r}")
        rows += await serve_and_measure(system, cmd, ready, f"http://127.0.0.1:{port}/v1", args)

    mode = "CPU smoke (tiny random Llama, float32)" if args.smoke else "Llama-3-8B shape, random weights, bf16"
    section = "\n".join(
        [
            SECTION,
            "",
            f"`bench/serve/gpu.sh{' --smoke' if args.smoke else ''}` — GPU: {gpu}; torch {torch.__version__}; "
            f"vLLM {vver or 'not installed'}; {platform.machine()}, {os.cpu_count()} CPUs. {mode}; two random LoRA "
            f"adapters (r=16, q/k/v/o) `a` and `b`, requests alternating between them; greedy, max_tokens "
            f"{args.max_tokens}; OpenAI `/v1/chat/completions` streaming through the `openai` client; per concurrency "
            f"max({args.requests}, 2×C) requests after one warm-up; TTFT p50 at the client. Each server runs alone.",
            "",
            "| system | concurrency | tokens/s | p50 s | p99 s | TTFT p50 s | tokens | note |",
            "|---|---|---|---|---|---|---|---|",
            *[fmt(r) for r in rows],
            "",
        ]
    )
    Path(args.out, "gpu_serve.json").write_text(json.dumps({"gpu": gpu, "vllm": vver, "rows": rows}, indent=1))
    Path(args.out, "gpu_serve.md").write_text(section)
    print(section, flush=True)
    print(f"written: {Path(args.out, 'gpu_serve.md')} and gpu_serve.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
