"""Local evaluation of experiments: AssignVariant's answer computed in-process, exposures and metric events sent back
asynchronously in batches.

    async with Clients(Endpoints.from_env()) as nw:
        async with LocalExperiments(nw.experiments, project="default") as experiments:
            a = await experiments.assign("projects/default/experiments/advisor-ab", "user-42")
            reply = call_model(a.endpoint, a.model)
            await experiments.track(a.experiment, "user-42", "latency_ms", 812.0, idempotency_key="req-1")

How it stays the server's answer. A background `WatchExperimentConfigs` keeps every RUNNING experiment's config (seed,
coverage, variants and every weight phase); evaluation uses the server's own code (`neuroweaver_runtime.assignment
.PhasedPlan`). For a unit:
1. a unit this SDK already exposed (or found in the shared `sticky_store` you pass) keeps its variant;
2. a unit whose bucket is *ambiguous* (an earlier phase covered it with another answer than the current phase, so
   another evaluator may have exposed it then) is asked of the server (`AssignVariant`, which records the exposure);
3. otherwise the current phase decides locally: outside the coverage -> the control, no exposure; inside -> a first
   exposure, queued for `IngestEvents` with the phase it was evaluated in.

Delivery. Exposures and `track`ed events wait in one bounded queue (`max_queue` items; `assign`/`track` wait for room
when it is full, so memory stays bounded and nothing is dropped silently). A sender task streams them in batches
(`batch_size`, or whatever is queued every `flush_interval` seconds) over `IngestEvents` and keeps every batch until
the server acknowledges it (after its commit). When the stream breaks (server restart, network) it reconnects with
exponential backoff and resends the unacknowledged batches; the server counts each exposure once per unit and each
event once per idempotency key (`track` makes one when you pass none), so nothing acknowledged is lost and nothing is
counted twice. When the server refuses a batch because one experiment is no longer running (FAILED_PRECONDITION or
NOT_FOUND naming it), only that experiment's items are dropped and the rest is resent; from a batch refused as
invalid (INVALID_ARGUMENT) the items the error names (`exposures[i]`, `events[i]`: e.g. an event of a unit never
exposed) are dropped and the rest is resent (a batch whose error names no item is dropped). Either way
`stats.rejected` keeps the count and the error. `flush()` waits until everything queued so far is acknowledged;
`close()` flushes (bounded by `close_timeout`) and stops.

Consistency bounds (what is not covered): between a weight change and the SDK receiving it (one watch poll, ~0.25 s),
the SDK still evaluates with the old phase; and an exposure reaches the server only when its batch is acknowledged,
so for that window another evaluator (AssignVariant, another SDK) may assign the same unit differently in an ambiguous
bucket. The server keeps the first stored answer and returns the other as a conflict: the SDK then serves the stored
variant from its sticky cache (`conflicts` counts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from google.protobuf import timestamp_pb2

from neuroweaver.experiments.v1 import experiment_pb2 as epb
from neuroweaver.experiments.v1 import experiments_service_pb2 as esvc
from neuroweaver_runtime.assignment import PhasedPlan
from neuroweaver_runtime.grpc_errors import error_info, field_violations

log = logging.getLogger(__name__)

_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}
# Refusals naming an experiment that is no longer running (or no longer exists): only its items are dropped.
_EXPERIMENT_GONE = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}
MAX_SERVER_BATCH = 10_000  # the server's limit per batch for exposures and for events


_ITEM = re.compile(r"^(exposures|events)\[(\d+)\]")


def _bad_items(exc: grpc.aio.AioRpcError) -> tuple[set[int], set[int]] | None:
    """The exposures and events an INVALID_ARGUMENT names in its field violations (None when it names none)."""
    exposures: set[int] = set()
    events: set[int] = set()
    for v in field_violations(exc):
        m = _ITEM.match(v.field)
        if m:
            (exposures if m.group(1) == "exposures" else events).add(int(m.group(2)))
    return (exposures, events) if exposures or events else None


class StickyStore(Protocol):
    """A sticky store shared by all evaluators (e.g. Redis): consulted before the server for ambiguous buckets and
    written with each local first exposure."""

    async def get(self, experiment: str, unit_id: str) -> str | None: ...
    async def put(self, experiment: str, unit_id: str, variant: str) -> None: ...


@dataclass(frozen=True, slots=True)
class LocalAssignment:
    experiment: str
    unit_id: str
    variant: str
    model: str
    endpoint: str
    openai_base_url: str
    in_experiment: bool
    bucket: int
    source: str  # "local" (current phase), "sticky" (exposed before), "server" (asked AssignVariant)


class _Config:
    __slots__ = ("config", "plan", "ids", "variants", "epoch", "sticky")

    def __init__(self, config: epb.ExperimentConfig, sticky: dict[str, str]) -> None:
        self.config = config
        self.plan = PhasedPlan(config.hash_seed, [list(p.weights) for p in config.phases], config.coverage)
        self.epoch = config.phases[-1].epoch
        self.ids = [v.id for v in config.variants]
        self.variants = {v.id: v for v in config.variants}
        self.sticky = sticky  # unit -> variant of units this SDK exposed or learned (kept across config updates)


@dataclass
class DeliveryStats:
    exposures_queued: int = 0
    events_queued: int = 0
    exposures_accepted: int = 0
    exposures_duplicate: int = 0
    events_accepted: int = 0
    events_duplicate: int = 0
    conflicts: int = 0
    batches_acked: int = 0
    reconnects: int = 0
    server_assignments: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (items dropped, error) of refused batches


class LocalExperiments:
    def __init__(
        self,
        stub: Any,
        project: str = "default",
        *,
        sticky_store: StickyStore | None = None,
        max_queue: int = 200_000,
        batch_size: int = 5_000,
        flush_interval: float = 0.05,
        max_sticky: int = 2_000_000,
        backoff: tuple[float, float] = (0.1, 5.0),
        close_timeout: float = 30.0,
        ack_timeout: float = 15.0,
    ) -> None:
        self.stub = stub
        self.parent = f"projects/{project}"
        self.store = sticky_store
        self.max_queue = max_queue
        self.batch_size = min(batch_size, MAX_SERVER_BATCH)
        self.flush_interval = flush_interval
        self.max_sticky = max_sticky
        self.backoff = backoff
        self.close_timeout = close_timeout
        self.ack_timeout = ack_timeout
        self._stream: object | None = None
        self._progress = 0.0
        self.version = 0
        self.stats = DeliveryStats()
        self._configs: dict[str, _Config] = {}
        self._sticky: dict[str, dict[str, str]] = {}  # experiment -> unit -> variant
        self._sticky_size = 0
        # (sequence number, item): an exposure as (experiment, unit, variant, epoch), built into the batch's message
        # only when sent (one protobuf construction instead of two)
        self._queue: deque[tuple[int, tuple[str, str, str, int] | epb.MetricEvent]] = deque()
        self._seq = 0  # items queued so far
        self._unacked: dict[int, tuple[int, esvc.IngestEventsRequest]] = {}  # batch id -> (first seq, batch), sent order
        self._held = 0  # items queued or in unacknowledged batches
        self._batch_ids = itertools.count(1)
        self._room = asyncio.Event()
        self._room.set()
        self._work = asyncio.Event()
        self._acked = asyncio.Condition()
        self._config_changed = asyncio.Condition()
        self._first_config = asyncio.Event()
        self._watch_refused = asyncio.Event()
        self._watch_error: grpc.aio.AioRpcError | None = None
        self._tasks: list[asyncio.Task] = []
        self._closing = False

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> LocalExperiments:
        """Starts the watch and the sender; waits for the first config snapshot (TimeoutError after `timeout`). A watch
        the server refuses before any snapshot (PERMISSION_DENIED, INVALID_ARGUMENT, ...) raises that error here."""
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._send())]
        first = asyncio.ensure_future(self._first_config.wait())
        refused = asyncio.ensure_future(self._watch_refused.wait())
        try:
            await asyncio.wait({first, refused}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            first.cancel()
            refused.cancel()
        if self._first_config.is_set():
            return self
        if self._watch_error is not None:
            await self.close()
            raise self._watch_error
        raise TimeoutError(f"no experiment configs from the server after {timeout} s")

    async def __aenter__(self) -> LocalExperiments:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Flushes what is queued (up to `close_timeout` seconds), then stops the watch and the sender."""
        if self._closing:
            return
        try:
            await asyncio.wait_for(self.flush(), self.close_timeout)
        except TimeoutError:
            log.warning("LocalExperiments.close: %d items not acknowledged after %.0f s", self._held, self.close_timeout)
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks = []

    # -- configs --------------------------------------------------------------------------------------------

    def experiments(self) -> list[str]:
        return sorted(self._configs)

    def config(self, experiment: str) -> epb.ExperimentConfig | None:
        held = self._configs.get(experiment)
        return held.config if held else None

    def variant(self, experiment: str, variant_id: str) -> epb.Variant:
        """The variant as the config holds it (id, model, endpoint, openai_base_url, weight): what AssignVariant's
        reply carries. KeyError when the experiment or the variant is unknown."""
        return self._configs[experiment].variants[variant_id]

    async def wait_for_config(self, predicate: Callable[[LocalExperiments], bool], timeout: float = 10.0) -> None:
        """Waits until `predicate(self)` holds after a config update (e.g. a new phase was received)."""

        async def wait() -> None:
            async with self._config_changed:
                await self._config_changed.wait_for(lambda: predicate(self))

        await asyncio.wait_for(wait(), timeout)

    async def _watch(self) -> None:
        delay = self.backoff[0]
        while True:
            try:
                request = esvc.WatchExperimentConfigsRequest(parent=self.parent, since_version=self.version)
                async for resp in self.stub.WatchExperimentConfigs(request):
                    self._apply(resp)
                    delay = self.backoff[0]
                    async with self._config_changed:
                        self._config_changed.notify_all()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRYABLE:
                    log.error("experiment config watch refused (%s): %s; retrying", exc.code().name, exc.details())
                    if not self._first_config.is_set():
                        self._watch_error = exc
                        self._watch_refused.set()
            except Exception:  # noqa: BLE001 - keep watching whatever happened
                log.exception("experiment config watch failed; retrying")
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter: replicas of a client do not retry in step
            delay = min(delay * 2, self.backoff[1])

    def _apply(self, resp: esvc.WatchExperimentConfigsResponse) -> None:
        if resp.snapshot:
            keep = {c.experiment for c in resp.configs}
            for name in list(self._configs):
                if name not in keep:
                    del self._configs[name]
        for name in resp.removed:
            self._configs.pop(name, None)
        for c in resp.configs:
            held = self._configs.get(c.experiment)
            if held is None or held.config.revision < c.revision or resp.snapshot:
                self._configs[c.experiment] = _Config(c, self._sticky.setdefault(c.experiment, {}))
        self.version = resp.version
        self._first_config.set()

    # -- evaluation -----------------------------------------------------------------------------------------

    def _result(self, held: _Config, unit: str, variant: str, in_experiment: bool, bucket: int, source: str) -> LocalAssignment:
        v = held.variants[variant]
        return LocalAssignment(
            held.config.experiment, unit, variant, v.model, v.endpoint, v.openai_base_url, in_experiment, bucket, source
        )

    def _remember(self, held: _Config, unit: str, variant: str) -> None:
        if self._sticky_size >= self.max_sticky:
            for units in self._sticky.values():
                units.clear()  # safe: outside ambiguous buckets the current phase gives the same answer
            self._sticky_size = 0
        held.sticky[unit] = variant
        self._sticky_size += 1

    async def assign(self, experiment: str, unit_id: str) -> LocalAssignment:
        """AssignVariant's answer for `unit_id`, computed locally (asks the server only for ambiguous buckets).
        KeyError when the experiment is not running (not in the current configs)."""
        held = self._configs.get(experiment)
        if held is None:
            raise KeyError(f"experiment {experiment} is not running (or not in project {self.parent})")
        if not unit_id or len(unit_id) > 256:
            raise ValueError("unit_id must be 1-256 characters")
        bucket, index, ambiguous = held.plan.evaluate(unit_id)
        stored = held.sticky.get(unit_id)
        if stored is not None and stored in held.variants:
            return self._result(held, unit_id, stored, True, bucket, "sticky")
        if ambiguous:
            if self.store is not None and (shared := await self.store.get(experiment, unit_id)) is not None:
                if shared in held.variants:
                    self._remember(held, unit_id, shared)
                    return self._result(held, unit_id, shared, True, bucket, "sticky")
            reply = await self.stub.AssignVariant(esvc.AssignVariantRequest(experiment=experiment, unit_id=unit_id))
            self.stats.server_assignments += 1
            if reply.in_experiment:
                self._remember(held, unit_id, reply.variant.id)
                if self.store is not None:
                    await self.store.put(experiment, unit_id, reply.variant.id)
            return self._result(held, unit_id, reply.variant.id, reply.in_experiment, reply.bucket, "server")
        if index is None:
            return self._result(held, unit_id, held.ids[0], False, bucket, "local")
        variant = held.ids[index]
        self._remember(held, unit_id, variant)
        if self.store is not None:
            await self.store.put(experiment, unit_id, variant)
        await self._enqueue((experiment, unit_id, variant, held.epoch))
        self.stats.exposures_queued += 1
        return self._result(held, unit_id, variant, True, bucket, "local")

    # -- events ---------------------------------------------------------------------------------------------

    async def track(
        self,
        experiment: str,
        unit_id: str,
        metric: str,
        value: float,
        *,
        idempotency_key: str | None = None,
        event_time: float | None = None,
        covariate: float | None = None,
    ) -> str:
        """Queues a metric event; returns its idempotency key (a new UUID when none is given), which makes a resend
        after a reconnect count once."""
        key = idempotency_key or uuid.uuid4().hex
        event = epb.MetricEvent(experiment=experiment, unit_id=unit_id, metric=metric, value=value, idempotency_key=key)
        if event_time is not None:
            ts = timestamp_pb2.Timestamp()
            ts.FromNanoseconds(int(event_time * 1e9))
            event.event_time.CopyFrom(ts)
        if covariate is not None:
            event.covariate = covariate
        await self._enqueue(event)
        self.stats.events_queued += 1
        return key

    async def _enqueue(self, item: tuple[str, str, str, int] | epb.MetricEvent) -> None:
        while self._held >= self.max_queue:
            self._room.clear()
            await self._room.wait()
        self._seq += 1
        self._queue.append((self._seq, item))
        self._held += 1
        if len(self._queue) >= self.batch_size:
            self._work.set()

    @property
    def pending(self) -> int:
        """Items queued or sent but not acknowledged yet."""
        return self._held

    def _lowest_pending(self) -> int:
        """The sequence number of the oldest item not acknowledged yet (batches are acknowledged out of order only
        when one is refused)."""
        firsts = [first for first, _ in self._unacked.values()]
        if self._queue:
            firsts.append(self._queue[0][0])
        return min(firsts, default=self._seq + 1)

    async def flush(self) -> None:
        """Waits until everything queued before this call is acknowledged by the server (or refused as invalid)."""
        target = self._seq
        self._work.set()
        async with self._acked:
            await self._acked.wait_for(lambda: self._lowest_pending() > target)

    # -- sender ---------------------------------------------------------------------------------------------

    def _next_batch(self) -> esvc.IngestEventsRequest | None:
        if not self._queue:
            return None
        first = self._queue[0][0]
        batch = esvc.IngestEventsRequest(batch_id=next(self._batch_ids))
        add_exposure, events = batch.exposures.add, batch.events
        queue, limit = self._queue, self.batch_size
        exposures = n_events = 0
        while queue and exposures < limit and n_events < limit:
            _, item = queue.popleft()
            if isinstance(item, tuple):
                add_exposure(experiment=item[0], unit_id=item[1], variant=item[2], epoch=item[3])
                exposures += 1
            else:
                events.append(item)
                n_events += 1
        self._unacked[batch.batch_id] = (first, batch)
        return batch

    async def _requests(self, stream: object) -> AsyncIterator[esvc.IngestEventsRequest]:
        """The batches of one stream: first the unacknowledged ones, in order, then new ones. Only the current
        stream's iterator takes items from the queue (a broken stream's iterator may still be polled once)."""
        for _, batch in list(self._unacked.values()):
            if self._stream is not stream:
                return
            yield batch
        while self._stream is stream:
            fresh = self._next_batch()
            if fresh is not None:
                if len(self._unacked) == 1:
                    self._progress = time.monotonic()
                yield fresh
                continue
            self._work.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._work.wait(), self.flush_interval)

    async def _read(self, call) -> None:
        async for ack in call:
            await self._on_ack(ack)

    async def _send(self) -> None:
        delay = self.backoff[0]
        while True:
            stream = self._stream = object()
            self._progress = time.monotonic()
            call = self.stub.IngestEvents(self._requests(stream))
            reader = asyncio.ensure_future(self._read(call))
            try:
                while not reader.done():  # watchdog: a stream that stops acknowledging is replaced
                    await asyncio.wait({reader}, timeout=min(1.0, self.ack_timeout))
                    if not reader.done() and self._unacked and time.monotonic() - self._progress > self.ack_timeout:
                        log.warning("IngestEvents: no acknowledgement for %.0f s; reconnecting", self.ack_timeout)
                        break
                if reader.done():
                    reader.result()  # the stream's error, if any
                    delay = self.backoff[0]
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                info = error_info(exc)
                bad = info.metadata.get("batch_id") if info is not None else None
                if exc.code() in _RETRYABLE or bad is None or int(bad) not in self._unacked:
                    log.info("IngestEvents stream broke (%s); %d batches to resend", exc.code().name, len(self._unacked))
                else:
                    gone = info.metadata.get("experiment") if info is not None else None
                    items = _bad_items(exc) if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else None
                    if exc.code() in _EXPERIMENT_GONE and gone:  # only that experiment's items; the rest is resent
                        n = self._drop(int(bad), experiment=gone)
                    elif items:  # only the items the server named (it names at most 100 at a time)
                        n = self._drop(int(bad), named=items)
                    else:
                        _, dropped = self._unacked.pop(int(bad))
                        n = len(dropped.exposures) + len(dropped.events)
                    self.stats.rejected.append((n, f"{exc.code().name}: {exc.details()}"))
                    log.error("IngestEvents refused %d items of batch %s: %s", n, bad, exc.details())
                    self._release(n)
                    async with self._acked:
                        self._acked.notify_all()
                    delay = 0.0  # a refused batch is no outage: resend the others at once
            except Exception:  # noqa: BLE001 - keep sending whatever happened
                log.exception("IngestEvents stream failed")
            finally:
                self._stream = None
                if not reader.done():
                    call.cancel()
                    reader.cancel()
                    with contextlib.suppress(BaseException):
                        await reader
            self.stats.reconnects += 1
            if delay:
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(max(delay, self.backoff[0]) * 2, self.backoff[1])

    def _drop(self, batch_id: int, *, experiment: str | None = None, named: tuple[set[int], set[int]] | None = None) -> int:
        """Removes items from an unacknowledged batch: those of `experiment`, and the indices in `named` (exposures,
        events); the batch keeps its place with the rest. Returns how many were removed."""
        first, batch = self._unacked[batch_id]
        bad_x, bad_e = named or (set(), set())
        kept = esvc.IngestEventsRequest(
            batch_id=batch_id,
            exposures=[x for i, x in enumerate(batch.exposures) if i not in bad_x and x.experiment != experiment],
            events=[e for i, e in enumerate(batch.events) if i not in bad_e and e.experiment != experiment],
        )
        removed = len(batch.exposures) + len(batch.events) - len(kept.exposures) - len(kept.events)
        if kept.exposures or kept.events:
            self._unacked[batch_id] = (first, kept)
        else:
            del self._unacked[batch_id]
        return removed

    def _release(self, n: int) -> None:
        self._held -= n
        if self._held < self.max_queue:
            self._room.set()

    async def _on_ack(self, ack: esvc.IngestEventsResponse) -> None:
        sent = self._unacked.pop(ack.batch_id, None)
        if sent is None:
            return
        self._progress = time.monotonic()
        batch = sent[1]
        s = self.stats
        s.batches_acked += 1
        s.exposures_accepted += ack.exposures_accepted
        s.exposures_duplicate += ack.exposures_duplicate
        s.events_accepted += ack.events_accepted
        s.events_duplicate += ack.events_duplicate
        for c in ack.conflicts:  # another evaluator exposed the unit first: serve what the server stored
            s.conflicts += 1
            held = self._configs.get(c.experiment)
            if held is not None and c.stored_variant in held.variants:
                held.sticky[c.unit_id] = c.stored_variant
            if self.store is not None:
                await self.store.put(c.experiment, c.unit_id, c.stored_variant)
        self._release(len(batch.exposures) + len(batch.events))
        async with self._acked:
            self._acked.notify_all()
