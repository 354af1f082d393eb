"""Every failure of the OpenAI-compatible API is OpenAI's error object (`{"error": {"message", "type", "param",
"code"}}`) with the HTTP status the official SDK maps to its exception classes: bad input, unknown models and paths,
wrong methods, oversized bodies, a full queue, an unexpected failure and a failure in the middle of a stream.
(Auth's 401/403 are in test_model_server_auth.py.)"""

from __future__ import annotations

import asyncio

import openai
import pytest
from model_server_testkit import wait_until

from neuroweaver_model_server.app import ModelServer, ModelServerConfig

NAME = "tiny-errors"
MESSAGES = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
async def server(tiny_base):
    s = ModelServer(
        ModelServerConfig(
            grpc_port=0, http_port=0, metrics_port=-1, base_model=str(tiny_base), served_model_name=NAME, max_queue=1,
            max_batch_size=1, max_new_tokens_limit=1000, shutdown_grace_seconds=1.0, shutdown_drain_seconds=0,
        )
    )  # fmt: skip
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def client(server):
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="-", max_retries=0) as c:
        yield c


def shape(err: openai.APIStatusError, code: str, type_: str) -> dict:
    body = err.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}, body
    assert body["code"] == code and body["type"] == type_ and body["message"], body
    return body


async def test_bad_requests_are_400_with_the_field_as_param(client):
    cases = [
        (dict(messages=[]), "INVALID_GENERATION_REQUEST", "messages"),
        (dict(messages=MESSAGES, temperature=5), "INVALID_GENERATION_REQUEST", "sampling.temperature"),
        (dict(messages=MESSAGES, n=2), "UNSUPPORTED_PARAMETER", "n"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "UNSUPPORTED_CONTENT", "messages[0].content"),
    ]
    for kwargs, code, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model=NAME, **kwargs)
        assert err.value.status_code == 400
        assert shape(err.value, code, "invalid_request_error")["param"] == param
    with pytest.raises(openai.BadRequestError) as err:
        await client.post("/chat/completions", content=b"{not json", cast_to=object)
    shape(err.value, "INVALID_JSON", "invalid_request_error")
    with pytest.raises(openai.APIStatusError) as big:
        await client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x" * (5 << 20)}])
    assert big.value.status_code == 413
    shape(big.value, "REQUEST_TOO_LARGE", "invalid_request_error")


async def test_unknown_models_paths_and_methods(client):
    with pytest.raises(openai.NotFoundError) as err:
        await client.chat.completions.create(model="nope", messages=MESSAGES)
    shape(err.value, "MODEL_NOT_FOUND", "not_found_error")
    with pytest.raises(openai.NotFoundError) as err:
        await client.embeddings.create(model=NAME, input="hi")  # a route this server does not have
    assert "/v1/embeddings" in shape(err.value, "ROUTE_NOT_FOUND", "not_found_error")["message"]
    with pytest.raises(openai.APIStatusError) as err:
        await client.models.delete(NAME)
    assert err.value.status_code == 405 and err.value.response.headers["Allow"] == "GET, HEAD"
    shape(err.value, "METHOD_NOT_ALLOWED", "invalid_request_error")


async def test_a_full_queue_is_a_rate_limit_error(server, client):
    engine = server.service.engine

    async def hold(max_tokens: int) -> None:
        async for _ in await client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=max_tokens, stream=True):
            pass

    running = asyncio.create_task(hold(1000))  # occupies the single batch slot
    try:
        await wait_until(lambda: engine.running == 1, what="the long stream to start decoding")
        queued = asyncio.create_task(hold(2))
        await wait_until(lambda: engine.queue_depth == 1, what="the second request to wait in the queue")
        with pytest.raises(openai.RateLimitError) as err:
            await client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2)
        assert err.value.status_code == 429
        shape(err.value, "QUEUE_FULL", "rate_limit_error")
    finally:
        for task in (running, queued):
            task.cancel()
        await asyncio.gather(running, queued, return_exceptions=True)
    await wait_until(lambda: engine.running == 0 and engine.queue_depth == 0, what="the streams to end")


async def test_unexpected_failures_are_500_internal_before_and_during_a_stream(server, client, monkeypatch):
    """A failure of the engine itself (here: the tokenizer breaks mid-decode) is a generic 500 `INTERNAL`, and in an
    SSE stream an error event the SDK raises as APIError; the server keeps serving."""
    engine = server.service.engine
    decode = engine.tokenizer.decode
    calls = {"n": 0}

    def failing_decode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("tokenizer broke")
        return decode(*args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "decode", failing_decode)
    with pytest.raises(openai.InternalServerError) as err:
        await client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=50, temperature=0)
    body = shape(err.value, "INTERNAL", "server_error")
    assert "tokenizer broke" not in body["message"]  # details stay in the server log
    calls["n"] = 0
    stream = await client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=50, temperature=0, stream=True)
    chunks = []
    with pytest.raises(openai.APIError) as mid:
        async for chunk in stream:
            chunks.append(chunk)
    assert type(mid.value) is openai.APIError and chunks  # an error event after the stream began, not a status
    assert isinstance(mid.value.body, dict) and mid.value.body["code"] == "INTERNAL"
    monkeypatch.undo()
    done = await client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2)
    assert done.usage is not None and done.usage.completion_tokens > 0
