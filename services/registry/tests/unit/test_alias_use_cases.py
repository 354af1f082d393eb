"""Alias use cases on in-memory repositories (tests/unit/conftest.py): compare-and-set, what may be aliased,
history, rollback, and that a refused move leaves nothing behind."""

from __future__ import annotations

import pytest

from neuroweaver_registry.domain.model import AliasAction, Artifact, Model, ModelState, ModelVersion, VersionState
from neuroweaver_runtime.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound

P = "projects/default"


async def _model_with_versions(fakes, *versions: str, model_id: str = "m") -> str:
    await fakes.registry.models.create(P, model_id, Model(name="", base_model="smollm2"), "", "fp")
    name = f"{P}/models/{model_id}"
    for version in versions:
        mv = ModelVersion(name="", version="", artifact=Artifact("file:///a", "0f" * 32, 1))
        await fakes.registry.versions.create(name, version, "", mv, "", "fp")
    return name


async def test_set_moves_the_alias_records_history_and_an_event_and_wakes_watchers(fakes):
    model = await _model_with_versions(fakes, "1.0.0", "1.1.0")
    fakes.notifier.woken.clear()
    moved = await fakes.registry.aliases.set(model, "production", "1.0.0", "-", "first rollout")
    assert (moved.name, moved.version, moved.reason) == (f"{model}/aliases/production", "1.0.0", "first rollout")
    again = await fakes.registry.aliases.set(model, "production", "1.1.0", "1.0.0", "better")
    assert again.version == "1.1.0"
    assert (await fakes.registry.aliases.get(f"{model}/aliases/production")).version == "1.1.0"
    assert (await fakes.registry.models.get(model)).aliases == {"production": "1.1.0"}
    assert (await fakes.registry.versions.get(f"{model}/versions/production")).version == "1.1.0"
    history = (await fakes.registry.aliases.history(f"{model}/aliases/production", 0, "")).items
    assert [(e.action, e.from_version, e.to_version) for e in history] == [
        (AliasAction.SET, "1.0.0", "1.1.0"),
        (AliasAction.SET, "", "1.0.0"),
    ]
    assert fakes.event_types()[-2:] == ["ALIAS_SET", "ALIAS_SET"]
    assert fakes.notifier.woken == ["default", "default"]


@pytest.mark.parametrize(
    ("expected", "current_ok"),
    [("-", False), ("1.1.0", False), ("1.0.0", True), ("", True)],
)
async def test_compare_and_set(fakes, expected, current_ok):
    model = await _model_with_versions(fakes, "1.0.0", "1.1.0")
    await fakes.registry.aliases.set(model, "production", "1.0.0", "", "")
    commits = fakes.uow.commits
    if current_ok:
        assert (await fakes.registry.aliases.set(model, "production", "1.1.0", expected, "")).version == "1.1.0"
        return
    with pytest.raises(Aborted) as caught:
        await fakes.registry.aliases.set(model, "production", "1.1.0", expected, "")
    assert caught.value.reason == "ALIAS_VERSION_MISMATCH"
    assert caught.value.metadata == {"current_version": "1.0.0", "expected_version": expected}
    assert fakes.uow.commits == commits and fakes.uow.rollbacks >= 1
    assert (await fakes.registry.aliases.get(f"{model}/aliases/production")).version == "1.0.0"


async def test_a_new_alias_with_expected_version_is_a_mismatch(fakes):
    model = await _model_with_versions(fakes, "1.0.0")
    with pytest.raises(Aborted) as caught:
        await fakes.registry.aliases.set(model, "canary", "1.0.0", "0.9.0", "")
    assert caught.value.metadata["current_version"] == ""


async def test_a_deprecated_version_cannot_be_aliased_and_nothing_is_written(fakes):
    model = await _model_with_versions(fakes, "1.0.0")
    await fakes.registry.versions.set_state(f"{model}/versions/1.0.0", VersionState.DEPRECATED, "old", "")
    events = len(fakes.store.events)
    with pytest.raises(FailedPrecondition) as caught:
        await fakes.registry.aliases.set(model, "production", "1.0.0", "", "")
    assert caught.value.reason == "VERSION_DEPRECATED"
    assert len(fakes.store.events) == events and not fakes.store.history and not fakes.store.aliases


