"""Checks of a job's inputs before it is queued: base model resolution and dataset validation.

Blocking (tokenizer loading, file reads): call through `asyncio.to_thread`. Everything ML-specific is
`neuroweaver_ml`; this module only maps its findings onto the service's errors.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from neuroweaver_ml import ModelNotFound, PathNotAllowed, confine_path, resolve_base_model, validate_dataset
from neuroweaver_runtime.errors import FieldViolation, InvalidArgument

from ..domain.job import dataset_problem_violations

SFT_FORMATS = ("chat", "prompt_completion")
PREFERENCE_FORMATS = ("preference",)
PROMPT_FORMATS = ("prompt",)


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
    """Data dir's `datasets/`, the repository's `data/` (when run from a checkout) and the working directory."""
    roots = [str(Path(data_dir) / "datasets")]
    repo_data = Path(__file__).resolve().parents[5] / "data"
    if repo_data.is_dir():
        roots.append(str(repo_data))
    roots.append(os.getcwd())
    return roots


def parse_roots(setting: str, data_dir: str) -> list[str]:
    roots = [r.strip() for r in setting.split(",") if r.strip()] if setting else default_dataset_roots(data_dir)
    return [str(Path(r).expanduser().resolve()) for r in roots]


@functools.lru_cache(maxsize=8)
def _tokenizer(base_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def resolve_model(reference: str, cache_dir: str | None) -> str:
    try:
        return str(resolve_base_model(reference, cache_dir))
    except ModelNotFound as exc:
        raise InvalidArgument(
            f"base model {reference!r} cannot be found: {'; '.join(exc.tried)}. Use a local checkpoint directory, "
            "a file:// URI or builtin:smollm2-135m-instruct",
            field="training_job.base_model",
            reason="BASE_MODEL_NOT_FOUND",
            metadata={"base_model": reference},
        ) from None


def confine_dataset(uri: str, roots: list[str], field: str) -> Path:
    try:
        path = confine_path(uri, roots)
    except PathNotAllowed as exc:
        raise InvalidArgument(
            f"{field}: {exc}", field=field, reason="DATASET_PATH_NOT_ALLOWED", metadata={"dataset_uri": uri}
        ) from None
    return path


def check_dataset(
    uri: str, roots: list[str], field: str, tokenizer, max_seq_length: int, formats: tuple[str, ...] = SFT_FORMATS
) -> tuple[Path, str, int]:
    path = confine_dataset(uri, roots, field)
    report = validate_dataset(path, "auto", tokenizer=tokenizer, max_tokens=max_seq_length, allowed_formats=formats)
    if not report.ok:
        lines = [p.line for p in report.problems if p.line is not None]
        shown = "; ".join(str(p) for p in report.problems[:3])
        more = len(report.problems) - 3
        violations = dataset_problem_violations(field, report.problems).items
        raise InvalidArgument(
            f"dataset {uri} is invalid: {shown}" + (f" (and {more} more)" if more > 0 else ""),
            reason="DATASET_INVALID",
            violations=[FieldViolation(v.field, v.description) for v in violations],
            metadata={"dataset_uri": uri, "first_line": str(lines[0]) if lines else "", "problems": str(len(report.problems))},
        )
    return path, report.sha256 or "", report.num_rows


def check_inputs(
    base_model: str,
    dataset_uri: str,
    eval_dataset_uri: str,
    roots: list[str],
    max_seq_length: int,
    cache_dir: str | None,
    *,
    method: str = "SFT_LORA",
    prompts_uri: str = "",
    eval_prompts_uri: str = "",
) -> CheckedInputs:
    """SFT (and RLAIF's SFT stage): chat / prompt_completion; DPO / REWARD_MODEL: preference rows; RLAIF prompt
    files: `{prompt, reference?}` rows. Every problem is line-numbered (`DATASET_INVALID`)."""
    formats = PREFERENCE_FORMATS if method in ("DPO", "REWARD_MODEL") else SFT_FORMATS
    # Paths first: a refused path must not reveal whether the file exists.
    for uri, field in (
        (dataset_uri, "training_job.dataset_uri"),
        (eval_dataset_uri, "training_job.eval_dataset_uri"),
        (prompts_uri, "training_job.rlaif.prompts_uri"),
        (eval_prompts_uri, "training_job.rlaif.eval_prompts_uri"),
    ):
        if uri:
            confine_dataset(uri, roots, field)
    base_dir = resolve_model(base_model, cache_dir)
    try:
        tokenizer = _tokenizer(base_dir)
    except Exception as exc:  # noqa: BLE001 - any load failure means the checkpoint is unusable
        raise InvalidArgument(
            f"base model {base_model!r} has no loadable tokenizer: {exc}",
            field="training_job.base_model",
            reason="BASE_MODEL_INVALID",
        ) from None
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
