"""Live performance of a deployment, computed from samples of the model server's Prometheus metrics: pure
arithmetic, no I/O (the adapters scrape replicas or query Prometheus).

A `Sample` is one scrape of one replica reduced to what performance needs; its counters are cumulative since the
replica started. Performance over a window is the difference of two samples (reset-aware, as Prometheus'
`increase`), divided by the span they cover; quantiles come from the histogram bucket differences with
`histogram_quantile`, a line-for-line port of Prometheus' `bucketQuantile` (promql/quantile.go).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from neuroweaver_runtime.errors import InvalidArgument

MIN_WINDOW_SECONDS = 1
MAX_WINDOW_SECONDS = 3600
DEFAULT_WINDOW_SECONDS = 60
QUANTILES = (0.5, 0.95, 0.99)

# Outcomes of the model server's `code` label: success, and the server errors the error-ratio alert counts
# (neuroweaver_kube.metrics.SERVER_ERROR_CODES_REGEX, as a set of names plus HTTP 5xx).
SUCCESS_CODES = frozenset({"OK", "200"})
SERVER_ERROR_CODES = frozenset({"Unknown", "Internal", "Unavailable", "DeadlineExceeded", "DataLoss", "ResourceExhausted"})


def is_server_error(code: str) -> bool:
    return code in SERVER_ERROR_CODES or (len(code) == 3 and code.startswith("5") and code.isdigit())


def validate_window(seconds: float | None) -> float:
    """The window a caller asked for (None = the default): whole seconds within the bounds, else INVALID_ARGUMENT."""
    if seconds is None:
        return float(DEFAULT_WINDOW_SECONDS)
    if not (MIN_WINDOW_SECONDS <= seconds <= MAX_WINDOW_SECONDS) or seconds != int(seconds):
        raise InvalidArgument(
            f"window must be whole seconds from {MIN_WINDOW_SECONDS} s to {MAX_WINDOW_SECONDS} s (got {seconds:g} s)",
            field="window",
            reason="INVALID_WINDOW",
        )
    return float(seconds)


# -- histogram_quantile ---------------------------------------------------------------------------------------


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over (upper bound, cumulative count) pairs: NaN without observations or
    without a +Inf bucket; linear interpolation inside the bucket holding the rank (the first bucket starts at 0);
    a rank in the +Inf bucket answers the highest finite bound."""
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    bs = sorted(buckets)
    if not bs or not math.isinf(bs[-1][0]):
        return math.nan
    bs = _coalesce(bs)
    _ensure_monotonic(bs)
    if len(bs) < 2:
        return math.nan
    observations = bs[-1][1]
    if observations == 0:
        return math.nan
    rank = q * observations
    b = next((i for i in range(len(bs) - 1) if bs[i][1] >= rank), len(bs) - 1)
    if b == len(bs) - 1:
        return bs[-2][0]
    if b == 0 and bs[0][0] <= 0:
        return bs[0][0]
    start, end, count = 0.0, bs[b][0], bs[b][1]
    if b > 0:
        start = bs[b - 1][0]
        count -= bs[b - 1][1]
        rank -= bs[b - 1][1]
    return start + (end - start) * (rank / count)


