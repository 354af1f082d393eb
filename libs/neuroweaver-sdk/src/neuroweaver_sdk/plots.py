"""PNG charts: training loss curves with eval points, and per-variant means with confidence intervals."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from neuroweaver.trainer.v1 import training_job_pb2 as tpb  # noqa: E402


def plot_training(events, out: str, title: str = "") -> str:
    steps, losses, eval_steps, eval_losses = [], [], [], []
    last_step = 0
    for event in events:
        if event.type == tpb.EVENT_TYPE_STEP:
            last_step = event.step.step
            steps.append(event.step.step)
            losses.append(event.step.loss)
        elif event.type == tpb.EVENT_TYPE_EVAL and "eval_loss" in event.metrics:
            eval_steps.append(event.step.step or last_step)
            eval_losses.append(event.metrics["eval_loss"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, losses, label="train loss", linewidth=1.2)
    if eval_steps:
        ax.plot(eval_steps, eval_losses, "o-", label="eval loss", markersize=5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
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
