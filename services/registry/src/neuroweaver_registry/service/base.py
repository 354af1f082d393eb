"""What every registry use case shares: the unit of work, page tokens, audit events and model lookups."""

from __future__ import annotations

from neuroweaver_runtime.auth import current_actor
from neuroweaver_runtime.errors import NotFound
from neuroweaver_runtime.pagination import PageTokens
from neuroweaver_runtime.timestamps import utcnow

from ..domain.model import MODEL, Model, ModelEvent
from .ports import UnitOfWork, UnitOfWorkFactory


class UseCases:
    """Each public method of a subclass is one transaction (or one read) with its audit event."""

    def __init__(self, uow: UnitOfWorkFactory, page_tokens: PageTokens) -> None:
        self.uow = uow
        self.tokens = page_tokens


async def event(uow: UnitOfWork, project: str, type_: str, resource: str, model: str = "", **details: object) -> None:
    """The audit event of a write, with the caller (on-behalf-of included) as its actor."""
    await uow.append_event(
        project,
        ModelEvent(type_, resource, model, current_actor(), {k: str(v) for k, v in details.items()}, create_time=utcnow()),
    )


async def get_model(uow: UnitOfWork, name: str, *, lock: bool = False, aliases: bool = False, field: str = "name") -> Model:
    """The model `name` (validated as `field`), or MODEL_NOT_FOUND; `lock` holds its row until the commit."""
    MODEL.parse(name, field)
    model = await uow.models.get(name, lock=lock, aliases=aliases)
    if model is None:
        raise NotFound(f"model {name} does not exist", reason="MODEL_NOT_FOUND", metadata={"model": name})
    return model