async def test_an_archived_model_moves_no_alias(fakes):
    model = await _model_with_versions(fakes, "1.0.0")
    await fakes.registry.aliases.set(model, "production", "1.0.0", "", "")
    await fakes.registry.models.set_state(model, ModelState.ARCHIVED, "")
    for move in (
        fakes.registry.aliases.set(model, "canary", "1.0.0", "", ""),
        fakes.registry.aliases.delete(f"{model}/aliases/production", "", ""),
    ):
        with pytest.raises(FailedPrecondition) as caught:
            await move
        assert caught.value.reason == "MODEL_ARCHIVED"


async def test_alias_ids_and_targets_are_checked(fakes):
    model = await _model_with_versions(fakes, "1.0.0")
    with pytest.raises(InvalidArgument) as caught:
        await fakes.registry.aliases.set(model, "latest", "1.0.0", "", "")
    assert caught.value.reason == "RESERVED_ALIAS"
    with pytest.raises(InvalidArgument) as caught:
        await fakes.registry.aliases.set(model, "production", "1.0.0", "", "r" * 1025)
    assert caught.value.reason == "FIELD_TOO_LONG"
    with pytest.raises(NotFound) as caught:
        await fakes.registry.aliases.set(model, "production", "2.0.0", "", "")
    assert caught.value.reason == "VERSION_NOT_FOUND"
    with pytest.raises(NotFound) as caught:
        await fakes.registry.aliases.set(f"{P}/models/nope", "production", "1.0.0", "", "")
    assert caught.value.reason == "MODEL_NOT_FOUND"


async def test_rollback_returns_to_the_previous_target_or_a_named_one(fakes):
    model = await _model_with_versions(fakes, "1.0.0", "1.1.0", "1.2.0")
    alias = f"{model}/aliases/production"
    await fakes.registry.aliases.set(model, "production", "1.0.0", "", "")
    with pytest.raises(FailedPrecondition) as caught:
        await fakes.registry.aliases.rollback(alias, "", "", "")
    assert caught.value.reason == "NO_PREVIOUS_VERSION"
    await fakes.registry.aliases.set(model, "production", "1.2.0", "", "")
    back = await fakes.registry.aliases.rollback(alias, "", "", "1.2.0")
    assert (back.version, back.reason) == ("1.0.0", "rollback")
    assert (await fakes.registry.aliases.rollback(alias, "1.1.0", "pin", "")).version == "1.1.0"
    entries = (await fakes.registry.aliases.history(alias, 0, "")).items
    assert [e.action for e in entries[:2]] == [AliasAction.ROLLBACK, AliasAction.ROLLBACK]
    assert fakes.event_types()[-1] == "ALIAS_ROLLED_BACK"
    with pytest.raises(NotFound):
        await fakes.registry.aliases.rollback(f"{model}/aliases/none", "", "", "")


async def test_delete_is_compare_and_set_and_kept_in_history(fakes):
    model = await _model_with_versions(fakes, "1.0.0")
    alias = f"{model}/aliases/production"
    await fakes.registry.aliases.set(model, "production", "1.0.0", "", "")
    with pytest.raises(Aborted):
        await fakes.registry.aliases.delete(alias, "2.0.0", "")
    await fakes.registry.aliases.delete(alias, "1.0.0", "retired")
    assert (await fakes.registry.aliases.list(model, 0, "")).items == []
    with pytest.raises(NotFound):
        await fakes.registry.aliases.get(alias)
    with pytest.raises(NotFound):
        await fakes.registry.aliases.delete(alias, "", "")
    entries = (await fakes.registry.aliases.history(alias, 0, "")).items
    assert (entries[0].action, entries[0].from_version, entries[0].to_version) == (AliasAction.DELETE, "1.0.0", "")
    with pytest.raises(NotFound) as caught:
        await fakes.registry.aliases.history(f"{model}/aliases/never", 0, "")
    assert caught.value.reason == "ALIAS_NOT_FOUND"


async def test_history_pages(fakes):
    model = await _model_with_versions(fakes, "1.0.0", "1.1.0")
    for i in range(5):
        await fakes.registry.aliases.set(model, "production", "1.0.0" if i % 2 else "1.1.0", "", f"move {i}")
    alias = f"{model}/aliases/production"
    first = await fakes.registry.aliases.history(alias, 2, "")
    second = await fakes.registry.aliases.history(alias, 2, first.next_page_token)
    third = await fakes.registry.aliases.history(alias, 2, second.next_page_token)
    reasons = [e.reason for page in (first, second, third) for e in page.items]
    assert reasons == [f"move {i}" for i in range(4, -1, -1)] and third.next_page_token == ""
    with pytest.raises(InvalidArgument):
        await fakes.registry.aliases.history(f"{model}/aliases/other", 2, first.next_page_token)
