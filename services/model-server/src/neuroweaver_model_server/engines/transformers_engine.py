"""The transformers engine: any HF checkpoint (+ PEFT adapter) decoded with continuous batching.

One worker thread runs a step loop over one batched KV cache (`DynamicCache`, left padded). At every step:

1. queued requests join while the batch has room (`max_batch_size`): their prompts are prefilled together (left
   padded), each samples its first token, and their cache rows are merged into the running cache (the shorter side
   is left padded with masked columns);
2. every running request feeds its last token in one decode forward pass and samples its next one;
3. finished, cancelled and expired requests leave the batch at once (their cache rows are dropped, so they stop
   computing), and cache columns that every remaining row has as padding are trimmed.

Sampling is per row: greedy rows take the argmax; sampled rows apply their own temperature and top_p and draw from
their own `torch.Generator` seeded with the request's seed, so a seeded request gives the same text whatever runs
beside it, and greedy/sampled requests with any stop strings and max_tokens share one batch. A request asking for
log-probabilities gets the log_softmax of the very logits row its token was drawn from, taken before temperature and
top_p (the model's own distribution, as OpenAI and vLLM report it), in float32. Position ids count each
row's real tokens, and padded columns are masked, so a row's answer does not depend on its companions' lengths.

Why not transformers' own `ContinuousBatchingManager` (`generate_batch`/`init_continuous_batching`, transformers
5.x): it decides greedy vs sampling once per manager (`generation_config.do_sample`), draws every row from the
process-wide RNG (one seed per manager), has no stop strings, and per-request temperature/top_p only exist when the
manager was built with non-default values. The model server needs all of these per request.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from neuroweaver_ml.generation import _eos_ids, _find_stop, _sample_next, stop_holdback
from neuroweaver_runtime.errors import Unavailable

from .. import metrics
from ..domain import Delta
from .base import Job, Prompt, QueuedEngine
from .logprobs import HFTokenBytes, Trail, top_entries

log = logging.getLogger("neuroweaver.model_server.engine")


@dataclass(eq=False)
class _Row:
    job: Job
    generator: Any  # torch.Generator for a seeded sampled request, else None (greedy, or the global RNG)
    pad: int = 0  # leading cache columns of this row that are padding (masked)
    real: int = 0  # real tokens in the cache (prompt + fed completion tokens): the next position id
    out: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    next_token: int | None = None  # sampled, not yet fed
    finish: str | None = None
    trail: Trail | None = None  # scored tokens not sent yet (requests asking for logprobs)


class TransformersEngine(QueuedEngine):
    """The transformers engine: continuous batching over one left-padded KV cache, per-request sampling."""

    name = "transformers"

    def __init__(
        self, model, tokenizer, *, max_queue: int, max_batch_size: int, prefill_tokens: int = 512, start: bool = True
    ) -> None:
        import torch

        super().__init__(max_queue=max_queue, max_batch_size=max_batch_size)
        self.model, self.tokenizer = model, tokenizer
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos = _eos_ids(model, tokenizer)
        self._torch = torch
        # transformers >= 5.25 names the cache argument `cache` (`past_key_values` is deprecated there)
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(core.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        # only the last position's logits (a prefill would otherwise project every prompt token onto the vocabulary)
        self._forward_kw: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.prefill_tokens = prefill_tokens  # prompt tokens prefilled per step at most (one longer prompt alone)
        self._rows: list[_Row] = []
        self._cache: Any = None  # DynamicCache of the running rows, batch order = self._rows
        self._finals: list[tuple[Job, Delta]] = []  # last deltas, sent once their rows left the batch
        self._token_bytes = HFTokenBytes(tokenizer)
        if start:
            self.start_worker()

    def encode(self, prompt: Prompt) -> list[int]:
        from neuroweaver_ml import encode_prompt

        if self._stopped:
            raise Unavailable("the model server is shutting down", reason="SHUTTING_DOWN")
        return encode_prompt(self.tokenizer, prompt)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "batching": "continuous"}

    # -- worker thread -----------------------------------------------------------------------

    def _admit_locked(self, now: float) -> list[Job]:
        for job in list(self._pending):
            if job.cancelled:
                self._pending.remove(job)
            elif job.expired(now):
                self._pending.remove(job)
                self.stats.dropped_expired += 1
                job.expire_in_queue()
        joiners: list[Job] = []
        tokens = 0
        while self._pending and len(self._rows) + len(joiners) < self.max_batch_size:
            # a bounded prefill per step, so that running requests keep decoding while a burst joins
            if joiners and tokens + len(self._pending[0].ids) > self.prefill_tokens:
                break
            tokens += len(self._pending[0].ids)
            joiners.append(self._pending.popleft())
        metrics.QUEUE_DEPTH.set(len(self._pending))
        return joiners

    def _work(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stopped and not self._pending and not self._rows:
                        self._cv.wait()
                    if self._stopped:
                        return
                    joiners = self._admit_locked(time.monotonic())
                try:
                    self._iteration(joiners)
                except Exception as exc:  # noqa: BLE001 - reported to each caller as INTERNAL by the interceptor
                    log.exception("generation failed")
                    finals, self._finals = self._finals, []
                    for job, delta in finals:  # complete answers
                        job.emit(delta)
                    for job in [*joiners, *(r.job for r in self._rows)]:
                        if not job.finished:
                            job.finished = True
                            job.emit(RuntimeError(f"generation failed: {exc}"))
                    self._rows, self._cache = [], None
                self._running = [r.job for r in self._rows]
                metrics.INFLIGHT.set(len(self._rows))
        finally:
            for row in self._rows:
                if not row.job.finished:
                    row.job.finished = True
                    row.job.emit(Unavailable("the model server is shutting down", reason="SHUTTING_DOWN"))
            self._rows, self._cache, self._running = [], None, []
            metrics.INFLIGHT.set(0)

    def _iteration(self, joiners: list[Job]) -> None:
        self._drop_aborted()
        joiners = [j for j in joiners if not j.cancelled]
        for group in self._length_groups(joiners):
            self._prefill(group)
            self._running = [r.job for r in self._rows]
            metrics.INFLIGHT.set(len(self._rows))
        if self._rows:
            self._decode()

    @staticmethod
    def _length_groups(jobs: list[Job]) -> list[list[Job]]:
        """Joiners in groups of similar prompt lengths (shortest first), so that a prefill pads little."""
        groups: list[list[Job]] = []
        for job in sorted(jobs, key=lambda j: len(j.ids)):
            if groups and len(job.ids) <= 1.25 * len(groups[-1][0].ids) + 8:
                groups[-1].append(job)
            else:
                groups.append([job])
        return groups

    def _drop_aborted(self) -> None:
        now = time.monotonic()
        gone = [r for r in self._rows if r.job.cancelled or r.job.expired(now)]
        for r in gone:
            self.stats.aborted += 1
            r.job.expire_in_decoding()
            r.finish = "length"
        if gone:
            self._compact()

    def _sample(self, logits, rows: list[_Row]) -> list[int]:
        """Next token per row from `logits` [len(rows), vocab]: argmax for greedy rows, each sampled row with its own
        temperature, top_p and generator (a [1, vocab] slice, exactly as that request alone would draw)."""
        tokens = self._torch.argmax(logits, dim=-1).tolist()
        for i, r in enumerate(rows):
            s = r.job.sampling
            if s.temperature > 0:
                tokens[i] = int(_sample_next(logits[i : i + 1], s.temperature, s.top_p, r.generator)[0])
        return tokens

    def _score(self, logits, rows: list[_Row], tokens: list[int]) -> list[tuple[float, list[tuple[int, float]]] | None]:
        """Per row asking for logprobs: the chosen token's log-probability and its `top_logprobs` most likely
        alternatives (most likely first), from `logits` [len(rows), vocab] before temperature and top_p."""
        torch = self._torch
        want = [i for i, r in enumerate(rows) if r.job.sampling.logprobs]
        scores: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(rows)
        if not want:
            return scores
        lp = torch.log_softmax(logits[want].float(), dim=-1)
        chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in want], device=lp.device)).squeeze(1).tolist()
        k = max(rows[i].job.sampling.top_logprobs for i in want)
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0])
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, i in enumerate(want):
            n = rows[i].job.sampling.top_logprobs
            scores[i] = (chosen[j], [(int(t), v) for t, v in zip(top_i[j][:n], top_v[j][:n], strict=True)])
        return scores

    def _prefill(self, jobs: list[Job]) -> None:
        torch = self._torch
        from transformers import DynamicCache

        longest = max(len(j.ids) for j in jobs)
        ids = torch.full((len(jobs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), longest), dtype=torch.long)
        rows = []
        for i, job in enumerate(jobs):
            n = len(job.ids)
            ids[i, longest - n :] = torch.tensor(job.ids)
            mask[i, longest - n :] = 1
            s = job.sampling
            gen = None
            if s.temperature > 0 and s.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(int(s.seed))
            rows.append(_Row(job, gen, pad=longest - n, real=n, trail=Trail() if s.logprobs else None))
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        with torch.inference_mode():
            o = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **{self._cache_arg: cache},
                **self._forward_kw,
                **self._adapters([r.job for r in rows]),
            )
            tokens = self._sample(o.logits[:, -1, :], rows)
            scores = self._score(o.logits[:, -1, :], rows, tokens)
        self._merge(rows, cache)  # filled in place by the forward pass
        now = time.monotonic()
        for r, t, score in zip(rows, tokens, scores, strict=True):
            self._on_token(r, t, now, score)
        self._compact()

    def _merge(self, rows: list[_Row], cache) -> None:
        """Appends `rows` (their prefilled `cache`) to the running batch, left padding the shorter side."""
        torch = self._torch
        if self._cache is None or not self._rows:
            self._rows, self._cache = rows, cache
            return
        old_len, new_len = self._cache_len(self._cache), self._cache_len(cache)
        if new_len < old_len:
            self._left_pad(cache, old_len - new_len)
            for r in rows:
                r.pad += old_len - new_len
        elif old_len < new_len:
            self._left_pad(self._cache, new_len - old_len)
            for r in self._rows:
                r.pad += new_len - old_len
        for old, new in zip(self._layers(self._cache), self._layers(cache), strict=True):
            old.keys = torch.cat([old.keys, new.keys], dim=0)
            old.values = torch.cat([old.values, new.values], dim=0)
        self._rows = self._rows + rows

    @staticmethod
    def _adapters(jobs: list[Job]) -> dict[str, Any]:
        """Several versions on one base: each row's adapter for this forward pass (PEFT mixed-adapter batches,
        `adapter_names`); nothing when the server serves one version."""
        if not any(j.adapter for j in jobs):
            return {}
        return {"adapter_names": [j.adapter for j in jobs]}

    def _layers(self, cache) -> list:
        from transformers.cache_utils import DynamicLayer

        layers = cache.layers
        for layer in layers:
            if type(layer) is not DynamicLayer:
                raise RuntimeError(
                    f"continuous batching needs full-attention cache layers; this model uses {type(layer).__name__}"
                )
        return layers

    def _cache_len(self, cache) -> int:
        return int(self._layers(cache)[0].keys.shape[-2])

    def _left_pad(self, cache, n: int) -> None:
        torch = self._torch
        for layer in self._layers(cache):
            k, v = layer.keys, layer.values
            layer.keys = torch.cat([k.new_zeros((*k.shape[:2], n, k.shape[-1])), k], dim=-2)
            layer.values = torch.cat([v.new_zeros((*v.shape[:2], n, v.shape[-1])), v], dim=-2)

    def _compact(self) -> None:
        """Drops finished rows from the batch and the cache, trims columns that are padding in every row, then sends
        the finished requests' last deltas (a caller that got its answer sees its row gone)."""
        self._drop_finished()
        self._running = [r.job for r in self._rows]
        metrics.INFLIGHT.set(len(self._rows))
        finals, self._finals = self._finals, []
        for job, delta in finals:
            job.emit(delta)

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if r.finish is None]
        if len(keep) == len(self._rows):
            pass
        elif not keep:
            self._rows, self._cache = [], None
            return
        else:
            index = self._torch.tensor(keep, device=self.device)
            for layer in self._layers(self._cache):
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
            self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            return
        trim = min(r.pad for r in self._rows)
        if trim > 0:
            for layer in self._layers(self._cache):
                layer.keys = layer.keys[:, :, trim:, :]
                layer.values = layer.values[:, :, trim:, :]
            for r in self._rows:
                r.pad -= trim

    def _decode(self) -> None:
        torch = self._torch
        rows = self._rows
        width = self._cache_len(self._cache) + 1
        pads = torch.tensor([r.pad for r in rows], device=self.device).unsqueeze(-1)
        mask = (torch.arange(width, device=self.device).unsqueeze(0) >= pads).long()
        ids = torch.tensor([[r.next_token] for r in rows], device=self.device)
        pos = torch.tensor([[r.real] for r in rows], device=self.device)
        with torch.inference_mode():
            o = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **{self._cache_arg: self._cache},
                **self._forward_kw,
                **self._adapters([r.job for r in rows]),
            )
            tokens = self._sample(o.logits[:, -1, :], rows)
            scores = self._score(o.logits[:, -1, :], rows, tokens)
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
        metrics.BATCH_SIZE.observe(len(rows))
        now = time.monotonic()
        for r, t, score in zip(rows, tokens, scores, strict=True):
            r.real += 1
            self._on_token(r, t, now, score)
        self._compact()

    def _on_token(self, row: _Row, token: int, now: float, score: tuple[float, list[tuple[int, float]]] | None = None) -> None:
        job = row.job
        if job.first_token is None:
            job.first_token = now
        stops = job.sampling.stop
        cut = -1
        if token in self.eos:
            row.finish = "stop"
        else:
            row.out.append(token)
            text = self.tokenizer.decode(row.out, skip_special_tokens=True)
            if row.trail is not None and score is not None:
                top = top_entries([(self._token_bytes(t), v) for t, v in score[1]])
                row.trail.add(self._token_bytes(token), score[0], top, len(row.text), len(text))
            cut = _find_stop(text, stops)
            if cut != -1:
                row.text, row.finish = text[:cut], "stop"
            else:
                row.text = text
                if len(row.out) >= job.sampling.max_tokens:
                    row.finish = "length"
        if row.finish is None:
            row.next_token = token
            safe = len(row.text) - stop_holdback(row.text, stops)
            if safe > row.sent:
                job.emit(Delta(text=row.text[row.sent : safe], logprobs=row.trail.take(safe) if row.trail else []))
                row.sent = safe
            return
        job.finished = True
        self.stats.completed += 1
        self._finals.append(
            (
                job,
                Delta(
                    text=row.text[row.sent :],
                    finish_reason=row.finish,  # type: ignore[arg-type]
                    prompt_tokens=len(job.ids),
                    completion_tokens=len(row.out),
                    latency_s=now - job.admitted,
                    ttft_s=job.first_token - job.admitted,
                    logprobs=row.trail.final(len(row.text), cut=cut != -1) if row.trail else [],
                ),
            )
        )
