"""The RLAIF pipeline: ``run_rlaif(RlaifConfig, on_event, should_stop) -> RlaifResult``.

Stages, each checkpointed under ``output_dir`` and skipped on a rerun once complete:

1. ``generate``     K sampled candidates per prompt from the parent policy (base + SFT adapter) →
                    ``candidates.jsonl`` (appended per batch; a rerun continues after the last full line;
                    batch seeds are ``seed + batch index``, so resumed output equals uninterrupted output).
2. ``judge``        pointwise scores (or pairwise preferences) → ``judgements.jsonl``; verdicts go
                    through the SQLite cache ``judge_cache.sqlite``, so a killed stage resumes without
                    re-sending anything already judged.
3. ``preferences``  chosen/rejected pairs with margin ≥ ``min_margin``; ties and unusable verdicts dropped
                    → ``preferences.jsonl``.
4. ``reward_model`` TRL RewardTrainer (MiniLM or a LoRA on the policy base) → ``reward_model/``, held-out
                    pairwise accuracy.
5. ``policy``       GRPO / RLOO (reward model, judge, or both as reward functions) or DPO on the pairs,
                    on a LoRA policy → ``policy/`` (HF Trainer checkpoints; resumes from the newest).
6. ``evaluate``     judge win rate of the new policy vs its parent and vs the base on held-out prompts
                    (greedy decoding), ties counted as half a win, unusable verdicts excluded, Wilson 95 % CI.

Stage completion markers are ``<file>.done.json`` / ``*_report.json``; ``rlaif_report.json`` is the
final report and ``adapter/`` the final LoRA adapter + tokenizer + model card.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..artifacts import digest_path
from ..datasets import load_rows
from ..errors import ResumeMismatch
from ..tracking import attach_trackers
from ..training import _base_identity, _f
from .events import JudgeProgressEvent, MetricsEvent, StageEvent
from .judges import Judge, JudgeCache, JudgeConfig, Judgement, Preference, make_judge
from .training import (
    DPOJobConfig,
    PolicyLoraSettings,
    PolicyResult,
    RewardModelConfig,
    RewardModelResult,
    RewardScorer,
    _card,
    _common_args,
    _device,
    _finish_policy_training,
    _quiet,
    as_messages,
    atomic_write_json,
    load_policy,
    make_stage_callback,
    prompt_text,
    run_dpo,
    run_reward_model,
)

log = logging.getLogger(__name__)

Algorithm = Literal["grpo", "rloo", "dpo"]
RewardSource = Literal["reward_model", "judge", "both"]


@dataclass
class RlaifConfig:
    """One RLAIF job (mirrors ``neuroweaver.trainer.v1.RlaifConfig`` plus the knobs a CPU run needs).
    Paths are local (resolve URIs before). ``judge`` is the resolved judge version."""

    base_model_dir: str
    prompts_file: str  # JSONL {prompt, reference?, ...} (format "prompt")
    output_dir: str
    judge: JudgeConfig
    eval_prompts_file: str | None = None  # held-out prompts for the win rate; None → no evaluation
    parent_adapter_dir: str | None = None  # SFT adapter / start_from_version's adapter; None → base is the parent
    system_prompt: str | None = None  # prepended to string prompts on chat models
    candidates_per_prompt: int = 4
    algorithm: Algorithm = "grpo"
    reward_source: RewardSource = "reward_model"  # GRPO/RLOO only
    reward_model_backbone: str = ""  # "" → all-MiniLM-L6-v2; "policy" → LoRA on the policy base; or a dir
    train_reward_model: bool = True  # False skips stage 4 when the policy stage does not need it
    kl_coefficient: float = 0.05  # GRPO/RLOO beta; DPO beta
    policy_steps: int = 20
    min_margin: float = 1.0  # pointwise: minimum score difference for a pair
    max_new_tokens: int = 64
    temperature: float = 0.9
    top_p: float = 1.0
    generation_batch_size: int = 8  # prompts per generation batch (× K sequences)
    max_prompts: int = 0  # 0 → all prompts
    max_eval_prompts: int = 0  # 0 → all eval prompts
    judge_chunk_size: int = 16  # verdicts per judge-progress event
    max_pairs_per_prompt: int = 6
    # reward model
    reward_model_epochs: float = 1.0
    reward_model_steps: int = -1
    reward_model_learning_rate: float = 5e-5
    reward_model_batch_size: int = 8
    reward_model_eval_fraction: float = 0.2
    # policy (LoRA)
    learning_rate: float = 1e-5
    prompts_per_step: int = 1  # GRPO/RLOO: prompts per optimizer step (× candidates_per_prompt completions)
    dpo_batch_size: int = 2
    max_length: int = 512
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None
    checkpoint_every_steps: int = 10
    keep_checkpoints: int = 2
    seed: int = 42
    device: str = "auto"
    judge_device: str = "cpu"  # local embedding judge
    base_model_ref: str | None = None
    adapter_name: str | None = None
    quantize_4bit: bool = False  # QLoRA policy: GRPO/RLOO/DPO train the LoRA on the base in 4-bit NF4

    def fingerprint(self) -> str:
        d = dataclasses.asdict(self)
        if not d["quantize_4bit"]:  # absent before the setting existed: unchanged fingerprints for older jobs
            d.pop("quantize_4bit")
        for k in (
            "output_dir",
            "checkpoint_every_steps",
            "keep_checkpoints",
            "device",
            "judge_device",
            "base_model_ref",
            "adapter_name",
            "judge_chunk_size",
        ):
            d.pop(k)
        for k in (
            "max_concurrency",
            "requests_per_minute",
            "tokens_per_minute",
            "timeout_seconds",
            "max_retries",
            "backoff_base_seconds",
            "backoff_max_seconds",
            "api_key_env",
            "base_url",
            "batch_size",
        ):
            d["judge"].pop(k)
        for k in ("prompts_file", "eval_prompts_file", "parent_adapter_dir"):
            p = d.pop(k)
            d[k + "_sha"] = digest_path(p)[0] if p else None
        d["base"] = _base_identity(d.pop("base_model_dir"))
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class WinRate:
    """Judge win rate of ``policy`` against ``opponent``; ties count half, unusable verdicts are excluded."""

    opponent: str  # parent | base
    wins: int
    ties: int
    losses: int
    excluded: int  # malformed or failed verdicts (not counted)
    n: int  # wins + ties + losses
    win_rate: float | None  # (wins + ties/2) / n
    ci_low: float | None  # Wilson score interval, 95 %
    ci_high: float | None
    ties_policy: str = "half"


@dataclass
class RlaifResult:
    status: Literal["completed", "cancelled"]
    output_dir: str
    algorithm: str
    reward_source: str
    judge_version: str
    adapter_dir: str | None
    adapter_sha256: str | None
    adapter_size_bytes: int | None
    report_path: str | None
    prompts: int
    candidates: int
    judged: int  # verdicts in the judge stage (incl. malformed, incl. cached from an earlier attempt)
    malformed: int
    judge_errors: int
    preference_pairs: int
    reward_model: RewardModelResult | None
    policy: PolicyResult | None
    win_rate_vs_parent: WinRate | None
    win_rate_vs_base: WinRate | None
    judge_cost_usd: float  # judge, policy (judge-rewarded GRPO/RLOO) and evaluate stages; each verdict paid once
    judge_prompt_tokens: int
    judge_completion_tokens: int
    judge_requests: int  # HTTP requests this process sent (retries included; 0 for the local judge)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    skipped_stages: list[str] = field(default_factory=list)
    runtime_seconds: float = 0.0
    metrics: dict[str, float | None] = field(default_factory=dict)  # flat, for registration


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float | None, float | None]:
    if n <= 0:
        return None, None
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(prefs: list[Preference], opponent: str) -> WinRate:
    wins = sum(1 for p in prefs if p.winner == "a")
    losses = sum(1 for p in prefs if p.winner == "b")
    ties = sum(1 for p in prefs if p.winner == "tie")
    n = wins + losses + ties
    lo, hi = wilson_interval(wins + 0.5 * ties, n)
    return WinRate(
        opponent=opponent,
        wins=wins,
        ties=ties,
        losses=losses,
        excluded=len(prefs) - n,
        n=n,
        win_rate=(wins + 0.5 * ties) / n if n else None,
        ci_low=lo,
        ci_high=hi,
    )


# ---------------------------------------------------------------------------------------------
# helpers


class _Ctx:
    def __init__(self, cfg: RlaifConfig, on_event, should_stop):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.on_event = on_event
        self.should_stop = should_stop or (lambda: False)
        self.cache = JudgeCache(self.out / "judge_cache.sqlite")
        self.stage_seconds: dict[str, float] = {}
        self.skipped: list[str] = []
        self.judge_requests = 0

    def emit(self, ev) -> None:
        if self.on_event is not None:
            self.on_event(ev)

    def judge(self) -> Judge:
        return make_judge(self.cfg.judge, self.cache, device=self.cfg.judge_device)


class _Cancelled(Exception):
    pass


def _read_jsonl(path: Path) -> list[dict]:
    rows: list[dict] = []
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # a line cut by a kill
            rows.append(json.loads(line))
    return rows


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _done(path: Path) -> Path:
    return path.with_name(path.name + ".done.json")


def _stage(ctx: _Ctx, name: str, marker: Path, fn: Callable[[], dict]) -> dict:
    """Run a stage unless its completion marker exists; returns the marker's content."""
    if marker.is_file():
        ctx.skipped.append(name)
        info = json.loads(marker.read_text())
        ctx.emit(StageEvent(stage=name, status="skipped", detail=info.get("summary", {})))
        return info
    if ctx.should_stop():
        raise _Cancelled(name)
    ctx.emit(StageEvent(stage=name, status="started"))
    t0 = time.monotonic()
    info = fn()
    dt = round(time.monotonic() - t0, 3)
    ctx.stage_seconds[name] = dt
    info = {"summary": info.get("summary", {}), **info, "seconds": dt}
    atomic_write_json(marker, info)
    ctx.emit(StageEvent(stage=name, status="completed", seconds=dt, detail=info.get("summary", {})))
    return info


