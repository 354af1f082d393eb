"""The generation engine: a bounded queue in front of one worker thread running a dynamic batcher.

Requests are admitted into a bounded queue (full → RESOURCE_EXHAUSTED). The worker thread takes the oldest
request plus every waiting request with compatible sampling settings (same temperature, top_p, stop strings;
up to `max_batch_size`; a request sampling with a seed is decoded alone, so that its seed reproduces it) and decodes them together in one left-padded batch with a KV cache, using
`neuroweaver_ml`'s decoding loop step by step so that every request gets its own deltas, its own max_tokens
and its own time to first token. Requests whose deadline passed while queued are dropped before decoding;
a cancelled or expired request stops being decoded at the next step. Nothing here blocks the event loop:
results travel back through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from neuroweaver_ml.generation import Decoder, SamplingParams, stop_holdback
from neuroweaver_runtime.errors import DeadlineExceeded, DomainError, InvalidArgument, ResourceExhausted, Unavailable

from .. import metrics
from ..domain import Delta, Sampling

log = logging.getLogger("neuroweaver.model_server.engine")


@dataclass(eq=False)
class Job:
    ids: list[int]
    sampling: Sampling
    deadline: float | None  # time.monotonic() value, or None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    admitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    cancelled: bool = False
    finished: bool = False

    def key(self) -> tuple:
        s = self.sampling
        if s.seed is not None and s.temperature > 0:
            # One generator draws for the whole batch: a seeded sample repeats only when decoded alone.
            return (id(self),)
        return (s.temperature, s.top_p, tuple(s.stop), s.seed)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


@dataclass
class EngineStats:
    batches: int = 0
    largest_batch: int = 0
    dropped_expired: int = 0
    aborted: int = 0
    completed: int = 0


class Engine:
    def __init__(self, model, tokenizer, *, max_queue: int, max_batch_size: int) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_queue, self.max_batch_size = max_queue, max_batch_size
        self.stats = EngineStats()
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._running: list[Job] = []
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name="generation", daemon=True)
        self._thread.start()

    # -- admission (event loop side) ---------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, ids: list[int], sampling: Sampling, deadline: float | None) -> Job:
        job = Job(ids, sampling, deadline, asyncio.get_running_loop())
        with self._cv:
            if self._stopped:
                raise Unavailable("the model server is shutting down", reason="SHUTTING_DOWN")
            if len(self._pending) >= self.max_queue:
                raise ResourceExhausted(
                    f"the request queue is full ({self.max_queue} waiting); retry with backoff",
                    reason="QUEUE_FULL",
                    metadata={"max_queue": str(self.max_queue)},
                )
            self._pending.append(job)
            metrics.QUEUE_DEPTH.set(len(self._pending))
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        with self._cv:
            try:
                self._pending.remove(job)
                metrics.QUEUE_DEPTH.set(len(self._pending))
            except ValueError:
                pass

    async def run(self, ids: list[int], sampling: Sampling, deadline: float | None) -> AsyncIterator[Delta]:
        """Admits a request and yields its deltas; the last one carries finish reason and accounting."""
        job = self.submit(ids, sampling, deadline)
        try:
            while True:
                item = await job.events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not job.finished:
                self.cancel(job)

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            pending = list(self._pending)
            self._pending.clear()
            self._cv.notify_all()
        for job in pending:
            job.emit(Unavailable("the model server is shutting down", reason="SHUTTING_DOWN"))

    # -- worker thread -----------------------------------------------------------------------

    def _take_batch(self) -> list[Job]:
        with self._cv:
            while not self._pending and not self._stopped:
                self._cv.wait()
            if self._stopped:
                return []
            first = self._pending.popleft()
            batch = [first]
            for job in list(self._pending):
                if len(batch) >= self.max_batch_size:
                    break
                if job.key() == first.key():
                    self._pending.remove(job)
                    batch.append(job)
            metrics.QUEUE_DEPTH.set(len(self._pending))
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            now = time.monotonic()
            live = []
            for job in batch:
                if job.cancelled:
                    continue
                if job.expired(now):
                    self.stats.dropped_expired += 1
                    job.finished = True
                    job.emit(
                        DeadlineExceeded("the request's deadline passed while it waited in the queue", reason="DEADLINE_EXCEEDED")
                    )
                    continue
                live.append(job)
            if not live:
                continue
            self._running = live
            metrics.INFLIGHT.set(len(live))
            metrics.BATCH_SIZE.observe(len(live))
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(live))
            try:
                self._decode(live)
            except DomainError as exc:
                for job in live:
                    if not job.finished:
                        job.finished = True
                        job.emit(exc)
            except Exception as exc:  # noqa: BLE001 - reported to each caller as INTERNAL by the interceptor
                log.exception("generation failed")
                for job in live:
                    if not job.finished:
                        job.finished = True
                        job.emit(RuntimeError(f"generation failed: {exc}"))
            finally:
                self._running = []
                metrics.INFLIGHT.set(0)

    def _decode(self, jobs: list[Job]) -> None:
        s = jobs[0].sampling
        params = SamplingParams(
            max_new_tokens=max(j.sampling.max_tokens for j in jobs),
            temperature=s.temperature,
            top_p=s.top_p,
            stop=list(s.stop),
            seed=s.seed,
        )
        try:
            dec = Decoder(self.model, self.tokenizer, [j.ids for j in jobs], params)
        except ValueError as exc:
            raise InvalidArgument(str(exc), reason="INVALID_GENERATION_REQUEST") from exc
        sent = [0] * len(jobs)
        while True:
            now = time.monotonic()
            for i, job in enumerate(jobs):
                if dec.finish[i] is None and (job.cancelled or job.expired(now)):
                    dec.finish[i] = "length"
                    job.finished = True
                    self.stats.aborted += 1
                    if not job.cancelled:
                        job.emit(DeadlineExceeded("the request's deadline passed during generation", reason="DEADLINE_EXCEEDED"))
            if all(f is not None for f in dec.finish) and all(j.finished for j in jobs):
                return
            dec.step()
            now = time.monotonic()
            for i, job in enumerate(jobs):
                if job.finished:
                    continue
                if job.first_token is None:
                    job.first_token = now
                if dec.finish[i] is None and len(dec.out[i]) >= job.sampling.max_tokens:
                    dec.finish[i] = "length"
                text = dec.texts[i]
                if dec.finish[i] is not None:
                    r = dec.result(i)
                    job.finished = True
                    self.stats.completed += 1
                    job.emit(
                        Delta(
                            text=r.text[sent[i] :],
                            finish_reason=r.finish_reason,
                            prompt_tokens=r.prompt_tokens,
                            completion_tokens=r.completion_tokens,
                            latency_s=now - job.admitted,
                            ttft_s=job.first_token - job.admitted,
                        )
                    )
                    continue
                safe = len(text) - stop_holdback(text, job.sampling.stop)
                if safe > sent[i]:
                    job.emit(Delta(text=text[sent[i] : safe]))
                    sent[i] = safe
