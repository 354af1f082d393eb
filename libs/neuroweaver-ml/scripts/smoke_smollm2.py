"""Smoke test on the real SmolLM2-135M-Instruct: convert the builtin GGUF (timed), run a few
LoRA and QLoRA SFT steps on CPU (tokens/s) and generate with the adapter.

    .venv/bin/python libs/neuroweaver-ml/scripts/smoke_smollm2.py [--steps 8] [--fresh-cache]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from neuroweaver_ml import SFTConfig, ensure_builtin, generate, load_for_inference, run_sft  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--data", default=str(REPO / "data" / "automotive" / "train.jsonl"))
    ap.add_argument("--fresh-cache", action="store_true", help="convert into a new temp cache to time the conversion")
    ap.add_argument("--methods", default="lora,qlora")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nw-smoke-"))
    cache = work / "models" if args.fresh_cache else None
    t0 = time.monotonic()
    base = ensure_builtin("smollm2-135m-instruct", cache)
    conv_s = time.monotonic() - t0
    print(f"base checkpoint: {base} ({'converted' if args.fresh_cache else 'resolved'} in {conv_s:.1f}s)")
    if not Path(args.data).is_file():
        raise SystemExit(f"dataset not found: {args.data}")

    summary = {"conversion_or_resolve_seconds": round(conv_s, 1), "cpu_threads": os.cpu_count()}
    question = [
        {"role": "system", "content": "You are a service advisor at a car dealership."},
        {"role": "user", "content": "How often should I rotate my tires?"},
    ]
    for method in args.methods.split(","):
        steps = []
        cfg = SFTConfig(
            base_model_dir=str(base),
            train_file=args.data,
            output_dir=str(work / method),
            method=method,
            max_steps=args.steps,
            batch_size=args.batch_size,
            max_seq_length=args.max_seq_length,
            learning_rate=2e-4,
            lora_r=16,
            lora_alpha=32,
            checkpoint_every_steps=args.steps,
            base_model_ref="builtin:smollm2-135m-instruct",
        )
        t = time.monotonic()
        res = run_sft(cfg, lambda e, steps=steps: steps.append(e) if e.kind == "step" else None)
        wall = time.monotonic() - t
        print(
            f"[{method}] steps={res.global_step} loss {steps[0].loss:.3f} -> {steps[-1].loss:.3f} "
            f"tokens={res.tokens_seen} train tokens/s={res.tokens_per_second:.0f} "
            f"rss={steps[-1].rss_bytes / 2**20:.0f} MiB wall={wall:.1f}s (incl. load)"
        )
        lm = load_for_inference(
            base, res.adapter_dir, load_in_4bit=(method == "qlora"), expected_adapter_sha256=res.adapter_sha256
        )
        t = time.monotonic()
        g = generate(lm.model, lm.tokenizer, question, max_new_tokens=60)
        gen_s = time.monotonic() - t
        print(
            f"[{method}] generated {g.completion_tokens} tokens in {gen_s:.2f}s "
            f"({g.completion_tokens / gen_s:.1f} tok/s, finish={g.finish_reason}): {g.text!r}"
        )
        summary[method] = {
            "train_tokens_per_second": round(res.tokens_per_second, 1),
            "steps": res.global_step,
            "first_loss": steps[0].loss,
            "last_loss": steps[-1].loss,
            "rss_mib": round(steps[-1].rss_bytes / 2**20),
            "gen_tokens_per_second": round(g.completion_tokens / gen_s, 1),
            "adapter_sha256": res.adapter_sha256,
        }
    print(json.dumps(summary, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
