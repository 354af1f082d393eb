"""Inference requests and the rules that check them: served names, model resolution, request validation."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from neuroweaver_runtime.errors import InvalidArgument, NotFound, Violations

DEFAULT_MAX_TOKENS = 128
ROLES = {"system", "user", "assistant"}
MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 128
MAX_PROMPT_CHARS = 200_000

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenerationInput:
    model: str
    messages: list[Message]
    prompt: str
    sampling: Sampling


@dataclass(frozen=True)
class ServedModel:
    name: str
    model_version: str
    base_model: str
    adapter_sha256: str
    quantized_4bit: bool


@dataclass
class Completion:
    model: str
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    ttft_s: float


@dataclass
class Delta:
    """A streamed piece; the last one has `finish_reason` and the accounting set."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    ttft_s: float = 0.0


@dataclass(frozen=True)
class Limits:
    max_new_tokens_limit: int = 1024
    max_queue: int = 64
    max_batch_size: int = 8


_SERVED_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-_]{0,127}$")


def validate_served_name(name: str) -> str:
    if not _SERVED_NAME.match(name or ""):
        raise ValueError(f"served model name {name!r} must match {_SERVED_NAME.pattern}")
    return name


def resolve_model(requested: str, served: ServedModel) -> None:
    """Empty selects the only model served; any other name must be exactly the served one."""
    if requested and requested != served.name:
        raise NotFound(
            f"model {requested!r} is not served here; this server serves {served.name!r} (see ListModels / GET /v1/models)",
            reason="MODEL_NOT_FOUND",
            metadata={"model": requested, "served_model": served.name},
        )


def validate(req: GenerationInput, limits: Limits, prefix: str = "") -> GenerationInput:
    """Checks a request and fills defaults; raises INVALID_ARGUMENT naming every bad field."""
    v = Violations()
    has_messages, has_prompt = bool(req.messages), bool(req.prompt)
    if has_messages == has_prompt:
        v.add(f"{prefix}messages", "set exactly one of messages (chat) and prompt (raw text)")
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            v.add(f"{prefix}messages[{i}].role", f"role {m.role!r} must be one of system, user, assistant")
    if has_messages and not any(m.content.strip() for m in req.messages):
        v.add(f"{prefix}messages", "every message is empty")
    if has_messages and req.messages[-1].role == "assistant" and len(req.messages) == 1:
        v.add(f"{prefix}messages", "a conversation needs a system or user message")
    total = len(req.prompt) + sum(len(m.content) for m in req.messages)
    if total > MAX_PROMPT_CHARS:
        v.add(f"{prefix}messages", f"input of {total} characters exceeds {MAX_PROMPT_CHARS}")
    s = req.sampling
    if s.max_tokens < 0:
        v.add(f"{prefix}sampling.max_tokens", "must not be negative")
    elif s.max_tokens > limits.max_new_tokens_limit:
        v.add(f"{prefix}sampling.max_tokens", f"{s.max_tokens} exceeds this server's limit of {limits.max_new_tokens_limit}")
    if not (0.0 <= s.temperature <= 2.0) or s.temperature != s.temperature:
        v.add(f"{prefix}sampling.temperature", "must be in [0, 2] (0 = greedy)")
    if not (0.0 <= s.top_p <= 1.0) or s.top_p != s.top_p:
        v.add(f"{prefix}sampling.top_p", "must be in (0, 1] (0 = default 1.0)")
    if len(s.stop) > MAX_STOP_SEQUENCES:
        v.add(f"{prefix}sampling.stop", f"at most {MAX_STOP_SEQUENCES} stop sequences")
    if any(not x or len(x) > MAX_STOP_CHARS for x in s.stop):
        v.add(f"{prefix}sampling.stop", f"stop sequences must be 1-{MAX_STOP_CHARS} characters")
    v.raise_if_any("INVALID_GENERATION_REQUEST")
    s.max_tokens = s.max_tokens or min(DEFAULT_MAX_TOKENS, limits.max_new_tokens_limit)
    s.top_p = s.top_p or 1.0
    return req


def prompt_too_long(prompt_tokens: int, max_tokens: int, context: int) -> InvalidArgument:
    return InvalidArgument(
        f"prompt of {prompt_tokens} tokens plus max_tokens={max_tokens} exceeds the model's context of {context} tokens",
        field="sampling.max_tokens",
        reason="CONTEXT_LENGTH_EXCEEDED",
        metadata={"prompt_tokens": str(prompt_tokens), "context": str(context)},
    )
