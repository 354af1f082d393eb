"""GetDeploymentMetrics' arithmetic: histogram_quantile as Prometheus computes it, reset-aware deltas, the bounded
ring, parsing a real prometheus_client exposition, and the Prometheus source's PromQL and answer parsing (against
answers recorded in Prometheus' HTTP API format; tests/integration/test_prometheus_live.py runs a real one)."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from neuroweaver_deployer.adapters.metrics import parse_exposition
from neuroweaver_deployer.adapters.prometheus import parse_vector, queries, stats_from, total_queries
from neuroweaver_deployer.domain.metrics import (
    Sample,
    SampleRing,
    delta,
    histogram_quantile,
    performance_from_rings,
    validate_window,
)
from neuroweaver_runtime.errors import InvalidArgument

INF = math.inf
# Prometheus' own test histogram (promql/testdata/histograms.test, "positive"): 50, 70, 110, 120 cumulative.
POSITIVE = [(0.1, 50.0), (0.2, 70.0), (1.0, 110.0), (INF, 120.0)]


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (0.0, 0.0),
        (0.25, 0.1 * 30 / 50),  # rank 30 in the first bucket, interpolated from 0
        (0.5, 0.1 + 0.1 * 10 / 20),  # rank 60: 10 of the 20 in (0.1, 0.2]
        (0.8, 0.2 + 0.8 * 26 / 40),  # rank 96: 26 of the 40 in (0.2, 1]
        (0.95, 1.0),  # rank 114 lies in +Inf: the highest finite bound
        (1.0, 1.0),
        (-0.1, -INF),
        (1.1, INF),
    ],
)
def test_histogram_quantile_interpolates_like_prometheus(q, expected):
    assert histogram_quantile(q, POSITIVE) == pytest.approx(expected)


def test_histogram_quantile_edge_cases():
    assert math.isnan(histogram_quantile(0.5, []))
    assert math.isnan(histogram_quantile(0.5, [(0.1, 1.0), (1.0, 2.0)]))  # no +Inf bucket
    assert math.isnan(histogram_quantile(0.5, [(0.1, 0.0), (INF, 0.0)]))  # no observations
    assert math.isnan(histogram_quantile(0.5, [(INF, 4.0)]))  # fewer than 2 buckets
    # non-monotonic counts (a scrape racing an observation) are evened out, not answered with garbage
    assert histogram_quantile(0.5, [(0.1, 5.0), (0.2, 4.0), (INF, 10.0)]) == pytest.approx(0.1)
    # a negative first bound is answered as is
    assert histogram_quantile(0.1, [(-0.2, 1.0), (-0.1, 2.0), (0.3, 2.0), (INF, 3.0)]) == pytest.approx(-0.2)


def test_window_bounds():
    assert validate_window(None) == 60
    assert validate_window(1) == 1 and validate_window(3600) == 3600
    for bad in (0, 0.5, -5, 3601, 10.5):
        with pytest.raises(InvalidArgument) as err:
            validate_window(bad)
        assert err.value.field == "window" and err.value.reason == "INVALID_WINDOW"


def _sample(t, requests, errors=0.0, tokens=0.0, latency=(), queue=0.0):
    return Sample(t, requests, errors, 0.0, tokens, tuple(latency), (), queue, 0.0)


def test_delta_handles_a_counter_reset_and_takes_gauges_from_the_last_sample():
    d = delta(
        [
            _sample(0, 10, latency=[(0.1, 8), (INF, 10)]),
            _sample(5, 20, latency=[(0.1, 15), (INF, 20)], queue=3),
            _sample(10, 4, tokens=40, latency=[(0.1, 1), (INF, 4)], queue=1),  # restarted: counts from 0
        ]
    )
    assert d.seconds == 10 and d.requests == 10 + 4 and d.output_tokens == 40 and d.queue_depth == 1
    assert dict(d.latency) == {0.1: 7 + 1, INF: 10 + 4}
    s = d.stats()
    assert s.requests_per_second == pytest.approx(1.4) and s.output_tokens_per_second == pytest.approx(4.0)


def test_ring_is_bounded_keeps_its_spacing_and_cuts_windows():
    ring = SampleRing(capacity=5, min_spacing=2.0)
    for t in range(0, 40):  # one sample a second
        ring.add(_sample(float(t), float(t)))
    times = [s.time for s in ring.samples]
    assert len(times) == 5 and times[-1] == 39
    assert all(b - a >= 2.0 for a, b in zip(times, times[1:-1], strict=False))
    window = ring.window(4.0)
    assert window[0].time <= 35 and window[-1].time == 39
    assert ring.window(1000.0)[0].time == times[0]  # a window longer than the history: all of it
    ring.add(_sample(10.0, 1.0))  # out of order: ignored
    assert ring.samples[-1].time == 39


def test_total_sums_replica_rates_and_merges_histograms():
    a = [Sample.zero(0.0), _sample(10, 10, errors=1, tokens=100, latency=[(0.1, 10), (1.0, 10), (INF, 10)])]
    b = [Sample.zero(5.0), _sample(10, 5, tokens=50, latency=[(0.1, 0), (1.0, 5), (INF, 5)], queue=2)]
    p = performance_from_rings("d", 60.0, "replicas", [("a", a), ("b", b)])
    assert [r.replica for r in p.replicas] == ["a", "b"]
    assert p.replicas[0].covered_seconds == 10 and p.replicas[1].covered_seconds == 5
    assert p.replicas[0].stats.requests_per_second == 1.0 and p.replicas[1].stats.requests_per_second == 1.0
    assert p.total.requests_per_second == 2.0 and p.total.output_tokens_per_second == 20.0
    assert p.total.requests == 15 and p.total.error_rate == pytest.approx(1 / 15) and p.total.queue_depth == 2
    # merged buckets: 10 under 0.1, 15 under 1: the median (rank 7.5) lies in the first bucket
    assert p.total.latency[0.5] == pytest.approx(0.1 * 7.5 / 10)
    assert p.total.ttft[0.5] is None  # no TTFT observations: unset, not 0


def test_parse_exposition_of_a_model_server_registry():
    reg = CollectorRegistry()
    requests = Counter("nw_inference_requests", "", ["method", "code"], registry=reg)
    latency = Histogram("nw_inference_request_duration_seconds", "", ["method", "code"], buckets=(0.1, 1.0), registry=reg)
    ttft = Histogram("nw_inference_time_to_first_token_seconds", "", ["method"], buckets=(0.1, 1.0), registry=reg)
    tokens = Counter("nw_inference_completion_tokens", "", registry=reg)
    Gauge("nw_inference_queue_depth", "", registry=reg).set(3)
    Gauge("nw_inference_inflight_requests", "", registry=reg).set(2)
    requests.labels("Generate", "OK").inc(4)
    requests.labels("ChatCompletions", "200").inc(2)
    requests.labels("Generate", "InvalidArgument").inc(1)
    requests.labels("Generate", "Unavailable").inc(1)
    requests.labels("ChatCompletions", "503").inc(1)
    for _ in range(4):
        latency.labels("Generate", "OK").observe(0.05)
    latency.labels("ChatCompletions", "200").observe(0.5)
    latency.labels("Generate", "InvalidArgument").observe(0.0001)  # left out: not a served request
    ttft.labels("Generate").observe(0.02)
    tokens.inc(33)
    s = parse_exposition(generate_latest(reg).decode(), 12.0)
    assert (s.time, s.requests, s.errors, s.server_errors, s.output_tokens) == (12.0, 9, 3, 2, 33)
    assert dict(s.latency) == {0.1: 4, 1.0: 5, INF: 5}
    assert dict(s.ttft) == {0.1: 1, 1.0: 1, INF: 1}
    assert (s.queue_depth, s.inflight) == (3, 2)


def test_promql_names_the_deployments_series_and_groups_by_pod():
    q = queries("serving", "advisor", 60)
    assert q["requests_per_second"] == (
        'sum by (pod) (rate(nw_inference_requests_total{namespace="serving",service="advisor"}[60s]))'
    )
    assert q["latency:0.95"] == (
        "histogram_quantile(0.95, sum by (pod, le) (rate(nw_inference_request_duration_seconds_bucket"
        '{namespace="serving",service="advisor",code=~"OK|200"}[60s])))'
    )
    assert 'code=~"Unknown|Internal|Unavailable|DeadlineExceeded|DataLoss|ResourceExhausted|5.."' in q["server_errors"]
    t = total_queries(q)
    assert t["requests_per_second"].startswith("sum (rate(") and "sum by (le) (rate(" in t["ttft:0.5"]
    assert queries('a"b', "s", 5)["queue_depth"].startswith('sum by (pod) (nw_inference_queue_depth{namespace="a\\"b"')


# Answers in the shape Prometheus' HTTP API gives (GET /api/v1/query), recorded from Prometheus 2.42.
RECORDED = {
    "status": "success",
    "data": {
        "resultType": "vector",
        "result": [
            {"metric": {"pod": "advisor-7d9f-abcde"}, "value": [1765100000.123, "2.5"]},
            {"metric": {"pod": "advisor-7d9f-fghij"}, "value": [1765100000.123, "NaN"]},
        ],
    },
}


def test_parse_prometheus_answers():
    assert parse_vector(RECORDED) == {"advisor-7d9f-abcde": 2.5, "advisor-7d9f-fghij": None}
    assert parse_vector({"status": "success", "data": {"resultType": "vector", "result": []}}) == {}
    total = {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "+Inf"]}]}}
    assert parse_vector(total) == {"": None}
    with pytest.raises(ValueError, match="parse error"):
        parse_vector({"status": "error", "errorType": "bad_data", "error": "1:1: parse error: unexpected"})
    with pytest.raises(ValueError, match="vector"):
        parse_vector({"status": "success", "data": {"resultType": "matrix", "result": []}})
    s = stats_from({"requests": 10.0, "errors": 2.0, "server_errors": 1.0, "requests_per_second": 0.5, "latency:0.5": 0.2})
    assert (s.error_rate, s.server_error_rate, s.requests_per_second, s.latency[0.5], s.latency[0.99]) == (
        0.2, 0.1, 0.5, 0.2, None,
    )  # fmt: skip
    assert stats_from({}).error_rate is None
