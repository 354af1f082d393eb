"""Bench only: the model server's former transformers engine (until issue 17), a static batcher over `generate`-style
decoding, kept so bench/serve can compare it with the continuous-batching engine. Not a product option.

A bounded queue in front of one worker thread running a dynamic batcher.

Requests are admitted into a bounded queue (full → RESOURCE_EXHAUSTED). The worker thread takes the oldest
request plus every waiting request with compatible sampling settings (same temperature, top_p, stop strings;
up to `max_batch_size`; a request sampling with a seed is decoded alone, so that its seed reproduces it) and decodes them together in one left-padded batch with a KV cache, using
`neuroweaver_ml`'s decoding loop step by step so that every request gets its own deltas, its own max_tokens
and its own time to first token. Requests whose deadline passed while queued are dropped before decoding;
a cancelled or expired request stops being decoded at the next step. Nothing here blocks the event loop:
results travel back through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import logging
import time

from neuroweaver_ml.generation import Decoder, SamplingParams, stop_holdback
from neuroweaver_model_server import metrics
from neuroweaver_model_server.domain import Delta
from neuroweaver_model_server.engines.base import Job, Prompt, QueuedEngine
from neuroweaver_runtime.errors import DomainError, InvalidArgument

log = logging.getLogger("neuroweaver.model_server.engine")


class StaticBatcherEngine(QueuedEngine):
    """The former transformers engine: batches of compatible requests decoded together until the last one ends."""

    name = "transformers-static"

    def __init__(self, model, tokenizer, *, max_queue: int, max_batch_size: int) -> None:
        super().__init__(max_queue=max_queue, max_batch_size=max_batch_size)
        self.model, self.tokenizer = model, tokenizer
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.start_worker()

    def encode(self, prompt: Prompt) -> list[int]:
        from neuroweaver_ml import encode_prompt

        return encode_prompt(self.tokenizer, prompt)

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
                    job.expire_in_queue()
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
                    self.stats.aborted += 1
                    job.expire_in_decoding()
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


def main() -> None:
    """`python bench/serve/static_batcher.py <model server flags>`: the model server with this engine in place of the
    transformers engine (for bench/serve/bench_cbatch.py only)."""
    from neuroweaver_model_server import __main__ as server_main
    from neuroweaver_model_server.engines import transformers_engine

    transformers_engine.TransformersEngine = StaticBatcherEngine  # type: ignore[misc, assignment]
    server_main.main()


if __name__ == "__main__":
    main()