def _load_prompts(path: str, limit: int) -> list[dict]:
    _fmt, rows = load_rows(path, "prompt")
    rows = rows[:limit] if limit > 0 else rows
    return [{"prompt": r["prompt"], "reference": r.get("reference")} for r in rows]


def _gen_input(prompt: Any, tokenizer, system_prompt: str | None):
    return as_messages(prompt, system_prompt) if getattr(tokenizer, "chat_template", None) else prompt_text(prompt)


# ---------------------------------------------------------------------------------------------
# stage 1: candidates


def _generate_candidates(ctx: _Ctx, prompts: list[dict]) -> dict:
    from ..generation import generate_batch, load_for_inference

    cfg = ctx.cfg
    path = ctx.out / "candidates.jsonl"
    done_rows = _read_jsonl(path)
    # rewrite without a cut last line
    _write_jsonl_atomic(path, done_rows)
    lm = load_for_inference(cfg.base_model_dir, cfg.parent_adapter_dir, device=cfg.device, merge_adapter=True)
    k = max(1, cfg.candidates_per_prompt)
    bs = max(1, cfg.generation_batch_size)
    start = len(done_rows)
    if start % bs:  # batches are the resume unit
        done_rows = done_rows[: start - start % bs]
        _write_jsonl_atomic(path, done_rows)
        start = len(done_rows)
    with open(path, "a", encoding="utf-8") as f:
        for b0 in range(start, len(prompts), bs):
            if ctx.should_stop():
                raise _Cancelled("generate")
            batch = prompts[b0 : b0 + bs]
            inputs = [_gen_input(p["prompt"], lm.tokenizer, cfg.system_prompt) for p in batch for _ in range(k)]
            res = generate_batch(
                lm.model,
                lm.tokenizer,
                inputs,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                seed=cfg.seed + b0 // bs,
            )
            for i, p in enumerate(batch):
                cands = [r.text for r in res[i * k : (i + 1) * k]]
                f.write(
                    json.dumps(
                        {"index": b0 + i, "prompt": p["prompt"], "reference": p["reference"], "candidates": cands},
                        ensure_ascii=False,
                    )
                    + "\n"
                )
            f.flush()
            ctx.emit(
                MetricsEvent(
                    stage="generate", metrics={"prompts_done": min(b0 + bs, len(prompts)), "prompts_total": len(prompts)}
                )
            )
    del lm
    return {"summary": {"prompts": len(prompts), "candidates": len(prompts) * k}}


