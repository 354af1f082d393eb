"""Training events (neuroweaver_ml) → job events: one rule per kind of event, in `RULES`.

run_sft, run_rlaif, run_dpo and run_reward_model report progress through callbacks with events of their own
(`kind` says which). Each rule turns one into the job event the contract streams (TrainingJobEvent) and the
job columns that change with it. Events that carry no stage (checkpoint, resumed) belong to the stage that is
running, which `EventMapper` follows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..domain.job import EventType, JobEvent, StepMetrics

# the pipeline's stage names → the contract's (TrainingJobEvent.stage)
STAGE_NAMES = {"preferences": "pairs"}


def numeric(values: dict) -> dict[str, float]:
    """The finite numbers of `values` as floats (booleans, None and NaN dropped)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


def _stage(ev) -> str:
    return STAGE_NAMES.get(ev.stage, ev.stage)


@dataclass
class Mapped:
    event: JobEvent
    job_values: dict[str, Any] = field(default_factory=dict)  # job columns written in the same transaction


@dataclass
class Running:
    """What the rules may read besides the event: the attempt and the stage that is running."""

    attempt: int
    stage: str = "sft"
    notes: dict[str, str] = field(default_factory=dict)  # stage → what its STAGE_STARTED message adds (how it trains)


Rule = Callable[[Any, Running], Mapped]


def _stage_started(ev, run: Running) -> Mapped:
    name = _stage(ev)
    note = f" ({run.notes[name]})" if name in run.notes else ""
    return Mapped(JobEvent(EventType.STAGE_STARTED, stage=name, message=f"attempt {run.attempt}: {name}{note}"), {"stage": name})


def _stage_completed(ev, run: Running) -> Mapped:
    name = _stage(ev)
    message = f"{name} completed in {ev.seconds or 0:.1f}s"
    return Mapped(JobEvent(EventType.STAGE_COMPLETED, stage=name, metrics=numeric(ev.detail or {}), message=message))


def _stage_skipped(ev, run: Running) -> Mapped:
    name = _stage(ev)
    message = f"{name}: already completed by an earlier attempt; skipped"
    return Mapped(JobEvent(EventType.LOG, stage=name, metrics=numeric(ev.detail or {}), message=message))


def _stage_other(ev, run: Running) -> Mapped:
    name = _stage(ev)
    return Mapped(JobEvent(EventType.LOG, stage=name, message=f"{name}: {ev.status}"))


def _judge_progress(ev, run: Running) -> Mapped:
    m = {
        "done": ev.done, "total": ev.total, "cache_hits": ev.cache_hits, "malformed": ev.malformed, "errors": ev.errors,
        "requests": ev.requests, "retries": ev.retries, "prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
        "tokens": ev.prompt_tokens + ev.completion_tokens, "cost_usd": ev.cost_usd,
    }  # fmt: skip
    return Mapped(JobEvent(EventType.JUDGE, stage=_stage(ev), metrics=numeric(m), message=f"judged {ev.done}/{ev.total}"))


def _rl_step(ev, run: Running) -> Mapped:
    # a DPO job's steps belong to its `dpo` stage, whatever stage name the preference trainer reports
    name = run.stage if run.stage == "dpo" else _stage(ev)
    step = StepMetrics(step=ev.step, total_steps=ev.total_steps, loss=ev.loss or 0.0, learning_rate=ev.learning_rate or 0.0)
    m = numeric(
        {**{k.replace("/", "_"): v for k, v in (ev.metrics or {}).items()}, "loss": ev.loss, "reward": ev.reward, "kl": ev.kl}
    )
    return Mapped(
        JobEvent(EventType.STEP, stage=name, step=step, metrics=m), {"current_step": ev.step, "total_steps": ev.total_steps}
    )


def _metrics(ev, run: Running) -> Mapped:
    final = ev.stage == "final"
    return Mapped(
        JobEvent(
            EventType.EVAL,
            stage="evaluate" if final else _stage(ev),
            metrics=numeric(ev.metrics),
            message="final metrics" if final else "",
        )
    )


def _step(ev, run: Running) -> Mapped:
    step = StepMetrics(
        step=ev.step, total_steps=ev.total_steps, epoch=ev.epoch, loss=ev.loss or 0.0, learning_rate=ev.learning_rate or 0.0,
        grad_norm=ev.grad_norm or 0.0, tokens_per_second=ev.tokens_per_second, eta_seconds=ev.eta_seconds or 0.0,
        rss_bytes=ev.rss_bytes, gpu_memory_bytes=ev.gpu_memory_bytes or 0,
    )  # fmt: skip
    return Mapped(JobEvent(EventType.STEP, stage="sft", step=step), {"current_step": ev.step, "total_steps": ev.total_steps})


def _eval(ev, run: Running) -> Mapped:
    return Mapped(JobEvent(EventType.EVAL, stage="sft", metrics={"eval_loss": ev.eval_loss, "step": float(ev.step)}))


def _checkpoint(ev, run: Running) -> Mapped:
    return Mapped(JobEvent(EventType.CHECKPOINT, stage=run.stage, metrics={"step": float(ev.step)}, message=ev.path))


def _resumed(ev, run: Running) -> Mapped:
    message = f"resumed from checkpoint {ev.path} at step {ev.step}"
    return Mapped(
        JobEvent(EventType.RESUMED, stage=run.stage, metrics={"step": float(ev.step)}, message=message),
        {"resumed_from_step": ev.step, "current_step": ev.step},
    )


# `kind` (or `stage:<status>` for stage events; `stage:*` for any other status) → its rule. Kinds not listed
# are not recorded.
RULES: dict[str, Rule] = {
    "stage:started": _stage_started,
    "stage:completed": _stage_completed,
    "stage:skipped": _stage_skipped,
    "stage:*": _stage_other,
    "judge_progress": _judge_progress,
    "rl_step": _rl_step,
    "metrics": _metrics,
    "step": _step,
    "eval": _eval,
    "checkpoint": _checkpoint,
    "resumed": _resumed,
}


def rule_for(ev) -> Rule | None:
    if ev.kind == "stage":
        return RULES.get(f"stage:{ev.status}", RULES["stage:*"])
    return RULES.get(ev.kind)


class EventMapper:
    """Maps one job's training events in order; a started stage becomes the running one."""

    def __init__(self, attempt: int, stage: str = "sft") -> None:
        self.running = Running(attempt, stage)

    @property
    def stage(self) -> str:
        return self.running.stage

    @stage.setter
    def stage(self, name: str) -> None:
        self.running.stage = name

    def map(self, ev) -> Mapped | None:
        rule = rule_for(ev)
        if rule is None:
            return None
        mapped = rule(ev, self.running)
        if mapped.event.type is EventType.STAGE_STARTED:
            self.running.stage = mapped.event.stage
        return mapped
