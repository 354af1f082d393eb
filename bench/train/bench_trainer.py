"""Trainer benchmark: a job run through the service vs a plain TRL/PEFT script, same model, data and
hyperparameters, in one run on one machine; plus event latency emit → watcher (p50/p99).

    .venv/bin/python bench/train/bench_trainer.py [--model builtin:smollm2-135m-instruct|tiny] [--steps 20] [--method qlora|lora] [--postgres]

Service side: registry + trainer in process (SQLite; with `--postgres` a second job on a fresh PostgreSQL database
for the NOTIFY path), the job trains in the trainer's worker subprocess;
tokens/s from the worker's training report (same counter as TRL: input tokens seen / train time), peak RSS
from the STEP events. Peer: `trl.SFTTrainer` + `peft.LoraConfig` in a subprocess, peak RSS from
getrusage. Latency: each event's create_time (set in the worker just before its commit) vs the moment a
gRPC watcher receives it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PEER = r"""
import json, resource, sys, time, torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer
a = json.loads(sys.argv[1])
rows = [json.loads(l) for l in open(a["data"]) if l.strip()]
tok = AutoTokenizer.from_pretrained(a["model"])
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
kw = {"dtype": torch.float32}
if a["method"] == "qlora":
    kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(a["model"], **kw)
cfg = SFTConfig(output_dir=a["out"], max_steps=a["steps"], per_device_train_batch_size=a["batch"], learning_rate=a["lr"],
                max_length=a["max_len"], logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                gradient_checkpointing=a["method"] == "qlora", include_num_input_tokens_seen="non_padding", lr_scheduler_type="cosine",
                warmup_steps=0.03, seed=42, disable_tqdm=True, bf16=False)
