"""Judge configurations: what a judge version must contain to be usable.

A config is a plain dict (stored as JSON): kind, mode, openai{...}, local_embedding{...}, rubric,
prompt_template, score_min, score_max, swap_positions. API keys are never part of it: only the
name of the environment variable that holds one.
"""

from __future__ import annotations

import re

from neuroweaver_runtime.errors import Violations

KINDS = {"OPENAI_COMPATIBLE", "LOCAL_EMBEDDING"}
MODES = {"POINTWISE", "PAIRWISE"}
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")
_SECRET_LIKE = re.compile(r"^(sk-|Bearer )")


def validate_judge_config(config: dict, v: Violations, prefix: str) -> None:
    kind, mode = config.get("kind"), config.get("mode")
    if kind not in KINDS:
        v.add(f"{prefix}.kind", "required: OPENAI_COMPATIBLE or LOCAL_EMBEDDING")
    if mode not in MODES:
        v.add(f"{prefix}.mode", "required: POINTWISE or PAIRWISE")
    lo, hi = config.get("score_min", 0.0), config.get("score_max", 0.0)
    if not hi > lo:
        v.add(f"{prefix}.score_max", "score_max must be greater than score_min (e.g. 1 and 10)")
    template = config.get("prompt_template", "")
    if len(template) > 16000:
        v.add(f"{prefix}.prompt_template", "at most 16000 characters")
    if len(config.get("rubric", "")) > 16000:
        v.add(f"{prefix}.rubric", "at most 16000 characters")
    if kind == "OPENAI_COMPATIBLE":
        openai = config.get("openai") or {}
        if not str(openai.get("base_url", "")).startswith(("http://", "https://")):
            v.add(f"{prefix}.openai.base_url", "required: an http(s) URL such as http://127.0.0.1:8081/v1")
        if not openai.get("model"):
            v.add(f"{prefix}.openai.model", "required: the model name served at base_url")
        env = openai.get("api_key_env", "")
        if env and (not _ENV_NAME.match(env) or _SECRET_LIKE.match(env)):
            v.add(f"{prefix}.openai.api_key_env", "must be the NAME of an environment variable, never the key itself")
        if mode == "POINTWISE" and template and "{response}" not in template:
            v.add(f"{prefix}.prompt_template", "a pointwise template must contain {response}")
        if mode == "PAIRWISE" and template and not ("{response_a}" in template and "{response_b}" in template):
            v.add(f"{prefix}.prompt_template", "a pairwise template must contain {response_a} and {response_b}")
        for key in ("requests_per_minute", "tokens_per_minute", "max_concurrency", "max_tokens"):
            if int(openai.get(key, 0) or 0) < 0:
                v.add(f"{prefix}.openai.{key}", "must not be negative")
        for key in ("price_per_1k_prompt_tokens", "price_per_1k_completion_tokens"):
            price = float(openai.get(key, 0.0) or 0.0)
            if not 0 <= price <= 1000:  # also refuses NaN; USD per 1,000 tokens
                v.add(f"{prefix}.openai.{key}", "must be in [0, 1000] USD per 1,000 tokens")
