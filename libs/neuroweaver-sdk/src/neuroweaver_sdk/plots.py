"""PNG charts: training loss curves with eval points (a panel per stage), and per-variant means with confidence intervals."""

from __future__ import annotations

from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from neuroweaver.trainer.v1 import training_job_pb2 as tpb  # noqa: E402


@dataclass
class StageCurve:
    """One training stage's losses: its steps count from 1 again (RLAIF: sft, then the policy's DPO), so a stage is
    its own series and never joined to the next."""

    stage: str
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)


def training_curves(events) -> list[StageCurve]:
    """The job's STEP losses and eval losses per stage, stages in the order they started. An eval of a stage without
    steps (the final `evaluate`) belongs to the last stage that trained, at its last step. A step seen again (an attempt
    resumed from an earlier checkpoint) keeps its latest loss, so a curve never runs backwards."""
    losses: dict[str, dict[int, float]] = {}
    evals: dict[str, dict[int, float]] = {}
    last = ""
    for event in events:
        stage = event.stage or "train"
        if event.type == tpb.EVENT_TYPE_STEP:
            losses.setdefault(stage, {})[event.step.step] = event.step.loss
            last = stage
        elif event.type == tpb.EVENT_TYPE_EVAL and "eval_loss" in event.metrics:
            if stage not in losses:
                if not last:
                    continue
                stage = last
            at = event.step.step or int(event.metrics.get("step", 0)) or max(losses[stage], default=0)
            evals.setdefault(stage, {})[at] = event.metrics["eval_loss"]
    curves = []
    for stage, by_step in losses.items():
        points, eval_points = sorted(by_step.items()), sorted(evals.get(stage, {}).items())
        curves.append(
            StageCurve(
                stage, [s for s, _ in points], [v for _, v in points], [s for s, _ in eval_points], [v for _, v in eval_points]
            )
        )
    return curves


def training_figure(events, title: str = "") -> Figure:
    """A panel per stage (own step axis and loss scale: SFT and DPO losses differ in kind), side by side."""
    curves = training_curves(events) or [StageCurve("train")]
    fig, axes = plt.subplots(1, len(curves), figsize=(8 if len(curves) == 1 else 5 * len(curves), 4.5), squeeze=False)
    for ax, curve in zip(axes[0], curves, strict=True):
        ax.plot(curve.steps, curve.losses, label=f"{curve.stage} train loss", linewidth=1.2)
        if curve.eval_steps:
            ax.plot(curve.eval_steps, curve.eval_losses, "o-", label=f"{curve.stage} eval loss", markersize=5)
        ax.set_title(curve.stage, fontsize=10)
        ax.set_xlabel(f"{curve.stage} optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_training(events, out: str, title: str = "") -> str:
    fig = training_figure(events, title)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_experiment(results, out: str) -> str:
    variants = list(results.primary.variants)
    names = [v.variant for v in variants]
    means = [v.mean for v in variants]
    lower = [v.mean - v.ci_lower for v in variants]
    upper = [v.ci_upper - v.mean for v in variants]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.errorbar(names, means, yerr=[lower, upper], fmt="o", capsize=8, markersize=8)
    for name, v in zip(names, variants, strict=True):
        ax.annotate(f"n={v.units}", (name, v.mean), textcoords="offset points", xytext=(12, 0))
    ax.set_ylabel(f"{results.primary.metric.name} (mean, 95% CI)")
    ax.set_title(f"{results.experiment.rsplit('/', 1)[-1]}: {results.reason[:60]}", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
