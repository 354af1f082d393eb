"""Model-server use cases: load the model once, then check, tokenize and run generation requests."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from neuroweaver_runtime.errors import InvalidArgument, Unavailable

from .. import metrics
from ..adapters.loading import LoadSpec, load_engine
from ..domain import Completion, Delta, GenerationInput, Limits, ServedModel, prompt_too_long, resolve_model, validate
from ..engines import QueuedEngine

log = logging.getLogger("neuroweaver.model_server")


class InferenceService:
    def __init__(self, served: ServedModel, limits: Limits) -> None:
        self.served = served
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
        if loaded.adapter_sha256:
            self.served = replace(self.served, adapter_sha256=loaded.adapter_sha256, quantized_4bit=spec.load_in_4bit)
        self.served = replace(self.served, engine=engine.name)
        self.engine = engine
        seconds = time.monotonic() - started
        self.created = int(time.time())
        metrics.LOAD_SECONDS.set(seconds)
        metrics.MODEL_LOADED.labels(self.served.name, self.served.model_version).set(1)
        metrics.ENGINE.labels(engine.name).set(1)
        log.info(
            "model loaded",
            extra={"fields": {"served_model_name": self.served.name, "seconds": round(seconds, 2), **engine.describe()}},
        )

    async def load(self, spec: LoadSpec) -> None:
        await asyncio.to_thread(self.load_blocking, spec)

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    # -- requests ----------------------------------------------------------------------------

    def models(self) -> list[ServedModel]:
        return [self.served]

    def resolve(self, model: str) -> str:
        """The name a response to a request naming `model` echoes; NOT_FOUND for a name this server does not answer to."""
        return resolve_model(model, self.served)

    def _prepare(self, req: GenerationInput, field_prefix: str = "") -> tuple[QueuedEngine, list[int]]:
        self.resolve(req.model)
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
        async for delta in engine.run(ids, req.sampling, deadline):
            if delta.finish_reason is not None:
                metrics.TIME_TO_FIRST_TOKEN.labels(method).observe(delta.ttft_s)
                metrics.PROMPT_TOKENS.inc(delta.prompt_tokens)
                metrics.COMPLETION_TOKENS.inc(delta.completion_tokens)
            yield delta

    async def generate(self, req: GenerationInput, deadline: float | None, method: str) -> Completion:
        parts: list[str] = []
        async for delta in self.stream(req, deadline, method):
            parts.append(delta.text)
            if delta.finish_reason is not None:
                return Completion(
                    model=self.resolve(req.model),
                    text="".join(parts),
                    finish_reason=delta.finish_reason,
                    prompt_tokens=delta.prompt_tokens,
                    completion_tokens=delta.completion_tokens,
                    latency_s=delta.latency_s,
                    ttft_s=delta.ttft_s,
                )
        raise RuntimeError("generation ended without a final delta")