def _coalesce(bs: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for upper, count in bs:
        if out and out[-1][0] == upper:
            out[-1][1] += count
        else:
            out.append([upper, count])
    return [(u, c) for u, c in out]


def _ensure_monotonic(bs: list[tuple[float, float]]) -> None:
    highest = -math.inf
    for i, (upper, count) in enumerate(bs):
        if count > highest:
            highest = count
        elif count < highest:
            bs[i] = (upper, highest)


# -- samples ------------------------------------------------------------------------------------------------------


Histogram = tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ascending, +Inf last


@dataclass(frozen=True)
class Sample:
    """One scrape of one replica. Counters are cumulative since the replica started; gauges are as of `time`."""

    time: float  # wall-clock seconds (time.time())
    requests: float = 0.0
    errors: float = 0.0
    server_errors: float = 0.0
    output_tokens: float = 0.0
    latency: Histogram = ()
    ttft: Histogram = ()
    queue_depth: float = 0.0
    inflight: float = 0.0

    @classmethod
    def zero(cls, time: float) -> Sample:
        """A replica at its start: every counter 0 (nothing was counted before the process existed)."""
        return cls(time)


def _counter_increase(values: Sequence[float]) -> float:
    """Prometheus `increase` without extrapolation: a value below its predecessor is a reset (counts from 0)."""
    total = 0.0
    for before, after in zip(values, values[1:], strict=False):
        total += after - before if after >= before else after
    return total


def _histogram_increase(hists: Sequence[Histogram]) -> Histogram:
    """Bucket-wise increase; a histogram whose +Inf count fell was reset (its buckets count from 0)."""
    bounds = sorted({upper for h in hists for upper, _ in h})
    if not bounds:
        return ()
    maps = [dict(h) for h in hists]
    out = dict.fromkeys(bounds, 0.0)
    for before, after in zip(maps, maps[1:], strict=False):
        reset = after.get(math.inf, 0.0) < before.get(math.inf, 0.0)
        for upper in bounds:
            a = after.get(upper, 0.0)
            out[upper] += a if reset else max(0.0, a - before.get(upper, 0.0))
    return tuple(out.items())


@dataclass
class Stats:
    """Performance over a span (PerformanceStats in the API). Quantiles are None without finished requests."""

    requests_per_second: float = 0.0
    requests: float = 0.0
    latency: dict[float, float | None] = field(default_factory=lambda: dict.fromkeys(QUANTILES))
    ttft: dict[float, float | None] = field(default_factory=lambda: dict.fromkeys(QUANTILES))
    output_tokens_per_second: float = 0.0
    error_rate: float | None = None
    server_error_rate: float | None = None
    queue_depth: float = 0.0
    inflight_requests: float = 0.0


@dataclass
class Delta:
    """What happened between two samples of one replica (or several replicas added up)."""

    seconds: float
    requests: float = 0.0
    errors: float = 0.0
    server_errors: float = 0.0
    output_tokens: float = 0.0
    latency: Histogram = ()
    ttft: Histogram = ()
    queue_depth: float = 0.0
    inflight: float = 0.0

    def stats(self) -> Stats:
        s = Stats(requests=self.requests, queue_depth=self.queue_depth, inflight_requests=self.inflight)
        if self.seconds > 0:
            s.requests_per_second = self.requests / self.seconds
            s.output_tokens_per_second = self.output_tokens / self.seconds
        if self.requests > 0:
            s.error_rate = self.errors / self.requests
            s.server_error_rate = self.server_errors / self.requests
        s.latency = {q: _finite(histogram_quantile(q, self.latency)) for q in QUANTILES}
        s.ttft = {q: _finite(histogram_quantile(q, self.ttft)) for q in QUANTILES}
        return s


def _finite(x: float) -> float | None:
    return None if math.isnan(x) or math.isinf(x) else x


def delta(samples: Sequence[Sample]) -> Delta:
    """From the first to the last of consecutive samples of one replica; gauges from the last."""
    first, last = samples[0], samples[-1]
    return Delta(
        seconds=max(0.0, last.time - first.time),
        requests=_counter_increase([s.requests for s in samples]),
        errors=_counter_increase([s.errors for s in samples]),
        server_errors=_counter_increase([s.server_errors for s in samples]),
        output_tokens=_counter_increase([s.output_tokens for s in samples]),
        latency=_histogram_increase([s.latency for s in samples]),
        ttft=_histogram_increase([s.ttft for s in samples]),
        queue_depth=last.queue_depth,
        inflight=last.inflight,
    )


def combine(deltas: Sequence[Delta], seconds: float) -> Delta:
    """Several replicas' deltas as one (counts and gauges summed, histograms merged bucket-wise) over `seconds`:
    the total's rates are the sum of what every replica served in the window."""
    merged: dict[str, dict[float, float]] = {"latency": {}, "ttft": {}}
    for d in deltas:
        for name in merged:
            for upper, count in getattr(d, name):
                merged[name][upper] = merged[name].get(upper, 0.0) + count
    return Delta(
        seconds=seconds,
        requests=sum(d.requests for d in deltas),
        errors=sum(d.errors for d in deltas),
        server_errors=sum(d.server_errors for d in deltas),
        output_tokens=sum(d.output_tokens for d in deltas),
        latency=tuple(sorted(merged["latency"].items())),
        ttft=tuple(sorted(merged["ttft"].items())),
        queue_depth=sum(d.queue_depth for d in deltas),
        inflight=sum(d.inflight for d in deltas),
    )


class SampleRing:
    """The recent samples of one replica, oldest first, bounded: at most `capacity` samples, and samples closer
    than `min_spacing` seconds to the newest kept replace it (so frequent on-demand scrapes cannot crowd out the
    history a long window needs)."""

    def __init__(self, capacity: int, min_spacing: float = 0.0) -> None:
        self.capacity = max(2, capacity)
        self.min_spacing = min_spacing
        self.samples: deque[Sample] = deque()

    def add(self, sample: Sample) -> None:
        if self.samples and sample.time < self.samples[-1].time:
            return  # out of order (a slow scrape finished after a newer one)
        if len(self.samples) >= 2 and self.samples[-1].time - self.samples[-2].time < self.min_spacing:
            self.samples[-1] = sample  # the newest is kept only once spaced from its predecessor: it moves forward
        else:
            self.samples.append(sample)
        while len(self.samples) > self.capacity:
            self.samples.popleft()

    def window(self, seconds: float) -> list[Sample]:
        """The samples from the newest one at least `seconds` before the last (or the oldest there is) to the last."""
        items = list(self.samples)
        if not items:
            return []
        cutoff = items[-1].time - seconds
        start = 0
        for i, s in enumerate(items):
            if s.time <= cutoff:
                start = i
        return items[start:]


@dataclass
class ReplicaStats:
    replica: str
    stats: Stats
    covered_seconds: float


@dataclass
class DeploymentPerformance:
    """GetDeploymentMetrics' answer in domain terms."""

    name: str
    window_seconds: float
    sample_time: float
    total: Stats
    replicas: list[ReplicaStats]
    source: str  # "replicas" | "prometheus" | "pods"


def performance_from_rings(
    name: str, window: float, source: str, replicas: Sequence[tuple[str, Sequence[Sample]]]
) -> DeploymentPerformance:
    """Per-replica and total performance from each replica's samples over the window (already cut to it)."""
    rows: list[ReplicaStats] = []
    deltas: list[Delta] = []
    newest = 0.0
    for replica, samples in replicas:
        if not samples:
            continue
        d = delta(samples)
        deltas.append(d)
        newest = max(newest, samples[-1].time)
        rows.append(ReplicaStats(replica, d.stats(), d.seconds))
    total = combine(deltas, max((d.seconds for d in deltas), default=0.0))
    # The total's rate is the sum of the replicas' rates (each over what it covered), not their counts over the
    # longest span: a replica that started within the window served at its own rate for its shorter life.
    stats = total.stats()
    stats.requests_per_second = sum(r.stats.requests_per_second for r in rows)
    stats.output_tokens_per_second = sum(r.stats.output_tokens_per_second for r in rows)
    return DeploymentPerformance(name, window, newest, stats, rows, source)
