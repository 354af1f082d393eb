"""Models over gRPC on SQLite and PostgreSQL: CRUD, lists, etags, idempotency and every bad input."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.registry.v1 import registry_pb2 as pb
from neuroweaver.registry.v1 import registry_service_pb2 as rs
from neuroweaver_registry.domain.model import ModelState, VersionState
from neuroweaver_runtime.grpc_errors import field_violations

INVALID, NOT_FOUND, ABORTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED
FAILED, EXISTS = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS
P = "projects/default"


async def test_create_get_update_archive_restore_delete(registry, expect_error):
    stub = registry.stub
    m = await registry.model(display_name="Parts", specialization="parts", labels={"team": "ml"})
    assert m.state == pb.Model.STATE_ACTIVE and m.creator == "anonymous" and m.etag and m.version_count == 0
    got = await stub.GetModel(rs.GetModelRequest(name=m.name))
    assert got == m
    await expect_error(
        stub.CreateModel(rs.CreateModelRequest(parent=P, model_id=m.name.rsplit("/", 1)[1], model=pb.Model())),
        grpc.StatusCode.ALREADY_EXISTS, "MODEL_ALREADY_EXISTS",
    )  # fmt: skip

    upd = await stub.UpdateModel(
        rs.UpdateModelRequest(
            model=pb.Model(name=m.name, description="new", display_name="ignored", etag=m.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        )
    )
    assert upd.description == "new" and upd.display_name == "Parts" and upd.etag != m.etag
    # the old etag is stale now
    await expect_error(
        stub.UpdateModel(rs.UpdateModelRequest(model=pb.Model(name=m.name, description="x", etag=m.etag), update_mask=field_mask_pb2.FieldMask(paths=["description"]))),
        ABORTED, "ETAG_MISMATCH",
    )  # fmt: skip
    await expect_error(stub.ArchiveModel(rs.ArchiveModelRequest(name=m.name, etag=m.etag)), ABORTED, "ETAG_MISMATCH")
    await expect_error(stub.DeleteModel(rs.DeleteModelRequest(name=m.name, etag=m.etag)), ABORTED, "ETAG_MISMATCH")

    archived = await stub.ArchiveModel(rs.ArchiveModelRequest(name=m.name, etag=upd.etag))
    assert archived.state == pb.Model.STATE_ARCHIVED
    await expect_error(registry.version(m.name, bump=cpb.VERSION_BUMP_PATCH), FAILED, "MODEL_ARCHIVED")
    restored = await stub.RestoreModel(rs.RestoreModelRequest(name=m.name))
    assert restored.state == pb.Model.STATE_ACTIVE
    await registry.version(m.name, bump=cpb.VERSION_BUMP_PATCH)

    err = await expect_error(stub.DeleteModel(rs.DeleteModelRequest(name=m.name)), FAILED, "MODEL_HAS_VERSIONS")
    assert "force" in err.details()
    await stub.DeleteModel(rs.DeleteModelRequest(name=m.name, force=True))
    await expect_error(stub.GetModel(rs.GetModelRequest(name=m.name)), NOT_FOUND, "MODEL_NOT_FOUND")
    # the id is free again
    again = await stub.CreateModel(rs.CreateModelRequest(parent=P, model_id=m.name.rsplit("/", 1)[1], model=pb.Model()))
    assert again.version_count == 0


async def test_delete_without_versions_needs_no_force(registry, expect_error):
    m = await registry.model()
    await registry.stub.DeleteModel(rs.DeleteModelRequest(name=m.name, etag=m.etag))
    await expect_error(registry.stub.DeleteModel(rs.DeleteModelRequest(name=m.name)), NOT_FOUND, "MODEL_NOT_FOUND")


async def test_update_labels_replaces_the_map(registry):
    m = await registry.model(labels={"a": "1", "b": "2"})
    upd = await registry.stub.UpdateModel(
        rs.UpdateModelRequest(
            model=pb.Model(name=m.name, labels={"c": "3"}), update_mask=field_mask_pb2.FieldMask(paths=["labels"])
        )
    )
    assert dict(upd.labels) == {"c": "3"}


@pytest.mark.parametrize(
    ("model_id", "model", "field", "reason"),
    [
        ("Bad_ID", pb.Model(), "model_id", "INVALID_ID"),
        ("", pb.Model(), "model_id", "INVALID_ID"),
        ("x" * 64, pb.Model(), "model_id", "INVALID_ID"),
        ("ok", pb.Model(description="d" * 4001), "model.description", "INVALID_ARGUMENT"),
        ("ok", pb.Model(labels={f"k{i}": "v" for i in range(65)}), "model.labels", "INVALID_ARGUMENT"),
        ("ok", pb.Model(labels={"Bad Key": "v"}), "model.labels['Bad Key']", "INVALID_ARGUMENT"),
        ("ok", pb.Model(display_name="n" * 201), "model.display_name", "INVALID_ARGUMENT"),
    ],
)
async def test_create_model_bad_input(registry, expect_error, model_id, model, field, reason):
    err = await expect_error(
        registry.stub.CreateModel(rs.CreateModelRequest(parent=P, model_id=model_id, model=model)), INVALID, reason
    )
    assert field in [v.field for v in field_violations(err)]


@pytest.mark.parametrize("parent", ["", "projects", "projects/Default", "project/default", "projects/default/models"])
async def test_create_model_bad_parent(registry, expect_error, parent):
    reason = "MISSING_NAME" if not parent else "MALFORMED_NAME"
    await expect_error(
        registry.stub.CreateModel(rs.CreateModelRequest(parent=parent, model_id="ok", model=pb.Model())), INVALID, reason
    )


@pytest.mark.parametrize(
    "name", ["", "models/x", "projects/default/models/X", "projects/default/models/x/versions/1.0.0", "projects/default/models/"]
)
async def test_get_model_malformed_names(registry, expect_error, name):
    await expect_error(
        registry.stub.GetModel(rs.GetModelRequest(name=name)), INVALID, "MISSING_NAME" if not name else "MALFORMED_NAME"
    )


async def test_update_mask_errors(registry, expect_error):
    m = await registry.model()
    stub = registry.stub
    await expect_error(stub.UpdateModel(rs.UpdateModelRequest(model=pb.Model(name=m.name))), INVALID, "MISSING_UPDATE_MASK")
    for paths in (["state"], ["name"], ["labels", "etag"], ["descripton"]):
        await expect_error(
            stub.UpdateModel(rs.UpdateModelRequest(model=pb.Model(name=m.name), update_mask=field_mask_pb2.FieldMask(paths=paths))),
            INVALID, "INVALID_UPDATE_MASK",
        )  # fmt: skip
    await expect_error(
        stub.UpdateModel(rs.UpdateModelRequest(model=pb.Model(name=m.name, description="d" * 4001), update_mask=field_mask_pb2.FieldMask(paths=["description"]))),
        INVALID, "INVALID_ARGUMENT",
    )  # fmt: skip
    await expect_error(
        stub.UpdateModel(rs.UpdateModelRequest(model=pb.Model(name=P + "/models/nope-" + uuid.uuid4().hex[:6]), update_mask=field_mask_pb2.FieldMask(paths=["description"]))),
        NOT_FOUND, "MODEL_NOT_FOUND",
    )  # fmt: skip


async def test_create_model_request_id_idempotency(registry, expect_error):
    rid = str(uuid.uuid4())
    model_id = "idem-" + uuid.uuid4().hex[:8]
    req = rs.CreateModelRequest(parent=P, model_id=model_id, model=pb.Model(description="one"), request_id=rid)
    first = await registry.stub.CreateModel(req)
    second = await registry.stub.CreateModel(req)
    assert second.name == first.name and second.create_time == first.create_time and second.description == "one"
    other = rs.CreateModelRequest(parent=P, model_id=model_id, model=pb.Model(description="two"), request_id=rid)
    await expect_error(registry.stub.CreateModel(other), INVALID, "REQUEST_ID_REUSED")
    bad = rs.CreateModelRequest(parent=P, model_id="x" + model_id, model=pb.Model(), request_id="not-a-uuid")
    await expect_error(registry.stub.CreateModel(bad), INVALID, "INVALID_REQUEST_ID")


async def test_list_models_filters_order_and_pages(registry, expect_error):
    stub = registry.stub
    spec = "s" + uuid.uuid4().hex[:10]  # isolates this test's models from others sharing the server
    made = []
    for i in range(7):
        made.append(await registry.model(model_id=f"{spec}-{i}", specialization=spec, labels={"team": "ml" if i % 2 else "ops"}))
    await stub.ArchiveModel(rs.ArchiveModelRequest(name=made[0].name))

    async def collect(filter_text: str, order_by: str = "", size: int = 2) -> list[str]:
        names, token, pages = [], "", 0
        while True:
            resp = await stub.ListModels(
                rs.ListModelsRequest(parent=P, page_size=size, page_token=token, filter=filter_text, order_by=order_by)
            )
            assert len(resp.models) <= size
            names += [m.name for m in resp.models]
            pages += 1
            token = resp.next_page_token
            if not token:
                return names

    all_names = [m.name for m in made]
    assert await collect(f'specialization = "{spec}"') == all_names
    assert await collect(f'specialization = "{spec}"', "name desc", 3) == all_names[::-1]
    assert await collect(f"specialization = {spec}", "create_time") == all_names
    assert await collect(f"specialization = {spec}", "create_time desc", 1) == all_names[::-1]
    assert await collect(f'specialization = "{spec}" AND labels.team = "ml"') == [all_names[i] for i in (1, 3, 5)]
    assert await collect(f'specialization = "{spec}" AND labels.team != "ml"') == [all_names[i] for i in (0, 2, 4, 6)]
    assert await collect(f"specialization = {spec} AND state = ARCHIVED") == [all_names[0]]
    assert await collect(f"specialization = {spec} AND state = active") == all_names[1:]
    assert await collect(f"specialization = {spec} AND labels.nothing = x") == []
    for spelling in ("STATE_ARCHIVED", "ARCHIVED", "archived", '"state_Archived"'):  # the contract's name, or bare; any case
        assert await collect(f"specialization = {spec} AND state = {spelling}") == [all_names[0]]
        assert await collect(f"specialization = {spec} AND state != {spelling}") == all_names[1:]
    for bad in ("BOGUS", "STATE_UNSPECIFIED"):  # would silently match nothing
        err = await expect_error(
            stub.ListModels(rs.ListModelsRequest(parent=P, filter=f"state = {bad}")), INVALID, "INVALID_FILTER"
        )
        assert [v.field for v in field_violations(err)] == ["filter"] and "one of: STATE_ACTIVE, STATE_ARCHIVED" in err.details()

    first = await stub.ListModels(rs.ListModelsRequest(parent=P, page_size=2, filter=f"specialization = {spec}"))
    assert first.next_page_token
    await expect_error(
        stub.ListModels(rs.ListModelsRequest(parent=P, page_size=2, filter=f"specialization = {spec} AND state = ACTIVE", page_token=first.next_page_token)),
        INVALID, "PAGE_TOKEN_QUERY_MISMATCH",
    )  # fmt: skip
    await expect_error(
        stub.ListModels(rs.ListModelsRequest(parent=P, page_size=2, filter=f"specialization = {spec}", order_by="name desc", page_token=first.next_page_token)),
        INVALID, "PAGE_TOKEN_QUERY_MISMATCH",
    )  # fmt: skip
    tampered = first.next_page_token[:-3] + ("AAA" if not first.next_page_token.endswith("AAA") else "BBB")
    await expect_error(
        stub.ListModels(rs.ListModelsRequest(parent=P, page_size=2, filter=f"specialization = {spec}", page_token=tampered)),
        INVALID, "INVALID_PAGE_TOKEN",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("request_kwargs", "reason"),
    [
        ({"page_size": -1}, "INVALID_PAGE_SIZE"),
        ({"filter": "owner = me"}, "INVALID_FILTER"),
        ({"filter": "state = ACTIVE OR state = ARCHIVED"}, "INVALID_FILTER"),
        ({"order_by": "version"}, "INVALID_ORDER_BY"),
        ({"order_by": "name up"}, "INVALID_ORDER_BY"),
        ({"page_token": "garbage"}, "INVALID_PAGE_TOKEN"),
        ({"parent": "projects/"}, "MALFORMED_NAME"),
    ],
)
async def test_list_models_bad_requests(registry, expect_error, request_kwargs, reason):
    kwargs = {"parent": P, **request_kwargs}
    await expect_error(registry.stub.ListModels(rs.ListModelsRequest(**kwargs)), INVALID, reason)


def test_filter_state_values_are_the_contracts():
    """The filters' allowed states (the domain's) are the contract's enum names without prefix and UNSPECIFIED."""
    for domain, contract in ((ModelState, pb.Model.State), (VersionState, pb.ModelVersion.State)):
        assert {s.value for s in domain} == {n.removeprefix("STATE_") for n in contract.keys()} - {"UNSPECIFIED"}


async def test_list_models_page_size_is_capped_not_rejected(registry):
    resp = await registry.stub.ListModels(rs.ListModelsRequest(parent=P, page_size=100_000))
    assert len(resp.models) <= 1000
