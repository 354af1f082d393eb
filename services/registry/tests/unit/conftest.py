"""In-memory fakes of the registry's repositories and unit of work (the use cases' ports, service/ports.py).

A transaction works on a deep copy of the store and swaps it in on a clean exit, so a failed use case leaves
nothing behind, as a rolled-back database transaction would. Objects handed out are copies: a use case changes
stored state only through the repositories. The API tests run the same use cases on the SQL repositories.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from neuroweaver_registry.domain import versions as semver_rules
from neuroweaver_registry.domain.model import (
    AliasHistoryEntry,
    Judge,
    JudgeVersion,
    Metric,
    Model,
    ModelAlias,
    ModelEvent,
    ModelVersion,
)
from neuroweaver_registry.service.ports import Resolved
from neuroweaver_registry.service.registry import Registry
from neuroweaver_runtime.notify import Notifier
from neuroweaver_runtime.pagination import PageTokens
from neuroweaver_runtime.testing import Duplicate, FakeUnitOfWorkBase


@dataclass
class Store:
    last_key: int = 0
    models: dict[str, Model] = field(default_factory=dict)
    versions: dict[tuple[int, str], ModelVersion] = field(default_factory=dict)  # (model key, version)
    aliases: dict[tuple[int, str], ModelAlias] = field(default_factory=dict)  # (model key, alias id)
    history: list[tuple[int, AliasHistoryEntry]] = field(default_factory=list)
    events: list[tuple[str, ModelEvent]] = field(default_factory=list)
    judges: dict[str, Judge] = field(default_factory=dict)
    judge_versions: dict[tuple[int, int], JudgeVersion] = field(default_factory=dict)
    requests: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # request_id → (method, fingerprint, name)

    def next_key(self) -> int:
        self.last_key += 1
        return self.last_key


class _Repo:
    def __init__(self, store: Store) -> None:
        self.store = store


def _set(obj: Any, values: dict[str, Any]) -> None:
    for name, value in values.items():
        setattr(obj, name, copy.deepcopy(value))
    obj.revision += 1


class FakeModels(_Repo):
    async def get(self, name: str, *, lock: bool = False, aliases: bool = False) -> Model | None:
        model = self.store.models.get(name)
        if model is None:
            return None
        found = copy.deepcopy(model)
        found.aliases = {a: m.version for (k, a), m in sorted(self.store.aliases.items()) if k == model.key} if aliases else {}
        return found

    async def add(self, model: Model) -> None:
        if model.name in self.store.models:
            raise Duplicate(model.name)
        model.key = self.store.next_key()
        self.store.models[model.name] = copy.deepcopy(model)

    async def update(self, model: Model, **values: Any) -> None:
        _set(self.store.models[model.name], values)

    async def delete(self, model: Model) -> None:
        del self.store.models[model.name]
        for table in (self.store.versions, self.store.aliases):
            for k in [k for k in table if k[0] == model.key]:
                del table[k]
        self.store.history = [(k, e) for k, e in self.store.history if k != model.key]

    async def page(self, project, filters, order_field, desc, cursor, limit):
        assert not filters and order_field == "name", "the fake lists by name only"
        models = sorted((m for m in self.store.models.values() if m.project == project), key=lambda m: m.name, reverse=desc)
        if cursor is not None:
            models = [m for m in models if (m.name > cursor[1]) != desc]
        page = [await self.get(m.name, aliases=True) for m in models[: limit + 1]]
        return page[:limit], ([page[limit - 1].name, page[limit - 1].name] if len(page) > limit else None)


class FakeVersions(_Repo):
    async def get(self, model: Model, version: str, *, details: bool = True) -> ModelVersion | None:
        found = self.store.versions.get((model.key, version))
        if found is None:
            return None
        found = copy.deepcopy(found)
        if details:
            found.aliases = sorted(a for (k, a), m in self.store.aliases.items() if k == model.key and m.version == version)
        else:
            found.metrics = []
        return found

    async def resolve(self, kind: str, model_name: str, ref: str) -> Resolved:
        model = self.store.models.get(model_name)
        if model is None:
            return Resolved(model_exists=False)
        resolved = Resolved(True, model.latest_version)
        version = {"semver": ref, "latest": model.latest_version}.get(kind)
        if kind == "alias":
            alias = self.store.aliases.get((model.key, ref))
            version = resolved.alias_target = alias.version if alias else None
        resolved.version = await self.get(model, version) if version else None
        return resolved

    def _of(self, model: Model) -> list[ModelVersion]:
        return [v for (k, _), v in self.store.versions.items() if k == model.key]

    async def highest(self, model: Model) -> str | None:
        versions = [semver_rules.parse_version(v.version) for v in self._of(model)]
        return str(max(versions)) if versions else None

    async def highest_and_taken(self, model: Model, sort_key: str) -> tuple[str | None, bool]:
        taken = any(semver_rules.sort_key(semver_rules.parse_version(v.version)) == sort_key for v in self._of(model))
        return await self.highest(model), taken

    async def add(self, model: Model, version: ModelVersion, sort_key: str) -> None:
        if (model.key, version.version) in self.store.versions:
            raise Duplicate(version.name)
        version.key = self.store.next_key()
        self.store.versions[(model.key, version.version)] = copy.deepcopy(version)

    async def add_metrics(self, version: ModelVersion, metrics: Sequence[Metric]) -> None:
        self._stored(version).metrics.extend(copy.deepcopy(list(metrics)))

    async def update(self, version: ModelVersion, **values: Any) -> None:
        _set(self._stored(version), values)

    async def count(self, model: Model) -> int:
        return len(self._of(model))

    async def page(self, model, filters, order_field, desc, cursor, limit):
        assert not filters and order_field == "version", "the fake lists by version only"
        versions = sorted(self._of(model), key=lambda v: semver_rules.sort_key(semver_rules.parse_version(v.version)))
        if desc:
            versions.reverse()
        if cursor is not None:
            after = [i for i, v in enumerate(versions) if v.key == cursor[1]][0]
            versions = versions[after + 1 :]
        page = [await self.get(model, v.version) for v in versions[: limit + 1]]
        last = page[limit - 1] if len(page) > limit else None
        return page[:limit], ([semver_rules.sort_key(semver_rules.parse_version(last.version)), last.key] if last else None)

    def _stored(self, version: ModelVersion) -> ModelVersion:
        return next(v for v in self.store.versions.values() if v.key == version.key)


class FakeAliases(_Repo):
    async def get(self, model: Model, alias: str) -> ModelAlias | None:
        return copy.deepcopy(self.store.aliases.get((model.key, alias)))

    async def all(self, model: Model) -> list[ModelAlias]:
        return [copy.deepcopy(a) for (k, _), a in sorted(self.store.aliases.items()) if k == model.key]

    async def set(self, model: Model, alias: str, target: ModelAlias) -> None:
        self.store.aliases[(model.key, alias)] = copy.deepcopy(target)

    async def delete(self, model: Model, alias: str) -> None:
        del self.store.aliases[(model.key, alias)]

    async def append_history(self, model: Model, entry: AliasHistoryEntry) -> None:
        stored = copy.deepcopy(entry)
        stored.sequence = len(self.store.history) + 1
        self.store.history.append((model.key, stored))

    async def history(self, model: Model, alias: str, before: int | None, limit: int) -> list[AliasHistoryEntry]:
        name = f"{model.name}/aliases/{alias}"
        entries = [e for k, e in reversed(self.store.history) if k == model.key and e.alias == name]
        return copy.deepcopy([e for e in entries if before is None or e.sequence < before][:limit])

    async def last_move(self, model: Model, alias: str) -> AliasHistoryEntry | None:
        entries = await self.history(model, alias, None, 1)
        return entries[0] if entries else None


class FakeEvents(_Repo):
    async def append(self, project: str, event: ModelEvent) -> int:
        event = copy.deepcopy(event)
        event.sequence = len(self.store.events) + 1
        self.store.events.append((project, event))
        return event.sequence

    async def after(self, project: str, model: str, after: int, limit: int, *, filters=(), before=None, desc=False):
        def matches(e: ModelEvent) -> bool:
            return all((getattr(e, f.field) == f.value) == (f.op == "=") for f in filters)

        found = [
            e for p, e in self.store.events
            if p == project and after < e.sequence < (before or 2**63) and (not model or e.model == model) and matches(e)
        ]  # fmt: skip
        return copy.deepcopy((found[::-1] if desc else found)[:limit])

    async def newest(self, project: str) -> int:
        return max((e.sequence for p, e in self.store.events if p == project), default=0)


class FakeJudges(_Repo):
    async def get(self, name: str, *, lock: bool = False) -> Judge | None:
        return copy.deepcopy(self.store.judges.get(name))

    async def add(self, judge: Judge) -> None:
        if judge.name in self.store.judges:
            raise Duplicate(judge.name)
        judge.key = self.store.next_key()
        self.store.judges[judge.name] = copy.deepcopy(judge)

    async def add_version(self, judge: Judge, version: JudgeVersion) -> None:
        self.store.judge_versions[(judge.key, version.version)] = copy.deepcopy(version)
        self.store.judges[judge.name].latest_version = judge.latest_version = version.version

    async def get_version(self, judge: Judge, number: int) -> JudgeVersion | None:
        return copy.deepcopy(self.store.judge_versions.get((judge.key, number)))

    async def page(self, project: str, after_name: str | None, limit: int) -> list[Judge]:
        judges = sorted((j for j in self.store.judges.values() if j.project == project), key=lambda j: j.name)
        return copy.deepcopy([j for j in judges if after_name is None or j.name > after_name][:limit])

    async def list_versions(self, judge: Judge, before: int | None, limit: int) -> list[JudgeVersion]:
        numbers = sorted((n for k, n in self.store.judge_versions if k == judge.key), reverse=True)
        numbers = [n for n in numbers if before is None or n < before][:limit]
        return [copy.deepcopy(self.store.judge_versions[(judge.key, n)]) for n in numbers]


class FakeUnitOfWork(FakeUnitOfWorkBase):
    def __init__(self, store: Store) -> None:
        super().__init__(store.requests)
        self.store = store
        self.models, self.versions, self.aliases = FakeModels(store), FakeVersions(store), FakeAliases(store)
        self.events, self.judges = FakeEvents(store), FakeJudges(store)
        self.woken: set[str] = set()

    async def append_event(self, project: str, event: ModelEvent) -> None:
        await self.events.append(project, event)
        self.woken.add(project)


class RecordingNotifier(Notifier):
    def __init__(self) -> None:
        super().__init__()
        self.woken: list[str] = []

    def wake(self, key: str) -> None:
        self.woken.append(key)
        super().wake(key)


class FakeUnitOfWorkFactory:
    def __init__(self, notifier: Notifier) -> None:
        self.store = Store()
        self.notifier = notifier
        self.commits = self.rollbacks = 0

    @asynccontextmanager
    async def transaction(self):
        work = copy.deepcopy(self.store)
        uow = FakeUnitOfWork(work)
        try:
            yield uow
        except BaseException:
            self.rollbacks += 1
            raise
        self.store = work
        self.commits += 1
        for project in uow.woken:
            self.notifier.wake(project)

    @asynccontextmanager
    async def read(self):
        yield FakeUnitOfWork(copy.deepcopy(self.store))  # anything written through a read is dropped


@dataclass
class Fakes:
    registry: Registry
    uow: FakeUnitOfWorkFactory
    notifier: RecordingNotifier

    @property
    def store(self) -> Store:
        return self.uow.store

    def event_types(self) -> list[str]:
        return [e.type for _, e in self.store.events]


@pytest.fixture
def fakes() -> Fakes:
    notifier = RecordingNotifier()
    uow = FakeUnitOfWorkFactory(notifier)
    return Fakes(Registry.on(uow, notifier, PageTokens("unit-test-secret")), uow, notifier)
