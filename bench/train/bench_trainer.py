"""Trainer benchmark: a job run through the service vs TRL's `SFTTrainer` configured at its best for the same work, same
model, data and hyperparameters, in one run on one machine; plus event latency emit → watcher (p50/p99).

    .venv/bin/python bench/train/bench_trainer.py [--model builtin:smollm2-135m-instruct|tiny] [--steps 20]
        [--method qlora lora] [--peers trl trl-padded trl-stock] [--repeat 2] [--postgres] [--write]

Service side: registry + trainer in process (SQLite; with `--postgres` a second job on a fresh PostgreSQL database
for the NOTIFY path), the job trains in the trainer's worker subprocess (padding-free, no held-out rows);
tokens/s from the worker's training report (input tokens seen / train time), peak RSS the worker's VmHWM.
Peers, each `trl.SFTTrainer` + `peft.LoraConfig` in a subprocess, peak RSS from getrusage:
`trl` (the headline) `padding_free=True`, the batch concatenated into one row with restarting position ids like the
service, QLoRA adapter weights kept in fp32 like the service; `trl-padded` TRL's default padded batches;
`trl-stock` padding-free with TRL's bf16 cast of a quantized model's adapter left in place.
Latency: each event's create_time (set in the worker just before its commit) vs the moment a gRPC watcher receives it.
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
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
from trl import SFTConfig, SFTTrainer
a = json.loads(sys.argv[1])
rows = [json.loads(l) for l in open(a["data"]) if l.strip()]
tok = AutoTokenizer.from_pretrained(a["model"])
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
qlora, pf = a["method"] == "qlora", a["padding_free"]
longest = max(len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows)
# TRL refuses max_length with padding_free and no packing (it would not truncate); no row reaches max_len, so None is the same work
assert longest <= a["max_len"], (longest, a["max_len"])
kw = {"dtype": torch.float32}
if qlora:
    kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(a["model"], **kw)
cfg = SFTConfig(output_dir=a["out"], max_steps=a["steps"], per_device_train_batch_size=a["batch"], learning_rate=a["lr"],
                padding_free=pf, max_length=None if pf else a["max_len"], logging_steps=1, report_to="none", use_cpu=True,
                save_strategy="steps", save_steps=a["steps"], gradient_checkpointing=qlora, gradient_checkpointing_kwargs={"use_reentrant": False},
                include_num_input_tokens_seen="all" if pf else "non_padding", lr_scheduler_type="cosine", warmup_steps=0.03,
                seed=42, data_seed=42, disable_tqdm=True, bf16=False, optim="adamw_torch", max_grad_norm=1.0, dataloader_num_workers=0)
peft_cfg = LoraConfig(r=a["r"], lora_alpha=a["alpha"], lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=peft_cfg)
if qlora and a["adapter_fp32"]:  # TRL casts a quantized model's LoRA weights to bf16 (its QLoRA recipe); back to fp32 like ours
    for p in trainer.model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
dtypes = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
class T0(TrainerCallback):
    def on_train_begin(self, *args, **kw):
        self.t0 = time.monotonic()
t0 = T0(); trainer.add_callback(t0)
trainer.train(); dt = time.monotonic() - t0.t0  # same window as the service: train begin .. train() returned (final checkpoint included)
print(json.dumps({"tokens_per_second": trainer.state.num_input_tokens_seen / dt, "tokens": trainer.state.num_input_tokens_seen,
                  "seconds": dt, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "longest_row": longest, "adapter_dtypes": dtypes}))
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


def worker_peak_rss() -> dict[int, int]:
    """VmHWM (the kernel's peak RSS, what getrusage's ru_maxrss reports for the peer) of this process's descendants: the
    trainer's worker subprocess. Read at each STEP event, so the last reading covers the whole training up to the last step."""
    import psutil

    out = {}
    for child in psutil.Process().children(recursive=True):
        try:
            for line in Path(f"/proc/{child.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out[child.pid] = int(line.split()[1]) * 1024
        except OSError:
            pass
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
        # no held-out eval rows (the peer trains on every row and evaluates nothing): both sides train on the same 64 rows
        hyperparameters=tpb.Hyperparameters(max_steps=args.steps, batch_size=args.batch, learning_rate=args.lr, max_seq_length=args.max_len,
                                            checkpoint_every_steps=args.steps, eval_fraction=0.0),
    )))  # fmt: skip
    latencies, rss, hwm = [], [], {}
    async for resp in stub.WatchTrainingJob(tsvc.WatchTrainingJobRequest(name=job.name)):
        now = time.time()
        e = resp.event
        if e.sequence > 2:  # skip the create/claim events, written before the watcher attached
            latencies.append(now - e.create_time.ToNanoseconds() / 1e9)
        if e.type == tpb.EVENT_TYPE_STEP:
            rss.append(e.step.rss_bytes)
            hwm.update(worker_peak_rss())
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
        "tokens_per_second": res["tokens_per_second"], "tokens": res["tokens_seen"], "peak_rss_bytes": max(hwm.values()),
        "sampled_rss_bytes": max(rss),
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


