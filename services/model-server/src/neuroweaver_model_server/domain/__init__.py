"""Inference requests as plain dataclasses and the rules that check them (no protobuf, no torch)."""

from .inference import (
    DEFAULT_MAX_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_TOP_LOGPROBS,
    ROLES,
    Completion,
    Delta,
    FinishReason,
    GenerationInput,
    Limits,
    Message,
    Sampling,
    ServedModel,
    TokenLogprob,
    TopLogprob,
    VersionSpec,
    check_unique_names,
    parse_extra_versions,
    parse_stable_names,
    prompt_too_long,
    resolve_model,
    route_model,
    validate,
    validate_served_name,
)

__all__ = [
    "DEFAULT_MAX_TOKENS", "MAX_PROMPT_CHARS", "MAX_STOP_CHARS", "MAX_STOP_SEQUENCES", "MAX_TOP_LOGPROBS", "ROLES", "Completion", "Delta",
    "FinishReason", "GenerationInput", "Limits", "Message", "Sampling", "ServedModel", "TokenLogprob", "TopLogprob", "parse_stable_names",
    "prompt_too_long", "VersionSpec", "check_unique_names", "parse_extra_versions", "route_model",
    "resolve_model", "validate", "validate_served_name",
]  # fmt: skip