# ---------------------------------------------------------------------------------------------
# stage 2: judging


class _Progress:
    def __init__(self, ctx: _Ctx, stage: str, judge: Judge, total: int):
        self.ctx, self.stage, self.judge, self.total = ctx, stage, judge, total
        self.done = self.malformed = self.errors = self.pt = self.ct = 0
        self.cost = 0.0
        self.req0, self.retry0, self.hits0 = judge.stats.requests, judge.stats.retries, judge.stats.cache_hits

    def add(self, verdicts: list[Judgement | Preference]) -> None:
        for v in verdicts:
            self.done += 1
            self.malformed += int(v.malformed)
            self.errors += int(v.error is not None)
            self.pt += v.prompt_tokens
            self.ct += v.completion_tokens
            self.cost += v.cost_usd
        s = self.judge.stats
        self.ctx.emit(
            JudgeProgressEvent(
                stage=self.stage,
                done=self.done,
                total=self.total,
                cache_hits=s.cache_hits - self.hits0,
                malformed=self.malformed,
                errors=self.errors,
                requests=s.requests - self.req0,
                retries=s.retries - self.retry0,
                prompt_tokens=self.pt,
                completion_tokens=self.ct,
                cost_usd=round(self.cost, 8),
            )
        )

    def summary(self) -> dict:
        return {
            "judged": self.done,
            "malformed": self.malformed,
            "errors": self.errors,
            "prompt_tokens": self.pt,
            "completion_tokens": self.ct,
            "cost_usd": round(self.cost, 8),
            "requests": self.judge.stats.requests - self.req0,
        }


def _pair_indices(k: int, limit: int) -> list[tuple[int, int]]:
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    return pairs[:limit] if limit > 0 else pairs


