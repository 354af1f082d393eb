"""Checks of a job's inputs before it is queued: base model resolution and dataset validation; dataset previews.

Blocking (tokenizer loading, file reads): call through `asyncio.to_thread`. Everything ML-specific is
`neuroweaver_ml`; this module only maps its findings onto the service's errors.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroweaver_ml import (
    BUILTIN_MODELS,
    ModelNotFound,
    PathNotAllowed,
    PathRoots,
    PathUnusable,
    resolve_base_model,
    validate_dataset,
)
from neuroweaver_ml.datasets import first_rows
from neuroweaver_runtime.errors import FieldViolation, InvalidArgument

from ..domain.job import dataset_problem_violations
from ..service.ports import DatasetPreview

log = logging.getLogger(__name__)

SFT_FORMATS = ("chat", "prompt_completion")
PREFERENCE_FORMATS = ("preference",)
PROMPT_FORMATS = ("prompt",)
BASE_MODEL = "training_job.base_model"


@dataclass
class CheckedInputs:
    base_model_dir: str
    dataset_path: str
    dataset_digest: str
    dataset_rows: int
    eval_dataset_path: str
    eval_dataset_digest: str
    prompts_digest: str = ""
    prompts_rows: int = 0
    eval_prompts_digest: str = ""


def default_dataset_roots(data_dir: str) -> list[str]:
    """Data dir's `datasets/` and the repository's `data/` (when run from a checkout). Never the working directory:
    a service started in `/` would otherwise read any file on the host."""
    roots = [str(Path(data_dir) / "datasets")]
    repo_data = Path(__file__).resolve().parents[5] / "data"
    if repo_data.is_dir():
        roots.append(str(repo_data))
    return roots


def default_model_roots(model_cache_dir: str, artifacts_dir: str) -> list[str]:
    """The converted-model cache (builtin models live there) and the artifact store (merged checkpoints)."""
    return [model_cache_dir, artifacts_dir]


def parse_roots(setting: str, default: list[str]) -> PathRoots:
    """Comma-separated directories from a setting, or `default` when it is empty."""
    return PathRoots.parse(setting, default)


@functools.lru_cache(maxsize=8)
def _tokenizer(base_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def path_refused(field: str, exc: PathNotAllowed, reason: str) -> InvalidArgument:
    """The error of a refused path: the field and a fixed sentence, never the path, a root or a symlink target
    (a refusal is the same whether the path exists or not)."""
    return InvalidArgument(f"{field} {exc.detail}", field=field, reason=reason)


def resolve_model(reference: str, cache_dir: str | None, roots: PathRoots, field: str = BASE_MODEL) -> str:
    """A base model: `builtin:<name>`, a hub id in the local HF cache, or a directory under `roots`."""
    try:
        return str(resolve_base_model(reference, cache_dir, roots))
    except PathNotAllowed as exc:
        raise path_refused(field, exc, "BASE_MODEL_PATH_NOT_ALLOWED") from None
    except ModelNotFound as exc:
        if exc.exists:
            raise InvalidArgument(
                f"{field} is not a usable model: {'; '.join(exc.tried)}",
                field=field,
                reason="BASE_MODEL_INVALID",
            ) from None
        raise InvalidArgument(
            f"{field} cannot be found: {'; '.join(exc.tried)}. Use a checkpoint directory under the trainer's "
            f"model roots (a path or a file:// URI) or one of {', '.join('builtin:' + n for n in sorted(BUILTIN_MODELS))}",
            field=field,
            reason="BASE_MODEL_NOT_FOUND",
        ) from None


def load_tokenizer(base_model: str, cache_dir: str | None, roots: PathRoots, chat_template: str, field: str = BASE_MODEL):
    """The base model's tokenizer (resolved under `roots`), with the job's chat template override when given."""
    base_dir = resolve_model(base_model, cache_dir, roots, field)
    try:
        tokenizer = _tokenizer(base_dir)
    except Exception as exc:  # noqa: BLE001 - any load failure means the checkpoint is unusable
        # the exception names files of the checkpoint (server paths): logged, not returned
        log.warning("tokenizer of base model %r failed to load: %s", base_model, exc)
        raise InvalidArgument(
            f"{field} has no loadable tokenizer ({type(exc).__name__})", field=field, reason="BASE_MODEL_INVALID"
        ) from None
    if chat_template:  # the job's override renders its conversations (a copy: the cached tokenizer stays as loaded)
        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = chat_template
    return base_dir, tokenizer


def confine_dataset(uri: str, roots: PathRoots, field: str) -> Path:
    """A dataset path inside the dataset roots, existing or not (a missing one is reported by validation)."""
    try:
        return roots.resolve(uri, kind="file", must_exist=False)
    except PathNotAllowed as exc:
        raise path_refused(field, exc, "DATASET_PATH_NOT_ALLOWED") from None
    except PathUnusable as exc:  # inside the roots: a directory, FIFO, device, symlink loop or unreadable
        raise InvalidArgument(f"{field} {exc.detail}", field=field, reason="DATASET_INVALID") from None


def check_dataset(
    uri: str, roots: PathRoots, field: str, tokenizer, max_seq_length: int, formats: tuple[str, ...] = SFT_FORMATS
) -> tuple[Path, str, int]:
    path = confine_dataset(uri, roots, field)
    report = validate_dataset(path, "auto", tokenizer=tokenizer, max_tokens=max_seq_length, allowed_formats=formats)
    if not report.ok:
        lines = [p.line for p in report.problems if p.line is not None]
        shown = "; ".join(str(p) for p in report.problems[:3])
        more = len(report.problems) - 3
        violations = dataset_problem_violations(field, report.problems).items
        raise InvalidArgument(
            f"{field} is invalid: {shown}" + (f" (and {more} more)" if more > 0 else ""),
            reason="DATASET_INVALID",
            violations=[FieldViolation(v.field, v.description) for v in violations],
            metadata={"first_line": str(lines[0]) if lines else "", "problems": str(len(report.problems))},
        )
    return path, report.sha256 or "", report.num_rows


def dataset_formats(method: str) -> tuple[str, ...]:
    return PREFERENCE_FORMATS if method in ("DPO", "REWARD_MODEL") else SFT_FORMATS


def check_inputs(
    base_model: str,
    dataset_uri: str,
    eval_dataset_uri: str,
    roots: PathRoots,
    max_seq_length: int,
    cache_dir: str | None,
    *,
    model_roots: PathRoots,
    method: str = "SFT_LORA",
    prompts_uri: str = "",
    eval_prompts_uri: str = "",
    chat_template: str = "",
) -> CheckedInputs:
    """SFT (and RLAIF's SFT stage): chat / prompt_completion; DPO / REWARD_MODEL: preference rows; RLAIF prompt
    files: `{prompt, reference?}` rows. Every problem is line-numbered (`DATASET_INVALID`)."""
    formats = dataset_formats(method)
    # Paths first: a refused path must not reveal whether the file exists.
    for uri, field in (
        (dataset_uri, "training_job.dataset_uri"),
        (eval_dataset_uri, "training_job.eval_dataset_uri"),
        (prompts_uri, "training_job.rlaif.prompts_uri"),
        (eval_prompts_uri, "training_job.rlaif.eval_prompts_uri"),
    ):
        if uri:
            confine_dataset(uri, roots, field)
    base_dir, tokenizer = load_tokenizer(base_model, cache_dir, model_roots, chat_template)
    path, digest, rows = "", "", 0
    if dataset_uri:
        p, digest, rows = check_dataset(dataset_uri, roots, "training_job.dataset_uri", tokenizer, max_seq_length, formats)
        path = str(p)
    eval_path, eval_digest = "", ""
    if eval_dataset_uri:
        ep, eval_digest, _ = check_dataset(
            eval_dataset_uri, roots, "training_job.eval_dataset_uri", tokenizer, max_seq_length, formats
        )
        eval_path = str(ep)
    checked = CheckedInputs(base_dir, path, digest, rows, eval_path, eval_digest)
    if prompts_uri:
        _, checked.prompts_digest, checked.prompts_rows = check_dataset(
            prompts_uri, roots, "training_job.rlaif.prompts_uri", tokenizer, max_seq_length, PROMPT_FORMATS
        )
    if eval_prompts_uri:
        _, checked.eval_prompts_digest, _ = check_dataset(
            eval_prompts_uri, roots, "training_job.rlaif.eval_prompts_uri", tokenizer, max_seq_length, PROMPT_FORMATS
        )
    return checked


PREVIEW_STRING_CHARS = 2000
PREVIEW_LIST_ITEMS = 50


def _shorten(value: Any) -> tuple[Any, bool]:
    """`value` with long strings and lists cut (a preview is for reading, not for copying the data out)."""
    if isinstance(value, str):
        return (value[:PREVIEW_STRING_CHARS] + "…", True) if len(value) > PREVIEW_STRING_CHARS else (value, False)
    if isinstance(value, list):
        items = [_shorten(v) for v in value[:PREVIEW_LIST_ITEMS]]
        return [v for v, _ in items], len(value) > PREVIEW_LIST_ITEMS or any(cut for _, cut in items)
    if isinstance(value, dict):
        pairs = {k: _shorten(v) for k, v in value.items()}
        return {k: v for k, (v, _) in pairs.items()}, any(cut for _, cut in pairs.values())
    return value, False


def preview_dataset(
    dataset_uri: str,
    roots: PathRoots,
    *,
    method: str,
    base_model: str,
    max_seq_length: int,
    chat_template: str,
    model_cache_dir: str | None,
    model_roots: PathRoots,
    max_rows: int,
) -> DatasetPreview:
    """The first rows of a dataset and the findings of `check_inputs`' validation (same roots, same path rules:
    a refused path says nothing about the file). Problems are returned, not raised: a preview shows them."""
    path = confine_dataset(dataset_uri, roots, "dataset_uri")
    tokenizer = load_tokenizer(base_model, model_cache_dir, model_roots, chat_template, "base_model")[1] if base_model else None
    formats = dataset_formats(method) if method else None
    report = validate_dataset(path, "auto", tokenizer=tokenizer, max_tokens=max_seq_length, allowed_formats=formats)
    rows = []
    if path.is_file():  # a missing file is the report's problem
        for line, row in first_rows(path, max_rows):
            content, cut = _shorten(row)
            rows.append((line, content, cut))
    return DatasetPreview(
        rows=rows,
        row_count=report.num_rows,
        format=report.format or "",
        sha256=report.sha256 or "",
        size_bytes=report.size_bytes,
        problems=[(p.line, p.message) for p in report.problems],
        problems_truncated=report.truncated,
    )
