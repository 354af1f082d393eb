"""Version use cases on in-memory repositories: numbering, idempotent creates, state changes, metrics, compare."""

from __future__ import annotations

import pytest

from neuroweaver_registry.domain.model import Artifact, Direction, Metric, Model, ModelState, ModelVersion, VersionState
from neuroweaver_runtime.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from neuroweaver_runtime.etag import etag_for

P = "projects/default"
MODEL = f"{P}/models/m"
REQUEST = "7d7b1e4a-55f4-4f25-9d0e-3d2a4f1c2b11"


def _mv(*metrics: Metric) -> ModelVersion:
    return ModelVersion(name="", version="", artifact=Artifact("file:///a", "0f" * 32, 1), metrics=list(metrics))


@pytest.fixture
async def model(fakes):
    await fakes.registry.models.create(P, "m", Model(name="", base_model="smollm2"), "", "fp")
    return MODEL


async def test_explicit_and_bumped_versions_move_latest(fakes, model):
    versions = fakes.registry.versions
    assert (await versions.create(model, "1.0.0-rc.1", "", _mv(), "", "a")).version == "1.0.0-rc.1"
    assert (await versions.create(model, "", "patch", _mv(), "", "b")).version == "1.0.1"  # a patch bump drops the tag
    assert (await versions.create(model, "", "minor", _mv(), "", "c")).version == "1.1.0"
    assert (await versions.create(model, "0.9.0", "", _mv(), "", "d")).version == "0.9.0"  # older: latest stays
    stored = await fakes.registry.models.get(model)
    assert (stored.latest_version, stored.version_count) == ("1.1.0", 4)
    latest = await versions.get(f"{model}/versions/latest")
    assert latest.version == "1.1.0" and latest.lineage.base_model == "smollm2"  # inherited from the model
    page = await versions.list(model, 3, "", "", "")
    rest = await versions.list(model, 3, page.next_page_token, "", "")
    assert [v.version for v in page.items + rest.items] == ["1.1.0", "1.0.1", "1.0.0-rc.1", "0.9.0"]
    assert fakes.event_types().count("VERSION_CREATED") == 4


async def test_versions_are_immutable_and_one_of_version_or_bump(fakes, model):
    versions = fakes.registry.versions
    await versions.create(model, "1.0.0", "", _mv(), "", "a")
    with pytest.raises(AlreadyExists) as caught:
        await versions.create(model, "1.0.0", "", _mv(), "", "b")
    assert caught.value.reason == "VERSION_ALREADY_EXISTS"
    for explicit, bump in (("", ""), ("1.2.0", "minor")):
        with pytest.raises(InvalidArgument) as caught:
            await versions.create(model, explicit, bump, _mv(), "", "c")
        assert caught.value.reason == "VERSION_OR_BUMP_REQUIRED"
    with pytest.raises(InvalidArgument) as caught:
        await versions.create(model, "1.0.0+build", "", _mv(), "", "d")
    assert caught.value.reason == "INVALID_VERSION"


async def test_a_retried_create_returns_the_first_result(fakes, model):
    versions = fakes.registry.versions
    first = await versions.create(model, "", "minor", _mv(), REQUEST, "body")
    again = await versions.create(model, "", "minor", _mv(), REQUEST, "body")
    assert again.version == first.version == "0.1.0" and (await fakes.registry.models.get(model)).version_count == 1
    with pytest.raises(InvalidArgument) as caught:
        await versions.create(model, "", "major", _mv(), REQUEST, "another body")
    assert caught.value.reason == "REQUEST_ID_REUSED"


async def test_an_archived_model_gets_no_new_version(fakes, model):
    await fakes.registry.models.set_state(model, ModelState.ARCHIVED, "")
    with pytest.raises(FailedPrecondition) as caught:
        await fakes.registry.versions.create(model, "1.0.0", "", _mv(), "", "a")
    assert caught.value.reason == "MODEL_ARCHIVED"
    assert fakes.store.versions == {}