def _judge_candidates(ctx: _Ctx) -> dict:
    cfg = ctx.cfg
    rows = _read_jsonl(ctx.out / "candidates.jsonl")
    judge = ctx.judge()
    chunk = max(1, cfg.judge_chunk_size)
    pairwise = cfg.judge.mode == "pairwise"

    async def go():
        try:
            if not pairwise:
                items = [(prompt_text(r["prompt"]), c, r["reference"]) for r in rows for c in r["candidates"]]
                prog = _Progress(ctx, "judge", judge, len(items))
                verdicts: list[Judgement] = []
                for i in range(0, len(items), chunk):
                    if ctx.should_stop():
                        raise _Cancelled("judge")
                    v = await judge.score_many(items[i : i + chunk])
                    verdicts += v
                    prog.add(v)
                out, pos = [], 0
                for r in rows:
                    vs = verdicts[pos : pos + len(r["candidates"])]
                    pos += len(r["candidates"])
                    out.append(
                        {
                            "index": r["index"],
                            "scores": [v.score for v in vs],
                            "malformed": [v.malformed for v in vs],
                            "errors": [v.error for v in vs],
                        }
                    )
                return out, prog
            jobs = [
                (ri, i, j) for ri, r in enumerate(rows) for i, j in _pair_indices(len(r["candidates"]), cfg.max_pairs_per_prompt)
            ]
            prog = _Progress(ctx, "judge", judge, len(jobs))
            prefs: list[Preference] = []
            for s in range(0, len(jobs), chunk):
                if ctx.should_stop():
                    raise _Cancelled("judge")
                part = jobs[s : s + chunk]
                v = await judge.compare_many(
                    [
                        (
                            prompt_text(rows[ri]["prompt"]),
                            rows[ri]["candidates"][i],
                            rows[ri]["candidates"][j],
                            rows[ri]["reference"],
                        )
                        for ri, i, j in part
                    ]
                )
                prefs += v
                prog.add(v)
            out = [{"index": r["index"], "comparisons": []} for r in rows]
            for (ri, i, j), p in zip(jobs, prefs, strict=True):
                out[ri]["comparisons"].append(
                    {
                        "i": i,
                        "j": j,
                        "winner": p.winner,
                        "margin": p.margin,
                        "consistent": p.consistent,
                        "malformed": p.malformed,
                        "error": p.error,
                    }
                )
            return out, prog
        finally:
            await judge.aclose()

    out, prog = asyncio.run(go())
    ctx.judge_requests += judge.stats.requests
    _write_jsonl_atomic(ctx.out / "judgements.jsonl", out)
    return {"summary": prog.summary()}


# ---------------------------------------------------------------------------------------------
# stage 3: preference pairs


def _build_preferences(ctx: _Ctx) -> dict:
    cfg = ctx.cfg
    cands = {r["index"]: r for r in _read_jsonl(ctx.out / "candidates.jsonl")}
    pairs, dropped_ties, dropped_unusable, dropped_margin = [], 0, 0, 0
    for jr in _read_jsonl(ctx.out / "judgements.jsonl"):
        r = cands[jr["index"]]
        c = r["candidates"]
        if "scores" in jr:
            sc = jr["scores"]
            for i, j in _pair_indices(len(c), 0):
                if sc[i] is None or sc[j] is None:
                    dropped_unusable += 1
                    continue
                if sc[i] == sc[j] or c[i].strip() == c[j].strip():
                    dropped_ties += 1
                    continue
                hi, lo = (i, j) if sc[i] > sc[j] else (j, i)
                if sc[hi] - sc[lo] < cfg.min_margin:
                    dropped_margin += 1
                    continue
                pairs.append((jr["index"], sc[hi] - sc[lo], c[hi], c[lo]))
        else:
            for cmp in jr["comparisons"]:
                if cmp["winner"] is None:
                    dropped_unusable += 1
                elif cmp["winner"] == "tie":
                    dropped_ties += 1
                else:
                    a, b = c[cmp["i"]], c[cmp["j"]]
                    pairs.append((jr["index"], cmp["margin"], *((a, b) if cmp["winner"] == "a" else (b, a))))
    # per prompt: largest margins first, at most max_pairs_per_prompt
    by_prompt: dict[int, list] = {}
    for p in pairs:
        by_prompt.setdefault(p[0], []).append(p)
    rows = []
    for idx in sorted(by_prompt):
        ps = sorted(by_prompt[idx], key=lambda p: -p[1])
        if cfg.max_pairs_per_prompt > 0:
            ps = ps[: cfg.max_pairs_per_prompt]
        for _i, m, ch, rj in ps:
            rows.append(
                {
                    "prompt": cands[idx]["prompt"],
                    "chosen": ch,
                    "rejected": rj,
                    "margin": m,
                    "reference": cands[idx]["reference"],
                    "index": idx,
                }
            )
    _write_jsonl_atomic(ctx.out / "preferences.jsonl", rows)
    return {
        "summary": {
            "pairs": len(rows),
            "dropped_ties": dropped_ties,
            "dropped_unusable": dropped_unusable,
            "dropped_below_margin": dropped_margin,
            "min_margin": cfg.min_margin,
        }
    }


# ---------------------------------------------------------------------------------------------
# stage 5: GRPO / RLOO


POLICY_JUDGE_USAGE = "judge_usage.json"  # under <output>/policy: what the policy stage's judge calls cost


