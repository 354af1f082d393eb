"""GPU QLoRA SFT bench: our trainer (`run_sft`, QLoRA + Liger kernels + offloaded gradient checkpointing) vs plain
TRL + PEFT (`SFTTrainer`, FlashAttention-2 when `flash_attn` imports, else SDPA, standard gradient checkpointing) on a
Llama-3-8B shape, at sequence lengths 1k/2k/4k. Run it through `bench/train/gpu.sh` (PYTHONPATH, carried wheels);
`--tiny` runs the same flow on CPU with a 2-layer model.

- base: random weights of the Llama-3-8B shape (32 layers, hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab
  128256, rope 500000) built with `LlamaConfig` straight on the GPU in bf16 (no float32 copy, no CPU init) and saved
  once to `--work` (reused by later runs); the repo's tiny test tokenizer (`build_tiny_tokenizer`: no model hub on
  the GPU machine) whose ids are a subset of the 128256-row vocabulary. Every cell loads it with bitsandbytes NF4 +
  double quantization, bf16 compute (QLoRA), LoRA r=16 / alpha 32 / dropout 0.05 on every attention/MLP projection,
  batch 1, optimizer paged_adamw_8bit, lr 2e-4 on both sides.
- data: prompt/completion rows of random words, each longer than the longest sequence, so that every step trains on
  exactly `seq` tokens (truncated), loss on the completion.
- configurations (each cell in its own subprocess: Liger patches module globals, an OOM leaves nothing behind):
  `hf`: TRL `SFTTrainer` + `peft_config`, the model from `from_pretrained(quantization_config=...,
  attn_implementation=fa2|sdpa)`, `gradient_checkpointing=True` (non-reentrant);
  `ours`: `neuroweaver_ml.training.run_sft` on the same files, `method="qlora"`, padding-free, bf16,
  `gradient_checkpointing=True`, `liger_kernels=True`, `offload_activations=True` (TRL's activation offloading);
  `ours-plain`: `run_sft` with the last two off (what they add).
- per cell: `--warmup` steps, then `--steps` measured steps; tokens/s = input tokens seen (the Trainer's count) over
  the wall time between the log event of the last warm-up step and that of the last step (each log reads the loss,
  which synchronizes); peak GPU memory = `torch.cuda.max_memory_allocated()` over the whole cell (load included),
  reset at its start. An out-of-memory error is recorded as OOM; `--cap-gb N` caps the process's CUDA allocator at N
  GiB (`set_per_process_memory_fraction`) to ask "does it fit an N GB card".
Writes gpu_train.json and gpu_train.md (a section for bench/RESULTS.md) to --out (default: $OUT, else
/tmp/nw-gpu-train/out) and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SECTION = "## Training: GPU, QLoRA SFT of a Llama-3-8B shape, ours (Liger + offloaded checkpointing) vs TRL + PEFT"
LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
)  # fmt: skip
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=1024, tie_word_embeddings=False,
)  # fmt: skip
CONFIGS = ("hf", "ours", "ours-plain")
# import name -> pip distribution
NEEDED = {
    "torch": "torch", "transformers": "transformers", "peft": "peft", "accelerate": "accelerate", "trl": "trl",
    "datasets": "datasets", "bitsandbytes": "bitsandbytes", "safetensors": "safetensors", "tokenizers": "tokenizers",
    "psutil": "psutil", "liger_kernel": "liger-kernel",
}  # fmt: skip
GPU_ONLY = ("liger_kernel",)  # Triton kernels: not needed (nor used) by --tiny on CPU
# imported for real once the names are found: a carried wheel may not fit the image's versions (transformers 5.17 there)
IMPORTED = ("trl", "trl.models.activation_offloading", "datasets", "peft", "bitsandbytes", "neuroweaver_ml.training")
WORDS = (
    "the model learns a short answer from each example while the trainer writes checkpoints and reports loss "
    "tokens memory adapter weights gradient batch sequence offload kernel layer attention projection rank alpha"
).split()


def missing_packages(tiny: bool) -> list[str]:
    out = []
    for module, dist in NEEDED.items():
        if tiny and module in GPU_ONLY:
            continue
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(dist)
    if not out:
        for module in IMPORTED + (() if tiny else ("liger_kernel.transformers",)):
            try:
                importlib.import_module(module)
            except ImportError as e:
                out.append(f"{e.name or module} (import of {module} failed: {str(e).splitlines()[0][:200]})")
    return out


def check(tiny: bool) -> bool:
    missing = missing_packages(tiny)
    if missing:
        print("MISSING Python packages: " + " ".join(missing), flush=True)
        print(
            "Carry them as wheels (README of the device tool): bench/train/wheels.sh fetches into .whl/ the set the "
            "GPU machine's image lacks; by hand, from the repo root on a machine with pip:\n"
            "  echo /.whl/ >> .git/info/exclude\n"
            "  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
            "--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 "
            "--platform manylinux_2_17_x86_64 "
            "--platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl " + " ".join(missing) + "\n"
            "(pin each to the version constraints.txt names; their own dependencies: "
            "unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist; name .whl in carry: gpu.sh installs "
            ".whl/*.whl)",
            flush=True,
        )
        return False
    print("packages: all found", flush=True)
    return True


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


# ---------------------------------------------------------------------------------------------------------------
# the base model and the data (parent process)


def make_base(work: Path, tiny: bool) -> Path:
    """Random weights of the shape, saved once (bf16 on the GPU, float32 for --tiny), with the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from neuroweaver_ml.models import build_tiny_tokenizer

    base = work / ("tiny-llama" if tiny else "llama3-8b-shape-random")
    if (base / "config.json").is_file() and any(base.glob("*.safetensors")):
        print(f"base: reusing {base}", flush=True)
        return base
    t0 = time.perf_counter()
    tok = build_tiny_tokenizer()
    shape = dict(TINY, vocab_size=len(tok)) if tiny else LLAMA3_8B
    cfg = LlamaConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
    device, dtype = ("cpu", torch.float32) if tiny else ("cuda", torch.bfloat16)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 on the GPU: no float32 copy of 8B parameters
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    params = sum(p.numel() for p in model.parameters())
    base.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"base: {params / 1e9:.2f}B parameters written to {base} in {time.perf_counter() - t0:.0f} s", flush=True)
    return base


