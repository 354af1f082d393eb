"""OpenAI-compatible HTTP API (`POST /v1/chat/completions` and `POST /v1/completions` with SSE streaming,
`GET /v1/models`, `GET /v1/models/{id}`) and `/healthz`, plus the ops app of the separate ops port (`/metrics` for
Prometheus, `/healthz`), served by aiohttp on the model server's event loop. Options the engine cannot honour
(`echo`, `n` > 1, ...) are refused with 400 `UNSUPPORTED_PARAMETER`, never ignored.

Log-probabilities as OpenAI shapes them: chat's `logprobs: true` + `top_logprobs: 0-20` →
`choices[].logprobs.content[]` ({token, logprob, bytes, top_logprobs}); the legacy completions' `logprobs: N` (0-20)
→ `choices[].logprobs` {tokens, token_logprobs, top_logprobs (the N most likely and the sampled token), text_offset
(characters into the completion)}; streamed chunks carry those of the tokens their text holds. Values are the
model's distribution (before temperature and top_p); neither a stop string's tokens nor the end-of-sequence token
are listed.

Callers name the model by any name the server answers to (`model` in the body; `GET /v1/models` lists them,
stable names first); `model` in the answer echoes that name, as OpenAI's does, while the version that served it
is in the `x-neuroweaver-model-version` header and `system_fingerprint` (`nw-<version>-<sha8>`), streaming
included. An unknown name is 404 `MODEL_NOT_FOUND`.

With auth on, every API path but `/healthz` needs `Authorization: Bearer <token>` (what OpenAI clients send as
their API key): no or an unknown token → 401, a token of another project or below viewer → 403, each with an
OpenAI-style error body."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from neuroweaver_runtime.auth import Role, TokenAuthenticator, authorize
from neuroweaver_runtime.errors import DomainError, InvalidArgument

from .. import metrics
from ..domain import MAX_TOP_LOGPROBS, GenerationInput, Message, Sampling, ServedModel, TokenLogprob
from ..service import InferenceService
from .http_tracing import tracing_middleware

log = logging.getLogger("neuroweaver.model_server.http")

_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
}  # fmt: skip
_ERROR_TYPE = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
    503: "service_unavailable",
}  # fmt: skip

OPEN_PATHS = frozenset({"/healthz"})  # readiness probes carry no token
VERSION_HEADER = "x-neuroweaver-model-version"  # the registry version that served a chat completion


def _error(status: int, message: str, code: str, param: str | None = None) -> web.Response:
    return web.json_response({"error": _error_body(status, message, code, param)}, status=status)


def _error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: `type` by HTTP status (what the SDK's exception classes follow), `code` our reason."""
    return {"message": message, "type": _ERROR_TYPE.get(status, "server_error"), "param": param, "code": code}


def _http_refusal(request: web.Request, exc: web.HTTPException, reason: str) -> web.Response:
    message = exc.text if exc.status == 413 and exc.text else f"{request.method} {request.path}: {exc.reason}"
    response = _error(exc.status, message, reason)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
    return response


@web.middleware
async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every failure of the API is an OpenAI error object: aiohttp's refusals and unexpected failures included
    (the latter as a generic 500 `INTERNAL`; the details go to the log only)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals (no route, wrong method, body too large), in OpenAI's error shape too.
        return _http_refusal(
            request,
            exc,
            reason={404: "ROUTE_NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "REQUEST_TOO_LARGE"}.get(
                exc.status, "INVALID_REQUEST"
            ),
        )
    except (asyncio.CancelledError, ConnectionResetError):  # the caller left: nobody to answer
        raise
    except Exception:
        log.exception("HTTP request failed", extra={"fields": {"path": request.path}})
        return _error(500, "internal error; see the server log", "INTERNAL")


def _domain_error(exc: DomainError) -> web.Response:
    status = _HTTP_STATUS.get(exc.kind.name, 500)
    param = exc.violations[0].field if exc.violations else None
    response = _error(status, exc.message, exc.reason, param)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="neuroweaver"'  # RFC 6750
    return response