def policy_judge_usage(out: Path) -> dict[str, float]:
    """The policy stage's judge spend over every attempt (cost_usd, prompt_tokens, completion_tokens); zeros if none."""
    path = out / "policy" / POLICY_JUDGE_USAGE
    usage = json.loads(path.read_text()) if path.is_file() else {}
    return {k: usage.get(k, 0) for k in ("cost_usd", "prompt_tokens", "completion_tokens")}


def _judge_reward_fn(ctx: _Ctx):
    """Async reward function calling the judge (normalised to [0, 1]; unusable verdicts → None, which
    TRL ignores). In pairwise mode: the completion vs the reference answer (win 1, tie 0.5, loss 0).
    After every call the stage's judge spend is added to ``policy/judge_usage.json`` (fresh verdicts only: cached
    ones were paid for when first given), so an attempt killed mid-stage still counts what it paid."""
    cfg = ctx.cfg
    judge = ctx.judge()
    lo, hi = cfg.judge.score_min, cfg.judge.score_max
    earlier = policy_judge_usage(ctx.out)  # attempts before this one

    def record() -> None:
        s = judge.stats
        atomic_write_json(
            ctx.out / "policy" / POLICY_JUDGE_USAGE,
            {
                "cost_usd": earlier["cost_usd"] + s.cost_usd,
                "prompt_tokens": earlier["prompt_tokens"] + s.prompt_tokens,
                "completion_tokens": earlier["completion_tokens"] + s.completion_tokens,
            },
        )

    async def judge_reward(prompts, completions, reference=None, **kw):
        refs = reference or [None] * len(prompts)
        ps = [prompt_text(p) for p in prompts]
        cs = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        if cfg.judge.mode == "pairwise":
            prefs = await judge.compare_many([(p, c, r or "", r) for p, c, r in zip(ps, cs, refs, strict=True)])
            record()
            return [None if p.winner is None else {"a": 1.0, "tie": 0.5, "b": 0.0}[p.winner] for p in prefs]
        js = await judge.score_many(list(zip(ps, cs, refs, strict=True)))
        record()
        return [None if j.score is None else (j.score - lo) / (hi - lo) for j in js]

    judge_reward.__name__ = "judge"
    return judge_reward, judge


def _rm_reward_fn(model_dir: str, device: str):
    scorer = RewardScorer(model_dir, device=device)

    def reward_model(prompts, completions, **kw):
        cs = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        return scorer.score(prompts, cs)

    return reward_model


def _run_online_policy(ctx: _Ctx, prompts: list[dict], rm: RewardModelResult | None) -> PolicyResult:
    from datasets import Dataset
    from transformers import AutoTokenizer, set_seed
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    cfg = ctx.cfg
    t0 = time.monotonic()
    out = ctx.out / "policy"
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg.device)
    set_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(cfg.parent_adapter_dir or cfg.base_model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    funcs: list = []
    judge = None
    if cfg.reward_source in ("reward_model", "both"):
        if rm is None or not rm.model_dir:
            raise ValueError(f"reward_source {cfg.reward_source!r} needs the reward model stage")
        funcs.append(_rm_reward_fn(rm.model_dir, device))
    if cfg.reward_source in ("judge", "both"):
        fn, judge = _judge_reward_fn(ctx)
        funcs.append(fn)
    model, peft_config = load_policy(
        cfg.base_model_dir,
        cfg.parent_adapter_dir,
        PolicyLoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules),
        device,
        quantize_4bit=cfg.quantize_4bit,
    )
    g = max(2, cfg.candidates_per_prompt)
    chat = bool(getattr(tok, "chat_template", None))
    ds = Dataset.from_list(
        [
            {
                "prompt": as_messages(p["prompt"], cfg.system_prompt) if chat else prompt_text(p["prompt"]),
                "reference": p["reference"] or "",
            }
            for p in prompts
        ]
    )
    ckdir = out / "checkpoints"
    common = _common_args(
        ckdir,
        device=device,
        seed=cfg.seed,
        learning_rate=cfg.learning_rate,
        batch_size=g * max(1, cfg.prompts_per_step),
        grad_accumulation=1,
        max_steps=cfg.policy_steps,
        num_epochs=1.0,
        checkpoint_every_steps=cfg.checkpoint_every_steps,
        keep_checkpoints=cfg.keep_checkpoints,
    )
    C, T = (GRPOConfig, GRPOTrainer) if cfg.algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    args = C(
        num_generations=g,
        max_completion_length=cfg.max_new_tokens,
        beta=cfg.kl_coefficient,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        **common,
    )
    bridge = make_stage_callback("policy", ctx.on_event, ctx.should_stop, ckdir)
    trainer = T(
        model=model,
        reward_funcs=funcs,
        args=args,  # type: ignore[arg-type]  # (C, T) is (GRPOConfig, GRPOTrainer) or (RLOOConfig, RLOOTrainer): mypy can't pair them
        train_dataset=ds,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[bridge],
    )
    _quiet(trainer)
    attach_trackers(trainer, "policy")
    cfg_dict = {"fingerprint": cfg.fingerprint(), "algorithm": cfg.algorithm, "reward_source": cfg.reward_source}
    card = _card(
        cfg.algorithm.upper(),
        cfg.base_model_ref or cfg.base_model_dir,
        cfg.adapter_name or ctx.out.name,
        cfg.parent_adapter_dir,
        {
            "reward": cfg.reward_source,
            "judge": cfg.judge.name,
            "KL beta": cfg.kl_coefficient,
            "steps": cfg.policy_steps,
            "group size": g,
            "base": "4-bit NF4 (QLoRA)" if cfg.quantize_4bit else "full precision",
        },
    )
    try:
        res = _finish_policy_training(trainer, bridge, tok, out, ckdir, cfg.algorithm, cfg_dict, ctx.on_event, t0, card)
    finally:
        if judge is not None:
            ctx.judge_requests += judge.stats.requests
    return res


