"""Deployer use cases: each public method validates, writes one transaction (deployment + revision), then
asks the controller to converge. Status is written by the controller, never here."""

from __future__ import annotations

import builtins
import copy
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime

from neuroweaver_kube.manifests import model_server_manifests, to_yaml
from neuroweaver_runtime import idempotency
from neuroweaver_runtime.auth import current_actor
from neuroweaver_runtime.db import Database
from neuroweaver_runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Violations
from neuroweaver_runtime.etag import check_etag
from neuroweaver_runtime.filtering import parse_filter, parse_order_by
from neuroweaver_runtime.names import PROJECT, validate_id
from neuroweaver_runtime.notify import Notifier
from neuroweaver_runtime.pagination import Page, PageTokens, page_size
from neuroweaver_runtime.timestamps import utcnow

from ..adapters import tables
from ..adapters.kube import KubeDefaults, model_server_spec
from ..adapters.registry import RegistryGateway
from ..adapters.repository import DeployerRepository, to_deployment, to_resolved
from ..domain.model import (
    DEPLOYMENT,
    Backend,
    Deployment,
    ResolvedVersion,
    Revision,
    State,
    alias_version_name,
    served_model_name,
    validate_replicas,
    validate_spec,
)
from .controller import Controller, target_of

log = logging.getLogger("neuroweaver.deployer")