def _content(raw: Any, index: int) -> str:
    """OpenAI content: a string or a list of parts (`{"type": "text", "text": ...}`)."""
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in raw):
        return "".join(str(p.get("text", "")) for p in raw)
    raise InvalidArgument("only text content is supported", field=f"messages[{index}].content", reason="UNSUPPORTED_CONTENT")


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object", reason="INVALID_JSON")
    return body


def _unsupported(body: dict[str, Any], *, chat: bool) -> None:
    """Options this server cannot honour are refused, never ignored (`top_logprobs` is chat's; the legacy
    completions API takes the count in `logprobs`)."""
    names = ("echo", "suffix", "logit_bias", "tools", "functions", *(() if chat else ("top_logprobs",)))
    for name in names:
        if body.get(name):  # absent, false, null, 0, empty: the default, fine
            raise InvalidArgument(f"{name} is not supported by this server", field=name, reason="UNSUPPORTED_PARAMETER")
    for name in ("n", "best_of"):
        if body.get(name, 1) not in (1, None):
            raise InvalidArgument(f"only {name}=1 is supported", field=name, reason="UNSUPPORTED_PARAMETER")


def _int_option(body: dict[str, Any], name: str) -> int | None:
    """An optional count in [0, MAX_TOP_LOGPROBS] (null = absent)."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(
            f"{name} must be an integer in [0, {MAX_TOP_LOGPROBS}]", field=name, reason="INVALID_GENERATION_REQUEST"
        )
    return value


def _logprobs_options(body: dict[str, Any], *, chat: bool) -> tuple[bool, int]:
    """(report logprobs, alternatives per token). Chat: `logprobs` a boolean, `top_logprobs` needs it; completions
    (legacy): `logprobs` the number of alternatives, 0 = the sampled token's only, null = none."""
    if not chat:
        n = _int_option(body, "logprobs")
        return n is not None, n or 0
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise InvalidArgument("logprobs must be a boolean", field="logprobs", reason="INVALID_GENERATION_REQUEST")
    top = _int_option(body, "top_logprobs")
    if top is not None and not wanted:
        raise InvalidArgument("top_logprobs needs logprobs: true", field="top_logprobs", reason="INVALID_GENERATION_REQUEST")
    return bool(wanted), top or 0


def _request(body: dict[str, Any], messages: list[Message], prompt: str, *, chat: bool) -> tuple[GenerationInput, bool, bool]:
    """The sampling options chat and text completions share → (input, stream, include_usage)."""
    _unsupported(body, chat=chat)
    logprobs, top_logprobs = _logprobs_options(body, chat=chat)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or 0
    temperature = body.get("temperature", 1.0)
    top_p = body.get("top_p", 1.0)
    seed = body.get("seed")
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p)):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise InvalidArgument(f"{name} must be a number", field=name, reason="INVALID_GENERATION_REQUEST")
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidArgument("stop must be a string or a list of strings", field="stop", reason="INVALID_GENERATION_REQUEST")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise InvalidArgument("seed must be an integer", field="seed", reason="INVALID_GENERATION_REQUEST")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise InvalidArgument("model must be a string", field="model", reason="INVALID_GENERATION_REQUEST")
    sampling = Sampling(
        temperature=float(temperature),
        top_p=float(top_p),
        max_tokens=int(max_tokens),
        stop=stop,
        seed=seed,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    stream = bool(body.get("stream", False))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
    return GenerationInput(model=model, messages=messages, prompt=prompt, sampling=sampling), stream, include_usage


def parse_chat_request(body: Any) -> tuple[GenerationInput, bool, bool]:
    """OpenAI chat-completions JSON → (input, stream, include_usage). Raises INVALID_ARGUMENT."""
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages must be a non-empty list", field="messages", reason="INVALID_GENERATION_REQUEST")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidArgument("each message must be an object", field=f"messages[{i}]", reason="INVALID_GENERATION_REQUEST")
        role = m.get("role")
        if role == "developer":
            role = "system"
        parsed.append(Message(str(role), _content(m.get("content"), i)))
    return _request(body, parsed, "", chat=True)


def parse_completion_request(body: Any) -> tuple[GenerationInput, bool, bool]:
    """OpenAI (legacy) completions JSON: `prompt` is raw text, sent to the model as is (no chat template)."""
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if not isinstance(prompt, str) or not prompt:
        raise InvalidArgument("prompt must be a non-empty string", field="prompt", reason="INVALID_GENERATION_REQUEST")
    return _request(body, [], prompt, chat=False)


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """Chat's `choices[].logprobs`: one object per token, the alternatives most likely first."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.raw),
                "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.raw)} for t in e.top],
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """The legacy completions' `choices[].logprobs`: parallel lists; each `top_logprobs` dict maps the most likely
    tokens' text to their logprob, with the sampled token always in it (as OpenAI: up to N+1 keys)."""
    tops = []
    for e in entries:
        top = {t.token: t.logprob for t in e.top}
        top.setdefault(e.token, e.logprob)
        tops.append(top)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": tops,
        "text_offset": [e.offset for e in entries],
    }


