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
    "Judge", "JudgeCache", "JudgeConfig", "JudgeConfigError", "JudgeStats", "Judgement", "LocalEmbeddingJudge",
    "OpenAICompatibleJudge", "Preference", "make_judge", "minilm_model_dir", "parse_score", "parse_winner",
]
