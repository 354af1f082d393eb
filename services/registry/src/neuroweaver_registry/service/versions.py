"""Model version use cases: create (explicit semver or bump, idempotent), get (cached hot path), list, labels, state,
metrics, and the comparison of two versions."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from datetime import datetime

from neuroweaver_runtime import idempotency
from neuroweaver_runtime.auth import current_actor
from neuroweaver_runtime.errors import AlreadyExists, InvalidArgument, NotFound, Violations
from neuroweaver_runtime.etag import check_etag
from neuroweaver_runtime.filtering import parse_filter, parse_order_by
from neuroweaver_runtime.names import validate_id
from neuroweaver_runtime.pagination import Page, PageTokens, page_size
from neuroweaver_runtime.timestamps import utcnow

from ..domain import versions as semver_rules
from ..domain.compare import Comparison, compare_versions, validate_tolerances
from ..domain.model import (
    MODEL,
    VERSION,
    Artifact,
    Metric,
    Model,
    ModelVersion,
    VersionState,
    add_export,
    check_labels,
    validate_export_artifact,
    validate_metrics,
    validate_new_version,
)
from ..domain.rules import change_version_state, require_active
from .base import UseCases, event, get_model
from .cache import VersionCache
from .ports import UnitOfWork, UnitOfWorkFactory


def _version_missing(version: str, model_name: str) -> NotFound:
    return NotFound(
        f"version {version} of {model_name} does not exist", reason="VERSION_NOT_FOUND", metadata={"version": version}
    )


def _alias_missing(ref: str, model_name: str) -> NotFound:
    return NotFound(
        f"{ref!r} is neither a version nor an alias of {model_name}", reason="ALIAS_NOT_FOUND", metadata={"alias": ref}
    )


async def resolve(uow: UnitOfWork, name: str, field: str = "name", *, lock: bool = False) -> tuple[Model, ModelVersion]:
    """(model, version with details) for `.../versions/{semver|alias|latest}`; `lock` holds the model's row first,
    so what is read after it is current until the commit."""
    parts = VERSION.parse(name, field)
    model_name = MODEL.format(project=parts["project"], model=parts["model"])
    model = await get_model(uow, model_name, lock=lock, field=field)
    ref = parts["version"]
    if semver_rules.looks_like_version(ref):
        version = str(semver_rules.parse_version(ref, field))
    elif ref == "latest":
        version = model.latest_version
        if not version:
            raise NotFound(f"model {model_name} has no versions yet", reason="VERSION_NOT_FOUND")
    else:
        validate_id(ref, field, "alias")
        alias = await uow.aliases.get(model, ref)
        if alias is None:
            raise _alias_missing(ref, model_name)
        version = alias.version
    found = await uow.versions.get(model, version)
    if found is None:
        raise _version_missing(version, model_name)
    return model, found


class VersionUseCases(UseCases):
    def __init__(self, uow: UnitOfWorkFactory, page_tokens: PageTokens, cache: VersionCache | None = None) -> None:
        super().__init__(uow, page_tokens)
        # Only sound if every wake-up of the notifier invalidates it (InvalidatingNotifier); see service/cache.py.
        self.cache = cache

    async def create(
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
        async with self.uow.transaction() as uow:
            earlier = await uow.find_request(request_id, "CreateModelVersion", fingerprint)
            if earlier is not None:
                found = await uow.versions.get(await get_model(uow, parent, field="parent"), earlier.rsplit("/", 1)[1])
                if found is None:  # the model was deleted (and re-created) since the first call
                    raise NotFound(
                        f"version {earlier} created by this request_id has since been deleted",
                        reason="VERSION_NOT_FOUND",
                        metadata={"version": earlier.rsplit("/", 1)[1]},
                    )
                return found
            # The model row lock serialises version creation per model, so concurrent bumps never collide.
            model = await get_model(uow, parent, lock=True, field="parent")
            require_active(model)
            if requested is None:
                highest_text = await uow.versions.highest(model)
                taken = False  # a bump is above the highest existing version, so it cannot exist yet
            else:
                highest_text, taken = await uow.versions.highest_and_taken(model, semver_rules.sort_key(requested))
            highest = semver_rules.parse_version(highest_text) if highest_text else None
            version = requested or semver_rules.bump(highest, bump)
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
                mv.lineage.base_model = model.base_model
            with uow.duplicate(AlreadyExists(f"version {version} already exists", reason="VERSION_ALREADY_EXISTS")):
                await uow.versions.add(model, mv, semver_rules.sort_key(version))
            new_latest = str(version) if highest is None or version.compare(highest) > 0 else model.latest_version
            await uow.models.update(model, latest_version=new_latest, version_count=model.version_count + 1, update_time=now)
            await uow.remember_request(request_id, "CreateModelVersion", fingerprint, mv.name)
            await event(uow, model.project, "VERSION_CREATED", mv.name, parent, version=mv.version)
        # What a re-read would return: the row as inserted; no alias can point at a version that did not exist.
        mv.aliases, mv.revision = [], 1
        return mv

    async def get(self, name: str) -> ModelVersion:
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
            async with self.uow.read() as uow:
                return (await resolve(uow, name))[1]
        async with self.uow.read() as uow:
            found = await uow.versions.resolve(kind, model_name, ref)
        if not found.model_exists:
            raise NotFound(f"model {model_name} does not exist", reason="MODEL_NOT_FOUND", metadata={"model": model_name})
        if kind == "latest":
            version = found.latest_version
            if not version:
                raise NotFound(f"model {model_name} has no versions yet", reason="VERSION_NOT_FOUND")
        elif kind == "alias":
            if found.alias_target is None:
                raise _alias_missing(ref, model_name)
            version = found.alias_target
        else:
            version = ref
        if found.version is None:
            raise _version_missing(version, model_name)
        if cache is not None:
            cache.put(name, project, token, found.version)
        return found.version

    async def list(self, parent: str, size: int, token: str, filter_text: str, order_by: str) -> Page[ModelVersion]:
        limit = page_size(size)
        filters = parse_filter(
            filter_text, {"base_model", "training_job"}, enums={"state": ("STATE_", {s.value for s in VersionState})}
        )
        order_field, desc = parse_order_by(order_by, {"version", "create_time"}, "version desc")
        query = [parent, filter_text, order_by]
        cursor = self.tokens.decode(token, query, str if order_field == "version" else datetime, int)
        async with self.uow.read() as uow:
            model = await get_model(uow, parent, field="parent")
            items, after = await uow.versions.page(model, filters, order_field, desc, cursor, limit)
        return Page(items, self.tokens.encode(after, query) if after else "")

    async def update_labels(self, name: str, labels: dict[str, str], etag: str) -> ModelVersion:
        v = Violations()
        check_labels(labels, "model_version.labels", v)
        v.raise_if_any()
        async with self.uow.transaction() as uow:
            model, version = await resolve(uow, name, "model_version.name", lock=True)
            check_etag(version.name, version.revision, etag)
            await uow.versions.update(version, labels=labels, update_time=utcnow())
            await event(uow, model.project, "VERSION_UPDATED", version.name, model.name, fields="labels")
            return await self._reread(uow, model, version)

    async def set_state(self, name: str, state: VersionState, reason: str, etag: str) -> ModelVersion:
        async with self.uow.transaction() as uow:
            model, version = await resolve(uow, name, lock=True)
            check_etag(version.name, version.revision, etag)
            if change_version_state(version, state):
                await uow.versions.update(version, state=state, update_time=utcnow())
                await event(
                    uow,
                    model.project,
                    "VERSION_STATE_CHANGED",
                    version.name,
                    model.name,
                    from_state=version.state.value,
                    to_state=state.value,
                    reason=reason,
                )
            return await self._reread(uow, model, version)

    async def append_metrics(self, name: str, metrics: builtins.list[Metric]) -> ModelVersion:
        if not metrics:
            raise InvalidArgument("metrics must not be empty", field="metrics", reason="NO_METRICS")
        v = Violations()
        validate_metrics(metrics, v, "metrics")
        v.raise_if_any()
        async with self.uow.transaction() as uow:
            model, version = await resolve(uow, name)
            now = utcnow()
            for metric in metrics:
                metric.record_time = now
                metric.source = metric.source or current_actor()
            await uow.versions.add_metrics(version, metrics)
            await uow.versions.update(version, update_time=now)
            metric_names = ",".join(m.name for m in metrics[:20])
            await event(uow, model.project, "VERSION_METRICS_APPENDED", version.name, model.name, metrics=metric_names)
            return await self._reread(uow, model, version)

    async def add_artifact(self, name: str, artifact: Artifact) -> ModelVersion:
        """Add an export to a version (idempotent for the same bytes; other bytes for the same kind → ALREADY_EXISTS)."""
        v = Violations()
        validate_export_artifact(artifact, v, "artifact")
        v.raise_if_any()
        async with self.uow.transaction() as uow:
            model, version = await resolve(uow, name, lock=True)
            require_active(model)
            now = utcnow()
            artifact.create_time = now
            try:
                added = add_export(version, artifact)
            except ValueError as exc:
                raise AlreadyExists(
                    f"{exc}; artifacts are immutable: delete nothing, export under another quantization",
                    reason="ARTIFACT_ALREADY_EXISTS",
                    metadata={"format": artifact.format.value, "quantization": artifact.quantization},
                ) from None
            if not added:
                return version
            version.update_time = now
            await uow.versions.set_artifacts(version)
            await event(
                uow, model.project, "VERSION_ARTIFACT_ADDED", version.name, model.name, format=artifact.format.value,
                quantization=artifact.quantization, sha256=artifact.sha256, uri=artifact.uri,
            )  # fmt: skip
            return await self._reread(uow, model, version)

    async def compare(
        self, base_name: str, candidate_name: str, tolerances: Mapping[str, float] | None = None
    ) -> tuple[ModelVersion, ModelVersion, Comparison]:
        tolerances = tolerances or {}
        v = Violations()
        validate_tolerances(tolerances, v, "metric_tolerances")
        v.raise_if_any()
        async with self.uow.read() as uow:
            base_model, base = await resolve(uow, base_name, "base_version")
            cand_model, cand = await resolve(uow, candidate_name, "candidate_version")
        if base_model.key != cand_model.key:
            relation = "UNRELATED"
        else:
            order = semver_rules.parse_version(cand.version).compare(semver_rules.parse_version(base.version))
            relation = "NEWER" if order > 0 else "OLDER" if order < 0 else "EQUAL"
        return base, cand, compare_versions(base, cand, relation, tolerances)

    @staticmethod
    async def _reread(uow: UnitOfWork, model: Model, version: ModelVersion) -> ModelVersion:
        found = await uow.versions.get(model, version.version)
        if found is None:  # cannot happen: written in this transaction under the model's lock
            raise _version_missing(version.version, model.name)
        return found