def _http_code(exc: BaseException) -> str:
    if isinstance(exc, DomainError):
        return str(_HTTP_STATUS.get(exc.kind.name, 500))
    if isinstance(exc, asyncio.CancelledError):
        return "499"  # client closed the connection
    return "500"


class OpenAIApi:
    def __init__(
        self,
        service: InferenceService,
        authenticator: TokenAuthenticator | None = None,
        project: str = "",
        *,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        """`stopping`: whether the server is shutting down (then /healthz is NOT_SERVING: readiness probes drop it)."""
        self.svc = service
        self.authenticator = authenticator or TokenAuthenticator({})
        self.project = project
        self.stopping = stopping

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=4 * 1024 * 1024,
            middlewares=[tracing_middleware(OPEN_PATHS), openai_errors, self._authenticate],
        )
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model:.+}", self.get_model)  # stable names hold slashes
        app.router.add_get("/healthz", self.healthz)
        return app

    def ops_app(self) -> web.Application:
        """The ops port: what scrapers and probes read, no inference."""
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        return app

    @web.middleware
    async def _authenticate(self, request: web.Request, handler) -> web.StreamResponse:
        """Inference needs the viewer role in this server's project (the same check as gRPC)."""
        if self.authenticator.enabled and request.path not in OPEN_PATHS:
            try:
                authorize(self.authenticator.authenticate(request.headers.get("Authorization")), Role.VIEWER, {self.project})
            except DomainError as exc:
                return _domain_error(exc)
        return await handler(request)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        ready = self.svc.engine is not None and not self.stopping()
        return web.json_response({"status": "SERVING" if ready else "NOT_SERVING"}, status=200 if ready else 503)

    @staticmethod
    def _version_headers(served: ServedModel) -> dict[str, str]:
        """Which version served a response, for callers that name a stable model (it changes across rollovers)."""
        return {VERSION_HEADER: served.model_version or served.name}

    def _model_entries(self) -> list[dict[str, Any]]:
        """One entry per accepted name, stable names first (the first is the default); `root` is the name unique to
        the version behind it, `created` when it was loaded. With several versions on one base (multi-LoRA) every
        version's names are listed and `parent` is the base model they share (null with one version), as vLLM lists
        LoRA adapters."""
        return [
            {
                "id": name,
                "object": "model",
                "created": self.svc.created,
                "owned_by": self.project or "neuroweaver",
                "root": m.name,
                "parent": m.parent or None,
                "model_version": m.model_version,
                "system_fingerprint": m.fingerprint,
                "engine": m.engine,
            }  # fmt: skip
            for m in self.svc.models()
            for name in m.names
        ]

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self._model_entries()})

    async def get_model(self, request: web.Request) -> web.Response:
        wanted = request.match_info["model"]
        try:
            self.svc.resolve(wanted)  # the same NOT_FOUND as a completion naming an unknown model
        except DomainError as exc:
            return _domain_error(exc)
        return web.json_response(next(e for e in self._model_entries() if e["id"] == wanted))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        """Chat (`messages`, the chat template) and text (`prompt` as is) completions: one path, two wire shapes."""
        method = "ChatCompletions" if chat else "Completions"
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            metrics.REQUESTS.labels(method, "400").inc()
            return _error(400, "the request body is not valid JSON", "INVALID_JSON")
        try:
            req, stream, include_usage = (parse_chat_request if chat else parse_completion_request)(body)
        except DomainError as exc:
            metrics.REQUESTS.labels(method, "400").inc()
            return _domain_error(exc)
        if stream:
            return await self._stream(request, req, include_usage, chat=chat)
        try:
            with metrics.observe(method, _http_code, ok="200"):
                c = await self.svc.generate(req, None, method)
        except DomainError as exc:
            return _domain_error(exc)
        served = c.served or self.svc.served
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}
            if c.logprobs is not None:
                choice["logprobs"] = chat_logprobs(c.logprobs)
        else:
            logprobs = completion_logprobs(c.logprobs) if c.logprobs is not None else None
            choice = {"index": 0, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}
        return web.json_response(
            {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": c.model,
                "system_fingerprint": served.fingerprint,
                "choices": [choice],
                "usage": {
                    "prompt_tokens": c.prompt_tokens,
                    "completion_tokens": c.completion_tokens,
                    "total_tokens": c.prompt_tokens + c.completion_tokens,
                },
            },
            headers=self._version_headers(served),
        )

    async def _stream(self, request: web.Request, req: GenerationInput, include_usage: bool, *, chat: bool) -> web.StreamResponse:
        method = "ChatCompletionsStream" if chat else "CompletionsStream"
        deltas = self.svc.stream(req, None, method)
        chunk_id, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        with metrics.observe(method, _http_code, ok="200"):
            try:
                first = await anext(deltas)  # errors before the first token still get a JSON error status
            except DomainError as exc:
                return _domain_error(exc)
            served, model = self.svc.route(req.model)  # accepted: the stream above has started
            fingerprint = served.fingerprint
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **self._version_headers(served)}
            )
            await response.prepare(request)

            def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
                body: dict[str, Any] = {
                    "id": chunk_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                    "model": model, "system_fingerprint": fingerprint, "choices": choices,
                }  # fmt: skip
                if include_usage:  # as OpenAI: `usage: null` on every chunk but the last, which has no choices
                    body["usage"] = usage
                return f"data: {json.dumps(body)}\n\n".encode()

            wants_logprobs = req.sampling.logprobs

            def choice(delta: dict, finish: str | None = None, logprobs: list[TokenLogprob] | None = None) -> list[dict]:
                if chat:
                    c: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
                    if wants_logprobs and logprobs is not None:
                        c["logprobs"] = chat_logprobs(logprobs)
                    return [c]
                lp = completion_logprobs(logprobs) if wants_logprobs and logprobs is not None else None
                return [{"index": 0, "text": delta.get("content", ""), "logprobs": lp, "finish_reason": finish}]

            if chat:
                await response.write(chunk(choice({"role": "assistant", "content": ""})))
            d = first
            while True:
                if d.finish_reason is None:
                    await response.write(chunk(choice({"content": d.text}, logprobs=d.logprobs)))
                else:
                    if d.text or d.logprobs:
                        await response.write(chunk(choice({"content": d.text}, logprobs=d.logprobs)))
                    await response.write(chunk(choice({}, d.finish_reason)))
                    if include_usage:
                        usage = {
                            "prompt_tokens": d.prompt_tokens,
                            "completion_tokens": d.completion_tokens,
                            "total_tokens": d.prompt_tokens + d.completion_tokens,
                        }
                        await response.write(chunk([], usage))
                    break
                try:
                    d = await anext(deltas)
                except Exception as exc:  # noqa: BLE001 - mid-stream failure: an error event, as OpenAI reports it
                    if isinstance(exc, DomainError):
                        err = _error_body(_HTTP_STATUS.get(exc.kind.name, 500), exc.message, exc.reason)
                    else:
                        log.exception("generation failed mid-stream")
                        err = _error_body(500, "internal error; see the server log", "INTERNAL")
                    await response.write(f"data: {json.dumps({'error': err})}\n\n".encode())
                    break
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        return response
