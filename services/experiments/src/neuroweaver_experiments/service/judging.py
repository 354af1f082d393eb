"""Judge-scored live answers: RecordAnswers stores answers durably and returns; a background worker judges the
sampled ones with the experiment's registered judge version and records each score as a metric event.

Flow of one answer:
1. RecordAnswers validates the batch (all-or-nothing, like metric events: unit exposed, variant = the unit's
   assignment when given, sizes, time), derives a key when none is given, and samples it deterministically
   (`domain.judging.sampled`, a hash of the key). New keys are inserted as PENDING (sampled) or SKIPPED rows in the
   same transaction; repeated keys are duplicates. The call returns once the rows are committed.
2. The worker (one per process, started when the service is ready) claims PENDING answers of RUNNING experiments
   under a lease (replicas share the table; PostgreSQL `SKIP LOCKED`), at most `max_concurrency` in flight per
   experiment and `--judge-concurrency` in all, and asks the judge.
3. A score is recorded through the ordinary ingest (`Ingestor.record`) as the event `judge:<answer key>` of the
   experiment's judging metric at the answer's time (idempotent: a re-judged answer is a duplicate, never a second
   score); the answer becomes SCORED and the event's `judge_version` column names the judge version (lineage).
4. A judge that cannot score marks the answer FAILED with the error (counted in the results' judging status, never
   a score). Transient failures (judge endpoint or registry unreachable) are retried after `retry_seconds`
   (doubling) up to `attempts` times, then FAILED.
Answers survive restarts: a stopped process gives its leases back; a killed one's leases expire after
`lease_seconds` and another worker (or the restarted one) takes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from neuroweaver_runtime.errors import DomainError, FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from neuroweaver_runtime.timestamps import utcnow

from ..domain.experiment import EXPERIMENT, Experiment, require_running
from ..domain.judging import (
    MAX_ANSWERS,
    MAX_KEY,
    MAX_TEXT,
    AnswerState,
    JudgingStatus,
    PendingAnswer,
    RecordedAnswer,
    derived_key,
    sampled,
    score_key,
)
from .ingest import EventBatch, Ingestor
from .ports import AssignmentRepository, ExperimentRepository

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    score: float | None
    error: str
    transient: bool = False


class AnswerJudges(Protocol):
    """The registry's judge versions and a way to run them (adapters.judges)."""

    async def resolve(self, judge_version: str) -> str:
        """The concrete name of a usable judge version (`latest` resolved); NOT_FOUND / FAILED_PRECONDITION /
        UNAVAILABLE as domain errors."""
        ...

    async def score(self, judge_version: str, prompt: str, answer: str, reference: str) -> Verdict: ...
    async def close(self) -> None: ...


class AnswerRepository(Protocol):
    async def add(self, rows: Sequence[dict]) -> set[str]: ...
    async def claimable(self, now: float) -> list[tuple[int, str]]: ...
    async def claim(
        self, experiment_key: int, limit: int, owner: str, now: float, until: float, exclude: Sequence[int] = ()
    ) -> list[PendingAnswer]: ...
    async def renew(self, owner: str, ids: Sequence[int], until: float) -> None: ...
    async def settle(
        self, answer_id: int, owner: str, state: AnswerState, now: datetime, *, score: float | None = None, error: str = ""
    ) -> bool: ...
    async def retry_later(self, answer_id: int, owner: str, error: str, not_before: float, now: datetime) -> None: ...
    async def release(self, owner: str, ids: Sequence[int] | None = None) -> None: ...
    async def set_lineage(self, experiment_key: int, event_key: str, judge_version: str) -> None: ...
    async def status(self, experiment_key: int, judge_version: str, metric: str) -> JudgingStatus: ...


class AnswerUnitOfWork(Protocol):
    @property
    def experiments(self) -> ExperimentRepository: ...
    @property
    def assignments(self) -> AssignmentRepository: ...
    @property
    def answers(self) -> AnswerRepository: ...


