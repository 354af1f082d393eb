"""Inference requests and the rules that check them: served names, model resolution, request validation."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Literal

from neuroweaver_runtime.errors import InvalidArgument, NotFound, Violations

DEFAULT_MAX_TOKENS = 128
ROLES = {"system", "user", "assistant"}
MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 128
MAX_PROMPT_CHARS = 200_000
MAX_TOP_LOGPROBS = 20  # most likely alternatives reported per token (OpenAI's limit for chat's top_logprobs)

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
    logprobs: bool = False  # report each generated token's log-probability
    top_logprobs: int = 0  # with logprobs: this many most likely alternatives per token too


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a position: its text, log-probability and raw bytes."""

    token: str
    logprob: float
    raw: bytes


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (its distribution before temperature and top_p, as
    OpenAI and vLLM report it), with the most likely alternatives at its position (most likely first). `token` is
    the token's text (bytes that are not UTF-8 on their own as \\xNN escapes), `raw` its bytes (OpenAI's `bytes`: a
    character split over several tokens joins from them), `offset` where its text starts in the completion
    (characters)."""

    token: str
    logprob: float
    raw: bytes
    offset: int
    top: tuple[TopLogprob, ...] = ()


@dataclass
class GenerationInput:
    model: str
    messages: list[Message]
    prompt: str
    sampling: Sampling


@dataclass(frozen=True)
class ServedModel:
    """What this server serves and the names it answers to. `name` is unique to the version and its weights (a
    caller naming it pins that version); `stable_names` are the deployment's names, the same on every version it
    rolls over to, so callers naming one of them never see NOT_FOUND because of a rollover."""

    name: str
    model_version: str
    base_model: str
    adapter_sha256: str
    quantized_4bit: bool
    stable_names: tuple[str, ...] = ()
    engine: str = ""  # the engine decoding it (transformers, llama.cpp, vllm), known once loaded
    # Several versions on one base (multi-LoRA): the engine's name for this version's adapter ("" = the server's
    # only version); `parent` = the base model they share (OpenAI/vLLM `parent` in GET /v1/models).
    adapter: str = ""
    parent: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        """Every accepted name, stable ones first (the first is the default)."""
        return tuple(dict.fromkeys((*self.stable_names, self.name)))

    @property
    def fingerprint(self) -> str:
        """OpenAI's `system_fingerprint`: `nw-<version>-<adapter sha256[:8]>`, short and stable per version and weights
        (the served name's digest stands in for parts that are unknown)."""
        version = self.model_version.rsplit("/", 1)[-1] if self.model_version else ""
        digest = self.adapter_sha256[:8] or hashlib.sha256(f"{self.name}|{self.base_model}".encode()).hexdigest()[:8]
        slug = re.sub(r"[^a-z0-9]+", "-", version.lower()).strip("-")
        return f"nw-{slug}-{digest}" if slug else f"nw-{digest}"


@dataclass(frozen=True)
class VersionSpec:
    """One more version a server serves on the same base (`--extra-versions`): its names and its adapter."""

    served_model_name: str
    model_version: str = ""
    model_names: tuple[str, ...] = ()
    adapter_uri: str = ""
    adapter_sha256: str = ""


def parse_extra_versions(raw: str) -> tuple[VersionSpec, ...]:
    """`--extra-versions`: a JSON list of objects {served_model_name, model_version, model_names (list or comma
    separated), adapter_uri, adapter_sha256}; each one another adapter on the server's base, or, with neither
    adapter_uri nor adapter_sha256, the base itself. ValueError when malformed."""
    if not raw.strip():
        return ()
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--extra-versions is not JSON: {exc}") from None
    if not isinstance(items, list):
        raise ValueError("--extra-versions must be a JSON list of objects")
    known = {"served_model_name", "model_version", "model_names", "adapter_uri", "adapter_sha256"}
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) - known:
            raise ValueError(f"--extra-versions[{i}] must be an object with keys among {', '.join(sorted(known))}")
        if not all(isinstance(v, str) for k, v in item.items() if k != "model_names"):
            raise ValueError(f"--extra-versions[{i}]: values must be strings")
        names = item.get("model_names", [])  # none: the served name only
        names = ",".join(names) if isinstance(names, list) else str(names)
        adapter_uri, sha = item.get("adapter_uri", ""), item.get("adapter_sha256", "")
        if bool(adapter_uri) != bool(sha):
            raise ValueError(
                f"--extra-versions[{i}] needs adapter_uri and adapter_sha256 together (neither: the version is the base)"
            )
        out.append(
            VersionSpec(
                validate_served_name(item.get("served_model_name", "")),
                item.get("model_version", ""),
                parse_stable_names(names),
                adapter_uri,
                sha,
            )
        )
    return tuple(out)


def check_unique_names(served: list[ServedModel]) -> None:
    """Every name routes to one version: a name two versions answer to is a configuration error."""
    seen: dict[str, str] = {}
    for m in served:
        for n in m.names:
            if n in seen and seen[n] != m.name:
                raise ValueError(f"model name {n!r} is given to two versions ({seen[n]} and {m.name})")
            seen[n] = m.name


@dataclass
class Completion:
    model: str  # the name the request used (or the default)
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    ttft_s: float
    served: ServedModel | None = None  # the version that answered (several versions on one base)
    logprobs: list[TokenLogprob] | None = None  # one per completion token when the request asked for them


@dataclass
class Delta:
    """A streamed piece; the last one has `finish_reason` and the accounting set."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    ttft_s: float = 0.0
    # With `Sampling.logprobs`: the tokens whose text this delta completes (a token held back with a possible stop
    # string travels with the delta that sends its text); tokens of a stop string or the end-of-sequence token none.
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class Limits:
    max_new_tokens_limit: int = 1024
    max_queue: int = 64
    max_batch_size: int = 8


_SERVED_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-_]{0,127}$")
# Stable names are resource names too: `projects/p/deployments/d`, `projects/p/models/m@alias`, `m@alias`.
_STABLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-_/@]{0,255}$")


def validate_served_name(name: str) -> str:
    if not _SERVED_NAME.match(name or ""):
        raise ValueError(f"served model name {name!r} must match {_SERVED_NAME.pattern}")
    return name


def parse_stable_names(raw: str) -> tuple[str, ...]:
    """A comma-separated list of stable names (`--model-names`), checked, duplicates dropped, order kept."""
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    for n in names:
        if not _STABLE_NAME.match(n):
            raise ValueError(f"model name {n!r} must match {_STABLE_NAME.pattern}")
    return names


def resolve_model(requested: str, served: ServedModel) -> str:
    """The name a response echoes: the requested one when it is any accepted name, the default when empty.
    Anything else is NOT_FOUND; the error names no served name (a caller learns those from ListModels)."""
    return route_model(requested, [served])[1]


def route_model(requested: str, served: list[ServedModel]) -> tuple[ServedModel, str]:
    """The version a request naming `requested` goes to and the name its response echoes. An empty name goes to the
    first version's default name; a name no version answers to is NOT_FOUND, naming no served name."""
    if not requested:
        return served[0], served[0].names[0]
    for m in served:
        if requested in m.names:
            return m, requested
    raise NotFound(
        f"model {requested!r} is not served here (see ListModels / GET /v1/models)",
        reason="MODEL_NOT_FOUND",
        metadata={"model": requested},
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
    if not 0 <= s.top_logprobs <= MAX_TOP_LOGPROBS:
        v.add(f"{prefix}sampling.top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]")
    elif s.top_logprobs and not s.logprobs:
        v.add(f"{prefix}sampling.top_logprobs", "needs logprobs")
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
