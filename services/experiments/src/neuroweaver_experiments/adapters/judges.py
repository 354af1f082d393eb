"""Judges for live answers: judge versions read from the registry, scored with neuroweaver_ml's judges (the ones
the trainer's RLAIF loop uses: reference similarity with all-MiniLM embeddings and the OpenAI-compatible LLM judge,
for example a deployment's own model server).

A judge version is immutable, so each is read once and its judge kept for the life of the process. Reads made for
the background worker run as a viewer of the judge's project (`acting_as`), never as whichever caller recorded the
answers. `neuroweaver_ml` (torch, transformers, openai) is imported on first use: an experiments service without
it still serves everything else, and its judging fails with a message saying what to install.

Outcomes (`service.judging.Verdict`): a score; a permanent failure (malformed verdict, no reference for a
reference-similarity judge, unusable version or API key variable); or a transient one (the judge endpoint or the registry unreachable),
which the worker retries later.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver_runtime.auth import Principal, Role, acting_as
from neuroweaver_runtime.errors import DomainError, FailedPrecondition, Unavailable
from neuroweaver_runtime.names import project_of

from ..domain.judging import JudgeEndpoints
from ..service.judging import Verdict
from .clients import RegistryClient

log = logging.getLogger(__name__)

_KINDS = {rpb.JUDGE_KIND_LOCAL_EMBEDDING: "local_embedding", rpb.JUDGE_KIND_OPENAI_COMPATIBLE: "openai_compatible"}


def judge_config_fields(v: rpb.JudgeVersion, *, max_retries: int) -> dict[str, Any]:
    """`neuroweaver.registry.v1.JudgeVersion` → `neuroweaver_ml.rlaif.JudgeConfig` keyword arguments (as the
    trainer's `judge_config_from_version`; the retry policy is this service's). Pairwise versions are refused:
    a live answer is scored alone."""
    kind = _KINDS.get(v.kind)
    if kind is None:
        raise FailedPrecondition(
            f"judge version {v.name} has no kind; it cannot score",
            reason="JUDGE_VERSION_UNUSABLE",
            metadata={"judge_version": v.name},
        )
    if v.mode == rpb.JUDGE_MODE_PAIRWISE:
        raise FailedPrecondition(
            f"judge version {v.name} is pairwise; live answers need a pointwise judge",
            reason="JUDGE_VERSION_UNUSABLE",
            metadata={"judge_version": v.name},
        )
    values: dict[str, Any] = dict(
        name=v.name, kind=kind, mode="pointwise", rubric=v.rubric, prompt_template=v.prompt_template, max_retries=max_retries
    )
    if v.score_max > v.score_min:
        values.update(score_min=v.score_min, score_max=v.score_max)
    if kind == "openai_compatible":
        o = v.openai
        values.update(model=o.model, base_url=o.base_url, api_key_env=o.api_key_env, temperature=o.temperature)
        for k in ("max_tokens", "requests_per_minute", "tokens_per_minute", "max_concurrency", "timeout_seconds"):
            if getattr(o, k):
                values[k] = getattr(o, k)
    else:
        values["model"] = v.local_embedding.model
    return values


class RegistryJudges:
    """`service.judging.AnswerJudges` on the registry and neuroweaver_ml."""

    def __init__(self, registry: RegistryClient, *, endpoints: JudgeEndpoints | None = None, max_retries: int = 1) -> None:
        self.registry = registry
        self.endpoints = endpoints or JudgeEndpoints()
        self.max_retries = max_retries
        self._judges: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    async def resolve(self, judge_version: str) -> str:
        """The concrete name of a usable pointwise judge version (`latest` resolved), as the caller."""
        v = await self.registry.judge_version(judge_version)
        config = self._config(v)
        return str(config.name)

    def _config(self, v: rpb.JudgeVersion):
        try:
            from neuroweaver_ml.rlaif.judges import JudgeConfig, JudgeConfigError
        except ImportError as exc:
            raise FailedPrecondition(
                f"this experiments service cannot run judges: {exc} (install neuroweaver-ml and openai)",
                reason="JUDGE_VERSION_UNUSABLE",
            ) from None
        fields = judge_config_fields(v, max_retries=self.max_retries)
        self.endpoints.check(fields)  # JUDGE_ENDPOINT_NOT_ALLOWED: not where this service may send prompts and keys
        try:
            return JudgeConfig(**fields)
        except (JudgeConfigError, TypeError, ValueError) as exc:
            raise FailedPrecondition(
                f"judge version {v.name} is not usable: {exc}",
                reason="JUDGE_VERSION_UNUSABLE",
                metadata={"judge_version": v.name},
            ) from None

    async def _judge(self, judge_version: str):
        judge = self._judges.get(judge_version)
        if judge is not None:
            return judge
        async with self._lock:
            if judge_version not in self._judges:
                with acting_as(Principal("answer-judge", project_of(judge_version) or "default", Role.VIEWER)):
                    v = await self.registry.judge_version(judge_version)
                config = self._config(v)
                from neuroweaver_ml.rlaif.judges import JudgeConfigError, make_judge

                try:
                    self._judges[judge_version] = await asyncio.to_thread(make_judge, config)
                except (JudgeConfigError, OSError, ValueError) as exc:
                    raise FailedPrecondition(
                        f"judge version {judge_version} cannot be loaded here: {exc}", reason="JUDGE_VERSION_UNUSABLE"
                    ) from None
            return self._judges[judge_version]

    async def score(self, judge_version: str, prompt: str, answer: str, reference: str) -> Verdict:
        try:
            judge = await self._judge(judge_version)
        except Unavailable as exc:
            return Verdict(None, exc.message, transient=True)
        except DomainError as exc:
            return Verdict(None, exc.message)
        j = await judge.score(prompt, answer, reference or None)
        if j.score is not None:
            return Verdict(float(j.score), "")
        if j.error:
            return Verdict(None, f"judge request failed: {j.error}", transient=True)
        raw = (j.raw or "").strip().replace("\n", " ")
        return Verdict(None, f"malformed verdict (no usable score): {raw[:200]!r}")

    async def close(self) -> None:
        for judge in self._judges.values():
            try:
                await judge.aclose()
            except Exception:  # noqa: BLE001 - closing clients at shutdown: nothing left to do with a failure
                log.debug("closing judge failed", exc_info=True)
        self._judges.clear()
