"""JSONL datasets: format detection, validation with 1-based line numbers, digest, split and
tokenization with completion-only labels.

Formats (one JSON object per line; blank lines are ignored but still counted):

* ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` —
  system only first, at least one user turn, last turn assistant.
* ``prompt_completion``: ``{"prompt": "...", "completion": "..."}`` — trained as raw text
  ``prompt + completion + eos`` (no chat template), loss on the completion only.
* ``preference``: ``{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}``
  (for DPO / reward models; not accepted by SFT).
* ``prompt``: ``{"prompt": str | messages, "reference": str (optional)}`` — prompt sets for RLAIF
  (GRPO/RLOO) and evaluation; not accepted by SFT.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .artifacts import digest_path
from .errors import DatasetInvalid

log = logging.getLogger(__name__)

DatasetFormat = Literal["chat", "prompt_completion", "preference", "prompt"]
FORMATS: tuple[str, ...] = ("chat", "prompt_completion", "preference", "prompt")
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class DatasetProblem:
    """One validation finding. ``line`` is 1-based, or ``None`` for file-level problems."""

    line: int | None
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line is not None else self.message


@dataclass
class ValidationReport:
    """Result of :func:`validate_dataset`. ``ok`` is true when there are no problems."""

    path: str
    format: str | None
    num_rows: int
    sha256: str | None
    size_bytes: int
    problems: list[DatasetProblem] = field(default_factory=list)
    truncated: bool = False  # more problems existed than were collected

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_invalid(self) -> None:
        if self.problems:
            raise DatasetInvalid(self.path, self.problems)


def detect_row_format(row: Any) -> str | None:
    """Format of one parsed row, or None if it matches none."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "chat"
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "completion" in row:
        return "prompt_completion"
    if "prompt" in row:
        return "prompt"
    return None


def _check_messages(
    msgs: Any, *, where: str = "messages", need_final_assistant: bool = True, need_user: bool = True
) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return f"'{where}' must be a non-empty list of {{role, content}} objects"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"{where}[{i}] must be an object with 'role' and 'content'"
        role = m.get("role")
        if role not in ROLES:
            return f"{where}[{i}].role is {role!r}; expected one of {', '.join(ROLES)}"
        content = m.get("content")
        if not isinstance(content, str):
            return f"{where}[{i}].content must be a string"
        if not content.strip():
            return f"{where}[{i}].content is empty"
        if role == "system" and i != 0:
            return f"{where}[{i}]: a system message is only allowed as the first message"
    roles = [m["role"] for m in msgs]
    if need_user and "user" not in roles:
        return f"'{where}' has no user message"
    if need_final_assistant and roles[-1] != "assistant":
        return f"'{where}' must end with an assistant message (last role is {roles[-1]!r})"
    return None


def _check_text_or_messages(row: dict, key: str, *, final_assistant: bool, need_user: bool) -> str | None:
    if key not in row:
        return f"missing field '{key}'"
    v = row[key]
    if isinstance(v, str):
        return f"'{key}' is empty" if not v.strip() else None
    if isinstance(v, list):
        return _check_messages(v, where=key, need_final_assistant=final_assistant, need_user=need_user)
    return f"'{key}' must be a string or a list of messages"


