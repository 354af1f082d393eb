"""The RLAIF OpenAI-compatible judge against the project's own model server (a real OpenAI-compatible endpoint).

The tiny random model cannot follow a rubric, so its verdicts are unparseable: the judge must record them as
malformed (raw text kept, no score invented) and the server must have really answered every request. Fault
injection (429/500, rate limits) is tested against a scriptable server in libs/neuroweaver-ml/tests.
"""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from neuroweaver_deployer.model_server.app import ModelServer, ModelServerConfig
from neuroweaver_ml.rlaif.judges import JudgeCache, JudgeConfig, OpenAICompatibleJudge

NAME = "judge-tiny-1-0-0-0123abcd"


@pytest.fixture(scope="module")
async def server(tiny_base, adapters):
    path, sha = adapters[0]
    s = ModelServer(
        ModelServerConfig(
            grpc_port=0, http_port=0, base_model=str(tiny_base), served_model_name=NAME,
            model_version="projects/default/models/judge/versions/1.0.0", adapter_uri=path.as_uri(), adapter_sha256=sha,
            shutdown_grace_seconds=1.0,
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
    before = await _requests_served(server.http_port)
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
        again = await judge.score("How often should I rotate tyres?", "Every 5,000-7,500 miles.", "About every 5,000 to 7,500 miles.")
    finally:
        await judge.aclose()
    assert len(verdicts) == 2
    for verdict in verdicts:
        assert verdict.score is None and verdict.malformed, verdict  # gibberish is recorded, never scored
        assert verdict.raw is not None and verdict.completion_tokens > 0  # the server really generated an answer
    assert again.cached and again.malformed  # the malformed verdict is cached: not re-sent on resume
    assert await _requests_served(server.http_port) - before == 2
