"""The audit screen: the registry's event stream, newest first, live and filterable.

The history is one ListModelEvents call, newest first; live events come from WatchModelEvents as server-sent events,
after the newest event the history shows, so nothing is missed or shown twice. Filters (model, event type, actor) are
the registry's: both RPCs get the same `model` and `filter`, so a live match after the history's newest is one the
history did not have."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from aiohttp import web

from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc

from .gateway import Gateway
from .lineage import judge_label
from .web import Event, _gateway, _render, _ts, project_key, sse

HISTORY = 200  # rows the page opens with
EVENT_TYPES = {name.removeprefix("TYPE_").lower(): value for name, value in rpb.ModelEvent.Type.items() if value}


def type_label(value: rpb.ModelEvent.Type.ValueType) -> str:
    return rpb.ModelEvent.Type.Name(value).removeprefix("TYPE_").lower().replace("_", " ")


def _quoted(value: str) -> str:
    """A string literal of the registry's filter language."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Filter:
    model: str = ""  # model id; the RPCs' `model` field
    type: str = ""  # an EVENT_TYPES key
    actor: str = ""  # the actor exactly as the table shows it

    @classmethod
    def parse(cls, query: Any) -> Filter:
        f = cls(query.get("model", "").strip(), query.get("type", "").strip(), query.get("actor", "").strip())
        if f.type and f.type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {f.type!r}; one of: {', '.join(EVENT_TYPES)}")
        return f

    def text(self) -> str:
        """The RPCs' `filter`: the event type and the actor."""
        parts = [f"type = {rpb.ModelEvent.Type.Name(EVENT_TYPES[self.type])}"] if self.type else []
        if self.actor:
            parts.append(f"actor = {_quoted(self.actor)}")
        return " AND ".join(parts)

    def query(self) -> str:
        return "&".join(
            f"{k}={quote(v, safe='')}" for k, v in (("model", self.model), ("type", self.type), ("actor", self.actor)) if v
        )


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


async def _filter(request: web.Request, gw: Gateway) -> tuple[Filter, str]:
    """The filter (ValueError for an unknown type) and the model's full name; an unknown model is the registry's
    NOT_FOUND."""
    f = Filter.parse(request.query)
    model = f"projects/{request.app[project_key]}/models/{f.model}" if f.model else ""
    if model:
        await gw.get_model(model)
    return f, model


async def audit(request: web.Request) -> web.Response:
    gw = await _gateway(request)
    try:
        f, model = await _filter(request, gw)
    except ValueError as exc:
        return _render(request, "error.html", status=400, code="INVALID_ARGUMENT", message=str(exc), reason="", violations=[])
    history = rsvc.ListModelEventsRequest(
        parent=f"projects/{gw.project}", model=model, filter=f.text(), order_by="sequence desc", page_size=HISTORY
    )
    events = (await gw.registry.ListModelEvents(history)).events
    # Nothing matches yet: the live stream starts at the beginning and sends any match (the registry reads only those).
    newest = events[0].sequence if events else 0
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
        rsvc.WatchModelEventsRequest(parent=f"projects/{project}", model=model, after_sequence=after, filter=f.text())
    )

    async def events() -> AsyncGenerator[Event, None]:
        try:
            async for message in call:
                yield Event("audit", event_row(message.event, project), message.event.sequence)
            yield Event("failure", {"code": "UNAVAILABLE", "reason": "", "message": "the registry ended the stream"})
        finally:
            call.cancel()  # now, not at garbage collection: ends the WatchModelEvents call on the registry

    return await sse(request, "audit", events())


def routes(app: web.Application) -> None:
    app.router.add_get("/audit", audit)
    app.router.add_get("/audit/events", audit_events)
