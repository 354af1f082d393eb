"""The transformers engine's continuous batching, in-process on the tiny Llama with an unmerged PEFT adapter: requests
with mixed prompt lengths and sampling settings share the running batch and each gets the answer it gets alone
(`neuroweaver_ml.generate`, one request, no padding); a short request joining mid-generation finishes first; a
cancelled client's row leaves the batch; stop strings and usage counts."""

from __future__ import annotations

import asyncio

import pytest
from model_server_testkit import wait_until

from neuroweaver_model_server.domain import Sampling
from neuroweaver_model_server.engines import TransformersEngine

PROMPTS = [
    "hi",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog wakes up and leaves.",
    "a b c d e f g",
    "Once upon a time",
    "x" * 60,
    "Tell me about the weather in spring and in autumn.",
    [{"role": "user", "content": "Hello! How are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours of the rainbow please."}],
]
SAMPLINGS = [
    Sampling(max_tokens=24),
    Sampling(max_tokens=9),
    Sampling(temperature=0.9, top_p=0.8, seed=3, max_tokens=20),
    Sampling(max_tokens=40),
    Sampling(temperature=1.3, seed=7, max_tokens=16),
    Sampling(max_tokens=5),
    Sampling(temperature=0.7, seed=11, max_tokens=30),
    Sampling(temperature=1.0, top_p=0.95, seed=5, max_tokens=12),
]


@pytest.fixture(scope="module")
def peft_model(tiny_base, adapters):
    """The tiny base with adapter 0 kept as a PEFT module (not merged): what a 4-bit deployment decodes with."""
    from neuroweaver_ml import load_for_inference

    loaded = load_for_inference(tiny_base, adapters[0][0], device="cpu", merge_adapter=False)
    assert type(loaded.model).__name__.startswith("Peft")
    return loaded


@pytest.fixture
async def engine(peft_model):
    # a small prefill budget: a burst joins over several steps, in groups of similar prompt lengths
    e = TransformersEngine(peft_model.model, peft_model.tokenizer, max_queue=32, max_batch_size=8, prefill_tokens=24)
    yield e
    e.stop()


def serial(peft_model, prompt, s: Sampling):
    from neuroweaver_ml import generate

    r = generate(peft_model.model, peft_model.tokenizer, prompt, s.max_tokens, s.temperature, s.top_p, list(s.stop), s.seed)
    return r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens


async def answer(engine, prompt, s: Sampling, *, first: asyncio.Event | None = None, done: list | None = None):
    """Runs one request; sets `first` at its first delta; appends the prompt to `done` when it ends."""
    ids = engine.encode(prompt)
    parts = []
    async for d in engine.run(ids, s, None):
        parts.append(d.text)
        if first is not None:
            first.set()
        if d.finish_reason is not None:
            if done is not None:
                done.append(prompt if isinstance(prompt, str) else prompt[-1]["content"])
            assert d.ttft_s <= d.latency_s
            return "".join(parts), d.finish_reason, d.prompt_tokens, d.completion_tokens
    raise AssertionError("no final delta")


async def test_mixed_requests_in_one_batch_equal_their_serial_answers(engine, peft_model):
    """Greedy, seeded top_p/temperature samples and stop-free requests of 1-60 tokens of prompt, half started together
    and half joining once the first ones decode: each equals its answer alone, text and usage."""
    expected = [serial(peft_model, p, s) for p, s in zip(PROMPTS, SAMPLINGS, strict=True)]
    started = asyncio.Event()
    first = [asyncio.ensure_future(answer(engine, p, s, first=started)) for p, s in zip(PROMPTS[:4], SAMPLINGS[:4], strict=True)]
    await started.wait()
    later = [asyncio.ensure_future(answer(engine, p, s)) for p, s in zip(PROMPTS[4:], SAMPLINGS[4:], strict=True)]
    got = await asyncio.gather(*first, *later)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"request {i} ({SAMPLINGS[i]}) differs from its serial answer"
    assert engine.stats.largest_batch >= 5  # the late ones joined the running batch
    assert engine.stats.completed == len(PROMPTS)
    assert engine.running == 0


async def test_a_request_joining_mid_generation_finishes_before_the_long_one(engine, peft_model):
    done: list[str] = []
    long_prompt, short_prompt = "Once upon a time", "a b c d e f g"
    started = asyncio.Event()
    long = asyncio.ensure_future(answer(engine, long_prompt, Sampling(max_tokens=200), first=started, done=done))
    await started.wait()
    short = asyncio.ensure_future(answer(engine, short_prompt, Sampling(max_tokens=4), done=done))
    long_answer, short_answer = await asyncio.gather(long, short)
    assert long_answer[1] == "length" and long_answer[3] == 200  # it ran all along
    assert done == [short_prompt, long_prompt]
    assert engine.stats.largest_batch == 2
    assert long_answer == serial(peft_model, long_prompt, Sampling(max_tokens=200))
    assert short_answer == serial(peft_model, short_prompt, Sampling(max_tokens=4))


async def test_a_cancelled_client_frees_its_row(peft_model):
    """One row only: a request waits behind a 1,000-token one; the client of the long one goes away after its first
    delta, its row is dropped at the next step and the waiting request is decoded."""
    engine = TransformersEngine(peft_model.model, peft_model.tokenizer, max_queue=4, max_batch_size=1)
    try:
        ids = engine.encode("Once upon a time")
        stream = engine.run(ids, Sampling(max_tokens=1000), None)
        await stream.__anext__()
        waiting = asyncio.ensure_future(answer(engine, "hi", Sampling(max_tokens=6)))
        await wait_until(lambda: engine.queue_depth == 1, what="the second request to queue")
        await stream.aclose()  # the client goes away (gRPC cancellation / HTTP disconnect end here)
        assert (await waiting) == serial(peft_model, "hi", Sampling(max_tokens=6))
        assert engine.stats.aborted == 1 and engine.stats.completed == 1
        assert engine.running == 0 and engine._cache is None  # nothing left computing
    finally:
        engine.stop()


async def test_stop_strings_and_usage_in_a_shared_batch(engine, peft_model):
    """A seeded sample cut at a stop string from its middle, beside the same request without stop strings and a greedy
    one: the text ends before the stop string, usage counts the prompt and the tokens decoded until the cut."""
    prompt = "Once upon a time"
    sampled = Sampling(temperature=1.0, seed=5, max_tokens=30)
    full_text, _, prompt_tokens, _ = serial(peft_model, prompt, sampled)
    stop = full_text[10:13]
    assert len(stop) == 3 and full_text.find(stop) >= 10
    with_stop = Sampling(temperature=1.0, seed=5, max_tokens=30, stop=["\u2603never", stop])
    got = await asyncio.gather(
        answer(engine, prompt, with_stop), answer(engine, "hi", Sampling(max_tokens=12)), answer(engine, prompt, sampled)
    )
    text, finish, p_tokens, c_tokens = got[0]
    assert text == full_text[: full_text.find(stop)] and finish == "stop"
    assert got[0] == serial(peft_model, prompt, with_stop)
    assert p_tokens == prompt_tokens == len(engine.encode(prompt))
    assert 0 < c_tokens < 30  # tokens decoded until the stop string completed
    assert got[2] == (full_text, "length", prompt_tokens, 30)
    assert got[1] == serial(peft_model, "hi", Sampling(max_tokens=12))