peft_cfg = LoraConfig(r=a["r"], lora_alpha=a["alpha"], lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=peft_cfg)
t0 = time.monotonic(); trainer.train(); dt = time.monotonic() - t0
print(json.dumps({"tokens_per_second": trainer.state.num_input_tokens_seen / dt, "tokens": trainer.state.num_input_tokens_seen,
                  "seconds": dt, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def rows(n: int = 64) -> list[dict]:
    out = []
    for i in range(n):
        a, b = (i * 7) % 50 + 1, (i * 13) % 50 + 1
        out.append({"messages": [
            {"role": "system", "content": "You are a service advisor at a car dealership."},
            {"role": "user", "content": f"My car needs {a} litres of oil and {b} more for the filter change. How much in total?"},
            {"role": "assistant", "content": f"You need {a} plus {b}, which is {a + b} litres. We can book the service this week."},
        ]})  # fmt: skip
    return out


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def run_service(args, model: str, data: Path, work: Path, database_url: str) -> dict:
    from neuroweaver.registry.v1 import registry_pb2 as rpb
    from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
    from neuroweaver.registry.v1 import registry_service_pb2_grpc as rgrpc
    from neuroweaver.trainer.v1 import trainer_service_pb2 as tsvc
    from neuroweaver.trainer.v1 import trainer_service_pb2_grpc as tgrpc
    from neuroweaver.trainer.v1 import training_job_pb2 as tpb
    from neuroweaver_registry.app import RegistryConfig
    from neuroweaver_registry.app import build as build_registry
    from neuroweaver_runtime.client import open_channel
    from neuroweaver_trainer.app import TrainerConfig
    from neuroweaver_trainer.app import build as build_trainer

    registry = build_registry(RegistryConfig(port=0, metrics_port=-1, data_dir=str(work / "registry")))
    registry.port = 0
    rport = await registry.start()
    rch = open_channel(f"127.0.0.1:{rport}")
    await rgrpc.RegistryServiceStub(rch).CreateModel(
        rsvc.CreateModelRequest(parent="projects/default", model_id="bench", model=rpb.Model())
    )
    trainer = build_trainer(TrainerConfig(
        port=0, metrics_port=-1, data_dir=str(work / "trainer"), dataset_roots=str(data.parent), registry_target=f"127.0.0.1:{rport}",
        database_url=database_url, watch_poll_seconds=args.watch_poll, model_roots=str(Path(model).parent),
    ))  # fmt: skip
    trainer.port = 0
    tport = await trainer.start()
    ch = open_channel(f"127.0.0.1:{tport}")
    stub = tgrpc.TrainerServiceStub(ch)
    method = tpb.TRAINING_METHOD_SFT_QLORA if args.method == "qlora" else tpb.TRAINING_METHOD_SFT_LORA
    job = await stub.CreateTrainingJob(tsvc.CreateTrainingJobRequest(parent="projects/default", training_job=tpb.TrainingJob(
        base_model=model, dataset_uri=data.as_uri(), method=method, target_model="projects/default/models/bench",
        lora=tpb.LoraConfig(r=args.r, alpha=args.alpha),
        hyperparameters=tpb.Hyperparameters(max_steps=args.steps, batch_size=args.batch, learning_rate=args.lr, max_seq_length=args.max_len,
                                            checkpoint_every_steps=args.steps, eval_every_steps=args.steps, eval_split=0.05),
    )))  # fmt: skip
    latencies, rss = [], []
    async for resp in stub.WatchTrainingJob(tsvc.WatchTrainingJobRequest(name=job.name)):
        now = time.time()
        e = resp.event
        if e.sequence > 2:  # skip the create/claim events, written before the watcher attached
            latencies.append(now - e.create_time.ToNanoseconds() / 1e9)
        if e.type == tpb.EVENT_TYPE_STEP:
            rss.append(e.step.rss_bytes)
    done = await stub.GetTrainingJob(tsvc.GetTrainingJobRequest(name=job.name))
    from neuroweaver_ml import uri_to_path

    report = json.loads((uri_to_path(done.output_uri) / "training_report.json").read_text())
    await ch.close()
    await rch.close()
    await trainer.stop()
    await registry.stop()
    assert done.state == tpb.TrainingJob.STATE_SUCCEEDED, done.error
    res = report["result"]
    return {
        "tokens_per_second": res["tokens_per_second"], "tokens": res["tokens_seen"], "peak_rss_bytes": max(rss),
        "latency_p50_ms": pct(latencies, 0.5) * 1000, "latency_p99_ms": pct(latencies, 0.99) * 1000, "events": len(latencies),
        "wall_seconds": (done.end_time.ToNanoseconds() - done.create_time.ToNanoseconds()) / 1e9,
    }  # fmt: skip


async def run_on_fresh_postgres(args, model: str, data: Path, work: Path) -> dict:
    """The service job again on a new database of the test PostgreSQL server (NW_TEST_POSTGRES_URL), dropped afterwards."""
    from neuroweaver_runtime.testing import create_postgres_database

    url, drop = await create_postgres_database("bench_train")
    try:
        return await run_service(args, model, data, work, url)
    finally:
        await drop()


def run_peer(args, model: str, data: Path, work: Path) -> dict:
    spec = {"model": model, "data": str(data), "out": str(work / "peer"), "steps": args.steps, "batch": args.batch, "lr": args.lr,
            "max_len": args.max_len, "r": args.r, "alpha": args.alpha, "method": args.method}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", PEER, json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the plain TRL/PEFT peer failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--method", default="qlora", choices=["qlora", "lora"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--postgres", action="store_true", help="also run the service job on PostgreSQL (event latency via NOTIFY)")
    p.add_argument("--watch-poll", type=float, default=0.0)
    p.add_argument("--write", action="store_true", help="replace the ## Trainer section of bench/RESULTS.md")
    args = p.parse_args()
    from neuroweaver_ml import build_tiny_llama, resolve_base_model

    work = Path(tempfile.mkdtemp(prefix="nw-bench-train-"))
    model = str(build_tiny_llama(work / "tiny")) if args.model == "tiny" else str(resolve_base_model(args.model))
    data = work / "data" / "chat.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    peer = run_peer(args, model, data, work)
    svc = asyncio.run(run_service(args, model, data, work / "sqlite", ""))
    pg = asyncio.run(run_on_fresh_postgres(args, model, data, work / "postgres")) if args.postgres else None
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
    lines = [
        "## Trainer",
        "",
        f"`bench/train/bench_trainer.py --model {args.model} --method {args.method} --steps {args.steps}` (batch {args.batch}, "
        f"max_len {args.max_len}, LoRA r={args.r}, same 64-row chat dataset), {time.strftime('%Y-%m-%d')}, {machine}. "
        "Peer: a plain `trl.SFTTrainer` + `peft` script with the same model, data and hyperparameters, run in the same invocation, "
        "in fp32 like the service on CPU (`bf16=False`: TRL defaults to bf16 autocast, which on a CPU without bf16 instructions "
        "trained ~12x slower). Tokens are real (non-padding) input tokens over train time on both sides; the peer pads each batch "
        "to its longest row as TRL does without flash attention, the service trains padding-free (rows concatenated with "
        "restarting position ids). On QLoRA, TRL also casts the LoRA adapter weights to bf16 (its QLoRA recipe, whatever "
        "`bf16` says), so the peer's adapter matmuls run in emulated bf16 on this CPU.",
        "",
        "| | tokens/s | peak RSS | tokens |",
        "|---|---|---|---|",
        f"| trainer service (worker process) | {svc['tokens_per_second']:.0f} | {svc['peak_rss_bytes'] / 2**20:.0f} MiB | {svc['tokens']} |",
        f"| plain TRL/PEFT script | {peer['tokens_per_second']:.0f} | {peer['peak_rss_bytes'] / 2**20:.0f} MiB | {peer['tokens']} |",
        f"| ratio service / TRL | {svc['tokens_per_second'] / peer['tokens_per_second']:.2f} | {svc['peak_rss_bytes'] / peer['peak_rss_bytes']:.2f} | |",
        "",
        f"Event latency emit → gRPC watcher (worker and server are separate processes): SQLite {svc['events']} events, "
        f"p50 {svc['latency_p50_ms']:.1f} ms, p99 {svc['latency_p99_ms']:.1f} ms"
        + (
            f"; PostgreSQL (a second job, same settings; {pg['tokens_per_second']:.0f} tokens/s) {pg['events']} events, "
            f"p50 {pg['latency_p50_ms']:.1f} ms, p99 {pg['latency_p99_ms']:.1f} ms"
            if pg
            else ""
        )
        + ". "
        "The worker wakes the trainer's watchers through a pipe after each commit (and NOTIFY on PostgreSQL); the poll "
        "timer is only a safety net.",
        f"Job wall time create → succeeded (incl. worker start, model load, registration): {svc['wall_seconds']:.1f} s. "
        "Peak RSS of the service job is the worker's RSS sampled at each step; the peer's is getrusage's maximum.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        results = Path(__file__).resolve().parents[1] / "RESULTS.md"
        old = results.read_text() if results.exists() else "# Benchmark results\n\n"
        if "## Trainer" in old:
            head, _, rest = old.partition("## Trainer")
            nxt = rest.find("\n## ")
            old = head + (rest[nxt + 1 :] if nxt >= 0 else "")
        results.write_text(old.rstrip() + "\n\n" + text)


if __name__ == "__main__":
    main()
