"""The playground: chat with a deployment (or two side by side), streamed token by token.

The browser posts the conversation as JSON (a cross-site form cannot send that content type without a CORS preflight,
which the console never grants); the console asks the deployer for the deployment, dials the model server at its
`endpoint` (the deployer's word, never the browser's) with the user's token and the console's client TLS, calls
GenerateStream and forwards the chunks as server-sent events. The channel closes when the answer ends or the browser
leaves (the Stop button, another page)."""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator
from typing import Any

import grpc
from aiohttp import web

from neuroweaver.deployer.v1 import deployer_service_pb2 as dsvc
from neuroweaver.deployer.v1 import deployment_pb2 as dpb
from neuroweaver.inference.v1 import inference_pb2 as ipb
from neuroweaver.inference.v1 import inference_service_pb2 as isvc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as igrpc
from neuroweaver_runtime.client import ServiceClient

from .deployments import deployment_summary, list_deployments, version_ref
from .web import _HTTP_STATUS, SECURITY_HEADERS, Event, _gateway, _render, project_key, rpc_error, sse

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 64
MAX_CHARS = 64_000  # the whole conversation; the model server's own limits still apply
MAX_TOKENS = 4096  # the form's bound; the deployment's serving.max_new_tokens_limit is the model server's to enforce
DEFAULT_MAX_TOKENS = 128
GENERATE_TIMEOUT_SECONDS = 600.0  # an answer that takes longer is cut off (DEADLINE_EXCEEDED shown in its pane)
LISTED = 500  # deployments offered in the pickers


class BadInput(ValueError):
    pass


async def playground(request: web.Request) -> web.Response:
    """The page; `?a=<deployment>&b=<deployment>` preselects the panes (a link from a deployment's page)."""
    gw = await _gateway(request)
    found: list[dpb.Deployment] = []
    token = ""
    while len(found) < LISTED:
        resp = await list_deployments(gw, token, page_size=200)
        found.extend(resp.deployments)
        token = resp.next_page_token
        if not token:
            break
    choices = [deployment_summary(d) for d in found]
    ids = {c["id"] for c in choices}
    picked = [request.query.get("a", ""), request.query.get("b", "")]
    unknown = [p for p in picked if p and p not in ids]
    return _render(
        request,
        "playground.html",
        status=404 if unknown else 200,
        choices=choices,
        a=picked[0] if picked[0] in ids else "",
        b=picked[1] if picked[1] in ids else "",
        unknown=unknown,
        default_max_tokens=DEFAULT_MAX_TOKENS,
        max_tokens=MAX_TOKENS,
    )


def parse_request(body: Any) -> tuple[str, isvc.GenerateStreamRequest]:
    """The browser's JSON → (deployment id, the GenerateStream request without its model name)."""
    if not isinstance(body, dict):
        raise BadInput("the request body must be a JSON object")
    deployment = body.get("deployment")
    if not isinstance(deployment, str) or not deployment or "/" in deployment:
        raise BadInput("pick a deployment")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise BadInput(f"send 1 to {MAX_MESSAGES} messages")
    chat = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadInput(f"each message needs a role ({', '.join(ROLES)}) and a text content")
        chat.append(ipb.ChatMessage(role=m["role"], content=m["content"]))
    if chat[-1].role != "user" or not chat[-1].content.strip():
        raise BadInput("type a message")
    if sum(len(m.content) for m in chat) > MAX_CHARS:
        raise BadInput(f"the conversation is longer than {MAX_CHARS} characters: clear it and start again")
    max_tokens, temperature = body.get("max_tokens"), body.get("temperature")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_TOKENS:
        raise BadInput(f"max tokens must be a whole number from 1 to {MAX_TOKENS}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not math.isfinite(temperature):
        raise BadInput("temperature must be a number")
    if not 0 <= temperature <= 2:
        raise BadInput("temperature must be from 0 (greedy) to 2")
    sampling = ipb.SamplingParams(max_tokens=max_tokens, temperature=float(temperature))
    return deployment, isvc.GenerateStreamRequest(messages=chat, sampling=sampling)


def _error(status: int, code: str, message: str, reason: str = "") -> web.Response:
    return web.json_response({"code": code, "reason": reason, "message": message}, status=status, headers=SECURITY_HEADERS)


def done_json(last: isvc.GenerateStreamResponse) -> dict[str, Any]:
    """The answer's last message: why it stopped, its tokens and timings, and which version served it."""
    return {
        "finish_reason": ipb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower(),
        "prompt_tokens": last.usage.prompt_tokens,
        "completion_tokens": last.usage.completion_tokens,
        "latency_ms": round(last.latency.ToMilliseconds()),
        "first_token_ms": round(last.time_to_first_token.ToMilliseconds()),
        "version": version_ref(last.model_version)["label"] if last.model_version else last.served_model,
    }


async def stream(request: web.Request) -> web.StreamResponse:
    """POST a conversation (JSON): the answer as server-sent events `token` {text}, then `done` (usage, timings,
    version) or `failure` {code, reason, message}. Errors before the first byte are JSON with an HTTP status."""
    if request.content_type != "application/json":
        return _error(415, "INVALID_ARGUMENT", "send the conversation as application/json")
    try:
        deployment_id, generate = parse_request(await request.json())
    except BadInput as exc:
        return _error(400, "INVALID_ARGUMENT", str(exc))
    except ValueError:
        return _error(400, "INVALID_ARGUMENT", "the request body must be JSON")
    gw = await _gateway(request)
    name = f"projects/{request.app[project_key]}/deployments/{deployment_id}"
    try:
        d = await gw.deployer.GetDeployment(dsvc.GetDeploymentRequest(name=name))
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise
        error = rpc_error(exc)
        return _error(_HTTP_STATUS.get(exc.code(), 502), error["code"], error["message"], error["reason"])
    if not d.endpoint:
        state = deployment_summary(d)["state"]
        return _error(409, "FAILED_PRECONDITION", f"{deployment_id} has no endpoint yet (it is {state})", "NO_ENDPOINT")
    generate.model = d.name  # its stable name: the same deployment across rollovers

    async def tokens() -> AsyncGenerator[Event, None]:
        async with ServiceClient(d.endpoint, token=gw.token, deadline=None, tls=gw.tls) as client:
            call = client.stub(igrpc.InferenceServiceStub).GenerateStream(generate, timeout=GENERATE_TIMEOUT_SECONDS)
            try:
                async for chunk in call:
                    if chunk.delta:
                        yield Event("token", {"text": chunk.delta})
                    if chunk.finish_reason:
                        yield Event("done", done_json(chunk))
            finally:
                call.cancel()  # the browser left or stopped: the model server stops generating

    return await sse(request, "playground", tokens())


def routes(app: web.Application) -> None:
    app.router.add_get("/playground", playground)
    app.router.add_post("/playground/stream", stream)
