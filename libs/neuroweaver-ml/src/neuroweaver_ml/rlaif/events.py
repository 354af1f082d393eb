"""RLAIF progress events (dataclasses with a ``kind`` field, like ``neuroweaver_ml.training``'s;
``neuroweaver_ml.training.event_to_dict`` turns any of them into JSON-able dicts). The pipeline also
emits the training module's ``CheckpointEvent`` and ``ResumedEvent`` from its trainer stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STAGES = ("generate", "judge", "preferences", "reward_model", "policy", "evaluate")


@dataclass
class StageEvent:
    stage: str  # one of STAGES
    status: str  # started | completed | skipped (already complete on disk) | cancelled
    seconds: float | None = None  # duration (completed)
    detail: dict[str, Any] = field(default_factory=dict)
    kind: str = "stage"


@dataclass
class JudgeProgressEvent:
    stage: str  # judge | policy (judge as reward) | evaluate
    done: int  # verdicts finished in this stage (cached ones included)
    total: int
    cache_hits: int
    malformed: int
    errors: int
    requests: int  # HTTP requests sent by this process (retries included)
    retries: int
    prompt_tokens: int  # over the verdicts done (cached ones carry their original usage)
    completion_tokens: int
    cost_usd: float
    kind: str = "judge_progress"


@dataclass
class RLStepEvent:
    stage: str  # reward_model | policy
    step: int
    total_steps: int
    loss: float | None
    reward: float | None  # GRPO/RLOO mean reward; DPO reward margin
    kl: float | None
    learning_rate: float | None
    metrics: dict[str, float] = field(default_factory=dict)  # everything the TRL trainer logged
    kind: str = "rl_step"


@dataclass
class MetricsEvent:
    stage: str
    metrics: dict[str, Any]
    kind: str = "metrics"
