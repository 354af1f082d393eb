"""The deployer's scrape rings against real HTTP /metrics endpoints (prometheus_client expositions): a fresh scrape per
call on top of the implicit zero sample at the replica's start, a replica that stops answering keeps its last
numbers, rings of replicas that went away are dropped (bounded memory), and a local deployment this deployer
replica does not run is METRICS_ELSEWHERE."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from aiohttp import web
from helpers import start_http_app
from prometheus_client import CollectorRegistry, Counter, generate_latest

from neuroweaver_deployer.adapters.metrics import LocalMetrics, ReplicaScraper, ScrapeTarget
from neuroweaver_deployer.domain.model import Deployment
from neuroweaver_runtime.errors import FailedPrecondition
from neuroweaver_runtime.testing import free_port


async def _server(registry: CollectorRegistry):
    async def metrics(_request):
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return await start_http_app(app)


async def test_rings_follow_the_replicas(tmp_path):
    import time

    registry = CollectorRegistry()
    requests = Counter("nw_inference_requests", "", ["method", "code"], registry=registry)
    tokens = Counter("nw_inference_completion_tokens", "", registry=registry)
    runner, port = await _server(registry)
    scraper = ReplicaScraper(interval=0)
    started = time.time() - 10  # the replica started 10 s ago: its counters were 0 then
    live = ScrapeTarget("r1", f"http://127.0.0.1:{port}/metrics", started)
    nowhere = ScrapeTarget("r2", f"http://127.0.0.1:{free_port()}/metrics", started)
    try:
        requests.labels("Generate", "OK").inc(4)
        requests.labels("Generate", "Internal").inc(1)
        tokens.inc(40)
        p = await scraper.performance("d", 60, "replicas", [live, nowhere])
        # r2 never answered: no numbers, no row; r1 covers its 10 s of life (from the zero sample at its start)
        assert [r.replica for r in p.replicas] == ["r1"]
        r1 = p.replicas[0]
        assert r1.stats.requests == 5 and r1.stats.server_error_rate == pytest.approx(0.2)
        assert 10 <= r1.covered_seconds < 60 and r1.stats.output_tokens_per_second * r1.covered_seconds == pytest.approx(40)

        await runner.cleanup()  # r1 stops answering: its last numbers stay (no fresh sample)
        again = await scraper.performance("d", 60, "replicas", [live])
        assert again.replicas[0].stats.requests == 5

        assert set(scraper.rings) == {("r1", live.metrics_url, started)}
        scraper.forget_except(set())  # r1 went away: its ring goes
        assert scraper.rings == {}
    finally:
        await scraper.close()


async def test_a_local_deployment_run_by_another_deployer_replica():
    backend = SimpleNamespace(deployments={})
    source = LocalMetrics(backend, owns=lambda name: False, scraper=ReplicaScraper(interval=0))
    with pytest.raises(FailedPrecondition) as err:
        await source.performance(Deployment(name="projects/p/deployments/d"), 60)
    assert err.value.reason == "METRICS_ELSEWHERE"
    # held here but not started yet: no rows rather than an error
    source.owns = lambda name: True
    p = await source.performance(Deployment(name="projects/p/deployments/d"), 60)
    assert p.replicas == [] and p.total.requests == 0
