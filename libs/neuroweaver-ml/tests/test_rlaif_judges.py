"""Judges: parsing, local embedding judge, and the OpenAI-compatible judge against a real HTTP server
(aiohttp, OpenAI wire format) with injected 429/500/malformed answers and rate limits."""

import asyncio
import os

import pytest

from neuroweaver_ml.rlaif.judge_server import JudgeServer
from neuroweaver_ml.rlaif.judges import (
    JudgeCache,
    JudgeConfig,
    LocalEmbeddingJudge,
    OpenAICompatibleJudge,
    parse_score,
    parse_winner,
)

REF = "Replace the brake pads when they are thinner than three millimetres."
GOOD = "Replace the brake pads when they are thinner than three millimetres of lining."
BAD = "Bananas are yellow fruit."


def test_parse_score_is_strict():
    assert parse_score("Looks fine.\nScore: 7", 1, 10) == 7
    assert parse_score('{"score": 3}', 1, 10) == 3
    assert parse_score("**Score:** 8/10", 1, 10) == 8
    assert parse_score("I'd give it a 7", 1, 10) is None  # no Score line
    assert parse_score("Score: 11", 1, 10) is None  # off the scale
    assert parse_score("Score: 3\nScore: 9", 1, 10) is None  # ambiguous
    assert parse_score("", 1, 10) is None
    assert parse_winner("blah\nWinner: B") == "b"
    assert parse_winner('{"winner": "tie"}') == "tie"
    assert parse_winner("A is better") is None


@pytest.fixture(scope="module")
def server():
    with JudgeServer() as s:
        yield s


def _cfg(server, **kw):
    base = dict(
        name="projects/p/judges/j/versions/1",
        kind="openai_compatible",
        base_url=server.base_url,
        model="nw-judge",
        api_key_env="NW_TEST_JUDGE_KEY",
        max_concurrency=4,
        timeout_seconds=5,
        backoff_base_seconds=0.05,
        rubric="Agreement with the reference.",
    )
    base.update(kw)
    return JudgeConfig(**base)


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("NW_TEST_JUDGE_KEY", "sk-test-secret")


def _reset(server):
    with server.state.lock:
        server.state.requests.clear()
        server.state.faults.clear()
    server.state.malformed_if_contains = None


def test_openai_judge_scores_retries_and_accounts(server, tmp_path):
    _reset(server)
    server.state.faults += [{"status": 429, "retry_after": 0.3}, {"status": 500}]
    j = OpenAICompatibleJudge(
        _cfg(server, max_concurrency=1, price_per_1k_prompt_tokens=0.5, price_per_1k_completion_tokens=1.0),
        JudgeCache(tmp_path / "c.sqlite"),
    )
    assert "sk-test-secret" not in repr(j)

    async def go():
        try:
            return await j.score("When should brake pads be replaced?", GOOD, REF)
        finally:
            await j.aclose()

    res = asyncio.run(go())
    assert res.ok and not res.malformed and res.score >= 8
    statuses = [r.status for r in server.state.requests]
    assert statuses == [429, 500, 200]
    # Retry-After 0.3 s was respected before the second attempt
    assert server.state.requests[1].t - server.state.requests[0].t >= 0.28
    assert j.stats.retries == 2 and j.stats.requests == 3
    assert res.prompt_tokens > 0 and res.completion_tokens > 0
    assert res.cost_usd == pytest.approx(res.prompt_tokens / 1000 * 0.5 + res.completion_tokens / 1000)


def test_malformed_is_recorded_and_cached_not_scored(server, tmp_path):
    _reset(server)
    server.state.malformed_if_contains = "transmission"
    cache = JudgeCache(tmp_path / "c.sqlite")
    items = [
        ("How often to change transmission fluid?", "Every 60k miles.", "Every 60000 miles."),
        ("When should brake pads be replaced?", GOOD, REF),
        ("When should brake pads be replaced?", BAD, REF),
    ]

    async def go(judge):
        try:
            return await judge.score_many(items)
        finally:
            await judge.aclose()

    j1 = OpenAICompatibleJudge(_cfg(server), cache)
    out = asyncio.run(go(j1))
    assert out[0].malformed and out[0].score is None
    assert out[1].score > out[2].score
    assert j1.stats.malformed == 1
    n = len(server.state.requests)
    assert n == 3
    j2 = OpenAICompatibleJudge(_cfg(server), cache)  # a resumed job: everything comes from the cache
    again = asyncio.run(go(j2))
    assert len(server.state.requests) == n
    assert [a.score for a in again] == [o.score for o in out] and all(a.cached for a in again)
    assert j2.stats.cache_hits == 3


def test_rate_limit_spaces_requests(server, tmp_path):
    _reset(server)
    rpm = 300  # 5/s, burst 5
    j = OpenAICompatibleJudge(_cfg(server, requests_per_minute=rpm, max_concurrency=8))
    items = [(f"Question {i}?", f"answer {i}", "reference answer") for i in range(12)]

    async def go():
        try:
            return await j.score_many(items)
        finally:
            await j.aclose()

    asyncio.run(go())
    ts = sorted(r.t for r in server.state.requests)
    assert len(ts) == 12
    # 5 may go at once, the other 7 at 5/s: at least 1.4 s between the first and the last request
    assert ts[-1] - ts[0] >= 1.3
    # and no window of 1 s holds more than burst + rate requests
    assert max(sum(1 for u in ts if t <= u < t + 1.0) for t in ts) <= 10


def test_pairwise_with_swap(server, tmp_path):
    _reset(server)
    j = OpenAICompatibleJudge(_cfg(server, mode="pairwise", swap_positions=True))

    async def go():
        try:
            return await j.compare_many([("Q?", GOOD, BAD, REF), ("Q?", BAD, GOOD, REF), ("Q?", BAD, BAD, REF)])
        finally:
            await j.aclose()

    p = asyncio.run(go())
    assert [x.winner for x in p] == ["a", "b", "tie"]
    assert len(server.state.requests) == 6  # both orders judged


def test_missing_api_key_env_is_an_error(server, monkeypatch):
    monkeypatch.delenv("NW_TEST_JUDGE_KEY")
    with pytest.raises(ValueError, match="NW_TEST_JUDGE_KEY"):
        OpenAICompatibleJudge(_cfg(server))


def test_local_embedding_judge(tmp_path):
    cfg = JudgeConfig(name="local:minilm:1", kind="local_embedding", score_min=0, score_max=10)
    j = LocalEmbeddingJudge(cfg, JudgeCache(tmp_path / "c.sqlite"))
    out = asyncio.run(j.score_many([("Q?", GOOD, REF), ("Q?", BAD, REF), ("Q?", GOOD, None)]))
    assert 0 <= out[1].score < out[0].score <= 10
    assert out[2].malformed and out[2].score is None
    pref = asyncio.run(j.compare("Q?", BAD, GOOD, REF))
    assert pref.winner == "b" and pref.margin > 0
    assert os.path.getsize(tmp_path / "c.sqlite") > 0
