"""What every decoding engine shares: the bounded admission queue, deadlines, cancellation and the hand-off of
deltas from the engine's worker thread to the event loop.

An engine subclasses `QueuedEngine`, implements `encode` (prompt → token ids, the engine's own tokenizer and chat
template), sets `name` and `context_length`, and runs `_work` in its worker thread: it takes jobs from
`self._pending` (under `self._cv`), decodes them and reports through `Job.emit` — text `Delta`s, the last one with
the finish reason and the accounting, or an exception. Nothing blocks the event loop: results travel back through
`loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from neuroweaver_runtime.errors import DeadlineExceeded, ResourceExhausted, Unavailable

from .. import metrics
from ..domain import Delta, Sampling

ENGINES = ("transformers", "llama.cpp", "vllm")

Prompt = str | list[dict[str, str]]


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
    adapter: str = ""  # the engine's name of the adapter to decode with when it holds several; "" = the only one

    def key(self) -> tuple:
        """Jobs with equal keys may share a batch of the transformers engine (one sampling setting per batch)."""
        s = self.sampling
        if s.seed is not None and s.temperature > 0:
            # One generator draws for the whole batch: a seeded sample repeats only when decoded alone.
            return (id(self),)
        return (s.temperature, s.top_p, tuple(s.stop), s.seed)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def emit(self, item: Delta | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def expire_in_queue(self) -> None:
        self.finished = True
        self.emit(DeadlineExceeded("the request's deadline passed while it waited in the queue", reason="DEADLINE_EXCEEDED"))

    def expire_in_decoding(self) -> None:
        self.finished = True
        if not self.cancelled:
            self.emit(DeadlineExceeded("the request's deadline passed during generation", reason="DEADLINE_EXCEEDED"))


@dataclass
class EngineStats:
    batches: int = 0  # decode steps (llama.cpp) or batches (transformers)
    largest_batch: int = 0  # most requests decoded together
    dropped_expired: int = 0
    aborted: int = 0
    completed: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens a request found in a sequence's KV cache (llama.cpp)


class QueuedEngine:
    """The admission side of an engine (event loop) and the worker thread's start and stop."""

    name = ""
    context_length = 0  # tokens of prompt + completion one request may use; 0 = unknown

    def __init__(self, *, max_queue: int, max_batch_size: int) -> None:
        self.max_queue, self.max_batch_size = max_queue, max_batch_size
        self.stats = EngineStats()
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._running: list[Job] = []
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start_worker(self) -> None:
        self._thread = threading.Thread(target=self._work, name=f"generation-{self.name}", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        raise NotImplementedError

    def encode(self, prompt: Prompt) -> list[int]:
        """Messages → the model's chat template with the generation prompt; a string → raw text. ValueError when
        the prompt cannot be encoded (no chat template, bad messages)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the engine runs, for logs."""
        return {"engine": self.name, "context_length": self.context_length, "max_batch_size": self.max_batch_size}

    # -- admission (event loop side) ---------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, ids: list[int], sampling: Sampling, deadline: float | None, adapter: str = "") -> Job:
        job = Job(ids, sampling, deadline, asyncio.get_running_loop(), adapter=adapter)
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
            self._cv.notify()

    async def run(self, ids: list[int], sampling: Sampling, deadline: float | None, adapter: str = "") -> AsyncIterator[Delta]:
        """Admits a request and yields its deltas; the last one carries finish reason and accounting. `adapter`: which
        of the engine's adapters decodes it when it holds several (multi-LoRA); "" = the only one."""
        job = self.submit(ids, sampling, deadline, adapter)
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