class AnswerUnitOfWorkFactory(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[AnswerUnitOfWork, bool | None]: ...


@dataclass
class RecordAnswersResult:
    accepted: int = 0
    duplicates: int = 0
    sampled: int = 0


@dataclass
class JudgingSettings:
    concurrency: int = 8  # judge calls in flight in this process, all experiments together (0 = no worker)
    lease_seconds: float = 300.0
    poll_seconds: float = 2.0
    attempts: int = 3
    retry_seconds: float = 5.0


class AnswerJudging:
    def __init__(
        self, uow: AnswerUnitOfWorkFactory, ingestor: Ingestor, judges: AnswerJudges, settings: JudgingSettings | None = None
    ) -> None:
        self.uow = uow
        self.ingestor = ingestor
        self.judges = judges
        self.settings = settings or JudgingSettings()
        self.owner = uuid.uuid4().hex[:16]
        self._wake = asyncio.Event()
        self._inflight: dict[int, asyncio.Task] = {}  # answer id → its task
        self._per_experiment: dict[int, int] = {}
        self._loop_task: asyncio.Task | None = None
        self._closing = False
        self._renewed = 0.0  # time.monotonic() of the last lease renewal

    # -- settings of an experiment ---------------------------------------------------------------

    async def resolve(self, exp: Experiment) -> None:
        """Checks the experiment's judge version in the registry and stores the concrete name (`latest` resolved)."""
        if exp.answer_judging is not None:
            exp.answer_judging.judge_version = await self.judges.resolve(exp.answer_judging.judge_version)

    # -- RecordAnswers ---------------------------------------------------------------------------

    async def record(self, experiment: str, answers: list[RecordedAnswer]) -> RecordAnswersResult:
        EXPERIMENT.parse(experiment, "experiment")
        if not answers:
            raise InvalidArgument("answers must not be empty", field="answers", reason="INVALID_ANSWER")
        if len(answers) > MAX_ANSWERS:
            raise InvalidArgument(
                f"at most {MAX_ANSWERS} answers per call, got {len(answers)}", field="answers", reason="BATCH_TOO_LARGE"
            )
        bad: list[FieldViolation] = []
        for i, a in enumerate(answers):
            if not a.unit_id or len(a.unit_id) > 256:
                bad.append(FieldViolation(f"answers[{i}].unit_id", "unit_id must be 1-256 characters"))
            for name in ("prompt", "answer"):
                if not getattr(a, name):
                    bad.append(FieldViolation(f"answers[{i}].{name}", f"{name} is required"))
            for name in ("prompt", "answer", "reference"):
                if len(getattr(a, name)) > MAX_TEXT:
                    bad.append(FieldViolation(f"answers[{i}].{name}", f"{name} is at most {MAX_TEXT} characters"))
            if len(a.key) > MAX_KEY:
                bad.append(FieldViolation(f"answers[{i}].idempotency_key", f"idempotency_key is at most {MAX_KEY} characters"))
        _raise_if_bad(bad, "INVALID_ANSWER")
        now = utcnow()
        async with self.uow.transaction() as uow:
            exp = await uow.experiments.get(experiment, lock=False)
            if exp is None:
                raise NotFound(f"experiment {experiment} does not exist", reason="EXPERIMENT_NOT_FOUND")
            judging = exp.answer_judging
            if judging is None:
                raise FailedPrecondition(
                    f"experiment {experiment} does not judge answers: set its answer_judging (a registered judge version "
                    "and the metric its scores go to) first",
                    reason="ANSWER_JUDGING_NOT_CONFIGURED",
                    metadata={"experiment": experiment},
                )
            require_running(exp, "answers are recorded")
            variants = await uow.assignments.stored(exp.key, sorted({a.unit_id for a in answers}))
            for i, a in enumerate(answers):
                stored = variants.get(a.unit_id)
                if stored is None:
                    bad.append(
                        FieldViolation(
                            f"answers[{i}].unit_id", f"unit {a.unit_id!r} was never exposed (assign it with AssignVariant first)"
                        )
                    )
                elif a.variant and a.variant != stored:
                    bad.append(
                        FieldViolation(f"answers[{i}].variant", f"unit {a.unit_id!r} is assigned {stored!r}, not {a.variant!r}")
                    )
                if a.answer_time is not None and exp.start_time is not None and a.answer_time < exp.start_time:
                    bad.append(FieldViolation(f"answers[{i}].answer_time", "answer time is before the experiment started"))
            if bad:
                reason = "UNIT_NOT_EXPOSED" if "never exposed" in bad[0].description else "INVALID_ANSWER"
                if "is assigned" in bad[0].description:
                    reason = "VARIANT_MISMATCH"
                _raise_if_bad(bad, reason)
            rows: dict[str, dict] = {}
            for a in answers:
                variant = variants[a.unit_id]
                key = a.key or derived_key(a.unit_id, variant, a.prompt, a.answer, a.reference)
                if key in rows:
                    continue
                take = sampled(key, judging.sample_rate)
                rows[key] = dict(
                    experiment_id=exp.key,
                    idempotency_key=key,
                    unit_id=a.unit_id,
                    variant=variant,
                    prompt=a.prompt if take else "",
                    answer=a.answer if take else "",
                    reference=a.reference if take else "",
                    judge_version=judging.judge_version,
                    metric=judging.metric,
                    state=(AnswerState.PENDING if take else AnswerState.SKIPPED).value,
                    score=None,
                    error="",
                    attempts=0,
                    lease_owner="",
                    lease_expires_at=0.0,
                    answer_time=a.answer_time or now,
                    update_time=now,
                )
            new = await uow.answers.add(list(rows.values()))
        taken = sum(1 for k in new if rows[k]["state"] == AnswerState.PENDING.value)
        if taken:
            self._wake.set()
        return RecordAnswersResult(len(new), len(answers) - len(new), taken)

    async def status(self, exp: Experiment) -> JudgingStatus | None:
        if exp.answer_judging is None:
            return None
        async with self.uow.transaction() as uow:
            return await uow.answers.status(exp.key, exp.answer_judging.judge_version, exp.answer_judging.metric)

    # -- the worker ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.settings.concurrency > 0 and self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="answer-judging")

    async def close(self) -> None:
        self._closing = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(BaseException):
                await self._loop_task
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):  # the database may already be gone; the leases then expire
            async with self.uow.transaction() as uow:
                await uow.answers.release(self.owner)
        await self.judges.close()

    async def _run(self) -> None:
        # Leases of answers being judged are renewed every third of their length: a slow judge keeps its answers,
        # and only a process that stopped renewing (killed, or cut off from the database) loses them.
        while not self._closing:
            tick = max(0.05, min(self.settings.poll_seconds, self.settings.lease_seconds / 3))
            try:
                await self._renew_leases()
                await self.claim_and_judge()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the worker outlives a database hiccup; the next round retries
                log.warning("answer judging round failed; retrying", exc_info=True)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), tick)

    async def _renew_leases(self) -> None:
        if not self._inflight or time.monotonic() - self._renewed < self.settings.lease_seconds / 3:
            return
        self._renewed = time.monotonic()
        async with self.uow.transaction() as uow:
            await uow.answers.renew(self.owner, list(self._inflight), time.time() + self.settings.lease_seconds)

    async def claim_and_judge(self) -> int:
        """One round: claims what the free slots allow and starts judging it; returns the number claimed."""
        free = self.settings.concurrency - len(self._inflight)
        if free <= 0:
            return 0
        now = time.time()
        claimed: list[tuple[PendingAnswer, Experiment]] = []
        async with self.uow.transaction() as uow:
            for exp_key, name in await uow.answers.claimable(now):
                exp = await uow.experiments.get(name)
                if exp is None or exp.answer_judging is None:
                    continue
                slots = min(free, exp.answer_judging.max_concurrency - self._per_experiment.get(exp_key, 0))
                if slots <= 0:
                    continue
                got = await uow.answers.claim(
                    exp_key, slots, self.owner, now, now + self.settings.lease_seconds, exclude=list(self._inflight)
                )
                claimed += [(p, exp) for p in got]
                free -= len(got)
                if free <= 0:
                    break
        for pending, _ in claimed:
            self._per_experiment[pending.experiment_key] = self._per_experiment.get(pending.experiment_key, 0) + 1
            task = asyncio.create_task(self._judge(pending))
            self._inflight[pending.id] = task
            task.add_done_callback(functools.partial(self._done, pending))
        return len(claimed)

    def _done(self, pending: PendingAnswer, _task: asyncio.Task) -> None:
        self._inflight.pop(pending.id, None)
        left = self._per_experiment.get(pending.experiment_key, 1) - 1
        if left > 0:
            self._per_experiment[pending.experiment_key] = left
        else:
            self._per_experiment.pop(pending.experiment_key, None)
        if not self._closing:
            self._wake.set()  # a slot is free

    async def _judge(self, p: PendingAnswer) -> None:
        try:
            verdict = await self.judges.score(p.judge_version, p.prompt, p.answer, p.reference)
            if verdict.score is None:
                await self._failed(p, verdict.error, transient=verdict.transient)
                return
            key = score_key(p.key)
            batch = EventBatch(
                experiments=[""], unit_ids=[p.unit_id], metrics=[p.metric], values=[verdict.score], times=[p.answer_time],
                keys=[key], covariates=[None],
            )  # fmt: skip
            try:
                await self.ingestor.record(p.experiment, batch)
            except FailedPrecondition as exc:
                if exc.reason == "EXPERIMENT_NOT_RUNNING":  # judged again once it runs (or never, once concluded)
                    async with self.uow.transaction() as uow:
                        await uow.answers.release(self.owner, [p.id])
                    return
                await self._failed(p, f"score not recorded: {exc.message}")
                return
            except DomainError as exc:
                await self._failed(p, f"score not recorded: {exc.message}")
                return
            async with self.uow.transaction() as uow:
                if await uow.answers.settle(p.id, self.owner, AnswerState.SCORED, utcnow(), score=verdict.score):
                    await uow.answers.set_lineage(p.experiment_key, key, p.judge_version)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one answer's crash must not stop the worker; it is retried
            log.warning("judging answer %s of %s failed", p.key, p.experiment, exc_info=True)
            await self._failed(p, f"internal error while judging: {type(exc).__name__}", transient=True)

    async def _failed(self, p: PendingAnswer, error: str, *, transient: bool = False) -> None:
        error = error[:1000]
        async with self.uow.transaction() as uow:
            if transient and p.attempts + 1 < self.settings.attempts:
                delay = self.settings.retry_seconds * 2**p.attempts
                await uow.answers.retry_later(p.id, self.owner, error, time.time() + delay, utcnow())
            else:
                await uow.answers.settle(p.id, self.owner, AnswerState.FAILED, utcnow(), error=error)


def _raise_if_bad(bad: list[FieldViolation], reason: str) -> None:
    if not bad:
        return
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise InvalidArgument(
        f"no answer was recorded: {bad[0].field}: {bad[0].description}{more}", reason=reason, violations=bad[:100]
    )
