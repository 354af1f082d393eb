"""Deployer use cases: each public method validates, writes one transaction (deployment + revision), then
asks the controller to converge. Status is written by the controller, never here, except that a change which needs
other replicas is stored PROGRESSING (`_rolls_out`): the status before it was about the previous spec."""

from __future__ import annotations

import builtins
import copy
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime

from neuroweaver_runtime import idempotency
from neuroweaver_runtime.auth import current_actor
from neuroweaver_runtime.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Violations
from neuroweaver_runtime.etag import check_etag
from neuroweaver_runtime.filtering import parse_filter, parse_order_by
from neuroweaver_runtime.names import PROJECT, validate_id
from neuroweaver_runtime.notify import Notifier
from neuroweaver_runtime.pagination import Page, PageTokens, page_size
from neuroweaver_runtime.timestamps import utcnow

from ..domain.model import (
    DEPLOYMENT,
    Backend,
    Deployment,
    ResolvedVersion,
    Revision,
    State,
    alias_version_name,
    check_co_served,
    check_engine_fits,
    served_model_name,
    validate_replicas,
    validate_spec,
)
from .controller import Controller, target_of
from .ports import DeploymentReads, DeploymentRepository, Registry, RenderManifests, UnitOfWorkFactory

log = logging.getLogger("neuroweaver.deployer")


