"""Test helpers shipped with the model server (as `neuroweaver_ml.testing` is): reference greedy answers of the
llama.cpp engine with the part of each answer that numerical noise cannot flip.

With a LoRA applied, llama.cpp's logits are not bit-identical across batch shapes (the adapter's float32 matmuls
take other kernels for other token counts; a reused prompt prefix changes the shape too), so a greedy answer may flip
where its two best tokens are nearly tied. A reference records, token by token, the gap between the two largest
logits; an answer from another server (or beside other requests) must equal the reference as far as every token
was decided by more than `NEAR_TIE`. Tests also check that the decided parts tell the versions apart, so a swapped
adapter still fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .domain import Sampling

# Logit gap under which a greedy choice counts as undecided: far above kernel-to-kernel drift (on one development CPU
# the logits were bit-identical across batch shapes; a CI machine's kernels flipped a near-tie), far below the gaps of
# the tokens the test adapters change (typically 1-7).
NEAR_TIE = 0.5


@dataclass(frozen=True)
class Greedy:
    """A reference greedy answer: its text, and its longest prefix decided by more than NEAR_TIE at every token."""

    text: str
    decided: str

    def admits(self, answer: str) -> bool:
        return answer == self.text if self.decided == self.text else answer.startswith(self.decided)


class _SampledGaps:
    """Stands in for the engine's `llama_cpp` module: passes every call through and records, at each sampled
    position, the token and the gap between its two largest logits."""

    def __init__(self, lc: Any, n_vocab: int) -> None:
        self._lc, self._n_vocab = lc, n_vocab
        self.sampled: list[tuple[int, float]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lc, name)

    def llama_sampler_sample(self, sampler: Any, ctx: Any, idx: int) -> int:
        import numpy as np

        token = self._lc.llama_sampler_sample(sampler, ctx, idx)
        logits = np.ctypeslib.as_array(self._lc.llama_get_logits_ith(ctx, idx), shape=(self._n_vocab,))
        second, first = np.partition(logits, -2)[-2:]
        self.sampled.append((int(token), float(first - second)))
        return int(token)


async def llamacpp_references(
    model_path: str, lora_path: str | None, prompts: Iterable[str], max_tokens: int, *, context_length: int = 256
) -> dict[str, Greedy]:
    """Each prompt's greedy chat answer (`max_tokens` at most) from a llama.cpp engine of its own holding one adapter
    (or none), one request at a time, with its decided part."""
    from .engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(model_path, lora_path=lora_path, max_queue=4, max_batch_size=1, context_length=context_length)
    try:
        lc = engine._lc
        gaps = _SampledGaps(lc, int(lc.llama_vocab_n_tokens(engine._vocab)))
        engine._lc = gaps  # type: ignore[assignment]  # a stand-in passing every call through; read at every step
        out = {}
        for prompt in prompts:
            gaps.sampled.clear()
            ids = engine.encode([{"role": "user", "content": prompt}])
            text = "".join([d.text async for d in engine.run(ids, Sampling(max_tokens=max_tokens), None)])
            tokens = [t for t, _ in gaps.sampled]
            near = [i for i, (_, gap) in enumerate(gaps.sampled) if gap < NEAR_TIE]
            decided = engine.detokenize(tokens[: near[0]]) if near else text
            # what was sent of it (the end-of-sequence token is never text; a multi-byte character may be cut)
            out[prompt] = Greedy(text, os.path.commonprefix([text, decided]))
        return out
    finally:
        engine.stop()