PEERS = {  # name → (padding_free, QLoRA adapter weights in fp32, row label)
    "trl": (True, True, "TRL `SFTTrainer`, `padding_free=True`"),
    "trl-padded": (False, True, "TRL `SFTTrainer`, padded batches (its default)"),
    "trl-stock": (True, False, "TRL `SFTTrainer`, `padding_free=True`, adapter in bf16 (TRL's QLoRA cast)"),
}


def run_peer(args, method: str, peer: str, model: str, data: Path, work: Path) -> dict:
    padding_free, adapter_fp32, _ = PEERS[peer]
    spec = {"model": model, "data": str(data), "out": str(work / f"peer-{method}-{peer}"), "steps": args.steps, "batch": args.batch,
            "lr": args.lr, "max_len": args.max_len, "r": args.r, "alpha": args.alpha, "method": method,
            "padding_free": padding_free, "adapter_fp32": adapter_fp32}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", PEER, json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the TRL/PEFT peer {peer} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def best(runs: list[dict]) -> dict:
    """The fastest of a side's repeats (a shared machine only ever slows a run down), peak RSS the highest seen."""
    top = dict(max(runs, key=lambda r: r["tokens_per_second"]))
    top["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    top["all_tps"] = [r["tokens_per_second"] for r in runs]
    return top


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--method", nargs="+", default=["qlora", "lora"], choices=["qlora", "lora"])
    p.add_argument("--peers", nargs="+", default=["trl", "trl-padded"], choices=list(PEERS),
                   help="peer variants; the first is the headline comparison")  # fmt: skip
    p.add_argument("--repeat", type=int, default=1, help="runs per side (best tokens/s is reported, every run listed)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--postgres", action="store_true", help="also run the service job on PostgreSQL (event latency via NOTIFY)")
    p.add_argument("--watch-poll", type=float, default=0.0)
    p.add_argument("--write", action="store_true", help="replace the ## Trainer section of bench/RESULTS.md")
    p.add_argument("--reuse", nargs="*", default=[], help="stderr logs of earlier runs whose measured sides are taken, not rerun")
    p.add_argument(
        "--reuse-only", action="store_true", help="measure only the service and the headline peer where --reuse lacks them"
    )
    args = p.parse_args()
    from neuroweaver_ml import build_tiny_llama, resolve_base_model

    work = Path(tempfile.mkdtemp(prefix="nw-bench-train-"))
    model = str(build_tiny_llama(work / "tiny")) if args.model == "tiny" else str(resolve_base_model(args.model))
    data = work / "data" / "chat.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    loads: list[float] = []
    results: dict[str, dict] = {}
    reused: dict[tuple[str, str], list[dict]] = {}
    for log in args.reuse:  # lines `<method> <side> run <n>: {json}` that an earlier invocation printed to stderr
        for ln in Path(log).read_text().splitlines():
            head_, sep, js = ln.partition(": ")
            parts = head_.split()
            if sep and len(parts) == 4 and parts[2] == "run" and js.startswith("{"):
                reused.setdefault((parts[0], parts[1]), []).append(json.loads(js))
    for method in args.method:
        sides: dict[str, list[dict]] = {"service": [], **{peer: [] for peer in args.peers}}
        for side in sides:
            sides[side] += reused.get((method, side), [])[: args.repeat]
            loads += [r["load_average"] for r in sides[side] if "load_average" in r]
        for i in range(args.repeat):
            for side in sides:  # alternate sides within each repeat so that a load spike hits one run, not one side
                if len(sides[side]) > i or (args.reuse_only and side != "service" and side != args.peers[0]):
                    continue
                loads.append(os.getloadavg()[0])
                if side == "service":
                    margs = argparse.Namespace(**{**vars(args), "method": method})
                    run = asyncio.run(run_service(margs, model, data, work / f"sqlite-{method}-{i}", ""))
                else:
                    run = run_peer(args, method, side, model, data, work / str(i))
                run["load_average"] = loads[-1]
                print(f"{method} {side} run {i + 1}: {json.dumps(run)}", file=sys.stderr)
                sides[side].append(run)
        results[method] = {side: best(runs) for side, runs in sides.items() if runs}
    pg = None
    if args.postgres:
        margs = argparse.Namespace(**{**vars(args), "method": args.method[0]})
        pg = asyncio.run(run_on_fresh_postgres(margs, model, data, work / "postgres"))
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), ""
    )
    import torch
    import transformers
    import trl

    machine = (
        f"{platform.machine()} {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, TRL {trl.__version__}; load average before each run "
        f"{min(loads, default=0):.1f}–{max(loads, default=0):.1f} (the machine is shared)"
    )
    cmd = f"bench/train/bench_trainer.py --steps {args.steps} --method {' '.join(args.method)} --peers {' '.join(args.peers)}"
    cmd += f" --repeat {args.repeat}" + (" --postgres" if args.postgres else "")
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    lines = [
        "## Trainer",
        "",
        f"`{cmd}`, {args.model}, batch {args.batch} sequences per step, max_len {args.max_len}, LoRA r={args.r} alpha "
        f"{args.alpha} dropout 0.05 on every linear projection, lr {args.lr} cosine, warmup 3%, the same 64-row chat dataset "
        f"on both sides (no held-out rows), {time.strftime('%Y-%m-%d')}, {machine}.",
        "",
        "The headline peer is TRL configured at its best for the same work: `SFTTrainer` with `padding_free=True` (a batch "
        "is one row of the batch's sequences concatenated, restarting position ids: exactly what the service's collator "
        "builds), fp32 like the service on CPU (`bf16=False`), QLoRA with the LoRA weights kept in fp32 as the service does "
        "(TRL would cast them to bf16), the same NF4 + double-quant base and non-reentrant gradient checkpointing on QLoRA, "
        "none on LoRA, the same seed and data order, a checkpoint at the last step on both sides. tokens/s = input tokens "
        "(none of them padding) / time from train begin until `train()` returns; peak RSS = the kernel's high-water mark "
        "of the training process (the service's worker subprocess: VmHWM; the peer: getrusage), model load included.",
        "",
        "| method | | tokens/s | peak RSS | tokens |",
        "|---|---|---|---|---|",
    ]
    for method, res in results.items():
        svc, head = res["service"], res[args.peers[0]]
        label = "QLoRA (NF4, double quant, gradient checkpointing)" if method == "qlora" else "LoRA (fp32 base)"
        runs = lambda r: "" if len(r["all_tps"]) < 2 else " (runs: " + ", ".join(f"{t:.0f}" for t in r["all_tps"]) + ")"  # noqa: E731
        lines.append(f"| {label} | trainer service (worker process) | {svc['tokens_per_second']:.0f}{runs(svc)} | "
                     f"{mib(svc['peak_rss_bytes'])} | {svc['tokens']:,} |")  # fmt: skip
        for peer in args.peers:
            if peer not in res:
                lines.append(f"| | {PEERS[peer][2]} | not run (`--reuse-only`) | | |")
                continue
            r = res[peer]
            lines.append(
                f"| | {PEERS[peer][2]} | {r['tokens_per_second']:.0f}{runs(r)} | {mib(r['peak_rss_bytes'])} | {r['tokens']:,} |"
            )
        lines.append(f"| | **ratio service / {PEERS[args.peers[0]][2]}** | **{svc['tokens_per_second'] / head['tokens_per_second']:.2f}** | "
                     f"{svc['peak_rss_bytes'] / head['peak_rss_bytes']:.2f} | |")  # fmt: skip
    first = results[args.method[0]]["service"]
    lines += [
        "",
        "Goal (service ≥ 1.0× padding-free TRL's tokens/s at equal or lower peak memory): "
        + "; ".join(
            f"{m} {'met' if r['service']['tokens_per_second'] >= r[args.peers[0]]['tokens_per_second'] else 'NOT met'} on speed, "
            f"{'met' if r['service']['peak_rss_bytes'] <= r[args.peers[0]]['peak_rss_bytes'] else 'NOT met'} on memory"
            for m, r in results.items()
        )
        + ".",
        "",
        f"Event latency emit → gRPC watcher (worker and server are separate processes), {args.method[0]} job: SQLite "
        f"{first['events']} events, p50 {first['latency_p50_ms']:.1f} ms, p99 {first['latency_p99_ms']:.1f} ms"
        + (
            f"; PostgreSQL (a second job, same settings; {pg['tokens_per_second']:.0f} tokens/s) {pg['events']} events, "
            f"p50 {pg['latency_p50_ms']:.1f} ms, p99 {pg['latency_p99_ms']:.1f} ms"
            if pg
            else ""
        )
        + ". The worker wakes the trainer's watchers through a pipe after each commit (and NOTIFY on PostgreSQL); the "
        "poll timer is only a safety net. Job wall time create → succeeded (worker start, model load, training, adapter, "
        "registration): " + ", ".join(f"{r['service']['wall_seconds']:.0f} s {m}" for m, r in results.items()) + ".",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        results_md = Path(__file__).resolve().parents[1] / "RESULTS.md"
        old = results_md.read_text() if results_md.exists() else "# Benchmark results\n\n"
        if "## Trainer" in old:  # replaced where it stands
            head_, _, rest = old.partition("## Trainer")
            nxt = rest.find("\n## ")
            results_md.write_text(head_ + text + ("\n" + rest[nxt + 1 :] if nxt >= 0 else ""))
        else:
            results_md.write_text(old.rstrip() + "\n\n" + text)


if __name__ == "__main__":
    main()
