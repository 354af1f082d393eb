"""`GET /metrics` on a local deployment's router (its own metrics port, not the API port): every ready replica's
metrics in one exposition, each sample labelled with its replica, parsed back with prometheus_client's own parser."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from helpers import start_http_app
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from neuroweaver_deployer.adapters.router import Router, Upstream, merge_expositions
from neuroweaver_runtime.testing import free_port


def replica_registry(requests: int, queue: float) -> CollectorRegistry:
    """What a model server exports, in miniature: a labelled counter, a histogram and a plain gauge."""
    registry = CollectorRegistry()
    counter = Counter("nw_requests", "Requests.", ["method", "code"], registry=registry)
    counter.labels("Generate", "OK").inc(requests)
    counter.labels("Generate", "INVALID_ARGUMENT").inc(1)
    latency = Histogram("nw_latency_seconds", "Latency.", buckets=(0.1, 1.0), registry=registry)
    for _ in range(requests):
        latency.observe(0.05)
    Gauge("nw_queue_depth", "Queued requests.", registry=registry).set(queue)
    return registry


def samples_by_replica(text: str) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            replica = labels.pop("replica")
            out.setdefault(replica, {})[(s.name, tuple(sorted(labels.items())))] = s.value
    return out


def test_merge_keeps_each_family_once_and_labels_every_sample():
    a, b = generate_latest(replica_registry(3, 2.0)).decode(), generate_latest(replica_registry(5, 0.0)).decode()
    merged = merge_expositions([("127.0.0.1:1111", a), ("127.0.0.1:2222", b)])

    names = [f.name for f in text_string_to_metric_families(merged)]
    assert len(names) == len(set(names)), names  # no family split in two (samples stay contiguous)
    assert {"nw_requests", "nw_latency_seconds", "nw_queue_depth"} <= set(names)
    assert merged.count("# HELP nw_requests_total") == 1 and merged.count("# TYPE nw_latency_seconds histogram") == 1

    by_replica = samples_by_replica(merged)
    assert set(by_replica) == {"127.0.0.1:1111", "127.0.0.1:2222"}
    ok = ("nw_requests_total", (("code", "OK"), ("method", "Generate")))
    assert by_replica["127.0.0.1:1111"][ok] == 3 and by_replica["127.0.0.1:2222"][ok] == 5
    assert by_replica["127.0.0.1:1111"][("nw_queue_depth", ())] == 2.0
    assert by_replica["127.0.0.1:2222"][("nw_latency_seconds_count", ())] == 5
    # every sample of each replica survived, with its own value
    for replica, text in (("127.0.0.1:1111", a), ("127.0.0.1:2222", b)):
        alone = {
            (s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples
        }
        assert by_replica[replica] == alone


def test_merge_escapes_the_label_value():
    merged = merge_expositions([('odd"\\name', "# TYPE up gauge\nup 1\n")])
    assert merged == '# TYPE up gauge\nup{replica="odd\\"\\\\name"} 1\n'
    assert samples_by_replica(merged) == {'odd"\\name': {("up", ()): 1.0}}


async def _replica_site(registry: CollectorRegistry) -> tuple[object, str]:
    async def metrics(_request):
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner, port = await start_http_app(app)
    return runner, f"http://127.0.0.1:{port}"


async def test_router_serves_all_ready_replicas_and_skips_one_that_does_not_answer():
    runners, upstreams = [], []
    for i, (requests, queue) in enumerate(((3, 2.0), (5, 0.0))):
        runner, url = await _replica_site(replica_registry(requests, queue))
        runners.append(runner)
        upstreams.append(Upstream(grpc_address=f"127.0.0.1:{5000 + i}", http_url=url, metrics_url=url + "/metrics"))
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens
    gone = Upstream(grpc_address="127.0.0.1:5002", http_url=nowhere, metrics_url=nowhere + "/metrics")
    router = Router()
    await router.start()
    try:
        metrics_url = router.metrics_url
        assert router.metrics_port not in (router.http_port, router.grpc_port)
        async with aiohttp.ClientSession() as http:
            async with http.get(metrics_url) as resp:  # no ready replica yet
                assert resp.status == 503

            await router.set_upstreams([*upstreams, gone])
            async with http.get(metrics_url) as resp:
                assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                by_replica = samples_by_replica(await resp.text())
            assert set(by_replica) == {"127.0.0.1:5000", "127.0.0.1:5001"}
            assert by_replica["127.0.0.1:5001"][("nw_requests_total", (("code", "OK"), ("method", "Generate")))] == 5

            await router.set_upstreams([gone])
            async with http.get(metrics_url) as resp:
                assert resp.status == 503 and "no replica answered" in await resp.text()
    finally:
        await router.stop()
        for runner in runners:
            await runner.cleanup()


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_merge_of_empty_expositions_is_empty(text):
    assert merge_expositions([("r", text)]) == ""
