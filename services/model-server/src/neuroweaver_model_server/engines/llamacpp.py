"""The llama.cpp engine: a GGUF base (+ a GGUF LoRA adapter) decoded on the CPU with continuous batching, through
llama-cpp-python's low-level bindings of llama.cpp's C API (`llama_batch` / `llama_decode` with one sequence id
per request, as llama.cpp's own server does with its slots).

One worker thread owns the llama.cpp context. Each request gets a sequence id (a slot) while it is decoded, up to
`max_batch_size` at once, each slot with a KV cache of its own of `context_length` tokens (llama.cpp's per-sequence
streams, `kv_unified=false`: a sequence's cells never interleave with another's, so a greedy answer is the same
whatever else is decoded beside it; with one shared cache the attention sums differ in the last bits and greedy
answers flip on near-ties). At every step the worker builds one batch: the next token of every decoding request,
then prompt tokens of newly admitted requests (chunked to the batch size), and calls `llama_decode` once; each
request samples its own next token with its own sampler chain (greedy, or temperature → top_p → seeded draw), so
different sampling settings share a batch and a seed reproduces its sample whatever runs beside it. A request asking
for log-probabilities gets the log-softmax (numpy, float64) of the logits its token was sampled from
(`llama_get_logits_ith` at its batch index), before temperature and top_p: the model's distribution. Requests join
at the next step after a slot frees and leave the batch as soon as they finish, are cancelled or pass their
deadline. Text is decoded incrementally (UTF-8 safe), stop strings are matched on it and never streamed.

Several versions on one base (`adapters={name: gguf_lora}`): the base weights are loaded once (one `llama_model`)
and every version's GGUF LoRA on it; one context serves them all. llama.cpp applies adapters per context, not per
sequence, so each step decodes the running requests grouped by adapter: `llama_set_adapters_lora` (a no-op when the
set is unchanged) then one `llama_decode` holding only that adapter's sequences, group after group. This is correct
because a sequence's KV cache only ever holds tokens decoded with its own adapter (every decode call that touches it
has its adapter set), and attention reads only the sequence's own cells (per-sequence streams): switching the
adapter between calls changes nothing already cached. A freed sequence's cache is reused for a prompt prefix only by
a request of the same adapter. Chosen over one context per adapter, which would hold a KV cache of
`--max-batch-size` x `--context-length` per version (and its own compute buffers) for the same result; the price is
one `llama_decode` per adapter present in a step instead of one per step.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from neuroweaver_ml.generation import stop_holdback
from neuroweaver_runtime.errors import Unavailable

from .. import metrics
from ..domain import Delta, Sampling
from .base import Job, Prompt, QueuedEngine
from .logprobs import Trail, top_entries

log = logging.getLogger("neuroweaver.model_server.engine.llamacpp")

DEFAULT_BATCH_TOKENS = 512  # tokens per llama_decode call (prompt chunks + one per decoding request)
DEFAULT_CONTEXT = 2048  # tokens per request (prompt + completion) unless --context-length says otherwise


def available() -> bool:
    """Whether llama-cpp-python is installed (without importing it: that loads the native library)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(eq=False)
class _Slot:
    seq: int
    job: Job
    sampler: Any
    adapter: str = ""  # the job's adapter name (its key in the engine's adapters)
    fed: int = 0  # prompt tokens already in the KV cache
    kv: list[int] = field(default_factory=list)  # the tokens in this sequence's KV cache, by position
    pos: int = 0  # next position of this sequence
    next_token: int | None = None  # sampled, still to be fed
    out: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    trail: Trail | None = None  # scored tokens not sent yet (requests asking for logprobs)

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.job.ids)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _find_stop(text: str, stops: list[str], start: int) -> int:
    best = -1
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