def make_data(work: Path, base: Path, longest: int, rows: int) -> Path:
    """prompt/completion rows of random words, each over `longest` tokens, so every step trains on `seq` tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    rng = random.Random(0)
    path = work / f"data-{longest}-{rows}.jsonl"
    with open(path, "w") as f:
        for i in range(rows):
            words: list[str] = []
            while len(tok(" ".join(words))["input_ids"]) <= longest + 16:
                words += [rng.choice(WORDS) for _ in range(max(64, longest // 4))]
            f.write(json.dumps({"prompt": f"Row {i}: continue the text.\n", "completion": " ".join(words)}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# one cell (child process)


def timed_steps(events: list[tuple[int, float, int]], warmup: int) -> dict:
    """events: (step, monotonic time, input tokens seen) per log event; the rate over the steps after the warm-up."""
    first = next(e for e in events if e[0] == warmup)
    last = events[-1]
    tokens, secs = last[2] - first[2], last[1] - first[1]
    return {"measured_steps": last[0] - first[0], "tokens": tokens, "seconds": round(secs, 3), "tok_s": tokens / secs}


def cell_hf(a, base: Path, data: Path, out: Path, events: list) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    gpu = a.device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    tok = AutoTokenizer.from_pretrained(str(base))
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    attn = "flash_attention_2" if gpu and flash_attn_available() else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(
        str(base), quantization_config=bnb, dtype=dtype, device_map={"": a.device}, attn_implementation=attn
    )
    cfg = SFTConfig(
        output_dir=str(out), max_steps=a.warmup + a.steps, per_device_train_batch_size=1, learning_rate=2e-4,
        max_length=a.seq, logging_steps=1, report_to="none", save_strategy="no", gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=gpu, use_cpu=not gpu,
        optim="paged_adamw_8bit" if gpu else "adamw_torch", include_num_input_tokens_seen="all", seed=42,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    rows = [json.loads(line) for line in open(data) if line.strip()]

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                events.append((state.global_step, time.monotonic(), int(state.num_input_tokens_seen)))

    trainer = SFTTrainer(
        model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=peft_cfg,
        callbacks=[Clock()],
    )  # fmt: skip
    trainer.train()
    print(f"hf: attention {attn}", flush=True)


def cell_ours(a, base: Path, data: Path, out: Path, events: list, lean: bool) -> None:
    from neuroweaver_ml.training import SFTConfig, StepEvent, run_sft

    gpu = a.device == "cuda"
    cfg = SFTConfig(
        base_model_dir=str(base), train_file=str(data), output_dir=str(out), method="qlora", lora_r=16, lora_alpha=32,
        lora_dropout=0.05, learning_rate=2e-4, max_steps=a.warmup + a.steps, batch_size=1, max_seq_length=a.seq,
        checkpoint_every_steps=0, keep_checkpoints=1, gradient_checkpointing=True, padding_free=True,
        precision="bf16" if gpu else "fp32", optim="paged_adamw_8bit" if gpu else "adamw_torch", device=a.device,
        liger_kernels=lean, offload_activations=lean,
    )  # fmt: skip

    def on_event(ev) -> None:
        if isinstance(ev, StepEvent):
            events.append((ev.step, time.monotonic(), ev.tokens_seen))

    run_sft(cfg, on_event)


def run_cell(a) -> int:
    """Runs one (config, seq) cell and prints one `RESULT {json}` line."""
    import torch

    res: dict = {"config": a.cell, "seq": a.seq}
    gpu = a.device == "cuda"
    if gpu:
        if a.cap_gb:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap_gb * 2**30 / total))
        torch.cuda.reset_peak_memory_stats()
    base, data, out = Path(a.base), Path(a.data), Path(a.work) / "runs" / f"{a.cell}-{a.seq}"
    events: list[tuple[int, float, int]] = []
    t0 = time.perf_counter()
    try:
        if a.cell == "hf":
            cell_hf(a, base, data, out, events)
        else:
            cell_ours(a, base, data, out, events, lean=a.cell == "ours" and gpu)
        res.update(timed_steps(events, a.warmup))
    except torch.cuda.OutOfMemoryError as e:
        res["oom"] = True
        res["error"] = str(e).splitlines()[0][:300]
    except Exception as e:  # noqa: BLE001  # recorded in the table, the next cell still runs
        oom = "out of memory" in str(e).lower()
        res.update({"oom": oom, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"})
    res["cell_s"] = round(time.perf_counter() - t0, 1)
    res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    print("RESULT " + json.dumps(res), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# the table (parent)


def fmt(r: dict, hf: dict | None, goal_gib: float) -> str:
    peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "—"
    if "tok_s" not in r:
        why = "OOM" if r.get("oom") else r.get("error", "failed")
        return f"| {r['config']} | {r['seq']} | {'OOM' if r.get('oom') else '—'} | {peak} | — | — | {why} |"
    speed = f"{r['tok_s'] / hf['tok_s']:.2f}×" if hf and "tok_s" in hf and r is not hf else "—"
    fits = "—" if r.get("peak_gib") is None else ("yes" if r["peak_gib"] <= goal_gib else "no")
    note = f"{r['tokens']} tokens in {r['seconds']:.2f} s over {r['measured_steps']} steps; cell {r['cell_s']:.0f} s"
    return f"| {r['config']} | {r['seq']} | {r['tok_s']:.0f} | {peak} | {fits} | {speed} | {note} |"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="2-layer model on CPU, no Liger / offloading (need CUDA)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/nw-gpu-train/out")
    ap.add_argument("--work", default="/tmp/nw-gpu-train", help="where the base, data and runs are written")
    ap.add_argument("--configs", default="hf,ours", help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--seqs", default="1024,2048,4096")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cap-gb", type=float, default=0.0, help="cap each cell's CUDA allocator at this many GiB")
    ap.add_argument("--goal-gb", type=float, default=8.0, help="the 'fits' column: peak <= this many GiB")
    ap.add_argument("--cell-timeout", type=float, default=300.0)
    ap.add_argument("--check-only", action="store_true", help="only check the packages")
    ap.add_argument("--cell", choices=CONFIGS, help=argparse.SUPPRESS)  # internal: run one cell
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.device = "cpu" if a.tiny else "cuda"
    if a.cell:
        return run_cell(a)
    if a.tiny:
        a.work = str(Path(a.work) / "tiny")
        if a.seqs == ap.get_default("seqs"):
            a.seqs = "128,256"
    if not check(a.tiny):
        return 2
    if a.check_only:
        return 0
    import torch

    if not a.tiny and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny on a CPU machine", flush=True)
        return 2
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    if unknown := set(configs) - set(CONFIGS):
        raise SystemExit(f"unknown configs {sorted(unknown)}; expected some of {CONFIGS}")
    seqs = [int(s) for s in a.seqs.split(",")]
    gpu = torch.cuda.get_device_name(0) if not a.tiny else "none (CPU, --tiny)"
    attn = "flash_attention_2" if not a.tiny and flash_attn_available() else "sdpa"
    if a.tiny:
        print("--tiny: CPU, float32, 2-layer model; Liger kernels and activation offloading need CUDA: 'ours' runs "
              "as 'ours-plain' here (run_sft refuses both flags without a GPU)", flush=True)  # fmt: skip
    elif attn == "sdpa":
        print("flash_attn is NOT importable here: the hf rows use attn_implementation='sdpa'", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    base = make_base(work, a.tiny)
    data = make_data(work, base, max(seqs), a.warmup + a.steps + 1)

    rows: list[dict] = []
    for config in configs:
        for seq in seqs:
            cmd = [sys.executable, __file__, "--cell", config, "--seq", str(seq), "--base", str(base), "--data",
                   str(data), "--work", str(work), "--warmup", str(a.warmup), "--steps", str(a.steps),
                   "--cap-gb", str(a.cap_gb)] + (["--tiny"] if a.tiny else [])  # fmt: skip
            print(f"cell {config} seq {seq}: ...", flush=True)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.cell_timeout)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    tail = (proc.stdout + proc.stderr)[-2000:]
                    oom = "out of memory" in tail.lower()
                    r = {"config": config, "seq": seq, "oom": oom, "error": f"exit {proc.returncode}", "log": tail}
                else:
                    r = json.loads(line[len("RESULT ") :])
                    if "error" in r:
                        r["log"] = (proc.stdout + proc.stderr)[-2000:]
            except subprocess.TimeoutExpired:
                r = {"config": config, "seq": seq, "error": f"timeout after {a.cell_timeout:.0f} s"}
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "log"}), flush=True)
            write(a, rows, gpu, attn, torch.__version__, quiet=True)  # what is done survives a cut-off call
    write(a, rows, gpu, attn, torch.__version__)
    print(f"total {time.perf_counter() - t_all:.0f} s")
    return 0


def write(a, rows: list[dict], gpu: str, attn: str, torch_version: str, quiet: bool = False) -> None:
    by = {(r["config"], r["seq"]): r for r in rows}
    mode = (
        "CPU --tiny (2-layer random Llama, float32; no Liger, no offloading)"
        if a.tiny
        else "Llama-3-8B shape (vocab 128256), random weights, NF4 + double quantization, bf16 compute"
    )
    section = "\n".join(
        [
            SECTION,
            "",
            f"`bench/train/gpu.sh{' --tiny' if a.tiny else ''}` — GPU: {gpu}; torch {torch_version}; "
            f"{platform.machine()}, {os.cpu_count()} CPUs. {mode}; LoRA r=16 on every projection; batch 1; "
            f"{a.warmup} warm-up + {a.steps} measured steps per cell, each cell in its own process; hf attention: "
            f"{attn}; peak = torch.cuda.max_memory_allocated over the cell (model load included)"
            + (f"; CUDA allocator capped at {a.cap_gb:g} GiB" if a.cap_gb else "")
            + f". fits: peak ≤ {a.goal_gb:g} GiB. Goal (issue 19 §8): seq 2048 within 8 GB and ≥ 1.5× hf tokens/s.",
            "",
            "| config | seq | tokens/s | peak GiB | fits | vs hf | note |",
            "|---|---|---|---|---|---|---|",
            *[fmt(r, by.get(("hf", r["seq"])), a.goal_gb) for r in rows],
            "",
        ]
    )
    Path(a.out, "gpu_train.json").write_text(
        json.dumps({"gpu": gpu, "torch": torch_version, "attn_hf": attn, "args": vars(a), "rows": rows}, indent=1)
    )
    Path(a.out, "gpu_train.md").write_text(section)
    if not quiet:
        print(section, flush=True)
        print(f"written: {Path(a.out, 'gpu_train.md')} and gpu_train.json", flush=True)


if __name__ == "__main__":
    sys.exit(main())