class DeployerService:
    def __init__(
        self,
        uow: UnitOfWorkFactory,
        notifier: Notifier,
        tokens: PageTokens,
        registry: Registry,
        controller: Controller,
        *,
        render_manifests: RenderManifests,
    ) -> None:
        self.uow, self.notifier, self.tokens = uow, notifier, tokens
        self.registry, self.controller = registry, controller
        self.render_manifests = render_manifests
        self.on_alias_change: Callable[[], None] | None = None  # set by the app: re-syncs the alias follower

    # -- helpers ---------------------------------------------------------------------------------

    async def _resolve(self, d: Deployment) -> ResolvedVersion:
        if d.model_alias:
            version = await self.registry.resolve(alias_version_name(d.model_alias), "deployment.model_alias")
        else:
            version = await self.registry.resolve(d.model_version, "deployment.model_version")
        check_engine_fits(d.serving, version)
        return await self._with_co_served(d, version)

    async def _with_co_served(self, d: Deployment, version: ResolvedVersion) -> ResolvedVersion:
        """`version` with the deployment's additional versions resolved beside it (same base, each with an adapter the
        engine loads, or the base itself). An additional version that is the deployment's own (its alias moved onto it)
        is served once, as its own, which then also answers to `<deployment>/<version>`."""
        others = [
            await self.registry.resolve(name, f"deployment.serving.additional_versions[{i}]")
            for i, name in enumerate(d.serving.additional_versions)
            if name != version.name
        ]
        if others:
            check_co_served(version, others, d.serving, d.resources.gpus)
        return dataclasses.replace(version, co_served=tuple(others))

    @staticmethod
    def _found(name: str, d: Deployment | None) -> Deployment:
        if d is None:
            raise NotFound(f"deployment {name} does not exist", reason="DEPLOYMENT_NOT_FOUND", metadata={"deployment": name})
        return d

    async def _get(self, repo: DeploymentReads, name: str, *, field: str = "name") -> Deployment:
        DEPLOYMENT.parse(name, field)
        return self._found(name, await repo.get(name))

    async def _locked(self, repo: DeploymentRepository, name: str) -> Deployment:
        """The deployment under its row lock until the transaction ends (its writers take turns)."""
        DEPLOYMENT.parse(name, "name")
        return self._found(name, await repo.get(name, lock=True))

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
        request_id = idempotency.validate_request_id(request_id)
        v = Violations()
        validate_spec(d, v, creating=True)
        v.raise_if_any()
        d.name = DEPLOYMENT.format(project=project, deployment=deployment_id)
        self._check_backend(d)
        version = await self._resolve(d)
        async with self.uow.transaction() as uow:
            earlier = await uow.find_request(request_id, "CreateDeployment", fingerprint)
            if earlier is None:
                exists = AlreadyExists(
                    f"deployment {d.name} already exists", reason="DEPLOYMENT_ALREADY_EXISTS", metadata={"deployment": d.name}
                )
                if await uow.deployments.get(d.name) is not None:
                    raise exists
                now = utcnow()
                d.state, d.revision, d.served_model_name = State.PENDING, 1, served_model_name(version)
                d.served_version, d.target = version.name, version
                d.create_time = d.update_time = now
                with uow.duplicate(exists):  # a concurrent create of the same name committed first
                    await uow.deployments.add(d)
                await uow.deployments.add_revision(d.key, Revision(d.name, 1, version.name, "create", current_actor(), now))
                await uow.remember_request(request_id, "CreateDeployment", fingerprint, d.name)
            result = self._found(earlier or d.name, await uow.deployments.get(earlier or d.name))
        if earlier is None:
            self._changed(d.name)
            self.controller.kick(d.name)
        return result

    async def get(self, name: str) -> Deployment:
        async with self.uow.read() as view:
            return await self._get(view.deployments, name)

    async def list(self, parent: str, size: int, token: str, filter_text: str, order_by: str) -> Page:
        project = PROJECT.parse(parent, "parent")["project"]
        limit = page_size(size)
        enums = {"state": ("STATE_", {s.value for s in State}), "backend": ("BACKEND_", {b.value for b in Backend})}
        filters = parse_filter(filter_text, set(), enums=enums)
        order_field, desc = parse_order_by(order_by, {"name", "create_time"}, "name")
        query = [parent, filter_text, order_by]
        cursor = self.tokens.decode(token, query, *((str,) if order_field == "name" else (datetime, str)))
        state: State | None = None
        backend: Backend | None = None
        checks = []  # checked on each row read: labels, `!=`, a second `=` on state or backend
        for c in filters:
            if c.field == "state" and c.op == "=" and state is None:
                state = State(c.value)
            elif c.field == "backend" and c.op == "=" and backend is None:
                backend = Backend(c.value)
            else:
                checks.append(c)
        items: list[Deployment] = []
        async with self.uow.read() as view:
            while len(items) <= limit:
                found = await view.deployments.page(project, state, backend, order_field, desc, cursor, limit + 1)
                for d in found:
                    cursor = _cursor(d, order_field)
                    if all((_field_value(d, c.field) == c.value) == (c.op == "=") for c in checks):
                        items.append(d)
                        if len(items) > limit:
                            break
                if len(found) <= limit:
                    break
        next_token = ""
        if len(items) > limit:
            items = items[:limit]
            next_token = self.tokens.encode(_cursor(items[-1], order_field), query)
        return Page(items, next_token)

    async def list_revisions(self, parent: str, size: int, token: str) -> Page:
        limit = page_size(size)
        cursor = self.tokens.decode(token, [parent], int)
        async with self.uow.read() as view:
            d = await self._get(view.deployments, parent, field="parent")
            revs = await view.deployments.revisions(d.key, d.name, int(cursor[0]) if cursor else None, limit + 1)
        next_token = self.tokens.encode([revs[limit - 1].revision], [parent]) if len(revs) > limit else ""
        return Page(revs[:limit], next_token)

    # -- changes ---------------------------------------------------------------------------------

    async def update(self, d: Deployment, paths: set[str], etag: str) -> Deployment:
        async with self.uow.transaction() as uow:
            current = await self._get(uow.deployments, d.name, field="deployment.name")
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
        if version is None and "serving" in paths and merged.target is not None:
            if merged.serving.additional_versions or merged.target.co_served:  # the versions served beside it
                version = await self._with_co_served(merged, dataclasses.replace(merged.target, co_served=()))
        if version is None and "serving" in paths and merged.target is not None:
            check_engine_fits(merged.serving, merged.target)  # a new engine for the version served now
        return await self._write_spec(merged, paths, version, "update", current.generation)

    async def _write_spec(
        self, d: Deployment, paths: set[str], version: ResolvedVersion | None, cause: str, generation: int
    ) -> Deployment:
        async with self.uow.transaction() as uow:
            stored = await self._locked(uow.deployments, d.name)
            if stored.generation != generation:  # writes based on a read see no change in between
                raise Aborted(f"{d.name} changed while this request was processed; retry", reason="CONCURRENT_MODIFICATION")
            if stored.state is State.DELETING:
                raise FailedPrecondition(f"{d.name} is being deleted", reason="DEPLOYMENT_DELETING")
            values = {p: getattr(d, p) for p in paths}
            values["model_version"], values["model_alias"] = d.model_version, d.model_alias
            now = utcnow()
            if version is not None and version.name != stored.served_version:
                revision = stored.revision + 1
                values.update(
                    revision=revision,
                    served_version=version.name,
                    target=version,
                    served_model_name=served_model_name(version),
                )
                await uow.deployments.add_revision(
                    stored.key, Revision(d.name, revision, version.name, cause, current_actor(), now)
                )
            elif version is not None and stored.target is not None and version.co_served != stored.target.co_served:
                values["target"] = version  # other additional versions beside the same one: no new revision
            if _rolls_out(stored, dataclasses.replace(stored, **values)):
                values["state"] = State.PROGRESSING
            await uow.deployments.update(stored.key, update_time=now, **values)
            result = self._found(d.name, await uow.deployments.get(d.name))
        self._changed(d.name)
        self.controller.kick(d.name)
        return result

    async def scale(self, name: str, replicas: int) -> Deployment:
        async with self.uow.transaction() as uow:
            stored = await self._locked(uow.deployments, name)
            validate_replicas(replicas, stored.backend)
            if stored.state is State.DELETING:
                raise FailedPrecondition(f"{name} is being deleted", reason="DEPLOYMENT_DELETING")
            if stored.replicas != replicas:
                # another count always rolls out (_rolls_out): PROGRESSING until the backend reports it done
                await uow.deployments.update(stored.key, replicas=replicas, state=State.PROGRESSING, update_time=utcnow())
            result = self._found(name, await uow.deployments.get(name))
        self._changed(name)
        self.controller.kick(name)
        return result

    async def rollback(self, name: str, to_revision: int) -> Deployment:
        if to_revision < 0:
            raise InvalidArgument("to_revision must not be negative", field="to_revision", reason="INVALID_REVISION")
        async with self.uow.transaction() as uow:
            current = await self._get(uow.deployments, name)
            number = to_revision or current.revision - 1
            if number >= current.revision and to_revision:
                raise InvalidArgument(
                    f"to_revision must be below the current revision {current.revision}",
                    field="to_revision",
                    reason="INVALID_REVISION",
                )
            rev = await uow.deployments.revision(current.key, name, number) if number >= 1 else None
        if rev is None:
            raise FailedPrecondition(
                f"{name} has no revision {number} to roll back to" if to_revision else f"{name} has no previous revision",
                reason="NO_PREVIOUS_REVISION",
            )
        version = await self._with_co_served(current, await self.registry.resolve(rev.model_version, "to_revision"))
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
        version = await self._with_co_served(d, version)
        before = d.served_version.rsplit("/", 1)[-1]
        await self._write_spec(d, set(), version, f"alias:{before}->{version.version}", d.generation)
        log.info("alias moved", extra={"fields": {"deployment": name, "from": before, "to": version.version}})
        return True

    async def delete(self, name: str, etag: str) -> None:
        """Marks the deployment DELETING and returns once its lease holder (this replica or another) has torn down
        everything it ran and removed the row (see service/controller.py)."""
        gone = self.notifier.subscribe(name)  # before the mark: the teardown's wake-up must not be missed
        try:
            async with self.uow.transaction() as uow:
                d = await self._locked(uow.deployments, name)
                check_etag(d.name, d.generation, etag)
                if d.state is not State.DELETING:
                    await uow.deployments.update(d.key, bump=False, state=State.DELETING, update_time=utcnow())
            self.notifier.wake(name)
            self.controller.kick(name)
            while True:
                async with self.uow.read() as view:
                    if await view.deployments.get(name) is None:
                        break
                # Woken by the teardown here or its NOTIFY from another replica; the timeout covers SQLite across
                # processes, where the owner notices the mark at its next lease renewal.
                await gone.wait(timeout=1.0)
        finally:
            gone.close()
        self._changed(name)

    # -- watch & render --------------------------------------------------------------------------

    async def watch(self, name: str) -> AsyncIterator[Deployment]:
        DEPLOYMENT.parse(name)
        subscription = self.notifier.subscribe(name)
        try:
            last = None
            first = True
            while True:
                async with self.uow.read() as view:
                    d = await view.deployments.get(name)
                if d is None:
                    if first:
                        raise NotFound(f"deployment {name} does not exist", reason="DEPLOYMENT_NOT_FOUND")
                    return
                first = False
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
            async with self.uow.read() as view:
                d = await self._get(view.deployments, name)
            assert d.target is not None  # a stored deployment has its resolved target
            version = d.target
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
            return self.render_manifests(target_of(d, version))
        except ValueError as exc:
            raise InvalidArgument(f"cannot render manifests: {exc}", field="deployment", reason="INVALID_MANIFEST_SPEC") from exc


def _rolls_out(stored: Deployment, changed: Deployment) -> bool:
    """Whether `changed` needs replicas the backend does not run yet (another version, serving settings or count).
    It is PROGRESSING from the moment it is stored: whatever the deployment was (AVAILABLE included) described the
    replicas of the spec before, and only the backend's report of the new spec's rollout may say otherwise
    (derive_state refuses reports about the previous spec)."""
    if stored.target is None or changed.target is None:
        return False
    return target_of(stored, stored.target).rollout_key() != target_of(changed, changed.target).rollout_key()


def _field_value(d: Deployment, field: str) -> str | None:
    """What a filter compares on `d`: a label (None when it has none) or the stored state or backend."""
    if field.startswith("labels."):
        return d.labels.get(field[len("labels.") :])
    return d.state.value if field == "state" else d.backend.value


def _cursor(d: Deployment, order_field: str) -> builtins.list:
    """The keyset position of `d` in a list ordered by `order_field`."""
    if order_field == "name":
        return [d.name]
    assert d.create_time is not None  # every stored deployment has one
    return [d.create_time.isoformat(), d.name]


__all__ = ["DeployerService", "Page"]
