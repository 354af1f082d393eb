"""Deployer use cases on in-memory repositories: create (idempotent), get/list, update, scale, rollback, delete and
alias following, with the real controller converging on a fake backend."""

from __future__ import annotations

import asyncio

import pytest

from neuroweaver_deployer.domain.model import Backend, Deployment, State
from neuroweaver_runtime.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from neuroweaver_runtime.etag import etag_for

P = "projects/default"
REQUEST = "7d7b1e4a-55f4-4f25-9d0e-3d2a4f1c2b11"
ALIAS = f"{P}/models/m/aliases/prod"


def _spec(version: str = f"{P}/models/m/versions/1.0.0", **kw) -> Deployment:
    return Deployment(name="", model_version=version, **kw)


async def eventually(check, timeout: float = 5.0):
    """Polls the async `check` until it returns something truthy (the controller converges in tasks of its own)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := await check()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached within {timeout}s")
        await asyncio.sleep(0.01)
    return result


async def _available(svc, name: str) -> Deployment:
    async def check():
        d = await svc.get(name)
        return d if d.state is State.AVAILABLE else None

    return await eventually(check)


async def test_create_is_idempotent_unique_and_converges(fakes):
    svc = fakes.service
    created = await svc.create(P, "d1", _spec(), REQUEST, "body")
    name = f"{P}/deployments/d1"
    assert (created.name, created.revision, created.generation, created.served_version) == (name, 1, 1, fakes.v1.name)
    assert created.served_model_name == f"m-1-0-0-{fakes.v1.artifact_sha256[:8]}" and created.key > 0
    again = await svc.create(P, "d1", _spec(), REQUEST, "body")  # a retry answers with the first result
    assert (again.name, again.key, again.generation, again.create_time) == (name, created.key, 1, created.create_time)
    with pytest.raises(InvalidArgument) as caught:
        await svc.create(P, "d2", _spec(), REQUEST, "another body")
    assert caught.value.reason == "REQUEST_ID_REUSED"
    with pytest.raises(AlreadyExists) as caught:
        await svc.create(P, "d1", _spec(), "", "body")
    assert caught.value.reason == "DEPLOYMENT_ALREADY_EXISTS"
    with pytest.raises(InvalidArgument) as caught:
        await svc.create(P, "d3", _spec(), "not-a-uuid", "body")
    assert caught.value.reason == "INVALID_REQUEST_ID"
    with pytest.raises(NotFound) as caught:  # the registry's answer, before anything is stored
        await svc.create(P, "d4", _spec(f"{P}/models/m/versions/9.9.9"), "", "body")
    assert caught.value.reason == "MODEL_VERSION_NOT_FOUND"
    with pytest.raises(FailedPrecondition) as caught:
        await svc.create(P, "d5", _spec(backend=Backend.KUBERNETES), "", "body")
    assert caught.value.reason == "BACKEND_NOT_CONFIGURED"
    assert [d.name for d in (await svc.list(P, 10, "", "", "")).items] == [name]
    [rev] = (await svc.list_revisions(name, 10, "")).items
    assert (rev.revision, rev.model_version, rev.cause) == (1, fakes.v1.name, "create")

    # The controller applies the stored target and writes the backend's status back (no new generation).
    ready = await _available(svc, name)
    assert (ready.ready_replicas, ready.endpoint, ready.generation) == (1, f"local:{name}", 1)
    assert [t.version for t in fakes.backend.applied] == [fakes.v1]
    assert {c.type: c.status for c in ready.conditions}["Available"] == "True"
    assert name in fakes.notifier.woken and fakes.alias_syncs


async def test_get_and_list_with_filters_orders_and_pages(fakes):
    svc = fakes.service
    for i in range(5):
        await svc.create(P, f"d{i}", _spec(labels={"team": "a" if i % 2 else "b"}), "", "fp")
    with pytest.raises(NotFound) as caught:
        await svc.get(f"{P}/deployments/missing")
    assert caught.value.reason == "DEPLOYMENT_NOT_FOUND"
    with pytest.raises(InvalidArgument):
        await svc.get("deployments/d1")

    async def all_pages(filter_text: str = "", order_by: str = "") -> list[str]:
        names, token = [], ""
        while True:
            page = await svc.list(P, 2, token, filter_text, order_by)
            names += [d.name.rsplit("/", 1)[1] for d in page.items]
            if not (token := page.next_page_token):
                return names

    assert await all_pages() == ["d0", "d1", "d2", "d3", "d4"]
    assert await all_pages(order_by="create_time desc") == ["d4", "d3", "d2", "d1", "d0"]
    assert await all_pages(order_by="name desc") == ["d4", "d3", "d2", "d1", "d0"]
    assert await all_pages('labels.team = "a"') == ["d1", "d3"]
    assert await all_pages('labels.team != "a"', "create_time") == ["d0", "d2", "d4"]
    assert await all_pages("backend = KUBERNETES") == []
    await _available(svc, f"{P}/deployments/d4")
    for i in range(4):
        await _available(svc, f"{P}/deployments/d{i}")
    assert await all_pages("state = AVAILABLE") == ["d0", "d1", "d2", "d3", "d4"]
    assert await all_pages("state = STATE_PENDING") == []
    for spelling in ("STATE_AVAILABLE", "available"):
        assert await all_pages(f"state = {spelling}") == ["d0", "d1", "d2", "d3", "d4"]
        assert await all_pages(f"state != {spelling}") == []
    assert await all_pages('backend != KUBERNETES AND labels.team = "a"') == ["d1", "d3"]  # `!=`: checked on each row
    with pytest.raises(InvalidArgument) as caught:
        await svc.list(P, 2, "", "state = SLEEPING", "")
    assert caught.value.reason == "INVALID_FILTER"
    first = await svc.list(P, 2, "", "", "")
    with pytest.raises(InvalidArgument) as caught:  # a token belongs to its query
        await svc.list(P, 2, first.next_page_token, "", "name desc")
    assert caught.value.reason == "PAGE_TOKEN_QUERY_MISMATCH"


async def test_update_rolls_a_new_version_and_checks_etags(fakes):
    svc = fakes.service
    name = f"{P}/deployments/d1"
    created = await svc.create(P, "d1", _spec(), "", "fp")
    with pytest.raises(Aborted) as caught:
        await svc.update(Deployment(name, display_name="x"), {"display_name"}, etag_for(name, 99))
    assert caught.value.reason == "ETAG_MISMATCH"

    renamed = await svc.update(Deployment(name, display_name="Service advisor"), {"display_name"}, etag_for(name, 1))
    assert (renamed.display_name, renamed.generation, renamed.revision) == ("Service advisor", 2, 1)
    assert renamed.served_version == fakes.v1.name and renamed.update_time >= created.update_time

    rolled = await svc.update(Deployment(name, model_version=fakes.v2.name), {"model_version"}, "")
    assert (rolled.revision, rolled.served_version, rolled.state, rolled.generation) == (
        2,
        fakes.v2.name,
        State.PROGRESSING,
        3,
    )
    assert rolled.target == fakes.v2
    revs = (await svc.list_revisions(name, 10, "")).items
    assert [(r.revision, r.model_version, r.cause) for r in revs] == [(2, fakes.v2.name, "update"), (1, fakes.v1.name, "create")]

    async def applied_v2() -> bool:  # a status report of the earlier apply (v1) may land first
        return bool(fakes.backend.applied) and fakes.backend.applied[-1].version == fakes.v2

    await eventually(applied_v2)
    assert (await _available(svc, name)).served_version == fakes.v2.name

    # Following an alias clears the pinned version; an invalid spec changes nothing.
    fakes.registry.aliases[f"{P}/models/m/versions/prod"] = fakes.v3.name
    followed = await svc.update(Deployment(name, model_alias=ALIAS), {"model_alias"}, "")
    assert (followed.model_alias, followed.model_version, followed.served_version) == (ALIAS, "", fakes.v3.name)
    with pytest.raises(InvalidArgument):
        await svc.update(Deployment(name, labels={"Bad Key": "x"}), {"labels"}, "")
    assert (await svc.get(name)).labels == {}


async def test_update_aborts_when_the_deployment_changed_meanwhile(fakes):
    svc = fakes.service
    name = f"{P}/deployments/d1"
    await svc.create(P, "d1", _spec(), "", "fp")

    async def concurrent_scale():
        fakes.registry.before_resolve = None
        await svc.scale(name, 3)

    fakes.registry.before_resolve = concurrent_scale  # runs between the update's read and its write
    with pytest.raises(Aborted) as caught:
        await svc.update(Deployment(name, model_version=fakes.v2.name), {"model_version"}, "")
    assert caught.value.reason == "CONCURRENT_MODIFICATION"
    stored = await svc.get(name)  # the failed write left nothing behind
    assert (stored.replicas, stored.served_version, stored.revision) == (3, fakes.v1.name, 1)
    assert len((await svc.list_revisions(name, 10, "")).items) == 1


async def test_scale(fakes):
    svc = fakes.service
    name = f"{P}/deployments/d1"
    await svc.create(P, "d1", _spec(), "", "fp")
    scaled = await svc.scale(name, 4)
    assert (scaled.replicas, scaled.generation, scaled.revision) == (4, 2, 1)
    assert (await svc.scale(name, 4)).generation == 2  # no change, no new generation
    await eventually(lambda: _ready(svc, name, 4))
    with pytest.raises(InvalidArgument) as caught:
        await svc.scale(name, 17)  # above the local backend's limit
    assert caught.value.reason == "INVALID_REPLICAS"
    with pytest.raises(NotFound):
        await svc.scale(f"{P}/deployments/missing", 1)
    async with fakes.uow.transaction() as uow:  # as a delete in progress leaves it
        await uow.deployments.update(scaled.key, bump=False, state=State.DELETING)
    with pytest.raises(FailedPrecondition) as caught:
        await svc.scale(name, 2)
    assert caught.value.reason == "DEPLOYMENT_DELETING"


async def _ready(svc, name: str, replicas: int) -> bool:
    d = await svc.get(name)
    return d.ready_replicas == replicas and d.state is State.AVAILABLE


async def test_rollback(fakes):
    svc = fakes.service
    name = f"{P}/deployments/d1"
    with pytest.raises(InvalidArgument) as caught:
        await svc.rollback(name, -1)
    assert caught.value.reason == "INVALID_REVISION"
    await svc.create(P, "d1", _spec(), "", "fp")
    with pytest.raises(FailedPrecondition) as caught:
        await svc.rollback(name, 0)
    assert caught.value.reason == "NO_PREVIOUS_REVISION"
    fakes.registry.aliases[f"{P}/models/m/versions/prod"] = fakes.v2.name
    await svc.update(Deployment(name, model_alias=ALIAS), {"model_alias"}, "")
    fakes.registry.aliases[f"{P}/models/m/versions/prod"] = fakes.v3.name
    assert await svc.follow_alias(name)
    with pytest.raises(InvalidArgument) as caught:
        await svc.rollback(name, 3)
    assert caught.value.reason == "INVALID_REVISION"

    back = await svc.rollback(name, 0)  # to the previous revision; pins its version
    assert (back.revision, back.served_version, back.model_version, back.model_alias) == (4, fakes.v2.name, fakes.v2.name, "")
    first = await svc.rollback(name, 1)
    assert (first.revision, first.served_version) == (5, fakes.v1.name)
    causes = [r.cause for r in (await svc.list_revisions(name, 10, "")).items]
    assert causes == ["rollback", "rollback", "alias:1.1.0->2.0.0", "update", "create"]
    page = await svc.list_revisions(name, 2, "")
    rest = await svc.list_revisions(name, 10, page.next_page_token)
    assert [r.revision for r in page.items + rest.items] == [5, 4, 3, 2, 1] and not rest.next_page_token
    with pytest.raises(NotFound):
        await svc.list_revisions(f"{P}/deployments/missing", 10, "")


async def test_delete_tears_down_and_forgets(fakes):
    svc = fakes.service
    name = f"{P}/deployments/d1"
    created = await svc.create(P, "d1", _spec(), "", "fp")
    await _available(svc, name)
    with pytest.raises(Aborted) as caught:
        await svc.delete(name, etag_for(name, 7))
    assert caught.value.reason == "ETAG_MISMATCH" and (await svc.get(name)).state is State.AVAILABLE
    await svc.delete(name, etag_for(name, created.generation))
    assert fakes.backend.removed == [name]
    async with fakes.uow.read() as view:
        assert await view.deployments.all() == []
        assert await view.deployments.revisions(created.key, name, None, 10) == []
    with pytest.raises(NotFound):
        await svc.get(name)
    with pytest.raises(NotFound):
        await svc.delete(name, "")
    # The name is free again, with a fresh history.
    again = await svc.create(P, "d1", _spec(), "", "fp")
    assert again.revision == 1 and len((await svc.list_revisions(name, 10, "")).items) == 1


async def test_follow_alias_rolls_only_when_the_alias_moved(fakes):
    svc = fakes.service
    name = f"{P}/deployments/d1"
    fakes.registry.aliases[f"{P}/models/m/versions/prod"] = fakes.v1.name
    followed = await svc.create(P, "d1", Deployment("", model_alias=ALIAS), "", "fp")
    assert (followed.served_version, followed.model_version) == (fakes.v1.name, "")
    assert not await svc.follow_alias(name)  # the alias points where it serves already

    fakes.registry.aliases[f"{P}/models/m/versions/prod"] = fakes.v2.name
    assert await svc.follow_alias(name)
    moved = await svc.get(name)
    assert (moved.served_version, moved.revision, moved.model_alias) == (fakes.v2.name, 2, ALIAS)
    assert (await svc.list_revisions(name, 1, "")).items[0].cause == "alias:1.0.0->1.1.0"
    assert (await _available(svc, name)).served_version == fakes.v2.name
    # The names callers send stay the same across the move; only the version-specific name changes.
    stable = (name, "d1", "m@prod", f"{P}/models/m@prod")
    assert followed.model_names == moved.model_names == stable and followed.served_model_name != moved.served_model_name
    assert fakes.backend.applied and {t.model_names for t in fakes.backend.applied} == {stable}
    # An event may carry the version it moved to: no registry look-up then.
    assert await svc.follow_alias(name, fakes.v3)
    assert (await svc.get(name)).served_version == fakes.v3.name

    pinned = await svc.create(P, "pinned", _spec(), "", "fp")
    assert pinned.model_names == (f"{P}/deployments/pinned", "pinned")  # no alias followed: no alias names
    assert not await svc.follow_alias(f"{P}/deployments/pinned")
    with pytest.raises(NotFound):
        await svc.follow_alias(f"{P}/deployments/missing")


async def test_render_and_watch(fakes):
    svc = fakes.service
    name = f"{P}/deployments/d1"
    created = await svc.create(P, "d1", _spec(), "", "fp")
    assert await svc.render(name, None) == (f"name: {name}\n", [f"Deployment/{created.served_model_name}"])
    preview = await svc.render("", Deployment(f"{P}/deployments/new", model_version=fakes.v2.name))
    assert preview[1] == [f"Deployment/m-1-1-0-{fakes.v2.artifact_sha256[:8]}"]
    with pytest.raises(InvalidArgument) as caught:
        await svc.render("", None)
    assert caught.value.reason == "MISSING_NAME"

    await _available(svc, name)
    watch = svc.watch(name)
    first = await anext(watch)
    assert first.state is State.AVAILABLE
    await svc.scale(name, 2)
    assert (await anext(watch)).replicas == 2
    await watch.aclose()
    with pytest.raises(NotFound):
        await anext(svc.watch(f"{P}/deployments/missing"))
