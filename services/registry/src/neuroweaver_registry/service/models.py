"""Model use cases: create (idempotent), get, list, update, archive/restore, delete."""

from __future__ import annotations

from datetime import datetime

from neuroweaver_runtime import idempotency
from neuroweaver_runtime.auth import current_actor
from neuroweaver_runtime.errors import AlreadyExists, FailedPrecondition, NotFound, Violations
from neuroweaver_runtime.etag import check_etag
from neuroweaver_runtime.filtering import parse_filter, parse_order_by
from neuroweaver_runtime.names import PROJECT, validate_id
from neuroweaver_runtime.pagination import Page, page_size
from neuroweaver_runtime.timestamps import utcnow

from ..domain.model import MODEL, Model, ModelState, validate_model_fields
from .base import UseCases, event, get_model

MODEL_UPDATABLE = {"display_name", "description", "specialization", "base_model", "labels"}


class ModelUseCases(UseCases):
    async def create(self, parent: str, model_id: str, model: Model, request_id: str, fingerprint: str) -> Model:
        project = PROJECT.parse(parent, "parent")["project"]
        validate_id(model_id, "model_id", "model id")
        request_id = idempotency.validate_request_id(request_id)
        v = Violations()
        validate_model_fields(model, v)
        v.raise_if_any()
        name = MODEL.format(project=project, model=model_id)
        async with self.uow.transaction() as uow:
            earlier = await uow.find_request(request_id, "CreateModel", fingerprint)
            if earlier is None:
                exists = AlreadyExists(f"model {name} already exists", reason="MODEL_ALREADY_EXISTS", metadata={"model": name})
                if await uow.models.get(name) is not None:
                    raise exists
                now = utcnow()
                model.name, model.state, model.creator = name, ModelState.ACTIVE, current_actor()
                model.create_time = model.update_time = now
                with uow.duplicate(exists):
                    await uow.models.add(model)
                await uow.remember_request(request_id, "CreateModel", fingerprint, name)
                await event(uow, project, "MODEL_CREATED", name, name)
            result = await uow.models.get(earlier or name, aliases=True)
            if result is None:  # AIP-155 retry of a create whose model was deleted since: nothing to return, nothing to redo
                raise NotFound(
                    f"model {earlier} created by this request_id has since been deleted",
                    reason="MODEL_NOT_FOUND",
                    metadata={"model": earlier or name},
                )
        return result

    async def get(self, name: str) -> Model:
        async with self.uow.read() as uow:
            return await get_model(uow, name, aliases=True)

    async def list(self, parent: str, size: int, token: str, filter_text: str, order_by: str) -> Page[Model]:
        project = PROJECT.parse(parent, "parent")["project"]
        limit = page_size(size)
        filters = parse_filter(
            filter_text, {"specialization", "base_model"}, enums={"state": ("STATE_", {s.value for s in ModelState})}
        )
        order_field, desc = parse_order_by(order_by, {"name", "create_time", "update_time"}, "name")
        query = [parent, filter_text, order_by]
        cursor = self.tokens.decode(token, query, str if order_field == "name" else datetime, str)
        async with self.uow.read() as uow:
            items, after = await uow.models.page(project, filters, order_field, desc, cursor, limit)
        return Page(items, self.tokens.encode(after, query) if after else "")

    async def update(self, model: Model, paths: set[str], etag: str) -> Model:
        v = Violations()
        validate_model_fields(model, v)
        v.raise_if_any()
        async with self.uow.transaction() as uow:
            current = await get_model(uow, model.name, lock=True, field="model.name")
            check_etag(current.name, current.revision, etag)
            await uow.models.update(current, update_time=utcnow(), **{p: getattr(model, p) for p in paths})
            await event(uow, current.project, "MODEL_UPDATED", current.name, current.name, fields=",".join(sorted(paths)))
            return await get_model(uow, current.name, aliases=True)

    async def set_state(self, name: str, state: ModelState, etag: str) -> Model:
        async with self.uow.transaction() as uow:
            model = await get_model(uow, name, lock=True)
            check_etag(model.name, model.revision, etag)
            if model.state is not state:
                await uow.models.update(model, state=state, update_time=utcnow())
                kind = "MODEL_ARCHIVED" if state is ModelState.ARCHIVED else "MODEL_RESTORED"
                await event(uow, model.project, kind, name, name)
            return await get_model(uow, name, aliases=True)

    async def delete(self, name: str, force: bool, etag: str) -> None:
        async with self.uow.transaction() as uow:
            model = await get_model(uow, name, lock=True)
            check_etag(model.name, model.revision, etag)
            count = await uow.versions.count(model)
            if count and not force:
                raise FailedPrecondition(
                    f"model {name} still has {count} version(s); delete with force=true to remove them too",
                    reason="MODEL_HAS_VERSIONS",
                    metadata={"versions": str(count)},
                )
            await uow.models.delete(model)
            await event(uow, model.project, "MODEL_DELETED", name, name, versions_deleted=count)
