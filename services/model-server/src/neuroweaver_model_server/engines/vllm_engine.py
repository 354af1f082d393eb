"""The vLLM engine (CUDA): an HF checkpoint served by vLLM's `AsyncLLM` (continuous batching, paged KV cache) with
the version's PEFT adapter as a LoRA request (`enable_lora`), written against vLLM's v1 API (`vllm.v1.engine.
async_llm.AsyncLLM`, `AsyncEngineArgs`, `SamplingParams` with `RequestOutputKind.DELTA`, `TokensPrompt`,
`LoRARequest`). vLLM is imported only when this engine is chosen.

Not exercised on this project's machines: vLLM is too large to carry to the GPU machine the project is lent, and
the CPU machines have no GPU. The admission rules are the other engines': at most `max_queue + max_batch_size`
requests in flight (more → RESOURCE_EXHAUSTED `QUEUE_FULL`), deadlines abort the request inside vLLM.

Log-probabilities are vLLM's own (`SamplingParams.logprobs` = the request's top_logprobs): per generated token a
`{token_id: Logprob(logprob, rank, decoded_token)}` holding the top ones and the sampled one, computed by default
from the raw logits before temperature and top_p (vLLM's `logprobs_mode="raw_logprobs"`), as the other engines
report them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from neuroweaver_runtime.errors import DeadlineExceeded, ResourceExhausted, Unavailable

from ..domain import Delta, Sampling
from .base import Prompt, QueuedEngine
from .logprobs import HFTokenBytes, Trail, top_entries

_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def _lora_rank(adapter_dir: str) -> int:
    r = int(json.loads(Path(adapter_dir, "adapter_config.json").read_text()).get("r", 8))
    return next((x for x in _LORA_RANKS if x >= r), _LORA_RANKS[-1])


class VllmEngine(QueuedEngine):
    name = "vllm"

    def __init__(
        self,
        model_dir: str,
        *,
        adapter_dir: str | None,
        max_queue: int,
        max_batch_size: int,
        max_new_tokens_limit: int,
        adapters: dict[str, str] | None = None,
    ) -> None:
        """`adapter_dir`: the one version's PEFT adapter; `adapters`: several versions' adapters by engine name
        (multi-LoRA: one LoRARequest each, chosen per request by `run(..., adapter=name)`)."""
        super().__init__(max_queue=max_queue, max_batch_size=max_batch_size)
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        named = dict(adapters or {})
        if adapter_dir and not named:
            named = {"": adapter_dir}
        tok_src = adapter_dir if adapter_dir and Path(adapter_dir, "tokenizer_config.json").is_file() else model_dir
        args = AsyncEngineArgs(
            model=model_dir,
            tokenizer=tok_src,
            max_num_seqs=max_batch_size,
            enable_lora=bool(named),
            max_loras=max(1, len(named)),
            max_lora_rank=max((_lora_rank(d) for d in named.values()), default=16),
        )
        self._llm = AsyncLLM.from_engine_args(args)
        self._loras = {name: LoRARequest(name or "adapter", i + 1, d) for i, (name, d) in enumerate(named.items())}
        self.tokenizer = AutoTokenizer.from_pretrained(tok_src)
        self._token_bytes = HFTokenBytes(self.tokenizer)
        self.context_length = int(self._llm.model_config.max_model_len)
        self.model_dir, self.adapter_dir = model_dir, adapter_dir
        self._inflight = 0
        self._waiting = 0  # admitted, no token yet (vLLM's queue plus prefill)

    def encode(self, prompt: Prompt) -> list[int]:
        from neuroweaver_ml import encode_prompt

        return encode_prompt(self.tokenizer, prompt)

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._inflight - self._waiting

    async def run(self, ids: list[int], sampling: Sampling, deadline: float | None, adapter: str = "") -> AsyncIterator[Delta]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if self._stopped:
            raise Unavailable("the model server is shutting down", reason="SHUTTING_DOWN")
        if self._inflight >= self.max_queue + self.max_batch_size:
            raise ResourceExhausted(
                f"the request queue is full ({self.max_queue} waiting); retry with backoff",
                reason="QUEUE_FULL",
                metadata={"max_queue": str(self.max_queue)},
            )
        lora = self._loras.get(adapter) if adapter else next(iter(self._loras.values()), None)
        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            # vLLM returns the sampled token's logprob and the `logprobs` most likely ones (0 = the sampled one only)
            logprobs=sampling.top_logprobs if sampling.logprobs else None,
            output_kind=RequestOutputKind.DELTA,
        )
        request_id = uuid.uuid4().hex
        admitted = time.monotonic()
        first: float | None = None
        completion_tokens = 0
        finished = False
        trail = Trail() if sampling.logprobs else None
        text_length = 0  # characters of completion text so far (the offsets of logprob entries)
        self._inflight += 1
        self._waiting += 1
        try:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            async with asyncio.timeout(remaining):
                async for out in self._llm.generate(TokensPrompt(prompt_token_ids=ids), params, request_id, lora_request=lora):
                    c = out.outputs[0]
                    completion_tokens += len(c.token_ids)
                    if first is None and c.token_ids:
                        first = time.monotonic()
                        self._waiting -= 1
                    if trail is not None:
                        self._add_logprobs(trail, c, text_length, sampling.top_logprobs)
                    text_length += len(c.text)
                    if out.finished:
                        finished = True
                        now = time.monotonic()
                        yield Delta(
                            text=c.text,
                            finish_reason="length" if c.finish_reason == "length" else "stop",
                            prompt_tokens=len(ids),
                            completion_tokens=completion_tokens,
                            latency_s=now - admitted,
                            ttft_s=(first or now) - admitted,
                            # as the other engines: neither a stop string's tokens (vLLM cut its text already) nor
                            # the end-of-sequence token are reported
                            logprobs=trail.final(text_length, cut=c.finish_reason == "stop") if trail else [],
                        )
                        self.stats.completed += 1
                        return
                    if c.text:
                        yield Delta(text=c.text, logprobs=trail.take(text_length) if trail else [])
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed during generation", reason="DEADLINE_EXCEEDED") from None
        finally:
            self._inflight -= 1
            if first is None:
                self._waiting -= 1
            if not finished:
                self.stats.aborted += 1
                await self._llm.abort(request_id)

    def _add_logprobs(self, trail: Trail, c, start: int, k: int) -> None:
        """vLLM's logprobs of this delta's tokens (`c.logprobs`: one {token_id: Logprob} per token of `c.token_ids`,
        a list or vLLM's FlatLogprobs, which reads as one) onto `trail`. vLLM's delta text is not split per token:
        offsets advance by each token's own text, within the delta's text (a stop string's tokens and the
        end-of-sequence token, which have none there, start where it ends). When vLLM holds text back (stop strings),
        a token's entry may come with the delta before its text and its `text_offset` be early by that text."""
        end = start + len(c.text)
        offset = start
        for token, entries in zip(c.token_ids, c.logprobs or (), strict=False):
            raw = self._token_bytes(token)
            nxt = min(end, offset + len(raw.decode("utf-8", "ignore")))
            if entries and token in entries:
                ranked = sorted(
                    ((t, e) for t, e in entries.items() if e.rank is not None and e.rank <= k),
                    key=lambda item: item[1].rank,
                )
                top = top_entries([(self._token_bytes(t), float(e.logprob)) for t, e in ranked])
                trail.add(raw, float(entries[token].logprob), top, offset, nxt)
            offset = nxt

    def stop(self) -> None:
        self._stopped = True
        self._llm.shutdown()
