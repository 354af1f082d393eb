"""Audit event use cases: list after a cursor, and watch (stored events, then live ones)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from neuroweaver_runtime.errors import InvalidArgument
from neuroweaver_runtime.names import PROJECT
from neuroweaver_runtime.notify import Notifier
from neuroweaver_runtime.pagination import Page, PageTokens, page_size

from ..domain.model import MODEL, ModelEvent
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


class EventUseCases(UseCases):
    def __init__(self, uow: UnitOfWorkFactory, page_tokens: PageTokens, notifier: Notifier) -> None:
        super().__init__(uow, page_tokens)
        self.notifier = notifier

    async def list(self, parent: str, model: str, after: int, size: int, token: str) -> Page[ModelEvent]:
        project = _check(parent, model, after)
        limit = page_size(size)
        query = [parent, model, after]
        cursor = self.tokens.decode(token, query, int)
        start = cursor[0] if cursor else after
        async with self.uow.read() as uow:
            events = await uow.events.after(project, model, start, limit + 1)
        next_token = self.tokens.encode([events[limit - 1].sequence], query) if len(events) > limit else ""
        return Page(events[:limit], next_token)

    async def watch(self, parent: str, model: str, after: int) -> AsyncIterator[ModelEvent]:
        """Stored events after the cursor, then live ones; runs until the client goes away."""
        project = _check(parent, model, after)
        subscription = self.notifier.subscribe(project)
        try:
            cursor = after
            while True:
                async with self.uow.read() as uow:
                    batch = await uow.events.after(project, model, cursor, _WATCH_BATCH)
                for event in batch:
                    cursor = event.sequence
                    yield event
                if len(batch) < _WATCH_BATCH:
                    # No polling: every commit here wakes it, and on PostgreSQL so does every replica's (LISTEN;
                    # a reconnected listener wakes all watchers to re-read what it may have missed).
                    await subscription.wait(timeout=None)
        finally:
            subscription.close()
