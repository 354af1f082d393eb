"""The registry's use cases, one object per resource, wired to one unit-of-work factory (SQL: app.build; fakes: tests)."""

from __future__ import annotations

from dataclasses import dataclass

from neuroweaver_runtime.db import Database
from neuroweaver_runtime.notify import Notifier
from neuroweaver_runtime.pagination import PageTokens

from .aliases import AliasUseCases
from .cache import VersionCache
from .events import EventUseCases
from .judges import JudgeUseCases
from .models import ModelUseCases
from .ports import UnitOfWorkFactory
from .versions import VersionUseCases


@dataclass
class Registry:
    models: ModelUseCases
    versions: VersionUseCases
    aliases: AliasUseCases
    events: EventUseCases
    judges: JudgeUseCases
    db: Database | None = None  # the database behind the units of work (app.build sets it; None with in-memory fakes)

    @property
    def cache(self) -> VersionCache | None:
        return self.versions.cache

    @classmethod
    def on(
        cls, uow: UnitOfWorkFactory, notifier: Notifier, page_tokens: PageTokens, cache: VersionCache | None = None
    ) -> Registry:
        """`notifier` must be the one the units of work wake after their commits (the cache relies on it)."""
        return cls(
            ModelUseCases(uow, page_tokens),
            VersionUseCases(uow, page_tokens, cache),
            AliasUseCases(uow, page_tokens),
            EventUseCases(uow, page_tokens, notifier),
            JudgeUseCases(uow, page_tokens),
        )