class LlamaCppEngine(QueuedEngine):
    name = "llama.cpp"

    def __init__(
        self,
        model_path: str,
        *,
        lora_path: str | None = None,
        lora_scale: float = 1.0,
        adapters: dict[str, str] | None = None,
        max_queue: int,
        max_batch_size: int,
        threads: int = 0,
        context_length: int = 0,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
    ) -> None:
        super().__init__(max_queue=max_queue, max_batch_size=max_batch_size)
        import llama_cpp as lc
        from llama_cpp import _logger

        _logger.set_verbose(False)  # llama.cpp's own log: errors only (it prints every tensor otherwise)
        self._lc = lc
        self.model_path, self.lora_path = model_path, lora_path
        self.threads = threads or default_threads()
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = 0
        model = lc.llama_model_load_from_file(model_path.encode(), mparams)
        if not model:
            raise ValueError(f"llama.cpp could not load {os.path.basename(model_path)!r} as a GGUF model")
        self._model = model
        self._vocab = lc.llama_model_get_vocab(model)
        self._n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        n_train = int(lc.llama_model_n_ctx_train(model)) or DEFAULT_CONTEXT
        self.context_length = min(n_train, context_length or DEFAULT_CONTEXT)
        self.batch_tokens = max(batch_tokens, max_batch_size)
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = self.context_length * max_batch_size  # split into one stream per sequence
        cparams.n_batch = self.batch_tokens
        cparams.n_ubatch = self.batch_tokens
        cparams.n_seq_max = max_batch_size
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.kv_unified = False
        cparams.no_perf = True
        ctx = lc.llama_init_from_model(model, cparams)
        if not ctx:
            raise ValueError("llama.cpp could not create a context (out of memory?)")
        self._ctx = ctx
        self._mem = lc.llama_get_memory(ctx)
        self.lora_scale = lora_scale
        # Adapter name → the GGUF LoRA loaded on the one model ("" = the job's default: `lora_path`, or none).
        self.adapter_paths = {"": lora_path, **(adapters or {})}
        self._loras: dict[str, Any] = {}
        for name, path in self.adapter_paths.items():
            if not path:
                self._loras[name] = None
                continue
            adapter = lc.llama_adapter_lora_init(model, path.encode())
            if not adapter:
                self._free()
                raise ValueError(f"llama.cpp could not load {os.path.basename(path)!r} as a GGUF LoRA adapter of this base model")
            self._loras[name] = adapter
        self._applied: Any = object()  # the adapter set on the context (none set yet)
        try:
            self._apply("")
        except RuntimeError as exc:
            self._free()
            raise ValueError(str(exc)) from exc
        self._batch = lc.llama_batch_init(self.batch_tokens, 0, 1)
        self._eog_cache: dict[int, bool] = {}
        self._template = self._chat_formatter()
        self._slots: list[_Slot | None] = [None] * max_batch_size
        # What each free sequence's KV cache still holds (its last request's tokens): a new request takes the free
        # sequence sharing the longest prefix with its prompt and decodes only the rest (the chat template's system
        # prompt, a conversation's earlier turns), as llama.cpp's server does with its slots; only for a request of the
        # adapter that computed that cache (`_cached_adapter`).
        self._cached: list[list[int]] = [[] for _ in range(max_batch_size)]
        self._cached_adapter: list[str] = [""] * max_batch_size
        self.start_worker()

    def _apply(self, name: str) -> None:
        """Sets the context's adapter to `name`'s (worker thread, between decode calls)."""
        lc = self._lc
        adapter = self._loras[name]
        if self._applied is adapter:
            return
        if adapter is None:
            rc = lc.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            arr = (lc.llama_adapter_lora_p_ctypes * 1)(adapter)
            rc = lc.llama_set_adapters_lora(self._ctx, arr, 1, (ctypes.c_float * 1)(self.lora_scale))
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not apply the LoRA adapter {name or 'of this server'!r} ({rc})")
        self._applied = adapter

    def submit(self, ids: list[int], sampling: Sampling, deadline: float | None, adapter: str = "") -> Job:
        if adapter not in self._loras:
            raise ValueError(f"this llama.cpp engine has no adapter {adapter!r}")
        return super().submit(ids, sampling, deadline, adapter)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "model": os.path.basename(self.model_path),
            "lora": os.path.basename(self.lora_path) if self.lora_path else "",
            "adapters": {k: os.path.basename(v) for k, v in self.adapter_paths.items() if k and v},
            "threads": self.threads,
        }

    # -- tokenizer and chat template (event loop side; llama.cpp's vocab is read-only) -----------

    def _chat_formatter(self):
        raw = self._lc.llama_model_chat_template(self._model, None)
        if not raw:
            return None
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        return Jinja2ChatFormatter(
            raw.decode("utf-8", "replace"),
            eos_token=self._piece(self._lc.llama_vocab_eos(self._vocab), special=True),
            bos_token=self._piece(self._lc.llama_vocab_bos(self._vocab), special=True),
        )

    def _piece(self, token: int, *, special: bool = False) -> str:
        return self._piece_bytes(token, special=special).decode("utf-8", "replace")

    def _piece_bytes(self, token: int, *, special: bool = False) -> bytes:
        if token < 0:
            return b""
        buf = ctypes.create_string_buffer(64)
        n = self._lc.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n > 64:
            buf = ctypes.create_string_buffer(n)
            n = self._lc.llama_token_to_piece(self._vocab, token, buf, n, 0, special)
        return buf.raw[: max(n, 0)]

    def tokenize(self, text: str) -> list[int]:
        """Raw text → ids (special tokens in the text are parsed, no BOS added: as the transformers engine)."""
        lc = self._lc
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self._vocab, data, len(data), buf, cap, False, True)
        if n < 0:
            cap = -n
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self._vocab, data, len(data), buf, cap, False, True)
        if n < 0:
            raise ValueError("the prompt could not be tokenized")
        return list(buf[:n])

    def detokenize(self, ids: list[int]) -> str:
        return b"".join(self._piece_bytes(t) for t in ids).decode("utf-8", "replace")

    def encode(self, prompt: Prompt) -> list[int]:
        if self._stopped:
            raise Unavailable("the model server is shutting down", reason="SHUTTING_DOWN")
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        if self._template is None:
            raise ValueError("this model's GGUF has no chat template; send a plain prompt")
        return self.tokenize(self._template(messages=prompt).prompt)

    def _is_eog(self, token: int) -> bool:
        hit = self._eog_cache.get(token)
        if hit is None:
            hit = self._eog_cache[token] = bool(self._lc.llama_vocab_is_eog(self._vocab, token))
        return hit

    # -- worker thread -----------------------------------------------------------------------

    def _sampler(self, job: Job):
        lc = self._lc
        s = job.sampling
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if s.temperature <= 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            return chain
        # As OpenAI and transformers: temperature first, then the nucleus of the tempered distribution, then a draw.
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(float(s.temperature)))
        if 0 < s.top_p < 1:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(float(s.top_p), 1))
        seed = lc.LLAMA_DEFAULT_SEED if s.seed is None else int(s.seed) & 0xFFFFFFFF
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
        return chain

    def _active(self) -> list[_Slot]:
        return [s for s in self._slots if s is not None]

    def _admit_locked(self, now: float) -> None:
        """Moves queued jobs into free slots, oldest first; cancelled and expired ones leave the queue."""
        for job in list(self._pending):
            if job.cancelled:
                self._pending.remove(job)
            elif job.expired(now):
                self._pending.remove(job)
                self.stats.dropped_expired += 1
                job.expire_in_queue()
        while self._pending and None in self._slots:
            job = self._pending.popleft()
            free = [i for i, slot in enumerate(self._slots) if slot is None]
            seq, common = max(
                ((i, _common_prefix(self._cached[i], job.ids) if self._cached_adapter[i] == job.adapter else 0) for i in free),
                key=lambda x: x[1],
            )
            common = min(common, len(job.ids) - 1)  # the last prompt token is decoded again: its logits sample
            if not self._lc.llama_memory_seq_rm(self._mem, seq, common, -1):
                self._lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
                common = 0
            slot = self._slots[seq] = _Slot(
                seq, job, self._sampler(job), job.adapter, trail=Trail() if job.sampling.logprobs else None
            )
            slot.fed = slot.pos = common
            slot.kv = list(job.ids[:common])
            self._cached[seq] = []
            self.stats.cached_prompt_tokens += common
        metrics.QUEUE_DEPTH.set(len(self._pending))

    def _release(self, slot: _Slot, *, keep: bool = True) -> None:
        """Frees the slot; its KV cache stays for a later prompt with the same prefix (`keep`), or is cleared (after a
        failed decode, whose cache state is unknown)."""
        lc = self._lc
        if keep:
            self._cached[slot.seq] = slot.kv
            self._cached_adapter[slot.seq] = slot.adapter
        else:
            lc.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
            self._cached[slot.seq] = []
        lc.llama_sampler_free(slot.sampler)
        self._slots[slot.seq] = None

    def _work(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stopped and not self._pending and not any(self._slots):
                        self._cv.wait()
                    if self._stopped:
                        return
                    self._admit_locked(time.monotonic())
                active = self._active()
                self._running = [s.job for s in active]
                metrics.INFLIGHT.set(len(active))
                if active:
                    try:
                        self._step(active)
                    except Exception as exc:  # noqa: BLE001 - reported to each caller as INTERNAL by the interceptor
                        log.exception("llama.cpp decoding failed")
                        for slot in self._active():
                            if not slot.job.finished:
                                slot.job.finished = True
                                slot.job.emit(RuntimeError(f"generation failed: {exc}"))
                            self._release(slot, keep=False)
                self._running = [s.job for s in self._active()]
                metrics.INFLIGHT.set(len(self._running))
        finally:
            for slot in self._active():
                if not slot.job.finished:
                    slot.job.finished = True
                    slot.job.emit(Unavailable("the model server is shutting down", reason="SHUTTING_DOWN"))
                self._release(slot, keep=False)
            self._running = []
            metrics.INFLIGHT.set(0)
            self._free()

    def _step(self, active: list[_Slot]) -> None:
        now = time.monotonic()
        live = []
        for slot in active:
            if slot.job.cancelled or slot.job.expired(now):
                self.stats.aborted += 1
                slot.job.expire_in_decoding()
                self._release(slot)
            else:
                live.append(slot)
        if not live:
            return
        groups: dict[str, list[_Slot]] = {}
        for slot in live:  # one llama_decode per adapter: a call holds sequences of one adapter only
            groups.setdefault(slot.adapter, []).append(slot)
        sampled = 0
        for name, slots in groups.items():
            sampled += self._decode(name, slots)
        self.stats.largest_batch = max(self.stats.largest_batch, sampled)
        metrics.BATCH_SIZE.observe(sampled)

    def _decode(self, adapter: str, live: list[_Slot]) -> int:
        """One `llama_decode` of `live` (all of `adapter`): their next tokens, then prompt chunks; samples each
        request whose last position was decoded. Returns how many sampled."""
        lc = self._lc
        b = self._batch
        n = 0
        outputs: list[tuple[_Slot, int]] = []

        def add(token: int, slot: _Slot, logits: bool) -> None:
            nonlocal n
            b.token[n] = token
            b.pos[n] = slot.pos
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = slot.seq
            b.logits[n] = 1 if logits else 0
            if logits:
                outputs.append((slot, n))
            slot.kv.append(token)
            slot.pos += 1
            n += 1

        for slot in live:  # decoding requests first: one token each
            if not slot.prefilling and slot.next_token is not None:
                add(slot.next_token, slot, True)
        for slot in live:  # then prompts, chunked into what is left of the batch
            ids = slot.job.ids
            while slot.prefilling and n < self.batch_tokens:
                add(ids[slot.fed], slot, slot.fed == len(ids) - 1)
                slot.fed += 1
        if n == 0:
            return 0
        b.n_tokens = n
        self._apply(adapter)
        rc = lc.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.stats.batches += 1
        now = time.monotonic()
        for slot, idx in outputs:
            logits = self._logits(idx) if slot.trail is not None else None
            token = int(lc.llama_sampler_sample(slot.sampler, self._ctx, idx))
            self._on_token(slot, token, now, self._score(logits, token, slot.job.sampling.top_logprobs))
        return len(outputs)

    def _logits(self, idx: int):
        """A copy of the logits of batch position `idx` (the row the request's sampler draws from)."""
        import numpy as np

        ptr = self._lc.llama_get_logits_ith(self._ctx, idx)
        if not ptr:
            raise RuntimeError(f"llama.cpp has no logits for batch position {idx}")
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).astype(np.float64)

    def _score(self, logits, token: int, k: int) -> tuple[float, list[tuple[int, float]]] | None:
        """The sampled token's log-probability and the `k` most likely tokens (most likely first, ties by id)."""
        if logits is None:
            return None
        import numpy as np

        m = logits.max()
        lp = logits - (m + np.log(np.exp(logits - m).sum()))
        top: list[tuple[int, float]] = []
        if k:
            part = np.argpartition(-lp, k - 1)[:k]
            top = [(int(t), float(lp[t])) for t in sorted(part.tolist(), key=lambda t: (-lp[t], t))]
        return float(lp[token]), top

    def _on_token(self, slot: _Slot, token: int, now: float, score: tuple[float, list[tuple[int, float]]] | None = None) -> None:
        job = slot.job
        if job.first_token is None:
            job.first_token = now
        finish = None
        cut = -1
        stops = job.sampling.stop
        if self._is_eog(token):
            finish = "stop"
        else:
            slot.out.append(token)
            before = len(slot.text)
            slot.text += slot.decoder.decode(self._piece_bytes(token))
            if slot.trail is not None and score is not None:
                top = top_entries([(self._piece_bytes(t, special=True), v) for t, v in score[1]])
                slot.trail.add(self._piece_bytes(token, special=True), score[0], top, before, len(slot.text))
            if stops:
                cut = _find_stop(slot.text, stops, max(0, before - max(len(s) for s in stops) + 1))
                if cut != -1:
                    slot.text = slot.text[:cut]
                    finish = "stop"
            if finish is None and len(slot.out) >= job.sampling.max_tokens:
                finish = "length"
        if finish is None:
            slot.next_token = token
            safe = len(slot.text) - stop_holdback(slot.text, stops)
            if safe > slot.sent:
                job.emit(Delta(text=slot.text[slot.sent : safe], logprobs=slot.trail.take(safe) if slot.trail else []))
                slot.sent = safe
            return
        if finish == "length":
            slot.text += slot.decoder.decode(b"", final=True)
        job.finished = True
        self.stats.completed += 1
        job.emit(
            Delta(
                text=slot.text[slot.sent :],
                finish_reason=finish,  # type: ignore[arg-type]
                prompt_tokens=len(job.ids),
                completion_tokens=len(slot.out),
                latency_s=now - job.admitted,
                ttft_s=job.first_token - job.admitted,
                logprobs=slot.trail.final(len(slot.text), cut=cut != -1) if slot.trail else [],
            )
        )
        self._release(slot)

    def _free(self) -> None:
        """Frees the batch and the context; the model (its vocab tokenizes on the event loop) lives as long as the
        process."""
        lc = self._lc
        if getattr(self, "_batch", None) is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            lc.llama_free(self._ctx)
            self._ctx = None