def _policy_stage(ctx: _Ctx, prompts: list[dict], rm: RewardModelResult | None) -> PolicyResult:
    cfg = ctx.cfg
    if cfg.algorithm == "dpo":
        jc = DPOJobConfig(
            base_model_dir=cfg.base_model_dir,
            preference_file=str(ctx.out / "preferences.jsonl"),
            output_dir=str(ctx.out / "policy"),
            parent_adapter_dir=cfg.parent_adapter_dir,
            system_prompt=cfg.system_prompt,
            beta=cfg.kl_coefficient,
            learning_rate=cfg.learning_rate,
            max_steps=cfg.policy_steps,
            batch_size=cfg.dpo_batch_size,
            max_length=cfg.max_length,
            lora_r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules,
            seed=cfg.seed,
            checkpoint_every_steps=cfg.checkpoint_every_steps,
            keep_checkpoints=cfg.keep_checkpoints,
            device=cfg.device,
            base_model_ref=cfg.base_model_ref,
            adapter_name=cfg.adapter_name,
            quantize_4bit=cfg.quantize_4bit,
        )
        return run_dpo(jc, ctx.on_event, ctx.should_stop)
    return _run_online_policy(ctx, prompts, rm)


# ---------------------------------------------------------------------------------------------
# stage 6: evaluation


def _greedy(ctx: _Ctx, adapter_dir: str | None, prompts: list[dict]) -> list[str]:
    from ..generation import generate_batch, load_for_inference

    cfg = ctx.cfg
    lm = load_for_inference(cfg.base_model_dir, adapter_dir, device=cfg.device, merge_adapter=True)
    outs: list[str] = []
    bs = max(1, cfg.generation_batch_size)
    for i in range(0, len(prompts), bs):
        if ctx.should_stop():
            raise _Cancelled("evaluate")
        inputs = [_gen_input(p["prompt"], lm.tokenizer, cfg.system_prompt) for p in prompts[i : i + bs]]
        outs += [
            r.text for r in generate_batch(lm.model, lm.tokenizer, inputs, max_new_tokens=cfg.max_new_tokens, temperature=0.0)
        ]
    del lm
    return outs


def _evaluate(ctx: _Ctx, policy_adapter: str) -> dict:
    cfg = ctx.cfg
    prompts = _load_prompts(cfg.eval_prompts_file, cfg.max_eval_prompts)  # type: ignore[arg-type]
    gens_path = ctx.out / "eval_generations.jsonl"
    gens = {r["model"]: r["outputs"] for r in _read_jsonl(gens_path)}
    opponents = {"policy": policy_adapter, "parent": cfg.parent_adapter_dir, "base": None}
    for name, adapter in opponents.items():
        if name == "base" and cfg.parent_adapter_dir is None:
            continue  # the parent is the base
        if name not in gens:
            gens[name] = _greedy(ctx, adapter, prompts)
            with open(gens_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"model": name, "outputs": gens[name]}, ensure_ascii=False) + "\n")
    judge = ctx.judge()
    vs = ["parent"] + (["base"] if "base" in gens else [])
    total = len(prompts) * len(vs)

    async def go():
        try:
            prog = _Progress(ctx, "evaluate", judge, total)
            res: dict[str, list[Preference]] = {}
            for opp in vs:
                items = [
                    (prompt_text(p["prompt"]), a, b, p["reference"])
                    for p, a, b in zip(prompts, gens["policy"], gens[opp], strict=True)
                ]
                res[opp] = []
                for s in range(0, len(items), max(1, cfg.judge_chunk_size)):
                    v = await judge.compare_many(items[s : s + cfg.judge_chunk_size])
                    res[opp] += v
                    prog.add(v)
            return res, prog
        finally:
            await judge.aclose()

    res, prog = asyncio.run(go())
    ctx.judge_requests += judge.stats.requests
    wr = {opp: dataclasses.asdict(win_rate(ps, opp)) for opp, ps in res.items()}
    if "base" not in wr:
        wr["base"] = dict(wr["parent"], opponent="base")  # parent == base
    metrics = {"judge_win_rate_vs_parent": wr["parent"]["win_rate"], "judge_win_rate_vs_base": wr["base"]["win_rate"]}
    ctx.emit(MetricsEvent(stage="evaluate", metrics={**metrics, "win_rates": wr}))
    return {
        "summary": {**metrics, **prog.summary(), "eval_prompts": len(prompts)},
        "win_rates": wr,
        "ties": "counted as half a win; malformed/failed verdicts excluded; 95% Wilson interval",
    }


