"""Audit event use cases: list (oldest or newest first, filtered) after a cursor, and watch (stored events, then live
ones)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from neuroweaver_runtime.errors import InvalidArgument
from neuroweaver_runtime.filtering import Comparison, parse_filter, parse_order_by
from neuroweaver_runtime.names import PROJECT
from neuroweaver_runtime.notify import Notifier
from neuroweaver_runtime.pagination import Page, PageTokens, page_size

from ..domain.model import EVENT_TYPES, MODEL, ModelEvent
from .base import UseCases
from .ports import UnitOfWorkFactory

EVENT_CHANNEL = "nw_registry_events"
_WATCH_BATCH = 500


def _check(parent: str, model: str, after: int) -> str:
    project = PROJECT.parse(parent, "parent")["project"]
    if model:
        MODEL.parse(model, "model")
    if after < 0:
        raise InvalidArgument("after_sequence must not be negative", field="after_sequence", reason="INVALID_CURSOR")
    return project


def _filters(text: str) -> list[Comparison]:
    """The filter's comparisons, a `type` as stored: `TYPE_ALIAS_SET` (the contract's enum name) or `ALIAS_SET`."""
    return parse_filter(text, {"actor", "resource"}, allow_labels=False, enums={"type": ("TYPE_", EVENT_TYPES)})


class EventUseCases(UseCases):
    def __init__(self, uow: UnitOfWorkFactory, page_tokens: PageTokens, notifier: Notifier) -> None:
        super().__init__(uow, page_tokens)
        self.notifier = notifier

    async def list(
        self, parent: str, model: str, after: int, size: int, token: str, filter_text: str = "", order_by: str = ""
    ) -> Page[ModelEvent]:
        project = _check(parent, model, after)
        limit = page_size(size)
        filters = _filters(filter_text)
        _, desc = parse_order_by(order_by, {"sequence"}, "sequence")
        # The default query keeps the fingerprint it had before filter and order_by, so its tokens stay valid; any
        # other filter or order (`sequence` and `sequence asc` are one) is part of it: a token of one order used with
        # the other is PAGE_TOKEN_QUERY_MISMATCH.
        query = [parent, model, after, filter_text, desc] if filter_text or desc else [parent, model, after]
        cursor = self.tokens.decode(token, query, int)
        last = cursor[0] if cursor else None
        async with self.uow.read() as uow:
            if desc:  # below the last one returned, down to after_sequence
                events = await uow.events.after(project, model, after, limit + 1, filters=filters, before=last, desc=True)
            else:
                events = await uow.events.after(project, model, after if last is None else last, limit + 1, filters=filters)
        next_token = self.tokens.encode([events[limit - 1].sequence], query) if len(events) > limit else ""
        return Page(events[:limit], next_token)

    async def watch(self, parent: str, model: str, after: int, filter_text: str = "") -> AsyncIterator[ModelEvent]:
        """Stored events after the cursor, then live ones; runs until the client goes away."""
        project = _check(parent, model, after)
        filters = _filters(filter_text)
        subscription = self.notifier.subscribe(project)
        try:
            cursor = after
            while True:
                async with self.uow.read() as uow:
                    # Filtered: the newest sequence first. Appends commit in sequence order, so every event up to it
                    # is visible to the read after it; once that read is done the cursor moves past the events that
                    # did not match, and a narrow watch does not re-read them at every wake-up.
                    newest = await uow.events.newest(project) if filters else 0
                    batch = await uow.events.after(project, model, cursor, _WATCH_BATCH, filters=filters)
                for event in batch:
                    cursor = event.sequence
                    yield event
                if len(batch) < _WATCH_BATCH:
                    cursor = max(cursor, newest)
                    # No polling: every commit here wakes it, and on PostgreSQL so does every replica's (LISTEN;
                    # a reconnected listener wakes all watchers to re-read what it may have missed).
                    await subscription.wait(timeout=None)
        finally:
            subscription.close()
