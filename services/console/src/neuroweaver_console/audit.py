"""The audit screen: the registry's event stream, newest first, live and filterable.

The history is the newest events from ListModelEvents; live ones come from WatchModelEvents as server-sent events,
from the newest sequence the history read, so nothing is missed or shown twice. Filters: the model is the RPCs' own
`model` field; the RPCs have none for the event type and the actor, so the console applies those to what it reads
(the history keeps reading older events until it has a page of matches or reaches the start, and the live stream
forwards only matches). ListModelEvents pages oldest first, so `newest_events` finds the newest sequence by bisection
over `after_sequence` and reads backwards from it in growing windows."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import grpc
from aiohttp import web

from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc

from .gateway import Gateway
from .lineage import judge_label
from .web import SECURITY_HEADERS, _gateway, _render, _ts, project_key

HISTORY = 200  # rows the page opens with
READ_SIZE = 1000  # the registry's largest page
HEARTBEAT_SECONDS = 15.0  # a comment line on a quiet stream, so that proxies keep it open
TICK_SECONDS = 1.0  # how often a quiet stream checks that the browser is still there
EVENT_TYPES = {name.removeprefix("TYPE_").lower(): value for name, value in rpb.ModelEvent.Type.items() if value}

Fetch = Callable[[int, int], Awaitable[list[rpb.ModelEvent]]]  # (after_sequence, size) -> events, oldest first


def type_label(value: rpb.ModelEvent.Type.ValueType) -> str:
    return rpb.ModelEvent.Type.Name(value).removeprefix("TYPE_").lower().replace("_", " ")


@dataclass(frozen=True)
class Filter:
    model: str = ""  # model id; the RPCs filter by it
    type: str = ""  # an EVENT_TYPES key
    actor: str = ""  # case-insensitive substring of the actor

    @classmethod
    def parse(cls, query: Any) -> Filter:
        f = cls(query.get("model", "").strip(), query.get("type", "").strip(), query.get("actor", "").strip())
        if f.type and f.type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {f.type!r}; one of: {', '.join(EVENT_TYPES)}")
        return f

    def keep(self, event: rpb.ModelEvent) -> bool:
        if self.type and event.type != EVENT_TYPES[self.type]:
            return False
        return not self.actor or self.actor.lower() in event.actor.lower()

    def query(self) -> str:
        return "&".join(
            f"{k}={quote(v, safe='')}" for k, v in (("model", self.model), ("type", self.type), ("actor", self.actor)) if v
        )


async def newest_sequence(fetch: Fetch) -> int:
    """The newest sequence `fetch` can see, 0 for none: grow a bound until nothing is after it, then bisect. About
    2·log2(sequence) single-event reads, each an indexed lookup in the registry."""
    found = await fetch(0, 1)
    if not found:
        return 0
    known = found[0].sequence  # an event exists here
    high = known * 2  # until shown otherwise, none after here
    while found := await fetch(high, 1):
        known = found[0].sequence
        high = known * 2
    while known < high:
        mid = (known + high) // 2
        found = await fetch(mid, 1)
        if found:
            known = found[0].sequence  # the first after mid; the newest is at or after it
        else:
            high = mid
    return known


async def _between(fetch: Fetch, start: int, end: int) -> list[rpb.ModelEvent]:
    """Events with start < sequence <= end, oldest first."""
    out: list[rpb.ModelEvent] = []
    cursor = start
    while cursor < end:
        batch = await fetch(cursor, READ_SIZE)
        out.extend(e for e in batch if e.sequence <= end)
        if len(batch) < READ_SIZE or batch[-1].sequence >= end:
            break
        cursor = batch[-1].sequence
    return out


async def newest_events(fetch: Fetch, limit: int, keep: Callable[[rpb.ModelEvent], bool]) -> tuple[list[rpb.ModelEvent], int]:
    """Up to `limit` events that `keep` accepts, newest first, and the sequence the live stream continues after."""
    end = newest = await newest_sequence(fetch)
    kept: list[rpb.ModelEvent] = []
    width = limit
    while end > 0 and len(kept) < limit:
        start = max(0, end - width)
        kept = [e for e in await _between(fetch, start, end) if keep(e)] + kept
        end, width = start, width * 4  # sparse matches (a rare actor) widen the window fast
    return kept[::-1][:limit], newest


def _resource(event: rpb.ModelEvent, model_href: str) -> tuple[str, str]:
    """What in the model the event is about (a version, an alias; nothing for the model itself), and its page."""
    if event.resource == event.model:
        return "", ""
    if event.model and event.resource.startswith(event.model + "/"):
        kind, _, rest = event.resource[len(event.model) + 1 :].partition("/")
        if kind == "versions":
            return f"version {rest}", f"{model_href}/versions/{quote(rest, safe='')}" if model_href else ""
        if kind == "aliases":
            return f"alias {rest}", f"{model_href}#aliases" if model_href else ""
    parts = event.resource.split("/")
    if len(parts) in (4, 6) and parts[2] == "judges":
        return "judge " + (judge_label(event.resource) if len(parts) == 6 else parts[3]), ""
    return event.resource, ""


def event_row(event: rpb.ModelEvent, project: str) -> dict[str, Any]:
    """One event as the table shows it (the page renders it, the live stream sends it as JSON)."""
    prefix = f"projects/{project}/models/"
    model_id = event.model.removeprefix(prefix)
    model_href = f"/models/{quote(model_id, safe='')}" if event.model.startswith(prefix) else ""
    resource, resource_href = _resource(event, model_href)
    return {
        "seq": event.sequence,
        "time": _ts(event.create_time),
        "actor": event.actor,
        "type": type_label(event.type),
        "model": model_id,
        "model_href": model_href,
        "resource": resource,
        "resource_href": resource_href,
        "details": [(k, v or "–") for k, v in sorted(event.details.items())],
    }


def _fetcher(gw: Gateway, model: str) -> Fetch:
    async def fetch(after: int, size: int) -> list[rpb.ModelEvent]:
        request = rsvc.ListModelEventsRequest(parent=f"projects/{gw.project}", model=model, after_sequence=after, page_size=size)
        return list((await gw.registry.ListModelEvents(request)).events)

    return fetch


async def _filter(request: web.Request, gw: Gateway) -> tuple[Filter, str]:
    """The filter (ValueError for an unknown type) and the model's full name; an unknown model is the registry's
    NOT_FOUND."""
    f = Filter.parse(request.query)
    model = f"projects/{request.app[project_key]}/models/{f.model}" if f.model else ""
    if model:
        await gw.get_model(model)
    return f, model


def _failure(code: str, message: str) -> bytes:
    return f"event: failure\ndata: {json.dumps({'code': code, 'message': message})}\n\n".encode()


async def audit(request: web.Request) -> web.Response:
    gw = await _gateway(request)
    try:
        f, model = await _filter(request, gw)
    except ValueError as exc:
        return _render(request, "error.html", status=400, code="INVALID_ARGUMENT", message=str(exc), reason="", violations=[])
    events, newest = await newest_events(_fetcher(gw, model), HISTORY, f.keep)
    models = [m.name.rsplit("/", 1)[-1] for m in (await gw.list_models()).models]
    if f.model and f.model not in models:
        models.append(f.model)  # beyond the first page of models
    query = f.query()
    return _render(
        request,
        "audit.html",
        rows=[event_row(e, request.app[project_key]) for e in events],
        filter=f,
        models=models,
        types=[(key, type_label(value)) for key, value in EVENT_TYPES.items()],
        live=f"/audit/events?after={newest}" + (f"&{query}" if query else ""),
        limit=HISTORY,
    )


async def _forward(request: web.Request, response: web.StreamResponse, call: Any, f: Filter, project: str) -> None:
    """WatchModelEvents messages that pass the filter, as `audit` events, until the browser leaves (checked every
    TICK_SECONDS, so a closed tab does not hold a registry stream until the next event) or the registry ends the call
    (`failure`). A comment line every HEARTBEAT_SECONDS keeps proxies from closing a quiet stream."""
    loop = asyncio.get_running_loop()
    read: asyncio.Future[Any] | None = None
    written = loop.time()
    try:
        while True:
            read = read or asyncio.ensure_future(call.read())
            done, _ = await asyncio.wait({read}, timeout=TICK_SECONDS)
            if not done:
                if request.transport is None or request.transport.is_closing():
                    return
                if loop.time() - written >= HEARTBEAT_SECONDS:
                    await response.write(b": heartbeat\n\n")
                    written = loop.time()
                continue
            message, read = read.result(), None
            if message is grpc.aio.EOF:
                await response.write(_failure("UNAVAILABLE", "the registry ended the stream"))
                return
            if f.keep(message.event):
                data = json.dumps(event_row(message.event, project), separators=(",", ":"))
                await response.write(f"id: {message.event.sequence}\nevent: audit\ndata: {data}\n\n".encode())
                written = loop.time()
    except grpc.aio.AioRpcError as exc:
        await response.write(_failure(exc.code().name, exc.details() or ""))
    finally:
        if read is not None:
            read.cancel()


async def audit_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events from WatchModelEvents after `Last-Event-ID` (the browser's reconnect) or `after`, filtered
    like the page. The registry's stream never ends by itself; this one ends when the browser leaves."""
    gw = await _gateway(request)
    try:
        f, model = await _filter(request, gw)
        after = max(int(request.headers.get("Last-Event-ID") or request.query.get("after", "0")), 0)
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    project = request.app[project_key]
    call = gw.registry.WatchModelEvents(
        rsvc.WatchModelEventsRequest(parent=f"projects/{project}", model=model, after_sequence=after)
    )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **SECURITY_HEADERS})
    try:
        await response.prepare(request)
        await _forward(request, response, call, f, project)
    except ConnectionResetError:
        pass  # the browser left between two checks
    finally:
        call.cancel()  # now, not at garbage collection: ends the WatchModelEvents call on the registry
    return response


def routes(app: web.Application) -> None:
    app.router.add_get("/audit", audit)
    app.router.add_get("/audit/events", audit_events)