# ---------------------------------------------------------------------------------------------
# entry point


def run_rlaif(
    config: RlaifConfig, on_event: Callable | None = None, should_stop: Callable[[], bool] | None = None
) -> RlaifResult:
    """Run (or resume, or return the finished result of) one RLAIF job. See the module docs.

    Raises ``ResumeMismatch`` when ``output_dir`` holds a run of a different configuration,
    ``DatasetInvalid`` for bad prompt files, ``JudgeConfigError`` for an unusable judge.
    """
    cfg = config
    if cfg.algorithm not in ("grpo", "rloo", "dpo"):
        raise ValueError(f"unknown algorithm {cfg.algorithm!r}")
    if cfg.reward_source not in ("reward_model", "judge", "both"):
        raise ValueError(f"unknown reward_source {cfg.reward_source!r}")
    t_start = time.monotonic()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp = cfg.fingerprint()
    run_cfg = out / "run_config.json"
    report_path = out / "rlaif_report.json"
    if run_cfg.is_file() and json.loads(run_cfg.read_text()).get("fingerprint") != fp:
        raise ResumeMismatch(f"{out} holds an RLAIF run with a different configuration or inputs; use a new output_dir")
    if report_path.is_file():
        rep = json.loads(report_path.read_text())
        if rep.get("fingerprint") == fp:
            return _result_from_dict(rep["result"])
    cfg_dump = dataclasses.asdict(cfg)
    cfg_dump["judge"].pop("api_key_env", None)
    atomic_write_json(run_cfg, {"fingerprint": fp, "config": cfg_dump})
    ctx = _Ctx(cfg, on_event, should_stop)
    prompts = _load_prompts(cfg.prompts_file, cfg.max_prompts)
    rm: RewardModelResult | None = None
    pol: PolicyResult | None = None
    try:
        gen = _stage(ctx, "generate", _done(out / "candidates.jsonl"), lambda: _generate_candidates(ctx, prompts))
        jud = _stage(ctx, "judge", _done(out / "judgements.jsonl"), lambda: _judge_candidates(ctx))
        prefs = _stage(ctx, "preferences", _done(out / "preferences.jsonl"), lambda: _build_preferences(ctx))
        if prefs["summary"]["pairs"] == 0 and cfg.algorithm == "dpo":
            raise ValueError("no preference pairs survived (all ties, unusable or below min_margin); cannot run DPO")
        need_rm = cfg.train_reward_model or (cfg.algorithm != "dpo" and cfg.reward_source != "judge")
        if need_rm:
            rm_cfg = RewardModelConfig(
                preference_file=str(out / "preferences.jsonl"),
                output_dir=str(out / "reward_model"),
                backbone=cfg.reward_model_backbone,
                base_model_dir=cfg.base_model_dir,
                eval_fraction=cfg.reward_model_eval_fraction,
                learning_rate=cfg.reward_model_learning_rate,
                num_epochs=cfg.reward_model_epochs,
                max_steps=cfg.reward_model_steps,
                batch_size=cfg.reward_model_batch_size,
                max_length=min(cfg.max_length, 512),
                seed=cfg.seed,
                checkpoint_every_steps=cfg.checkpoint_every_steps,
                device=cfg.device,
            )
            box: dict[str, RewardModelResult] = {}

            def _rm():
                box["r"] = run_reward_model(rm_cfg, ctx.on_event, ctx.should_stop)
                if box["r"].status != "completed":
                    raise _Cancelled("reward_model")
                return {
                    "summary": {"accuracy": box["r"].accuracy, "eval_pairs": box["r"].eval_pairs},
                    "result": dataclasses.asdict(box["r"]),
                }

            info = _stage(ctx, "reward_model", out / "reward_model" / "stage.done.json", _rm)
            rm = box.get("r") or RewardModelResult(**info["result"])
        pbox: dict[str, PolicyResult] = {}

        def _pol():
            pbox["r"] = _policy_stage(ctx, prompts, rm)
            if pbox["r"].status != "completed":
                raise _Cancelled("policy")
            return {
                "summary": {
                    "steps": pbox["r"].global_step,
                    **{k: v for k, v in pbox["r"].final_metrics.items() if k in ("loss", "reward", "kl")},
                },
                "result": dataclasses.asdict(pbox["r"]),
            }

        pinfo = _stage(ctx, "policy", out / "policy" / "stage.done.json", _pol)
        pol = pbox.get("r") or PolicyResult(**pinfo["result"])
        ev = None
        if cfg.eval_prompts_file:
            ev = _stage(ctx, "evaluate", out / "evaluation.json", lambda: _evaluate(ctx, pol.adapter_dir))  # type: ignore[arg-type]
    except _Cancelled as c:
        ctx.emit(StageEvent(stage=str(c), status="cancelled"))
        return RlaifResult(
            status="cancelled",
            output_dir=str(out),
            algorithm=cfg.algorithm,
            reward_source=cfg.reward_source,
            judge_version=cfg.judge.name,
            adapter_dir=None,
            adapter_sha256=None,
            adapter_size_bytes=None,
            report_path=None,
            prompts=len(prompts),
            candidates=0,
            judged=0,
            malformed=0,
            judge_errors=0,
            preference_pairs=0,
            reward_model=rm,
            policy=pol,
            win_rate_vs_parent=None,
            win_rate_vs_base=None,
            judge_cost_usd=0.0,
            judge_prompt_tokens=0,
            judge_completion_tokens=0,
            judge_requests=ctx.judge_requests,
            stage_seconds=ctx.stage_seconds,
            skipped_stages=ctx.skipped,
            runtime_seconds=round(time.monotonic() - t_start, 3),
        )
    finally:
        ctx.cache.close()

    # final adapter at output_dir/adapter
    final = out / "adapter"
    staging = out / ".adapter.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(pol.adapter_dir, staging)  # type: ignore[arg-type]
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    sha, size = digest_path(final)
    js, es = jud["summary"], (ev or {}).get("summary", {})
    wrp = WinRate(**ev["win_rates"]["parent"]) if ev else None
    wrb = WinRate(**ev["win_rates"]["base"]) if ev else None
    pu = policy_judge_usage(out)  # GRPO/RLOO rewarded by the judge: its calls in the policy stage
    cost = js.get("cost_usd", 0.0) + es.get("cost_usd", 0.0) + pu["cost_usd"]
    result = RlaifResult(
        status="completed",
        output_dir=str(out),
        algorithm=cfg.algorithm,
        reward_source=cfg.reward_source,
        judge_version=cfg.judge.name,
        adapter_dir=str(final),
        adapter_sha256=sha,
        adapter_size_bytes=size,
        report_path=str(report_path),
        prompts=len(prompts),
        candidates=gen["summary"]["candidates"],
        judged=js["judged"],
        malformed=js["malformed"],
        judge_errors=js["errors"],
        preference_pairs=prefs["summary"]["pairs"],
        reward_model=rm,
        policy=pol,
        win_rate_vs_parent=wrp,
        win_rate_vs_base=wrb,
        judge_cost_usd=round(cost, 8),
        judge_prompt_tokens=js["prompt_tokens"] + es.get("prompt_tokens", 0) + int(pu["prompt_tokens"]),
        judge_completion_tokens=js["completion_tokens"] + es.get("completion_tokens", 0) + int(pu["completion_tokens"]),
        judge_requests=ctx.judge_requests,
        stage_seconds=ctx.stage_seconds,
        skipped_stages=ctx.skipped,
        runtime_seconds=round(time.monotonic() - t_start, 3),
    )
    result.metrics = {
        "reward_model_accuracy": rm.accuracy if rm else None,
        "judge_win_rate_vs_parent": wrp.win_rate if wrp else None,
        "judge_win_rate_vs_parent_ci_low": wrp.ci_low if wrp else None,
        "judge_win_rate_vs_parent_ci_high": wrp.ci_high if wrp else None,
        "judge_win_rate_vs_base": wrb.win_rate if wrb else None,
        "judge_win_rate_vs_base_ci_low": wrb.ci_low if wrb else None,
        "judge_win_rate_vs_base_ci_high": wrb.ci_high if wrb else None,
        "judge_cost_usd": result.judge_cost_usd,
        "judged": float(result.judged),
        "malformed": float(result.malformed),
        "preference_pairs": float(result.preference_pairs),
        "policy_steps": float(pol.global_step),
        "policy_final_loss": _f(pol.final_metrics.get("loss")),
        "policy_final_reward": _f(pol.final_metrics.get("reward")),
    }
    ctx.emit(MetricsEvent(stage="final", metrics=dict(result.metrics)))
    atomic_write_json(
        report_path,
        {
            "fingerprint": fp,
            "judge_version": cfg.judge.name,
            "config": cfg_dump,
            "result": dataclasses.asdict(result),
            "evaluation": ev,
            "judging": js,
            "preferences": prefs["summary"],
        },
    )
    return result


def _result_from_dict(d: dict) -> RlaifResult:
    d = dict(d)
    d["reward_model"] = RewardModelResult(**d["reward_model"]) if d.get("reward_model") else None
    d["policy"] = PolicyResult(**d["policy"]) if d.get("policy") else None
    for k in ("win_rate_vs_parent", "win_rate_vs_base"):
        d[k] = WinRate(**d[k]) if d.get(k) else None
    return RlaifResult(**d)
