"""Model-server use cases: load the model once, then check, tokenize and run generation requests."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from neuroweaver_runtime.errors import InvalidArgument, Unavailable

from .. import metrics
from ..adapters.loading import LoadSpec, adapter_name, load_engine
from ..domain import (
    Completion,
    Delta,
    GenerationInput,
    Limits,
    ServedModel,
    TokenLogprob,
    check_unique_names,
    prompt_too_long,
    route_model,
    validate,
)
from ..engines import QueuedEngine

log = logging.getLogger("neuroweaver.model_server")


class InferenceService:
    def __init__(self, served: ServedModel, limits: Limits, extra: tuple[ServedModel, ...] = ()) -> None:
        # Several versions on one base (multi-LoRA): `served` first (its first name is the default), then `extra`;
        # each has the engine's name for its adapter (as LoadSpec.adapters names them; a version without an adapter
        # digest is the base itself). One version alone keeps adapter "" (the engine's only one).
        self.versions = [served, *extra]
        if extra:
            self.versions = [
                replace(m, adapter=adapter_name(i, bool(m.adapter_sha256)), parent=served.base_model)
                for i, m in enumerate(self.versions)
            ]
        check_unique_names(self.versions)
        self.limits = limits
        self.engine: QueuedEngine | None = None
        self.context_length = 0
        self.created = int(time.time())  # unix seconds the model was loaded (OpenAI's `created`); start time until then

    # -- loading -----------------------------------------------------------------------------

    def load_blocking(self, spec: LoadSpec) -> None:
        """Loads the model (adapter digest checked first) into its engine and starts it (run it in a thread)."""
        started = time.monotonic()
        loaded = load_engine(spec, self.limits)
        engine = loaded.engine
        self.context_length = engine.context_length
        if loaded.adapter_sha256 and len(self.versions) == 1:
            self.served = replace(self.served, adapter_sha256=loaded.adapter_sha256, quantized_4bit=spec.load_in_4bit)
        self.versions = [replace(m, engine=engine.name, quantized_4bit=spec.load_in_4bit) for m in self.versions]
        self.engine = engine
        seconds = time.monotonic() - started
        self.created = int(time.time())
        metrics.LOAD_SECONDS.set(seconds)
        for m in self.versions:
            metrics.MODEL_LOADED.labels(m.name, m.model_version).set(1)
        metrics.ENGINE.labels(engine.name).set(1)
        log.info(
            "model loaded",
            extra={
                "fields": {
                    "served_model_name": ",".join(m.name for m in self.versions),
                    "seconds": round(seconds, 2),
                    **engine.describe(),
                }
            },
        )

    async def load(self, spec: LoadSpec) -> None:
        await asyncio.to_thread(self.load_blocking, spec)

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    # -- requests ----------------------------------------------------------------------------

    @property
    def served(self) -> ServedModel:
        """The first (default) version: the only one unless several versions share the base."""
        return self.versions[0]

    @served.setter
    def served(self, value: ServedModel) -> None:
        self.versions[0] = value

    def models(self) -> list[ServedModel]:
        return list(self.versions)

    def route(self, model: str) -> tuple[ServedModel, str]:
        """The version serving a request naming `model` and the name its response echoes; NOT_FOUND for a name this
        server does not answer to."""
        return route_model(model, self.versions)

    def resolve(self, model: str) -> str:
        """The name a response to a request naming `model` echoes; NOT_FOUND for a name this server does not answer to."""
        return self.route(model)[1]

    def _prepare(self, req: GenerationInput, field_prefix: str = "") -> tuple[QueuedEngine, list[int]]:
        self.route(req.model)
        validate(req, self.limits, field_prefix)
        engine = self.engine
        if engine is None:
            raise Unavailable("the model is still loading; retry shortly", reason="MODEL_LOADING")
        prompt = req.prompt if req.prompt else [{"role": m.role, "content": m.content} for m in req.messages]
        try:
            ids = engine.encode(prompt)
        except ValueError as exc:
            raise InvalidArgument(str(exc), field=f"{field_prefix}messages", reason="INVALID_PROMPT") from exc
        if not ids:
            raise InvalidArgument("the prompt encodes to zero tokens", field=f"{field_prefix}prompt", reason="EMPTY_PROMPT")
        if self.context_length and len(ids) + req.sampling.max_tokens > self.context_length:
            raise prompt_too_long(len(ids), req.sampling.max_tokens, self.context_length)
        return engine, ids

    async def stream(self, req: GenerationInput, deadline: float | None, method: str) -> AsyncIterator[Delta]:
        engine, ids = self._prepare(req)
        served = self.route(req.model)[0]
        # the version's adapter, named only when several versions share the base (engines with one adapter take none)
        run = (
            engine.run(ids, req.sampling, deadline, adapter=served.adapter)
            if served.adapter
            else engine.run(ids, req.sampling, deadline)
        )
        async for delta in run:
            if delta.finish_reason is not None:
                metrics.TIME_TO_FIRST_TOKEN.labels(method).observe(delta.ttft_s)
                metrics.PROMPT_TOKENS.inc(delta.prompt_tokens)
                metrics.COMPLETION_TOKENS.inc(delta.completion_tokens)
            yield delta

    async def generate(self, req: GenerationInput, deadline: float | None, method: str) -> Completion:
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        async for delta in self.stream(req, deadline, method):
            parts.append(delta.text)
            logprobs.extend(delta.logprobs)
            if delta.finish_reason is not None:
                served, model = self.route(req.model)
                return Completion(
                    served=served,
                    model=model,
                    text="".join(parts),
                    finish_reason=delta.finish_reason,
                    prompt_tokens=delta.prompt_tokens,
                    completion_tokens=delta.completion_tokens,
                    latency_s=delta.latency_s,
                    ttft_s=delta.ttft_s,
                    logprobs=logprobs if req.sampling.logprobs else None,
                )
        raise RuntimeError("generation ended without a final delta")
