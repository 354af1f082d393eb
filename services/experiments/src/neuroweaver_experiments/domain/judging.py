"""Judge-scored live answers: an experiment's judging settings, the answers callers record, deterministic sampling
and the judging status (no protobuf, no SQL).

An experiment with `AnswerJudging` scores a sample of the answers recorded for it (RecordAnswers) with one
registered judge version; each score becomes a metric event of `metric` whose lineage names that judge version.
A judge that cannot score (transport failure, malformed verdict, missing reference, unusable version) marks the
answer FAILED: counted in the status with its error, never recorded as a score.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from neuroweaver_runtime.errors import FailedPrecondition, InvalidArgument, Violations
from neuroweaver_runtime.judge_endpoints import JudgeEndpoints as _JudgeEndpoints
from neuroweaver_runtime.names import ResourceName

from .statistics import MetricKind, MetricSpec

JUDGE_VERSION = ResourceName(
    "projects/{project}/judges/{judge}/versions/{version}", (("version", r"(?:[1-9][0-9]{0,17}|latest)"),)
)

DEFAULT_CONCURRENCY = 4
MAX_CONCURRENCY = 64
MAX_ANSWERS = 1_000  # per RecordAnswers call
MAX_TEXT = 32 * 1024  # characters of a prompt, answer or reference
MAX_KEY = 200  # characters of an answer's idempotency key (the score's event key adds a prefix)
# Prefix of the score events' idempotency keys (`judge:` + the answer's key): reserved for the judge.
SCORE_KEY_PREFIX = "judge:"


@dataclass(frozen=True)
class JudgeEndpoints(_JudgeEndpoints):
    """Where this service may send LLM judges' prompts (`--judge-endpoints`; see neuroweaver_runtime.judge_endpoints):
    judge versions are checked when an experiment names one and again before each call."""

    SERVICE = "experiments service"
    OWN_SETTINGS = "NW_EXPERIMENTS_"


class AnswerState(StrEnum):
    SKIPPED = "SKIPPED"  # not in the sample: counted as received, never judged
    PENDING = "PENDING"
    SCORED = "SCORED"
    FAILED = "FAILED"


@dataclass
class AnswerJudging:
    judge_version: str
    metric: str
    sample_rate: float = 1.0
    max_concurrency: int = DEFAULT_CONCURRENCY


def apply_judging_defaults(j: AnswerJudging) -> None:
    j.sample_rate = j.sample_rate or 1.0
    j.max_concurrency = j.max_concurrency or DEFAULT_CONCURRENCY


def validate_judging(j: AnswerJudging, metrics: list[MetricSpec], v: Violations, path: str = "experiment.answer_judging") -> None:
    try:
        JUDGE_VERSION.parse(j.judge_version, f"{path}.judge_version")
    except InvalidArgument as exc:
        v.add(f"{path}.judge_version", exc.message)
    spec = next((m for m in metrics if m.name == j.metric), None)
    if spec is None:
        v.add(f"{path}.metric", f"metric {j.metric!r} is not one of the experiment's metrics ({sorted(m.name for m in metrics)})")
    elif spec.kind is not MetricKind.MEAN:
        v.add(f"{path}.metric", f"metric {j.metric!r} must be of kind MEAN to hold judge scores")
    if not math.isfinite(j.sample_rate) or not 0 < j.sample_rate <= 1:
        v.add(f"{path}.sample_rate", "sample_rate must be in (0, 1]")
    if not 1 <= j.max_concurrency <= MAX_CONCURRENCY:
        v.add(f"{path}.max_concurrency", f"max_concurrency must be between 1 and {MAX_CONCURRENCY}")


def check_judge_kept(old: AnswerJudging | None, new: AnswerJudging | None, started: bool) -> None:
    """Once an experiment has started, its judge version and score metric are fixed: scores from two judges in one
    metric would not be comparable. The sample rate and concurrency may change."""
    if not started or old is None:
        return
    if new is None or new.judge_version != old.judge_version or new.metric != old.metric:
        raise FailedPrecondition(
            f"the experiment started with judge {old.judge_version} scoring {old.metric!r}: after start only "
            "answer_judging.sample_rate and max_concurrency can change (start a new experiment for another judge)",
            reason="JUDGE_FIXED_AFTER_START",
            metadata={"judge_version": old.judge_version, "metric": old.metric},
        )


def sampled(key: str, rate: float) -> bool:
    """Whether the answer with this idempotency key is judged: the first 8 bytes of sha256(key) as a fraction of
    2^64 below the rate. Deterministic, so a retried answer is sampled exactly as before."""
    if rate >= 1.0:
        return True
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h / 2.0**64 < rate


def derived_key(unit: str, variant: str, prompt: str, answer: str, reference: str) -> str:
    """The key of an answer recorded without one: its content (a resent identical answer is a duplicate)."""
    payload = json.dumps([unit, variant, prompt, answer, reference], ensure_ascii=False)
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def score_key(answer_key: str) -> str:
    return SCORE_KEY_PREFIX + answer_key


@dataclass
class RecordedAnswer:
    unit_id: str
    variant: str  # "" = the unit's stored assignment
    prompt: str
    answer: str
    reference: str
    key: str
    answer_time: datetime | None


@dataclass
class PendingAnswer:
    """A sampled answer claimed for judging."""

    id: int
    experiment_key: int
    experiment: str
    unit_id: str
    prompt: str
    answer: str
    reference: str
    key: str
    judge_version: str
    metric: str
    answer_time: datetime
    attempts: int


@dataclass
class JudgingStatus:
    judge_version: str
    metric: str
    received: int = 0
    sampled: int = 0
    scored: int = 0
    failed: int = 0
    pending: int = 0
    last_error: str = ""
    last_error_time: datetime | None = None
