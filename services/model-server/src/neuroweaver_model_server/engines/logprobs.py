"""Log-probabilities of generated tokens, shared by the engines (no torch, no numpy here).

- `token_text`: a token's raw bytes as text; bytes that are not UTF-8 on their own (a character split over several
  tokens) as `\\xNN` escapes, as OpenAI shows them; the raw bytes travel beside it.
- `HFTokenBytes`: the raw bytes of a Hugging Face tokenizer's token (byte-level BPE pieces mapped back to their
  bytes, SentencePiece `▁` as a space and `<0xNN>` byte fallback), for the transformers and vLLM engines; the
  llama.cpp engine has them from `llama_token_to_piece`.
- `Trail`: a request's scored tokens waiting for their text to be sent, so that each delta carries the entries of
  the tokens whose text it completes (stop strings hold text back; a stop string's own tokens are never reported).
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..domain import TokenLogprob, TopLogprob

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def top_entries(top: list[tuple[bytes, float]]) -> tuple[TopLogprob, ...]:
    return tuple(TopLogprob(token_text(b), lp, b) for b, lp in top)


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the printable character standing for each byte → the byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class HFTokenBytes:
    """token id → raw bytes for a transformers tokenizer (cached)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = ""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            try:
                decoder = json.dumps(json.loads(backend.to_str()).get("decoder"), ensure_ascii=False)
            except (ValueError, TypeError, AttributeError):  # a backend without a JSON form: the fallbacks below
                decoder = ""
        self.byte_level = "ByteLevel" in decoder
        self.metaspace = "\u2581" in decoder or "Metaspace" in decoder
        self._table = _byte_level_decoder() if self.byte_level else {}
        # special and added tokens are stored as their text, not in the byte-level alphabet
        self._literal = set(getattr(tokenizer, "all_special_ids", ())) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._bytes(token_id)
        return hit

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return b""
        if token_id in self._literal:
            return piece.encode()
        if self.byte_level:
            try:
                return bytes(self._table[c] for c in piece)
            except KeyError:
                pass
        m = _BYTE_FALLBACK.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if self.metaspace:
            return piece.replace("\u2581", " ").encode()
        return str(self.tokenizer.decode([token_id])).encode()


class Trail:
    """A request's scored tokens whose text has not been sent yet (offsets in characters of the completion)."""

    def __init__(self) -> None:
        self._pending: list[tuple[TokenLogprob, int]] = []  # (entry, where its text ends)

    def add(self, raw: bytes, logprob: float, top: tuple[TopLogprob, ...], start: int, end: int) -> None:
        self._pending.append((TokenLogprob(token_text(raw), logprob, raw, start, top), max(start, end)))

    def take(self, sent: int) -> list[TokenLogprob]:
        """The entries of tokens whose text lies within the first `sent` characters (sent so far)."""
        n = 0
        while n < len(self._pending) and self._pending[n][1] <= sent:
            n += 1
        out = [e for e, _ in self._pending[:n]]
        del self._pending[:n]
        return out

    def final(self, text_length: int, *, cut: bool) -> list[TokenLogprob]:
        """Every entry left at the end; after a stop string (`cut`), only tokens starting before it (the text kept
        is `text_length` characters): a token holding the stop string's start and text before it stays."""
        out = [e for e, _ in self._pending if not cut or e.offset < text_length]
        self._pending.clear()
        return out