async def test_state_changes_with_etag_and_the_alias_rule(fakes, model):
    versions = fakes.registry.versions
    created = await versions.create(model, "1.0.0", "", _mv(), "", "a")
    name = created.name
    with pytest.raises(Aborted):
        await versions.set_state(name, VersionState.VALIDATED, "", etag_for(name, created.revision + 1))
    validated = await versions.set_state(name, VersionState.VALIDATED, "eval passed", etag_for(name, created.revision))
    assert validated.state is VersionState.VALIDATED and validated.revision == created.revision + 1
    changes = fakes.event_types().count("VERSION_STATE_CHANGED")
    same = await versions.set_state(name, VersionState.VALIDATED, "again", "")
    assert same.revision == validated.revision and fakes.event_types().count("VERSION_STATE_CHANGED") == changes

    await fakes.registry.aliases.set(model, "production", "1.0.0", "", "")
    with pytest.raises(FailedPrecondition) as caught:
        await versions.set_state(f"{model}/versions/production", VersionState.DEPRECATED, "", "")
    assert caught.value.reason == "VERSION_HAS_ALIASES" and "production" in caught.value.message
    await fakes.registry.aliases.delete(f"{model}/aliases/production", "", "")
    deprecated = await versions.set_state(name, VersionState.DEPRECATED, "superseded", "")
    assert deprecated.state is VersionState.DEPRECATED
    event = [e for _, e in fakes.store.events if e.type == "VERSION_STATE_CHANGED"][-1]
    assert event.details == {"from_state": "VALIDATED", "to_state": "DEPRECATED", "reason": "superseded"}


async def test_resolution_errors(fakes, model):
    versions = fakes.registry.versions
    with pytest.raises(NotFound) as caught:
        await versions.get(f"{model}/versions/latest")
    assert caught.value.reason == "VERSION_NOT_FOUND"
    with pytest.raises(NotFound) as caught:
        await versions.get(f"{model}/versions/staging")
    assert caught.value.reason == "ALIAS_NOT_FOUND"
    with pytest.raises(NotFound) as caught:
        await versions.get(f"{P}/models/other/versions/1.0.0")
    assert caught.value.reason == "MODEL_NOT_FOUND"
    with pytest.raises(NotFound) as caught:
        await versions.set_state(f"{model}/versions/3.0.0", VersionState.VALIDATED, "", "")
    assert caught.value.reason == "VERSION_NOT_FOUND"


async def test_labels_and_metrics(fakes, model):
    versions = fakes.registry.versions
    created = await versions.create(model, "1.0.0", "", _mv(Metric("acc", 0.5, Direction.HIGHER)), "", "a")
    labelled = await versions.update_labels(created.name, {"stage": "qa"}, etag_for(created.name, created.revision))
    assert labelled.labels == {"stage": "qa"}
    with pytest.raises(InvalidArgument):
        await versions.update_labels(created.name, {"Bad": "x"}, "")
    appended = await versions.append_metrics(created.name, [Metric("acc", 0.7)])
    assert [(m.name, m.value) for m in appended.metrics] == [("acc", 0.5), ("acc", 0.7)]
    assert appended.metrics[1].source == "anonymous" and appended.metrics[1].record_time is not None
    with pytest.raises(InvalidArgument) as caught:
        await versions.append_metrics(created.name, [])
    assert caught.value.reason == "NO_METRICS"


async def test_compare_uses_declared_directions_and_tolerances(fakes, model):
    versions = fakes.registry.versions
    up, down = Direction.HIGHER, Direction.LOWER
    base = await versions.create(model, "1.0.0", "", _mv(Metric("acc", 0.80, up), Metric("p99_ms", 100.0, down)), "", "a")
    cand = await versions.create(model, "1.1.0", "", _mv(Metric("acc", 0.85, up), Metric("p99_ms", 103.0, down)), "", "b")
    _, _, strict = await versions.compare(base.name, cand.name)
    assert strict.semver_relation == "NEWER" and strict.recommendation == "EXPERIMENT"
    _, _, tolerant = await versions.compare(base.name, cand.name, {"p99_ms": 0.05})
    assert tolerant.recommendation == "PROMOTE", tolerant.reason
    _, _, reverse = await versions.compare(cand.name, base.name, {"p99_ms": 0.05})
    assert reverse.semver_relation == "OLDER" and reverse.recommendation == "KEEP_BASE"
    with pytest.raises(InvalidArgument) as caught:
        await versions.compare(base.name, cand.name, {"acc": float("nan")})
    assert [v.field for v in caught.value.violations] == ["metric_tolerances['acc']"]
