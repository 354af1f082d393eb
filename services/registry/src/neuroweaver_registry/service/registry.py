"""Registry use cases: each public method is one transaction with its audit event."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.exc import IntegrityError

from neuroweaver_runtime import idempotency
from neuroweaver_runtime.auth import current_actor
from neuroweaver_runtime.db import Database
from neuroweaver_runtime.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Violations,
)
from neuroweaver_runtime.etag import check_etag
from neuroweaver_runtime.filtering import parse_filter, parse_order_by
from neuroweaver_runtime.names import PROJECT, validate_id
from neuroweaver_runtime.notify import Notifier
from neuroweaver_runtime.pagination import PageTokens, page_size
from neuroweaver_runtime.timestamps import utcnow

from ..adapters import tables
from ..adapters.repository import RegistryRepository, alias_list, aware, metric_from_row, version_from_row
from ..domain import versions as semver_rules
from ..domain.judges import validate_judge_config
from ..domain.model import (
    ALIAS,
    JUDGE,
    JUDGE_VERSION,
    MODEL,
    RESERVED_ALIASES,
    VERSION,
    AliasAction,
    AliasHistoryEntry,
    Comparison,
    Judge,
    JudgeVersion,
    Metric,
    Model,
    ModelAlias,
    ModelEvent,
    ModelState,
    ModelVersion,
    VersionState,
    check_labels,
    compare_versions,
    validate_metrics,
    validate_model_fields,
    validate_new_version,
)
from .cache import VersionCache

MODEL_UPDATABLE = {"display_name", "description", "specialization", "base_model", "labels"}
EVENT_CHANNEL = "nw_registry_events"

log = logging.getLogger("neuroweaver.registry")


def _log_alias_move(what: str, alias: ModelAlias) -> None:
    """Aliases route production traffic: every committed move is one log line (with the call's request and trace id)."""
    log.info(
        what,
        extra={"fields": {"alias": alias.name, "version": alias.version, "actor": alias.actor, "reason": alias.reason[:200]}},
    )


@dataclass
class Page:
    items: list
    next_page_token: str


class RegistryService:
    def __init__(self, db: Database, notifier: Notifier, page_tokens: PageTokens, cache: VersionCache | None = None) -> None:
        self.db = db
        self.notifier = notifier
        self.tokens = page_tokens
        # Only sound if every wake-up of `notifier` invalidates it (InvalidatingNotifier); see service/cache.py.
        self.cache = cache

    # -- helpers ---------------------------------------------------------------------------------

    async def _event(self, repo: RegistryRepository, project: str, type_: str, resource: str, model: str = "", **details) -> None:
        await repo.append_event(
            project,
            ModelEvent(type_, resource, model, current_actor(), {k: str(v) for k, v in details.items()}, create_time=utcnow()),
        )

    def _committed(self, project: str) -> None:
        self.notifier.wake(project)

    @staticmethod
    async def _model(repo: RegistryRepository, name: str, *, for_update: bool = False, field: str = "name"):
        MODEL.parse(name, field)
        row = await repo.model_row(name, for_update=for_update)
        if row is None:
            raise NotFound(f"model {name} does not exist", reason="MODEL_NOT_FOUND", metadata={"model": name})
        return row

    @staticmethod
    def _require_active(row) -> None:
        if row.state != ModelState.ACTIVE.value:
            raise FailedPrecondition(
                f"model {row.name} is archived; restore it first", reason="MODEL_ARCHIVED", metadata={"model": row.name}
            )

    # -- models ----------------------------------------------------------------------------------

    async def create_model(self, parent: str, model_id: str, model: Model, request_id: str, fingerprint: str) -> Model:
        project = PROJECT.parse(parent, "parent")["project"]
        validate_id(model_id, "model_id", "model id")
        request_id = idempotency.validate_request_id(request_id)
        v = Violations()
        validate_model_fields(model, v)
        v.raise_if_any()
        name = MODEL.format(project=project, model=model_id)
        async with self.db.transaction() as s:
            repo = RegistryRepository(s)
            earlier = await idempotency.find(s, tables.idempotency_keys, request_id, "CreateModel", fingerprint)
            if earlier is None:
                if await repo.model_row(name) is not None:
                    raise AlreadyExists(f"model {name} already exists", reason="MODEL_ALREADY_EXISTS", metadata={"model": name})
                now = utcnow()
                model.name, model.state, model.creator = name, ModelState.ACTIVE, current_actor()
                model.create_time = model.update_time = now
                await repo.insert_model(model, project)
                await idempotency.remember(s, tables.idempotency_keys, request_id, "CreateModel", fingerprint, name)
                await self._event(repo, project, "MODEL_CREATED", name, name)
            row = await repo.model_row(earlier or name)
            if row is None:  # AIP-155 retry of a create whose model was deleted since: nothing to return, nothing to redo
                raise NotFound(
                    f"model {earlier} created by this request_id has since been deleted",
                    reason="MODEL_NOT_FOUND",
                    metadata={"model": earlier or name},
                )
            result = await repo.to_model(row)
        self._committed(project)
        return result

    async def get_model(self, name: str) -> Model:
        async with self.db.read() as s:
            repo = RegistryRepository(s)
            return await repo.to_model(await self._model(repo, name))

    async def list_models(self, parent: str, size: int, token: str, filter_text: str, order_by: str) -> Page:
        project = PROJECT.parse(parent, "parent")["project"]
        limit = page_size(size)
        filters = parse_filter(filter_text, {"specialization", "state", "base_model"})
        order_field, desc = parse_order_by(order_by, {"name", "create_time", "update_time"}, "name")
        query = [parent, filter_text, order_by]
        cursor = self.tokens.decode(token, query, str if order_field == "name" else datetime, str)
        async with self.db.read() as s:
            repo = RegistryRepository(s)
            rows = await repo.list_models(project, filters, order_field, desc, cursor, limit + 1)
            items = [await repo.to_model(r) for r in rows[:limit]]
        next_token = ""
        if len(rows) > limit:
            last = rows[limit - 1]
            value = getattr(last, order_field)
            next_token = self.tokens.encode([value.isoformat() if order_field != "name" else value, last.name], query)
        return Page(items, next_token)

    async def update_model(self, model: Model, paths: set[str], etag: str) -> Model:
        v = Violations()
        validate_model_fields(model, v)
        v.raise_if_any()
        async with self.db.transaction() as s:
            repo = RegistryRepository(s)
            row = await self._model(repo, model.name, for_update=True, field="model.name")
            check_etag(row.name, row.revision, etag)
            values = {p: getattr(model, p) for p in paths}
            await repo.update_model(row.id, update_time=utcnow(), **values)
            await self._event(repo, row.project, "MODEL_UPDATED", row.name, row.name, fields=",".join(sorted(paths)))
            result = await repo.to_model(await repo.model_row(row.name))
        self._committed(row.project)
        return result

    async def set_model_state(self, name: str, state: ModelState, etag: str) -> Model:
        async with self.db.transaction() as s:
            repo = RegistryRepository(s)
            row = await self._model(repo, name, for_update=True)
            check_etag(row.name, row.revision, etag)
            if row.state != state.value:
                await repo.update_model(row.id, state=state.value, update_time=utcnow())
                kind = "MODEL_ARCHIVED" if state is ModelState.ARCHIVED else "MODEL_RESTORED"
                await self._event(repo, row.project, kind, name, name)
            result = await repo.to_model(await repo.model_row(name))
        self._committed(row.project)
        return result

    async def delete_model(self, name: str, force: bool, etag: str) -> None:
        async with self.db.transaction() as s:
            repo = RegistryRepository(s)
            row = await self._model(repo, name, for_update=True)
            check_etag(row.name, row.revision, etag)
            count = await repo.count_versions(row.id)
            if count and not force:
                raise FailedPrecondition(
                    f"model {name} still has {count} version(s); delete with force=true to remove them too",
                    reason="MODEL_HAS_VERSIONS",
                    metadata={"versions": str(count)},
                )
            await repo.delete_model(row.id)
            await self._event(repo, row.project, "MODEL_DELETED", name, name, versions_deleted=count)
        self._committed(row.project)

    # -- versions --------------------------------------------------------------------------------

    async def create_version(
        self, parent: str, explicit: str, bump: str, mv: ModelVersion, request_id: str, fingerprint: str
    ) -> ModelVersion:
        MODEL.parse(parent, "parent")
        request_id = idempotency.validate_request_id(request_id)
        if bool(explicit) == bool(bump):
            raise InvalidArgument(
                "set exactly one of version (explicit semver) and bump (major, minor or patch)",
                field="version",
                reason="VERSION_OR_BUMP_REQUIRED",
            )
        requested = semver_rules.parse_version(explicit) if explicit else None
        v = Violations()
        validate_new_version(mv, v)
        v.raise_if_any()
        async with self.db.transaction() as s:
            repo = RegistryRepository(s)
            earlier = await idempotency.find(s, tables.idempotency_keys, request_id, "CreateModelVersion", fingerprint)
            if earlier is not None:
                model_row = await self._model(repo, parent, field="parent")
                earlier_row = await repo.version_row(model_row.id, earlier.rsplit("/", 1)[1])
                if earlier_row is None:  # the model was deleted (and re-created) since the first call
                    raise NotFound(
                        f"version {earlier} created by this request_id has since been deleted",
                        reason="VERSION_NOT_FOUND",
                        metadata={"version": earlier.rsplit("/", 1)[1]},
                    )
                return (await repo.to_versions(parent, [earlier_row]))[0]
            # The model row lock serialises version creation per model, so concurrent bumps never collide.
            row = await self._model(repo, parent, for_update=True, field="parent")
            self._require_active(row)
            if requested is None:
                highest_text = await repo.highest_version(row.id)
                taken = False  # a bump is above the highest existing version, so it cannot exist yet
            else:
                highest_text, taken = await repo.highest_version_and_taken(row.id, semver_rules.sort_key(requested))
            highest = semver_rules.parse_version(highest_text) if highest_text else None
            version = requested or semver_rules.bump(highest, bump)
            key = semver_rules.sort_key(version)
            if taken:
                raise AlreadyExists(
                    f"version {version} of {parent} already exists; versions are immutable, create a new one",
                    reason="VERSION_ALREADY_EXISTS",
                    metadata={"version": str(version)},
                )
            now = utcnow()
            mv.version, mv.name = str(version), f"{parent}/versions/{version}"
            mv.state, mv.creator, mv.create_time, mv.update_time = VersionState.REGISTERED, current_actor(), now, now
            for metric in mv.metrics:
                metric.record_time = now
            if not mv.lineage.base_model:
                mv.lineage.base_model = row.base_model
            try:
                await repo.insert_version(row.id, mv, key)
            except IntegrityError:
                raise AlreadyExists(f"version {version} already exists", reason="VERSION_ALREADY_EXISTS") from None
            new_latest = str(version) if highest is None or version.compare(highest) > 0 else row.latest_version
            await repo.update_model(row.id, latest_version=new_latest, version_count=row.version_count + 1, update_time=now)
            await idempotency.remember(s, tables.idempotency_keys, request_id, "CreateModelVersion", fingerprint, mv.name)
            await self._event(repo, row.project, "VERSION_CREATED", mv.name, parent, version=mv.version)
        # What a re-read would return: the row as inserted; no alias can point at a version that did not exist.
        mv.aliases, mv.revision = [], 1
        self._committed(row.project)
        return mv

    async def _resolve(self, repo: RegistryRepository, name: str, field: str = "name"):
        """(model row, version row) for `.../versions/{semver|alias|latest}`."""
        parts = VERSION.parse(name, field)
        model_name = MODEL.format(project=parts["project"], model=parts["model"])
        model_row = await self._model(repo, model_name, field=field)
        ref = parts["version"]
        if semver_rules.looks_like_version(ref):
            version = str(semver_rules.parse_version(ref, field))
        elif ref == "latest":
            version = model_row.latest_version
            if not version:
                raise NotFound(f"model {model_name} has no versions yet", reason="VERSION_NOT_FOUND")
        else:
            validate_id(ref, field, "alias")
            alias = await repo.alias_row(model_row.id, ref)
            if alias is None:
                raise NotFound(
                    f"{ref!r} is neither a version nor an alias of {model_name}",
                    reason="ALIAS_NOT_FOUND",
                    metadata={"alias": ref},
                )
            version = alias.version
        row = await repo.version_row(model_row.id, version)
        if row is None:
            raise NotFound(
                f"version {version} of {model_name} does not exist", reason="VERSION_NOT_FOUND", metadata={"version": version}
            )
        return model_row, row

    async def get_version(self, name: str) -> ModelVersion:
        """The hot read path: a cache hit, or one statement (model ⟕ alias ⟕ version ⟕ metrics) without locks."""
        cache = self.cache
        if cache is not None and (hit := cache.get(name)) is not None:
            return hit
        parts = VERSION.parse(name, "name")
        project = parts["project"]
        token = cache.token(project) if cache is not None else None
        model_name = MODEL.format(project=project, model=parts["model"])
        ref = parts["version"]
        try:
            if semver_rules.looks_like_version(ref):
                kind, ref = "semver", str(semver_rules.parse_version(ref, "name"))
            elif ref == "latest":
                kind = "latest"
            else:
                kind = "alias"
                validate_id(ref, "name", "alias")
        except InvalidArgument:
            # Malformed references are rare; the step-by-step path reports the same error as always
            # (a missing model is reported before a malformed version).
            async with self.db.read() as s:
                repo = RegistryRepository(s)
                model_row, row = await self._resolve(repo, name)
                return (await repo.to_versions(model_row.name, [row]))[0]
        async with self.db.read() as s:
            rows = await RegistryRepository(s).version_with_details(kind, model_name, ref)
        if not rows:
            raise NotFound(f"model {model_name} does not exist", reason="MODEL_NOT_FOUND", metadata={"model": model_name})
        first = rows[0]
        if kind == "latest":
            version = first.m_latest
            if not version:
                raise NotFound(f"model {model_name} has no versions yet", reason="VERSION_NOT_FOUND")
        elif kind == "alias":
            if first.alias_target is None:
                raise NotFound(
                    f"{ref!r} is neither a version nor an alias of {model_name}",
                    reason="ALIAS_NOT_FOUND",
                    metadata={"alias": ref},
                )
            version = first.alias_target
        else:
            version = ref
        if first.id is None:
            raise NotFound(
                f"version {version} of {model_name} does not exist", reason="VERSION_NOT_FOUND", metadata={"version": version}
            )
        metrics = [metric_from_row(r) for r in rows if r.metric_name is not None]
        result = version_from_row(model_name, first, metrics, alias_list(first, self.db.dialect))
        if cache is not None:
            cache.put(name, project, token, result)
        return result

    async def list_versions(self, parent: str, size: int, token: str, filter_text: str, order_by: str) -> Page:
        limit = page_size(size)
        filters = parse_filter(filter_text, {"state", "base_model", "training_job"})
        order_field, desc = parse_order_by(order_by, {"version", "create_time"}, "version desc")
        query = [parent, filter_text, order_by]
        cursor = self.tokens.decode(token, query, str if order_field == "version" else datetime, int)
        async with self.db.read() as s:
            repo = RegistryRepository(s)
            model_row = await self._model(repo, parent, field="parent")
            rows = await repo.list_versions(model_row.id, filters, order_field, desc, cursor, limit + 1)
            items = await repo.to_versions(parent, rows[:limit])
        next_token = ""
        if len(rows) > limit:
            last = rows[limit - 1]
            value = last.sort_key if order_field == "version" else last.create_time.isoformat()
            next_token = self.tokens.encode([value, last.id], query)
        return Page(items, next_token)

    async def update_version_labels(self, name: str, labels: dict[str, str], etag: str) -> ModelVersion:
        v = Violations()
        check_labels(labels, "model_version.labels", v)
        v.raise_if_any()
        async with self.db.transaction() as s:
            repo = RegistryRepository(s)
            model_row, row = await self._resolve(repo, name, "model_version.name")
            await repo.model_row(model_row.name, for_update=True)
            check_etag(f"{model_row.name}/versions/{row.version}", row.revision, etag)
            await repo.update_version(row.id, labels=labels, update_time=utcnow())
            full = f"{model_row.name}/versions/{row.version}"
            await self._event(repo, model_row.project, "VERSION_UPDATED", full, model_row.name, fields="labels")
            result = (await repo.to_versions(model_row.name, [await repo.version_row(model_row.id, row.version)]))[0]
        self._committed(model_row.project)
        return result

    async def set_version_state(self, name: str, state: VersionState, reason: str, etag: str) -> ModelVersion:
        async with self.db.transaction() as s:
            repo = RegistryRepository(s)
            model_row, row = await self._resolve(repo, name)
            await repo.model_row(model_row.name, for_update=True)
            full = f"{model_row.name}/versions/{row.version}"
            check_etag(full, row.revision, etag)
            if state is VersionState.DEPRECATED:
                pointing = await repo.versions_with_alias_refs(model_row.id, row.version)
                if pointing:
                    raise FailedPrecondition(
                        f"aliases {', '.join(pointing)} point at {row.version}; move them before deprecating it",
                        reason="VERSION_HAS_ALIASES",
                    )
            if row.state != state.value:
                await repo.update_version(row.id, state=state.value, update_time=utcnow())
                await self._event(
                    repo,
                    model_row.project,
                    "VERSION_STATE_CHANGED",
                    full,
                    model_row.name,
                    from_state=row.state,
                    to_state=state.value,
                    reason=reason,
                )
            result = (await repo.to_versions(model_row.name, [await repo.version_row(model_row.id, row.version)]))[0]
        self._committed(model_row.project)
        return result

    async def append_metrics(self, name: str, metrics: list[Metric]) -> ModelVersion:
        if not metrics:
            raise InvalidArgument("metrics must not be empty", field="metrics", reason="NO_METRICS")
        v = Violations()
        validate_metrics(metrics, v, "metrics")
        v.raise_if_any()
        async with self.db.transaction() as s:
            repo = RegistryRepository(s)
            model_row, row = await self._resolve(repo, name)
            now = utcnow()
            for metric in metrics:
                metric.record_time = now
                metric.source = metric.source or current_actor()
            await repo.insert_metrics(row.id, metrics)
            await repo.update_version(row.id, update_time=now)
            full = f"{model_row.name}/versions/{row.version}"
            await self._event(
                repo,
                model_row.project,
                "VERSION_METRICS_APPENDED",
                full,
                model_row.name,
                metrics=",".join(m.name for m in metrics[:20]),
            )
            result = (await repo.to_versions(model_row.name, [await repo.version_row(model_row.id, row.version)]))[0]
        self._committed(model_row.project)
        return result

    async def compare(self, base_name: str, candidate_name: str) -> tuple[ModelVersion, ModelVersion, Comparison]:
        async with self.db.read() as s:
            repo = RegistryRepository(s)
            base_model, base_row = await self._resolve(repo, base_name, "base_version")
            cand_model, cand_row = await self._resolve(repo, candidate_name, "candidate_version")
            base = (await repo.to_versions(base_model.name, [base_row]))[0]
            cand = (await repo.to_versions(cand_model.name, [cand_row]))[0]
        if base_model.id != cand_model.id:
            relation = "UNRELATED"
        else:
            order = semver_rules.parse_version(cand.version).compare(semver_rules.parse_version(base.version))
            relation = "NEWER" if order > 0 else "OLDER" if order < 0 else "EQUAL"
        return base, cand, compare_versions(base, cand, relation)

    # -- aliases ---------------------------------------------------------------------------------

    @staticmethod
    def _check_alias_id(alias: str, field: str) -> None:
        validate_id(alias, field, "alias")
        if alias in RESERVED_ALIASES:
            raise InvalidArgument(
                f"alias {alias!r} is reserved (versions/{alias} always resolves to the highest version)",
                field=field,
                reason="RESERVED_ALIAS",
            )

    @staticmethod
    def _check_expected(current: str | None, expected: str, alias: str) -> None:
        """Compare-and-set: `expected` empty = unconditional; `-` = alias must not exist."""
        if not expected:
            return
        want = None if expected == "-" else expected
        if current != want:
            raise Aborted(
                f"alias {alias} points at {current or 'nothing'}, not {expected}; re-read it and retry",
                reason="ALIAS_VERSION_MISMATCH",
                metadata={"current_version": current or "", "expected_version": expected},
            )

    async def _move_alias(
        self,
        repo: RegistryRepository,
        model_row,
        alias: str,
        target: str,
        action: AliasAction,
        expected: str,
        reason: str,
        field: str,
    ) -> ModelAlias:
        self._require_active(model_row)
        version_text = str(semver_rules.parse_version(target, field))
        version_row = await repo.version_row(model_row.id, version_text)
        if version_row is None:
            raise NotFound(
                f"version {version_text} of {model_row.name} does not exist",
                reason="VERSION_NOT_FOUND",
                metadata={"version": version_text},
            )
        if version_row.state == VersionState.DEPRECATED.value:
            raise FailedPrecondition(
                f"version {version_text} is deprecated; an alias cannot point at it", reason="VERSION_DEPRECATED"
            )
        current_row = await repo.alias_row(model_row.id, alias)
        current = current_row.version if current_row else None
        alias_name = ALIAS.format(**MODEL.parse(model_row.name), alias=alias)
        self._check_expected(current, expected, alias_name)
        now, actor = utcnow(), current_actor()
        await repo.upsert_alias(model_row.id, alias, version_text, actor, reason, now)
        await repo.append_alias_history(
            model_row.id, AliasHistoryEntry(alias_name, action, current or "", version_text, actor, reason, create_time=now)
        )
        kind = "ALIAS_ROLLED_BACK" if action is AliasAction.ROLLBACK else "ALIAS_SET"
        await self._event(
            repo,
            model_row.project,
            kind,
            alias_name,
            model_row.name,
            alias=alias,
            from_version=current or "",
            to_version=version_text,
            reason=reason,
        )
        return ModelAlias(alias_name, version_text, actor, reason, now)

    async def set_alias(self, model: str, alias: str, version: str, expected: str, reason: str) -> ModelAlias:
        self._check_alias_id(alias, "alias")
        if len(reason) > 1024:
            raise InvalidArgument("reason is at most 1024 characters", field="reason", reason="FIELD_TOO_LONG")
        async with self.db.transaction() as s:
            repo = RegistryRepository(s)
            row = await self._model(repo, model, for_update=True, field="model")
            result = await self._move_alias(repo, row, alias, version, AliasAction.SET, expected, reason, "version")
        self._committed(row.project)
        _log_alias_move("alias set", result)
        return result

    async def get_alias(self, name: str) -> ModelAlias:
        parts = ALIAS.parse(name)
        async with self.db.read() as s:
            repo = RegistryRepository(s)
            row = await self._model(repo, MODEL.format(project=parts["project"], model=parts["model"]))
            alias = await repo.alias_row(row.id, parts["alias"])
        if alias is None:
            raise NotFound(f"alias {name} does not exist", reason="ALIAS_NOT_FOUND")
        return ModelAlias(name, alias.version, alias.actor, alias.reason, alias.update_time)

    async def list_aliases(self, model: str) -> list[ModelAlias]:
        async with self.db.read() as s:
            repo = RegistryRepository(s)
            row = await self._model(repo, model, field="model")
            # One query in this transaction: a nested transaction per alias deadlocks on SQLite (BEGIN IMMEDIATE).
            return [
                ModelAlias(ALIAS.format(**MODEL.parse(model), alias=a.alias), a.version, a.actor, a.reason, aware(a.update_time))
                for a in await repo.alias_rows(row.id)
            ]

    async def delete_alias(self, name: str, expected: str, reason: str) -> None:
        parts = ALIAS.parse(name)
        async with self.db.transaction() as s:
            repo = RegistryRepository(s)
            row = await self._model(repo, MODEL.format(project=parts["project"], model=parts["model"]), for_update=True)
            self._require_active(row)
            current = await repo.alias_row(row.id, parts["alias"])
            if current is None:
                raise NotFound(f"alias {name} does not exist", reason="ALIAS_NOT_FOUND")
            self._check_expected(current.version, expected, name)
            now, actor = utcnow(), current_actor()
            await repo.delete_alias(row.id, parts["alias"])
            await repo.append_alias_history(
                row.id, AliasHistoryEntry(name, AliasAction.DELETE, current.version, "", actor, reason, create_time=now)
            )
            await self._event(
                repo,
                row.project,
                "ALIAS_DELETED",
                name,
                row.name,
                alias=parts["alias"],
                from_version=current.version,
                reason=reason,
            )
        self._committed(row.project)

    async def rollback_alias(self, name: str, to_version: str, reason: str, expected: str) -> ModelAlias:
        parts = ALIAS.parse(name)
        async with self.db.transaction() as s:
            repo = RegistryRepository(s)
            row = await self._model(repo, MODEL.format(project=parts["project"], model=parts["model"]), for_update=True)
            current = await repo.alias_row(row.id, parts["alias"])
            if current is None:
                raise NotFound(f"alias {name} does not exist", reason="ALIAS_NOT_FOUND")
            target = to_version
            if not target:
                last = await repo.last_alias_move(row.id, parts["alias"])
                if last is None or not last.from_version:
                    raise FailedPrecondition(
                        f"alias {name} has no earlier target to roll back to; pass to_version",
                        reason="NO_PREVIOUS_VERSION",
                    )
                target = last.from_version
            result = await self._move_alias(
                repo, row, parts["alias"], target, AliasAction.ROLLBACK, expected, reason or "rollback", "to_version"
            )
        self._committed(row.project)
        _log_alias_move("alias rolled back", result)
        return result

    async def alias_history(self, name: str, size: int, token: str) -> Page:
        parts = ALIAS.parse(name)
        limit = page_size(size)
        cursor = self.tokens.decode(token, [name], int)
        async with self.db.read() as s:
            repo = RegistryRepository(s)
            row = await self._model(repo, MODEL.format(project=parts["project"], model=parts["model"]))
            entries = await repo.alias_history_page(row.id, parts["alias"], name, cursor[0] if cursor else None, limit + 1)
        if not entries and cursor is None and await self._alias_missing(row.id, parts["alias"]):
            raise NotFound(f"alias {name} has never existed", reason="ALIAS_NOT_FOUND")
        next_token = self.tokens.encode([entries[limit - 1].sequence], [name]) if len(entries) > limit else ""
        return Page(entries[:limit], next_token)

    async def _alias_missing(self, model_id: int, alias: str) -> bool:
        async with self.db.read() as s:
            return await RegistryRepository(s).alias_row(model_id, alias) is None

    # -- events ----------------------------------------------------------------------------------

    async def list_events(self, parent: str, model: str, after: int, size: int, token: str) -> Page:
        project = PROJECT.parse(parent, "parent")["project"]
        if model:
            MODEL.parse(model, "model")
        if after < 0:
            raise InvalidArgument("after_sequence must not be negative", field="after_sequence", reason="INVALID_CURSOR")
        limit = page_size(size)
        query = [parent, model, after]
        cursor = self.tokens.decode(token, query, int)
        start = cursor[0] if cursor else after
        async with self.db.read() as s:
            events = await RegistryRepository(s).events_after(project, model, start, limit + 1)
        next_token = self.tokens.encode([events[limit - 1].sequence], query) if len(events) > limit else ""
        return Page(events[:limit], next_token)

    async def watch_events(self, parent: str, model: str, after: int) -> AsyncIterator[ModelEvent]:
        """Stored events after the cursor, then live ones; runs until the client goes away."""
        project = PROJECT.parse(parent, "parent")["project"]
        if model:
            MODEL.parse(model, "model")
        if after < 0:
            raise InvalidArgument("after_sequence must not be negative", field="after_sequence", reason="INVALID_CURSOR")
        subscription = self.notifier.subscribe(project)
        try:
            cursor = after
            while True:
                async with self.db.read() as s:
                    batch = await RegistryRepository(s).events_after(project, model, cursor, 500)
                for event in batch:
                    cursor = event.sequence
                    yield event
                if len(batch) < 500:
                    # No polling: every commit here wakes it, and on PostgreSQL so does every replica's (LISTEN;
                    # a reconnected listener wakes all watchers to re-read what it may have missed).
                    await subscription.wait(timeout=None)
        finally:
            subscription.close()

    # -- judges ----------------------------------------------------------------------------------

    async def create_judge(
        self, parent: str, judge_id: str, judge: Judge, config: dict, notes: str, request_id: str, fingerprint: str
    ) -> Judge:
        project = PROJECT.parse(parent, "parent")["project"]
        validate_id(judge_id, "judge_id", "judge id")
        request_id = idempotency.validate_request_id(request_id)
        v = Violations()
        validate_judge_config(config, v, "judge_version")
        if len(judge.display_name) > 200:
            v.add("judge.display_name", "at most 200 characters")
        if len(judge.description) > 4000:
            v.add("judge.description", "at most 4000 characters")
        v.raise_if_any()
        name = JUDGE.format(project=project, judge=judge_id)
        async with self.db.transaction() as s:
            repo = RegistryRepository(s)
            earlier = await idempotency.find(s, tables.idempotency_keys, request_id, "CreateJudge", fingerprint)
            if earlier is None:
                if await repo.judge_row(name) is not None:
                    raise AlreadyExists(f"judge {name} already exists", reason="JUDGE_ALREADY_EXISTS")
                now, actor = utcnow(), current_actor()
                judge.name, judge.creator, judge.create_time = name, actor, now
                judge_id_ = await repo.insert_judge(judge, project)
                config = {**config, "notes": notes}
                await repo.insert_judge_version(judge_id_, JudgeVersion(f"{name}/versions/1", 1, config, actor, now))
                await idempotency.remember(s, tables.idempotency_keys, request_id, "CreateJudge", fingerprint, name)
                await self._event(repo, project, "JUDGE_CREATED", name)
                await self._event(repo, project, "JUDGE_VERSION_CREATED", f"{name}/versions/1")
            row = await repo.judge_row(name)
        self._committed(project)
        return _judge(row)

    async def get_judge(self, name: str) -> Judge:
        JUDGE.parse(name)
        async with self.db.read() as s:
            row = await RegistryRepository(s).judge_row(name)
        if row is None:
            raise NotFound(f"judge {name} does not exist", reason="JUDGE_NOT_FOUND")
        return _judge(row)

    async def list_judges(self, parent: str, size: int, token: str) -> Page:
        project = PROJECT.parse(parent, "parent")["project"]
        limit = page_size(size)
        cursor = self.tokens.decode(token, [parent], str)
        async with self.db.read() as s:
            rows = await RegistryRepository(s).list_judges(project, cursor[0] if cursor else None, limit + 1)
        next_token = self.tokens.encode([rows[limit - 1].name], [parent]) if len(rows) > limit else ""
        return Page([_judge(r) for r in rows[:limit]], next_token)

    async def create_judge_version(
        self, parent: str, config: dict, notes: str, request_id: str, fingerprint: str
    ) -> JudgeVersion:
        JUDGE.parse(parent, "parent")
        request_id = idempotency.validate_request_id(request_id)
        v = Violations()
        validate_judge_config(config, v, "judge_version")
        v.raise_if_any()
        async with self.db.transaction() as s:
            repo = RegistryRepository(s)
            row = await repo.judge_row(parent, for_update=True)
            if row is None:
                raise NotFound(f"judge {parent} does not exist", reason="JUDGE_NOT_FOUND")
            earlier = await idempotency.find(s, tables.idempotency_keys, request_id, "CreateJudgeVersion", fingerprint)
            if earlier is not None:
                number = int(earlier.rsplit("/", 1)[1])
            else:
                number = row.latest_version + 1
                name = f"{parent}/versions/{number}"
                await repo.insert_judge_version(
                    row.id, JudgeVersion(name, number, {**config, "notes": notes}, current_actor(), utcnow())
                )
                await idempotency.remember(s, tables.idempotency_keys, request_id, "CreateJudgeVersion", fingerprint, name)
                await self._event(repo, row.project, "JUDGE_VERSION_CREATED", name)
            version_row = await repo.judge_version_row(row.id, number)
        self._committed(row.project)
        return _judge_version(parent, version_row)

    async def get_judge_version(self, name: str) -> JudgeVersion:
        parts = JUDGE_VERSION.parse(name)
        judge_name = JUDGE.format(project=parts["project"], judge=parts["judge"])
        async with self.db.read() as s:
            repo = RegistryRepository(s)
            row = await repo.judge_row(judge_name)
            if row is None:
                raise NotFound(f"judge {judge_name} does not exist", reason="JUDGE_NOT_FOUND")
            number = row.latest_version if parts["version"] == "latest" else int(parts["version"])
            version_row = await repo.judge_version_row(row.id, number)
        if version_row is None:
            raise NotFound(f"judge version {name} does not exist", reason="JUDGE_VERSION_NOT_FOUND")
        return _judge_version(judge_name, version_row)

    async def list_judge_versions(self, parent: str, size: int, token: str) -> Page:
        JUDGE.parse(parent, "parent")
        limit = page_size(size)
        cursor = self.tokens.decode(token, [parent], int)
        async with self.db.read() as s:
            repo = RegistryRepository(s)
            row = await repo.judge_row(parent)
            if row is None:
                raise NotFound(f"judge {parent} does not exist", reason="JUDGE_NOT_FOUND")
            rows = await repo.list_judge_versions(row.id, cursor[0] if cursor else None, limit + 1)
        next_token = self.tokens.encode([rows[limit - 1].version], [parent]) if len(rows) > limit else ""
        return Page([_judge_version(parent, r) for r in rows[:limit]], next_token)


def _judge(row) -> Judge:
    return Judge(row.name, row.display_name, row.description, row.latest_version, row.creator, aware(row.create_time))


def _judge_version(judge_name: str, row) -> JudgeVersion:
    return JudgeVersion(
        f"{judge_name}/versions/{row.version}", row.version, dict(row.config), row.creator, aware(row.create_time)
    )
