"""The RLAIF OpenAI-compatible judge against the project's own model server (a real OpenAI-compatible endpoint).

The tiny random model cannot follow a rubric, so its verdicts are unparseable: the judge must record them as
malformed (raw text kept, no score invented) and the server must have really answered every request. Fault
injection (429/500, rate limits) is tested against a scriptable server in libs/neuroweaver-ml/tests.
"""

from __future__ import annotations

import aiohttp
import pytest
from model_server_testkit import start_http_app
from prometheus_client.parser import text_string_to_metric_families

from neuroweaver_ml.rlaif.judges import JudgeCache, JudgeConfig, OpenAICompatibleJudge
from neuroweaver_model_server.app import ModelServer, ModelServerConfig

NAME = "judge-tiny-1-0-0-0123abcd"


@pytest.fixture(scope="module")
async def server(tiny_base, adapters):
    path, sha = adapters[0]
    s = ModelServer(
        ModelServerConfig(
            grpc_port=0, http_port=0, metrics_port=0, base_model=str(tiny_base), served_model_name=NAME,
            model_version="projects/default/models/judge/versions/1.0.0", adapter_uri=path.as_uri(), adapter_sha256=sha,
            shutdown_grace_seconds=1.0, shutdown_drain_seconds=0,
        )
    )  # fmt: skip
    await s.start()
    yield s
    await s.stop()


async def _requests_served(port: int) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "nw_inference_requests":
            total += sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels.get("code") in ("OK", "200"))
    return total


async def test_openai_judge_talks_to_the_model_server_and_never_invents_scores(server, tmp_path):
    before = await _requests_served(server.metrics_port)
    config = JudgeConfig(
        name="projects/default/judges/tiny/versions/1", kind="openai_compatible", mode="pointwise",
        base_url=f"http://127.0.0.1:{server.http_port}/v1", model=NAME, max_tokens=8, max_concurrency=2,
        requests_per_minute=600, max_retries=1,
    )  # fmt: skip
    judge = OpenAICompatibleJudge(config, cache=JudgeCache(tmp_path / "cache.sqlite"))
    try:
        verdicts = await judge.score_many(
            [("Is it safe to drive with a flashing check-engine light?", "No: stop and have it towed.", "Stop driving.")] * 1
            + [("How often should I rotate tyres?", "Every 5,000-7,500 miles.", "About every 5,000 to 7,500 miles.")]
        )
        again = await judge.score(
            "How often should I rotate tyres?", "Every 5,000-7,500 miles.", "About every 5,000 to 7,500 miles."
        )
    finally:
        await judge.aclose()
    assert len(verdicts) == 2
    for verdict in verdicts:
        assert verdict.score is None and verdict.malformed, verdict  # gibberish is recorded, never scored
        assert verdict.raw is not None and verdict.completion_tokens > 0  # the server really generated an answer
    assert again.cached and again.malformed  # the malformed verdict is cached: not re-sent on resume
    assert await _requests_served(server.metrics_port) - before == 2


async def test_retries_and_rate_limits_against_the_model_server_behind_a_fault_injecting_proxy(server, tmp_path):
    """The first two judge requests get 429 (with Retry-After) and 500 from a proxy; everything else is forwarded
    to the model server. The judge retries both, the model server answers exactly the forwarded requests, and the
    client-side request rate limit (120/min: burst 2, then one every 0.5 s) spaces the requests out."""
    from aiohttp import web

    faults = [web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "0.2"}),
              web.json_response({"error": {"message": "boom"}}, status=500)]  # fmt: skip
    seen: list[tuple[float, int]] = []
    upstream = f"http://127.0.0.1:{server.http_port}"

    async def proxy(request: web.Request) -> web.StreamResponse:
        import time

        body = await request.read()
        if faults:
            reply = faults.pop(0)
            seen.append((time.monotonic(), reply.status))
            return reply
        async with (
            aiohttp.ClientSession() as http,
            http.post(upstream + request.path, data=body, headers={"Content-Type": "application/json"}) as resp,
        ):
            payload = await resp.read()
            seen.append((time.monotonic(), resp.status))
            return web.Response(body=payload, status=resp.status, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", proxy)
    runner, port = await start_http_app(app)
    before = await _requests_served(server.metrics_port)
    judge = OpenAICompatibleJudge(
        JudgeConfig(
            name="projects/default/judges/tiny/versions/2", kind="openai_compatible", mode="pointwise",
            base_url=f"http://127.0.0.1:{port}/v1", model=NAME, max_tokens=4, max_concurrency=4,
            requests_per_minute=120, max_retries=4, backoff_base_seconds=0.05, backoff_max_seconds=0.5,
        )
    )  # fmt: skip
    try:
        verdicts = await judge.score_many([(f"Question {i}?", "An answer.", "A reference.") for i in range(3)])
    finally:
        await judge.aclose()
        await runner.cleanup()
    assert [status for _, status in seen].count(429) == 1 and [status for _, status in seen].count(500) == 1
    assert [status for _, status in seen].count(200) == 3
    assert judge.stats.retries == 2
    assert all(v.error is None and v.malformed and v.score is None for v in verdicts)  # answered, unparseable, unscored
    assert await _requests_served(server.metrics_port) - before == 3
    times = sorted(t for t, _ in seen)
    assert times[-1] - times[0] >= 0.9 * (len(times) - 2) * 0.5  # burst of 2, then 2 requests/s
