"""Alias use cases: set, get, list, delete, roll back and the alias history. Every move is compare-and-set capable,
recorded in the history and the audit log, and logged (aliases route production traffic)."""

from __future__ import annotations

import logging

from neuroweaver_runtime.auth import current_actor
from neuroweaver_runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from neuroweaver_runtime.pagination import Page, page_size
from neuroweaver_runtime.timestamps import utcnow

from ..domain import versions as semver_rules
from ..domain.model import ALIAS, MODEL, AliasAction, AliasHistoryEntry, Model, ModelAlias
from ..domain.rules import check_alias_id, check_aliasable, check_expected, require_active
from .base import UseCases, event, get_model
from .ports import UnitOfWork

log = logging.getLogger("neuroweaver.registry")


def _log_alias_move(what: str, alias: ModelAlias) -> None:
    """Aliases route production traffic: every committed move is one log line (with the call's request and trace id)."""
    log.info(
        what,
        extra={"fields": {"alias": alias.name, "version": alias.version, "actor": alias.actor, "reason": alias.reason[:200]}},
    )


def _model_of(alias_name: str, field: str = "name") -> tuple[str, str]:
    """(model name, alias id) of `projects/{p}/models/{m}/aliases/{a}`."""
    parts = ALIAS.parse(alias_name, field)
    return MODEL.format(project=parts["project"], model=parts["model"]), parts["alias"]


def _missing(name: str) -> NotFound:
    return NotFound(f"alias {name} does not exist", reason="ALIAS_NOT_FOUND")


async def _move(
    uow: UnitOfWork, model: Model, alias: str, target: str, action: AliasAction, expected: str, reason: str, field: str
) -> ModelAlias:
    """Points `alias` of the locked `model` at version `target`, after the rules and the compare-and-set."""
    require_active(model)
    version_text = str(semver_rules.parse_version(target, field))
    version = await uow.versions.get(model, version_text, details=False)
    if version is None:
        raise NotFound(
            f"version {version_text} of {model.name} does not exist",
            reason="VERSION_NOT_FOUND",
            metadata={"version": version_text},
        )
    check_aliasable(version)
    current_alias = await uow.aliases.get(model, alias)
    current = current_alias.version if current_alias else None
    alias_name = f"{model.name}/aliases/{alias}"
    check_expected(current, expected, alias_name)
    moved = ModelAlias(alias_name, version_text, current_actor(), reason, utcnow())
    await uow.aliases.set(model, alias, moved)
    await uow.aliases.append_history(
        model,
        AliasHistoryEntry(alias_name, action, current or "", version_text, moved.actor, reason, create_time=moved.update_time),
    )
    kind = "ALIAS_ROLLED_BACK" if action is AliasAction.ROLLBACK else "ALIAS_SET"
    await event(
        uow, model.project, kind, alias_name, model.name,
        alias=alias, from_version=current or "", to_version=version_text, reason=reason,
    )  # fmt: skip
    return moved


class AliasUseCases(UseCases):
    async def set(self, model: str, alias: str, version: str, expected: str, reason: str) -> ModelAlias:
        check_alias_id(alias, "alias")
        if len(reason) > 1024:
            raise InvalidArgument("reason is at most 1024 characters", field="reason", reason="FIELD_TOO_LONG")
        async with self.uow.transaction() as uow:
            locked = await get_model(uow, model, lock=True, field="model")
            result = await _move(uow, locked, alias, version, AliasAction.SET, expected, reason, "version")
        _log_alias_move("alias set", result)
        return result

    async def get(self, name: str) -> ModelAlias:
        model_name, alias = _model_of(name)
        async with self.uow.read() as uow:
            found = await uow.aliases.get(await get_model(uow, model_name), alias)
        if found is None:
            raise _missing(name)
        return found

    async def list(self, parent: str, size: int, token: str) -> Page[ModelAlias]:
        """A page of the model's aliases in name order; the token is the last alias name (keyset)."""
        limit = page_size(size)
        cursor = self.tokens.decode(token, [parent], str)
        async with self.uow.read() as uow:
            # One query in this transaction: a nested transaction per alias deadlocks on SQLite (BEGIN IMMEDIATE).
            aliases = await uow.aliases.all(await get_model(uow, parent, field="parent"))
        # A model has a handful of aliases (deployment stages), so the page is cut here rather than in SQL.
        rest = [a for a in aliases if cursor is None or a.name.rsplit("/", 1)[-1] > cursor[0]]
        next_token = self.tokens.encode([rest[limit - 1].name.rsplit("/", 1)[-1]], [parent]) if len(rest) > limit else ""
        return Page(rest[:limit], next_token)

    async def delete(self, name: str, expected: str, reason: str) -> None:
        model_name, alias = _model_of(name)
        async with self.uow.transaction() as uow:
            model = await get_model(uow, model_name, lock=True)
            require_active(model)
            current = await uow.aliases.get(model, alias)
            if current is None:
                raise _missing(name)
            check_expected(current.version, expected, name)
            now, actor = utcnow(), current_actor()
            await uow.aliases.delete(model, alias)
            await uow.aliases.append_history(
                model, AliasHistoryEntry(name, AliasAction.DELETE, current.version, "", actor, reason, create_time=now)
            )
            await event(
                uow, model.project, "ALIAS_DELETED", name, model.name, alias=alias, from_version=current.version, reason=reason
            )

    async def rollback(self, name: str, to_version: str, reason: str, expected: str) -> ModelAlias:
        model_name, alias = _model_of(name)
        async with self.uow.transaction() as uow:
            model = await get_model(uow, model_name, lock=True)
            if await uow.aliases.get(model, alias) is None:
                raise _missing(name)
            target = to_version
            if not target:
                last = await uow.aliases.last_move(model, alias)
                if last is None or not last.from_version:
                    raise FailedPrecondition(
                        f"alias {name} has no earlier target to roll back to; pass to_version",
                        reason="NO_PREVIOUS_VERSION",
                    )
                target = last.from_version
            result = await _move(uow, model, alias, target, AliasAction.ROLLBACK, expected, reason or "rollback", "to_version")
        _log_alias_move("alias rolled back", result)
        return result

    async def history(self, name: str, size: int, token: str) -> Page[AliasHistoryEntry]:
        model_name, alias = _model_of(name, "parent")
        limit = page_size(size)
        cursor = self.tokens.decode(token, [name], int)
        async with self.uow.read() as uow:
            model = await get_model(uow, model_name)
            entries = await uow.aliases.history(model, alias, cursor[0] if cursor else None, limit + 1)
            if not entries and cursor is None and await uow.aliases.get(model, alias) is None:
                raise NotFound(f"alias {name} has never existed", reason="ALIAS_NOT_FOUND")
        next_token = self.tokens.encode([entries[limit - 1].sequence], [name]) if len(entries) > limit else ""
        return Page(entries[:limit], next_token)
