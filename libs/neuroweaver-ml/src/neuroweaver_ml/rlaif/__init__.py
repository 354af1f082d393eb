"""RLAIF: AI judges, preference data, reward models and policy optimisation (GRPO / RLOO / DPO).

Plain Python, no gRPC and no SQL; heavy imports happen inside the functions that need them.
"""

from .judges import (
    Judge,
    JudgeCache,
    JudgeConfig,
    JudgeConfigError,
    Judgement,
    JudgeStats,
    LocalEmbeddingJudge,
    OpenAICompatibleJudge,
    Preference,
    make_judge,
    minilm_model_dir,
    parse_score,
    parse_winner,
)

__all__ = [
    "Judge",
    "JudgeCache",
    "JudgeConfig",
    "JudgeConfigError",
    "JudgeStats",
    "Judgement",
    "LocalEmbeddingJudge",
    "OpenAICompatibleJudge",
    "Preference",
    "make_judge",
    "minilm_model_dir",
    "parse_score",
    "parse_winner",
]
from .events import STAGES, JudgeProgressEvent, MetricsEvent, RLStepEvent, StageEvent  # noqa: E402
from .pipeline import RlaifConfig, RlaifResult, WinRate, run_rlaif, wilson_interval, win_rate  # noqa: E402
from .training import (  # noqa: E402
    DPOJobConfig,
    PolicyResult,
    RewardModelConfig,
    RewardModelResult,
    RewardScorer,
    run_dpo,
    run_reward_model,
)

__all__ += [
    "DPOJobConfig",
    "JudgeProgressEvent",
    "MetricsEvent",
    "PolicyResult",
    "RLStepEvent",
    "RewardModelConfig",
    "RewardModelResult",
    "RewardScorer",
    "RlaifConfig",
    "RlaifResult",
    "STAGES",
    "StageEvent",
    "WinRate",
    "run_dpo",
    "run_reward_model",
    "run_rlaif",
    "wilson_interval",
    "win_rate",
]