class DeployerService:
    def __init__(
        self,
        db: Database,
        notifier: Notifier,
        tokens: PageTokens,
        registry: RegistryGateway,
        controller: Controller,
        *,
        kube: KubeDefaults,
    ) -> None:
        self.db, self.notifier, self.tokens = db, notifier, tokens
        self.registry, self.controller = registry, controller
        self.kube = kube
        self.on_alias_change: Callable[[], None] | None = None  # set by the app: re-syncs the alias follower

    # -- helpers ---------------------------------------------------------------------------------

    async def _resolve(self, d: Deployment) -> ResolvedVersion:
        if d.model_alias:
            return await self.registry.resolve(alias_version_name(d.model_alias), "deployment.model_alias")
        return await self.registry.resolve(d.model_version, "deployment.model_version")

    @staticmethod
    async def _row(repo: DeployerRepository, name: str, *, for_update: bool = False, field: str = "name"):
        DEPLOYMENT.parse(name, field)
        row = await repo.row(name, for_update=for_update)
        if row is None:
            raise NotFound(f"deployment {name} does not exist", reason="DEPLOYMENT_NOT_FOUND", metadata={"deployment": name})
        return row

    def _check_backend(self, d: Deployment) -> None:
        if d.backend not in self.controller.backends:
            raise FailedPrecondition(
                f"the {d.backend.value.lower()} backend is not configured on this deployer",
                reason="BACKEND_NOT_CONFIGURED",
                metadata={"backend": d.backend.value},
            )

    def _changed(self, name: str) -> None:
        self.notifier.wake(name)
        if self.on_alias_change is not None:
            self.on_alias_change()

    # -- create / read ---------------------------------------------------------------------------

    async def create(self, parent: str, deployment_id: str, d: Deployment, request_id: str, fingerprint: str) -> Deployment:
        project = PROJECT.parse(parent, "parent")["project"]
        validate_id(deployment_id, "deployment_id", "deployment id")
        once = idempotency.CreateOnce.of(tables.idempotency_keys, "CreateDeployment", request_id, fingerprint)
        v = Violations()
        validate_spec(d, v, creating=True)
        v.raise_if_any()
        d.name = DEPLOYMENT.format(project=project, deployment=deployment_id)
        self._check_backend(d)
        version = await self._resolve(d)
        async with self.db.transaction() as s:
            repo = DeployerRepository(s)
            earlier = await once.earlier(s)
            if earlier is None:
                if await repo.row(d.name) is not None:
                    raise AlreadyExists(
                        f"deployment {d.name} already exists", reason="DEPLOYMENT_ALREADY_EXISTS", metadata={"deployment": d.name}
                    )
                now = utcnow()
                d.state, d.revision, d.served_model_name = State.PENDING, 1, served_model_name(version)
                d.create_time = d.update_time = now
                row_id = await repo.insert(d, version)
                await repo.add_revision(row_id, Revision(d.name, 1, version.name, "create", current_actor(), now))
                await once.remember(s, d.name)
            result = to_deployment(await repo.row(earlier or d.name))
        if earlier is None:
            self._changed(d.name)
            self.controller.kick(d.name)
        return result

    async def get(self, name: str) -> Deployment:
        async with self.db.read() as s:
            return to_deployment(await self._row(DeployerRepository(s), name))

    async def list(self, parent: str, size: int, token: str, filter_text: str, order_by: str) -> Page:
        project = PROJECT.parse(parent, "parent")["project"]
        limit = page_size(size)
        filters = parse_filter(filter_text, {"state", "backend"})
        order_field, desc = parse_order_by(order_by, {"name", "create_time"}, "name")
        query = [parent, filter_text, order_by]
        cursor = self.tokens.decode(token, query, *((str,) if order_field == "name" else (datetime, str)))
        state = backend = None
        labels_eq: list[tuple[str, str, bool]] = []
        for c in filters:
            value = c.value.upper().removeprefix("STATE_").removeprefix("BACKEND_")
            if c.field == "state":
                if value not in State.__members__ or c.op != "=":
                    raise InvalidArgument(
                        "filter: state = PENDING|PROGRESSING|AVAILABLE|DEGRADED|FAILED|DELETING",
                        field="filter",
                        reason="INVALID_FILTER",
                    )
                state = value
            elif c.field == "backend":
                if value not in Backend.__members__ or c.op != "=":
                    raise InvalidArgument("filter: backend = LOCAL|KUBERNETES", field="filter", reason="INVALID_FILTER")
                backend = value
            else:
                labels_eq.append((c.label_key or "", c.value, c.op == "="))
        items: list[Deployment] = []
        last = None
        async with self.db.read() as s:
            repo = DeployerRepository(s)
            while len(items) <= limit:
                rows = await repo.list(project, state, backend, order_field, desc, cursor, limit + 1)
                for r in rows:
                    cursor = [r.name] if order_field == "name" else [r.create_time.isoformat(), r.name]
                    if all((r.labels.get(k) == val) == eq for k, val, eq in labels_eq):
                        items.append(to_deployment(r))
                        last = cursor
                        if len(items) > limit:
                            break
                if len(rows) <= limit:
                    break
        next_token = ""
        if len(items) > limit:
            items = items[:limit]
            d = items[-1]
            assert d.create_time is not None  # every stored deployment has one
            last = [d.name] if order_field == "name" else [d.create_time.isoformat(), d.name]
            next_token = self.tokens.encode(last, query)
        return Page(items, next_token)

    async def list_revisions(self, parent: str, size: int, token: str) -> Page:
        limit = page_size(size)
        cursor = self.tokens.decode(token, [parent], int)
        async with self.db.read() as s:
            repo = DeployerRepository(s)
            row = await self._row(repo, parent, field="parent")
            revs = await repo.revisions(row.id, row.name, int(cursor[0]) if cursor else None, limit + 1)
        next_token = self.tokens.encode([revs[limit - 1].revision], [parent]) if len(revs) > limit else ""
        return Page(revs[:limit], next_token)

    # -- changes ---------------------------------------------------------------------------------

    async def update(self, d: Deployment, paths: set[str], etag: str) -> Deployment:
        async with self.db.transaction() as s:
            current = to_deployment(await self._row(DeployerRepository(s), d.name, field="deployment.name"))
        check_etag(current.name, current.generation, etag)
        merged = copy.deepcopy(current)
        for p in paths:
            setattr(merged, p, copy.deepcopy(getattr(d, p)))
        if "model_version" in paths and d.model_version and "model_alias" not in paths:
            merged.model_alias = ""
        if "model_alias" in paths and d.model_alias and "model_version" not in paths:
            merged.model_version = ""
        v = Violations()
        validate_spec(merged, v, creating=False)
        v.raise_if_any()
        version = await self._resolve(merged) if paths & {"model_version", "model_alias"} else None
        return await self._write_spec(merged, paths, version, "update", current.generation)

    async def _write_spec(
        self, d: Deployment, paths: set[str], version: ResolvedVersion | None, cause: str, generation: int
    ) -> Deployment:
        async with self.db.transaction() as s:
            repo = DeployerRepository(s)
            row = await self._row(repo, d.name, for_update=True)
            check_etag_generation(row, generation)
            if row.state == State.DELETING.value:
                raise FailedPrecondition(f"{d.name} is being deleted", reason="DEPLOYMENT_DELETING")
            values = {p: _column_value(d, p) for p in paths}
            values["model_version"], values["model_alias"] = d.model_version, d.model_alias
            now = utcnow()
            if version is not None and version.name != row.served_version:
                revision = row.revision + 1
                values.update(
                    revision=revision,
                    served_version=version.name,
                    target=version,
                    served_model_name=served_model_name(version),
                    state=State.PROGRESSING.value,  # until the backend reports the new version rolled out
                )
                await repo.add_revision(row.id, Revision(d.name, revision, version.name, cause, current_actor(), now))
            await repo.update(row.id, update_time=now, **values)
            result = to_deployment(await repo.row(d.name))
        self._changed(d.name)
        self.controller.kick(d.name)
        return result

    async def scale(self, name: str, replicas: int) -> Deployment:
        async with self.db.transaction() as s:
            repo = DeployerRepository(s)
            row = await self._row(repo, name, for_update=True)
            validate_replicas(replicas, Backend(row.backend))
            if row.state == State.DELETING.value:
                raise FailedPrecondition(f"{name} is being deleted", reason="DEPLOYMENT_DELETING")
            if row.replicas != replicas:
                await repo.update(row.id, replicas=replicas, update_time=utcnow())
            result = to_deployment(await repo.row(name))
        self._changed(name)
        self.controller.kick(name)
        return result

    async def rollback(self, name: str, to_revision: int) -> Deployment:
        if to_revision < 0:
            raise InvalidArgument("to_revision must not be negative", field="to_revision", reason="INVALID_REVISION")
        async with self.db.transaction() as s:
            repo = DeployerRepository(s)
            row = await self._row(repo, name)
            number = to_revision or row.revision - 1
            if number >= row.revision and to_revision:
                raise InvalidArgument(
                    f"to_revision must be below the current revision {row.revision}",
                    field="to_revision",
                    reason="INVALID_REVISION",
                )
            rev = await repo.revision(row.id, name, number) if number >= 1 else None
            current = to_deployment(row)
        if rev is None:
            raise FailedPrecondition(
                f"{name} has no revision {number} to roll back to" if to_revision else f"{name} has no previous revision",
                reason="NO_PREVIOUS_REVISION",
            )
        version = await self.registry.resolve(rev.model_version, "to_revision")
        # Rolling back pins the version: a followed alias would otherwise move it forward again.
        current.model_version, current.model_alias = rev.model_version, ""
        return await self._write_spec(current, set(), version, "rollback", current.generation)

    async def follow_alias(self, name: str, alias_version: ResolvedVersion | None = None) -> bool:
        """Re-resolves the alias a deployment follows and rolls it when it moved. True when it rolled."""
        d = await self.get(name)
        if not d.model_alias:
            return False
        version = alias_version or await self.registry.resolve(alias_version_name(d.model_alias), "model_alias")
        if version.name == d.served_version:
            return False
        before = d.served_version.rsplit("/", 1)[-1]
        await self._write_spec(d, set(), version, f"alias:{before}->{version.version}", d.generation)
        log.info("alias moved", extra={"fields": {"deployment": name, "from": before, "to": version.version}})
        return True

    async def delete(self, name: str, etag: str) -> None:
        async with self.db.transaction() as s:
            repo = DeployerRepository(s)
            row = await self._row(repo, name, for_update=True)
            check_etag(row.name, row.generation, etag)
            await repo.update(row.id, bump=False, state=State.DELETING.value, update_time=utcnow())
            d, version = to_deployment(row), to_resolved(row)
        self.notifier.wake(name)
        await self.controller.remove(d, version)
        async with self.db.transaction() as s:
            repo = DeployerRepository(s)
            row = await repo.row(name, for_update=True)
            if row is not None:
                await repo.delete(row.id)
        self._changed(name)

    # -- watch & render --------------------------------------------------------------------------

    async def watch(self, name: str) -> AsyncIterator[Deployment]:
        DEPLOYMENT.parse(name)
        subscription = self.notifier.subscribe(name)
        try:
            last = None
            first = True
            while True:
                async with self.db.read() as s:
                    row = await DeployerRepository(s).row(name)
                if row is None:
                    if first:
                        raise NotFound(f"deployment {name} does not exist", reason="DEPLOYMENT_NOT_FOUND")
                    return
                first = False
                d = to_deployment(row)
                key = (d.state, d.ready_replicas, d.endpoint, d.served_version, d.revision, d.replicas, d.generation,
                       tuple((c.type, c.status, c.reason) for c in d.conditions))  # fmt: skip
                if key != last:
                    last = key
                    yield d
                await subscription.wait(timeout=5.0)
        finally:
            subscription.close()

    async def render(self, name: str, spec: Deployment | None) -> tuple[str, builtins.list[str]]:
        if name:
            async with self.db.read() as s:
                row = await self._row(DeployerRepository(s), name)
            d, resolved = to_deployment(row), to_resolved(row)
            assert resolved is not None  # a stored deployment has its resolved target
            version = resolved
        else:
            if spec is None or not spec.name:
                raise InvalidArgument("set name, or deployment with its name", field="deployment.name", reason="MISSING_NAME")
            DEPLOYMENT.parse(spec.name, "deployment.name")
            v = Violations()
            validate_spec(spec, v, creating=True)
            v.raise_if_any()
            d = spec
            version = await self._resolve(d)
            d.served_model_name = served_model_name(version)
        try:
            objects = model_server_manifests(model_server_spec(target_of(d, version), self.kube))
        except ValueError as exc:
            raise InvalidArgument(f"cannot render manifests: {exc}", field="deployment", reason="INVALID_MANIFEST_SPEC") from exc
        return to_yaml(objects), [f"{o['kind']}/{o['metadata']['name']}" for o in objects]


def check_etag_generation(row, generation: int) -> None:
    """Writes based on a read see no change in between (update/rollback read, then write)."""
    from neuroweaver_runtime.errors import Aborted

    if row.generation != generation:
        raise Aborted(f"{row.name} changed while this request was processed; retry", reason="CONCURRENT_MODIFICATION")


def _column_value(d: Deployment, path: str):
    from dataclasses import asdict

    value = getattr(d, path)
    return asdict(value) if path in ("autoscaling", "resources", "serving") else value


__all__ = ["DeployerService", "Page"]