def check_row(row: Any, fmt: str) -> str | None:
    """Validate one parsed row against ``fmt``; returns a message or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if fmt == "chat":
        if "messages" not in row:
            return "missing field 'messages'"
        return _check_messages(row["messages"])
    if fmt == "prompt_completion":
        for k in ("prompt", "completion"):
            if k not in row:
                return f"missing field '{k}'"
            if not isinstance(row[k], str):
                return f"'{k}' must be a string"
            if not row[k].strip():
                return f"'{k}' is empty"
        return None
    if fmt == "preference":
        err = _check_text_or_messages(row, "prompt", final_assistant=False, need_user=True)
        if err:
            return err
        for k in ("chosen", "rejected"):
            err = _check_text_or_messages(row, k, final_assistant=True, need_user=False)
            if err:
                return err
        if row["chosen"] == row["rejected"]:
            return "'chosen' and 'rejected' are identical"
        return None
    if fmt == "prompt":
        err = _check_text_or_messages(row, "prompt", final_assistant=False, need_user=True)
        if err:
            return err
        if isinstance(row["prompt"], list) and row["prompt"][-1]["role"] != "user":
            return "'prompt' messages must end with a user message"
        if "reference" in row and (not isinstance(row["reference"], str) or not row["reference"].strip()):
            return "'reference' must be a non-empty string when present"
        return None
    raise ValueError(f"unknown dataset format {fmt!r}; expected one of {FORMATS}")


def row_text(row: dict, fmt: str, tokenizer=None) -> str:
    """The text a row trains on (chat rendered with the tokenizer's template when given)."""
    if fmt == "chat":
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(row["messages"], tokenize=False)
        return "\n".join(m["content"] for m in row["messages"])
    if fmt == "prompt_completion":
        return row["prompt"] + row["completion"]
    parts = []
    for k in ("prompt", "chosen", "rejected", "reference"):
        if k not in row:
            continue
        v = row[k]
        parts.append(v if isinstance(v, str) else "\n".join(m["content"] for m in v))
    return "\n".join(parts)


MAX_LINE_BYTES = 1 << 20  # 1 MiB: far above any row a max_seq_length allows, small enough to hold in memory


@dataclass(frozen=True)
class _LineTooLong:
    limit: int


def _iter_lines(path: Path, max_line_bytes: int = MAX_LINE_BYTES):
    """Yield (1-based line number, decoded text | UnicodeDecodeError | _LineTooLong). A line longer than
    ``max_line_bytes`` is skipped in 1 MiB chunks, never held whole in memory."""
    with open(path, "rb") as f:
        n = 0
        while raw := f.readline(max_line_bytes + 1):
            n += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                yield n, _LineTooLong(max_line_bytes)
                continue
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, e


def validate_dataset(
    path: str | os.PathLike,
    fmt: str = "auto",
    *,
    tokenizer=None,
    max_tokens: int | None = None,
    max_chars: int | None = None,
    max_problems: int = 10,
    allowed_formats: tuple[str, ...] | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> ValidationReport:
    """Validate a JSONL dataset without raising; returns a report with up to ``max_problems``
    line-numbered problems (the rest are counted in ``truncated``).

    ``fmt="auto"`` takes the format of the first parseable row; rows of another format are
    problems. Length limits are checked in tokens (needs ``tokenizer``; chat rows rendered with its
    chat template) and/or characters. A line longer than ``max_line_bytes`` (newline excluded; default
    1 MiB) is a problem and is never read whole. Problems never name the file's path.
    """
    p = Path(path)
    report = ValidationReport(path=str(p), format=None if fmt == "auto" else fmt, num_rows=0, sha256=None, size_bytes=0)

    def add(line: int | None, msg: str) -> bool:
        if len(report.problems) >= max_problems:
            report.truncated = True
            return False
        report.problems.append(DatasetProblem(line, msg))
        return True

    if fmt != "auto" and fmt not in FORMATS:
        add(None, f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)} or auto")
        return report
    if not p.exists():
        add(None, "file not found")
        return report
    if not p.is_file():  # a directory, FIFO or device: never opened (a FIFO would block the reader)
        add(None, "not a regular file")
        return report
    try:
        report.sha256, report.size_bytes = digest_path(p)
        lines = _iter_lines(p, max_line_bytes)
        dataset_fmt = report.format  # None until the first parseable row when auto-detecting
        for n, text in lines:
            if isinstance(text, _LineTooLong):
                add(n, f"line is longer than {text.limit} bytes (the maximum)")
                continue
            if isinstance(text, UnicodeDecodeError):
                add(n, f"not valid UTF-8 ({text.reason} at byte {text.start})")
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                add(n, f"invalid JSON: {e.msg} (column {e.colno})")
                continue
            except RecursionError:
                add(n, "invalid JSON: nested too deeply")
                continue
            row_fmt = detect_row_format(row)
            if dataset_fmt is None:
                if row_fmt is None:
                    add(
                        n,
                        "cannot tell the format: expected 'messages', 'prompt'/'completion' or "
                        "'prompt'/'chosen'/'rejected' fields"
                        if isinstance(row, dict)
                        else f"expected a JSON object, got {type(row).__name__}",
                    )
                    continue
                dataset_fmt = row_fmt
                report.format = dataset_fmt
                if allowed_formats is not None and dataset_fmt not in allowed_formats:
                    add(None, f"dataset format {dataset_fmt!r} is not accepted here; expected {', '.join(allowed_formats)}")
                    return report
            report.num_rows += 1
            # a prompt-only row in a prompt/completion file is a missing completion, said so by check_row
            if (
                row_fmt is not None
                and row_fmt != dataset_fmt
                and not (row_fmt == "prompt" and dataset_fmt == "prompt_completion")
            ):
                err: str | None = f"row looks like {row_fmt!r} but the dataset format is {dataset_fmt!r}"
            else:
                err = check_row(row, dataset_fmt)
            if err:
                add(n, err)
                continue
            if max_chars is not None or (max_tokens is not None and tokenizer is not None):
                try:
                    txt = row_text(row, dataset_fmt, tokenizer)
                except Exception as e:  # noqa: BLE001 - a chat template is code: it raises what it likes on a row
                    add(n, f"the chat template cannot render this row: {type(e).__name__}: {str(e)[:200]}")
                    continue
                if max_chars is not None and len(txt) > max_chars:
                    add(n, f"row is {len(txt)} characters, over the maximum of {max_chars}")
                    continue
                if max_tokens is not None and tokenizer is not None:
                    ntok = len(tokenizer(txt, add_special_tokens=False)["input_ids"])
                    if ntok > max_tokens:
                        add(n, f"row is {ntok} tokens, over the maximum of {max_tokens}")
    except OSError as e:
        add(None, f"cannot be read ({e.strerror or type(e).__name__})")
        return report
    if report.num_rows == 0 and not report.problems:
        add(None, "dataset has no rows")
    return report


def first_rows(path: str | os.PathLike, limit: int, max_line_bytes: int = MAX_LINE_BYTES) -> list[tuple[int, dict]]:
    """(1-based line number, row) of the first ``limit`` lines that are JSON objects, read as ``validate_dataset``
    reads them (bounded lines; lines that are not objects are skipped: they are its problems)."""
    rows: list[tuple[int, dict]] = []
    if limit <= 0:
        return rows
    for n, text in _iter_lines(Path(path), max_line_bytes):
        if not isinstance(text, str) or not text.strip():
            continue
        try:
            row = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append((n, row))
            if len(rows) >= limit:
                break
    return rows


def load_rows(path: str | os.PathLike, fmt: str = "auto", **validate_kwargs) -> tuple[str, list[dict]]:
    """Validate then load a dataset; returns ``(format, rows)`` or raises ``DatasetInvalid``."""
    report = validate_dataset(path, fmt, **validate_kwargs)
    report.raise_if_invalid()
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return report.format or fmt, rows


def split_train_eval(rows: list, eval_fraction: float, seed: int = 0, min_eval: int = 1) -> tuple[list, list]:
    """Deterministic seeded split. ``eval_fraction`` 0 → no eval rows. Keeps at least one train row."""
    if eval_fraction <= 0 or len(rows) < 2:
        return list(rows), []
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_eval = min(len(rows) - 1, max(min_eval, round(len(rows) * eval_fraction)))
    eval_idx = set(idx[:n_eval])
    return [r for i, r in enumerate(rows) if i not in eval_idx], [r for i, r in enumerate(rows) if i in eval_idx]


def _assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]] | None:
    """Render ``messages`` and return the character spans of each assistant turn (content + end
    tokens the template appends). None if the template is not prefix-stable."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            return None
        spans.append((len(prefix), len(upto)))
    return full, spans


def tokenize_row(
    tokenizer, row: dict, fmt: str, max_seq_length: int, completion_only: bool = True
) -> dict[str, list[int]] | None:
    """Tokenize one SFT row into ``input_ids`` / ``labels`` (``-100`` where no loss is taken).

    chat: rendered with the tokenizer's chat template, loss only on assistant turns (falls back to
    loss on all tokens if the template is not prefix-stable). prompt_completion: raw text, loss on
    the completion plus eos. Truncated to ``max_seq_length``; returns None when nothing trainable
    is left.
    """
    if fmt == "chat":
        res = _assistant_spans(tokenizer, row["messages"]) if completion_only else None
        if res is None:
            text, spans = tokenizer.apply_chat_template(row["messages"], tokenize=False), None
        else:
            text, spans = res
    elif fmt == "prompt_completion":
        eos = tokenizer.eos_token or ""
        text = row["prompt"] + row["completion"]
        if eos and not text.endswith(eos):
            text += eos
        spans = [(len(row["prompt"]), len(text))] if completion_only else None
    else:
        raise ValueError(f"format {fmt!r} cannot be used for SFT")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=spans is not None)
    ids = list(enc["input_ids"])
    if spans is None:
        labels = list(ids)
    else:
        labels = []
        for tid, (s, _e) in zip(ids, enc["offset_mapping"], strict=True):
            inside = any(a <= s < b for a, b in spans)
            labels.append(tid if inside else IGNORE_INDEX)
    ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    if all(lab == IGNORE_INDEX for lab in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}


@dataclass
class TokenizedDataset:
    """Tokenized rows plus what happened to them."""

    examples: list[dict[str, list[int]]]
    dropped: int = 0  # rows with no trainable tokens left after truncation
    truncated: int = 0
    num_tokens: int = 0
    num_label_tokens: int = 0


def tokenize_rows(tokenizer, rows: list[dict], fmt: str, max_seq_length: int, completion_only: bool = True) -> TokenizedDataset:
    out = TokenizedDataset(examples=[])
    for row in rows:
        ex = tokenize_row(tokenizer, row, fmt, max_seq_length + 1, completion_only)
        if ex is not None and len(ex["input_ids"]) > max_seq_length:
            out.truncated += 1
            ex = {k: v[:max_seq_length] for k, v in ex.items()}
            if all(lab == IGNORE_INDEX for lab in ex["labels"][1:]):
                ex = None
        if ex is None:
            out.dropped += 1
            continue
        out.examples.append(ex)
        out.num_tokens += len(ex["input_ids"])
        out.num_label_tokens += sum(1 for lab in ex["labels"][1:] if lab != IGNORE_INDEX)
    return out
