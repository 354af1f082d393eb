"""Model versions over gRPC on SQLite and PostgreSQL: explicit and bumped versions, lists, lookup, metrics, state."""

from __future__ import annotations

import math
import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.registry.v1 import registry_pb2 as pb
from neuroweaver.registry.v1 import registry_service_pb2 as rs
from neuroweaver_runtime.grpc_errors import field_violations

INVALID, NOT_FOUND, ABORTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED
UP, DOWN = cpb.METRIC_DIRECTION_HIGHER_IS_BETTER, cpb.METRIC_DIRECTION_LOWER_IS_BETTER
FAILED, EXISTS = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS
PATCH, MINOR, MAJOR = cpb.VERSION_BUMP_PATCH, cpb.VERSION_BUMP_MINOR, cpb.VERSION_BUMP_MAJOR


async def test_explicit_and_bumped_versions(registry, expect_error):
    m = await registry.model(base_model="smollm2")
    v1 = await registry.version(m.name, bump=PATCH)
    assert v1.version == "0.0.1" and v1.name == m.name + "/versions/0.0.1"
    assert v1.state == pb.ModelVersion.STATE_REGISTERED and v1.lineage.base_model == "smollm2"  # inherited from the model
    assert (await registry.version(m.name, bump=MINOR)).version == "0.1.0"
    assert (await registry.version(m.name, version="1.0.0-rc.1")).version == "1.0.0-rc.1"
    assert (await registry.version(m.name, bump=PATCH)).version == "1.0.1"  # never the release of the prerelease
    assert (await registry.version(m.name, version="1.0.0")).version == "1.0.0"  # explicit below the highest is fine
    assert (await registry.version(m.name, bump=MAJOR)).version == "2.0.0"
    got = await registry.stub.GetModel(rs.GetModelRequest(name=m.name))
    assert got.latest_version == "2.0.0" and got.version_count == 6
    await expect_error(registry.version(m.name, version="1.0.0"), EXISTS, "VERSION_ALREADY_EXISTS")


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"version": "1.0", "bump": 0}, "INVALID_VERSION"),
        ({"version": "v1.0.0", "bump": 0}, "INVALID_VERSION"),
        ({"version": "1.0.0+build", "bump": 0}, "INVALID_VERSION"),
        ({"version": "01.0.0", "bump": 0}, "INVALID_VERSION"),
        ({"version": "1.0.0", "bump": PATCH}, "VERSION_OR_BUMP_REQUIRED"),
        ({"version": "", "bump": 0}, "VERSION_OR_BUMP_REQUIRED"),
        ({"version": "", "bump": 42}, "INVALID_ENUM"),
    ],
)
async def test_create_version_bad_version_or_bump(registry, expect_error, kwargs, reason):
    m = await registry.model()
    await expect_error(registry.version(m.name, **kwargs), INVALID, reason)


@pytest.mark.parametrize(
    ("artifact", "field"),
    [
        (pb.Artifact(uri="file:///a"), "model_version.artifact.sha256"),
        (pb.Artifact(uri="file:///a", sha256="AB" * 32), "model_version.artifact.sha256"),
        (pb.Artifact(sha256="ab" * 32), "model_version.artifact.uri"),
        (pb.Artifact(uri="file:///a", sha256="ab" * 32, size_bytes=-5), "model_version.artifact.size_bytes"),
    ],
)
async def test_create_version_bad_artifact(registry, expect_error, artifact, field):
    m = await registry.model()
    req = rs.CreateModelVersionRequest(parent=m.name, bump=PATCH, model_version=pb.ModelVersion(artifact=artifact))
    err = await expect_error(registry.stub.CreateModelVersion(req), INVALID, "INVALID_ARGUMENT")
    assert field in [v.field for v in field_violations(err)]


async def test_create_version_unknown_model_and_bad_parent(registry, expect_error):
    await expect_error(
        registry.version("projects/default/models/nope-" + uuid.uuid4().hex[:6], bump=PATCH), NOT_FOUND, "MODEL_NOT_FOUND"
    )
    await expect_error(registry.version("projects/default/models/Bad", bump=PATCH), INVALID, "MALFORMED_NAME")


async def test_create_version_request_id(registry, expect_error):
    m = await registry.model()
    rid = str(uuid.uuid4())
    art = pb.Artifact(uri="file:///a", sha256="cd" * 32)
    req = rs.CreateModelVersionRequest(parent=m.name, bump=PATCH, model_version=pb.ModelVersion(artifact=art), request_id=rid)
    first = await registry.stub.CreateModelVersion(req)
    second = await registry.stub.CreateModelVersion(req)
    assert first.version == second.version == "0.0.1" and first.create_time == second.create_time
    assert (await registry.stub.GetModel(rs.GetModelRequest(name=m.name))).version_count == 1
    other = rs.CreateModelVersionRequest(parent=m.name, bump=MINOR, model_version=pb.ModelVersion(artifact=art), request_id=rid)
    await expect_error(registry.stub.CreateModelVersion(other), INVALID, "REQUEST_ID_REUSED")


async def test_list_versions_by_precedence_across_pages(registry, expect_error):
    m = await registry.model()
    created = [
        "1.0.0",
        "1.0.0-rc.1",
        "0.9.0",
        "1.0.0-alpha",
        "1.0.0-rc.10",
        "1.0.0-rc.2",
        "2.0.0-beta.1",
        "1.1.0",
        "1.0.0-alpha.1",
    ]
    for v in created:
        await registry.version(m.name, version=v, labels={"odd": str(created.index(v) % 2)})
    expected_desc = [
        "2.0.0-beta.1",
        "1.1.0",
        "1.0.0",
        "1.0.0-rc.10",
        "1.0.0-rc.2",
        "1.0.0-rc.1",
        "1.0.0-alpha.1",
        "1.0.0-alpha",
        "0.9.0",
    ]

    async def collect(order_by: str = "", size: int = 2, filter_text: str = "") -> list[str]:
        out, token = [], ""
        while True:
            resp = await registry.stub.ListModelVersions(
                rs.ListModelVersionsRequest(
                    parent=m.name, page_size=size, page_token=token, order_by=order_by, filter=filter_text
                )
            )
            out += [v.version for v in resp.model_versions]
            token = resp.next_page_token
            if not token:
                return out

    assert await collect() == expected_desc
    assert await collect("version", 4) == expected_desc[::-1]
    assert await collect("create_time", 3) == created
    assert await collect("create_time desc", 1) == created[::-1]
    assert await collect(filter_text='labels.odd = "1"') == [v for v in expected_desc if created.index(v) % 2]
    await registry.stub.SetModelVersionState(
        rs.SetModelVersionStateRequest(name=f"{m.name}/versions/1.1.0", state=pb.ModelVersion.STATE_DEPRECATED)
    )
    for spelling in ("STATE_DEPRECATED", "DEPRECATED", "deprecated"):  # the contract's name, or bare; any case
        assert await collect(filter_text=f"state = {spelling}") == ["1.1.0"]
        assert await collect(filter_text=f"state != {spelling}") == [v for v in expected_desc if v != "1.1.0"]
    for bad in ("RETIRED", "STATE_UNSPECIFIED"):
        err = await expect_error(
            registry.stub.ListModelVersions(rs.ListModelVersionsRequest(parent=m.name, filter=f"state = {bad}")),
            INVALID,
            "INVALID_FILTER",
        )
        assert [v.field for v in field_violations(err)] == ["filter"]
        assert "one of: STATE_DEPRECATED, STATE_REGISTERED, STATE_VALIDATED" in err.details()
    first = await registry.stub.ListModelVersions(rs.ListModelVersionsRequest(parent=m.name, page_size=2))
    await expect_error(
        registry.stub.ListModelVersions(rs.ListModelVersionsRequest(parent=m.name, page_size=2, order_by="version", page_token=first.next_page_token)),
        INVALID, "PAGE_TOKEN_QUERY_MISMATCH",
    )  # fmt: skip
    await expect_error(
        registry.stub.ListModelVersions(rs.ListModelVersionsRequest(parent=m.name, page_size=-3)), INVALID, "INVALID_PAGE_SIZE"
    )
    await expect_error(
        registry.stub.ListModelVersions(rs.ListModelVersionsRequest(parent=m.name, filter="specialization = x")),
        INVALID,
        "INVALID_FILTER",
    )
    other = await registry.model()
    await expect_error(
        registry.stub.ListModelVersions(rs.ListModelVersionsRequest(parent=other.name, page_size=2, page_token=first.next_page_token)),
        INVALID, "PAGE_TOKEN_QUERY_MISMATCH",
    )  # fmt: skip


async def test_get_version_by_semver_alias_and_latest(registry, expect_error):
    m = await registry.model()
    await registry.version(m.name, version="1.0.0")
    await registry.version(m.name, version="2.0.0-rc.1")
    await registry.version(m.name, version="1.5.0")
    get = registry.stub.GetModelVersion
    assert (await get(rs.GetModelVersionRequest(name=m.name + "/versions/latest"))).version == "2.0.0-rc.1"
    await registry.stub.SetModelAlias(rs.SetModelAliasRequest(model=m.name, alias="prod", version="1.0.0"))
    by_alias = await get(rs.GetModelVersionRequest(name=m.name + "/versions/prod"))
    assert by_alias.version == "1.0.0" and list(by_alias.aliases) == ["prod"]
    assert by_alias.name == m.name + "/versions/1.0.0"
    await expect_error(get(rs.GetModelVersionRequest(name=m.name + "/versions/3.0.0")), NOT_FOUND, "VERSION_NOT_FOUND")
    await expect_error(get(rs.GetModelVersionRequest(name=m.name + "/versions/canary")), NOT_FOUND, "ALIAS_NOT_FOUND")
    await expect_error(get(rs.GetModelVersionRequest(name=m.name + "/versions/Prod")), INVALID, "INVALID_ID")
    await expect_error(get(rs.GetModelVersionRequest(name=m.name + "/versions/1.0.0/x")), INVALID, "MALFORMED_NAME")
    await expect_error(get(rs.GetModelVersionRequest(name=m.name + "/versions/1.0.0+b")), INVALID, "MALFORMED_NAME")
    empty = await registry.model()
    await expect_error(get(rs.GetModelVersionRequest(name=empty.name + "/versions/latest")), NOT_FOUND, "VERSION_NOT_FOUND")
    await expect_error(
        get(rs.GetModelVersionRequest(name="projects/default/models/nope-" + uuid.uuid4().hex[:6] + "/versions/1.0.0")),
        NOT_FOUND,
        "MODEL_NOT_FOUND",
    )


async def test_metrics_state_labels_and_compare(registry, expect_error):
    m = await registry.model(base_model="smollm2")
    base = await registry.version(
        m.name, version="1.0.0",
        metrics=[pb.Metric(name="accuracy", value=0.8, direction=UP), pb.Metric(name="eval_loss", value=1.2, direction=DOWN)],
        lineage=pb.Lineage(hyperparameters={"lr": "1e-4"}),
    )  # fmt: skip
    assert [(x.name, x.value) for x in base.metrics] == [("accuracy", 0.8), ("eval_loss", 1.2)]
    cand = await registry.version(
        m.name,
        version="1.1.0",
        metrics=[pb.Metric(name="accuracy", value=0.7)],
        lineage=pb.Lineage(hyperparameters={"lr": "2e-4"}),
    )
    appended = await registry.stub.AppendModelVersionMetrics(
        rs.AppendModelVersionMetricsRequest(
            name=cand.name,
            metrics=[
                pb.Metric(name="accuracy", value=0.9, source="eval-job"),
                pb.Metric(name="eval_loss", value=1.0, direction=DOWN),
            ],
        )
    )
    assert [(x.name, x.value) for x in appended.metrics] == [("accuracy", 0.7), ("accuracy", 0.9), ("eval_loss", 1.0)]
    assert appended.metrics[1].source == "eval-job" and appended.metrics[2].source == "anonymous"
    assert appended.metrics[1].record_time.seconds > 0
    await expect_error(
        registry.stub.AppendModelVersionMetrics(rs.AppendModelVersionMetricsRequest(name=cand.name)), INVALID, "NO_METRICS"
    )
    err = await expect_error(
        registry.stub.AppendModelVersionMetrics(rs.AppendModelVersionMetricsRequest(name=cand.name, metrics=[pb.Metric(name="x", value=math.nan)])),
        INVALID, "INVALID_ARGUMENT",
    )  # fmt: skip
    assert [v.field for v in field_violations(err)] == ["metrics[0].value"]

    cmp = await registry.stub.CompareModelVersions(
        rs.CompareModelVersionsRequest(base_version=base.name, candidate_version=m.name + "/versions/latest")
    )
    assert cmp.semver_relation == rs.SEMVER_RELATION_NEWER and cmp.base_model_compatible
    # accuracy: declared by the base only (the candidate's records say nothing), which is enough
    assert cmp.recommendation == rs.RECOMMENDATION_PROMOTE, cmp.reason
    deltas = {d.name: d for d in cmp.metric_deltas}
    assert deltas["accuracy"].delta == pytest.approx(0.1) and deltas["accuracy"].improved
    assert deltas["eval_loss"].direction == cpb.METRIC_DIRECTION_LOWER_IS_BETTER and deltas["eval_loss"].improved
    assert [(d.field, d.base_value, d.candidate_value) for d in cmp.hyperparameter_diffs] == [
        ("hyperparameters.lr", "1e-4", "2e-4")
    ]
    reverse = await registry.stub.CompareModelVersions(
        rs.CompareModelVersionsRequest(base_version=cand.name, candidate_version=base.name)
    )
    assert reverse.semver_relation == rs.SEMVER_RELATION_OLDER and reverse.recommendation == rs.RECOMMENDATION_KEEP_BASE
    # A tolerance per metric: +0.1 accuracy within 20 % is no change, and eval_loss alone decides.
    tolerant = await registry.stub.CompareModelVersions(
        rs.CompareModelVersionsRequest(base_version=base.name, candidate_version=cand.name, metric_tolerances={"accuracy": 0.2})
    )
    tolerant_deltas = {d.name: d for d in tolerant.metric_deltas}
    assert not tolerant_deltas["accuracy"].improved and tolerant_deltas["eval_loss"].improved
    assert tolerant.recommendation == rs.RECOMMENDATION_PROMOTE and "eval_loss" in tolerant.reason
    err = await expect_error(
        registry.stub.CompareModelVersions(
            rs.CompareModelVersionsRequest(base_version=base.name, candidate_version=cand.name, metric_tolerances={"accuracy": -1})
        ),
        INVALID, "INVALID_ARGUMENT",
    )  # fmt: skip
    assert [v.field for v in field_violations(err)] == ["metric_tolerances['accuracy']"]
    # A metric without a declared direction is a change without a verdict, whatever its name suggests.
    plain = await registry.version(m.name, version="1.2.0", metrics=[pb.Metric(name="eval_loss", value=0.5)])
    unjudged = await registry.stub.CompareModelVersions(
        rs.CompareModelVersionsRequest(base_version=m.name + "/versions/1.1.0", candidate_version=plain.name)
    )
    loss = {d.name: d for d in unjudged.metric_deltas}["eval_loss"]
    assert loss.direction == cpb.METRIC_DIRECTION_LOWER_IS_BETTER  # the base declares it
    undeclared = await registry.version(m.name, version="1.3.0", metrics=[pb.Metric(name="eval_loss", value=0.4)])
    neither = await registry.stub.CompareModelVersions(
        rs.CompareModelVersionsRequest(base_version=plain.name, candidate_version=undeclared.name)
    )
    loss = {d.name: d for d in neither.metric_deltas}["eval_loss"]
    assert loss.direction == cpb.METRIC_DIRECTION_UNSPECIFIED and loss.HasField("delta")
    assert not loss.improved and not loss.regressed
    assert neither.recommendation == rs.RECOMMENDATION_EXPERIMENT and "direction" in neither.reason
    other = await registry.model()
    ov = await registry.version(other.name, version="1.0.0")
    unrelated = await registry.stub.CompareModelVersions(
        rs.CompareModelVersionsRequest(base_version=base.name, candidate_version=ov.name)
    )
    assert unrelated.semver_relation == rs.SEMVER_RELATION_UNRELATED and unrelated.recommendation == rs.RECOMMENDATION_EXPERIMENT
    await expect_error(
        registry.stub.CompareModelVersions(rs.CompareModelVersionsRequest(base_version=base.name, candidate_version="bad")),
        INVALID,
        "MALFORMED_NAME",
    )

    validated = await registry.stub.SetModelVersionState(
        rs.SetModelVersionStateRequest(
            name=cand.name, state=pb.ModelVersion.STATE_VALIDATED, reason="passed eval", etag=appended.etag
        )
    )
    assert validated.state == pb.ModelVersion.STATE_VALIDATED
    await expect_error(
        registry.stub.SetModelVersionState(rs.SetModelVersionStateRequest(name=cand.name, state=pb.ModelVersion.STATE_DEPRECATED, etag=appended.etag)),
        ABORTED, "ETAG_MISMATCH",
    )  # fmt: skip
    for bad_state in (pb.ModelVersion.STATE_UNSPECIFIED, 99):
        await expect_error(
            registry.stub.SetModelVersionState(rs.SetModelVersionStateRequest(name=cand.name, state=bad_state)),
            INVALID,
            "INVALID_STATE",
        )

    labelled = await registry.stub.UpdateModelVersion(
        rs.UpdateModelVersionRequest(
            model_version=pb.ModelVersion(name=cand.name, labels={"stage": "qa"}, etag=validated.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
        )
    )
    assert dict(labelled.labels) == {"stage": "qa"} and labelled.state == pb.ModelVersion.STATE_VALIDATED
    await expect_error(
        registry.stub.UpdateModelVersion(rs.UpdateModelVersionRequest(model_version=pb.ModelVersion(name=cand.name, notes="x"), update_mask=field_mask_pb2.FieldMask(paths=["notes"]))),
        INVALID, "INVALID_UPDATE_MASK",
    )  # fmt: skip
    await expect_error(
        registry.stub.UpdateModelVersion(rs.UpdateModelVersionRequest(model_version=pb.ModelVersion(name=cand.name, labels={"stage": "x"}, etag=validated.etag), update_mask=field_mask_pb2.FieldMask(paths=["labels"]))),
        ABORTED, "ETAG_MISMATCH",
    )  # fmt: skip
    await expect_error(
        registry.stub.UpdateModelVersion(rs.UpdateModelVersionRequest(model_version=pb.ModelVersion(name=cand.name, labels={"Bad": "x"}), update_mask=field_mask_pb2.FieldMask(paths=["labels"]))),
        INVALID, "INVALID_ARGUMENT",
    )  # fmt: skip
    await expect_error(
        registry.stub.UpdateModelVersion(rs.UpdateModelVersionRequest(model_version=pb.ModelVersion(name=cand.name))),
        INVALID,
        "MISSING_UPDATE_MASK",
    )


async def test_unknown_artifact_format_is_rejected(registry, expect_error):
    m = await registry.model()
    art = pb.Artifact(uri="file:///a", sha256="ab" * 32, format=77)
    req = rs.CreateModelVersionRequest(parent=m.name, bump=PATCH, model_version=pb.ModelVersion(artifact=art))
    err = await expect_error(registry.stub.CreateModelVersion(req), INVALID, "INVALID_ENUM")
    assert [v.field for v in field_violations(err)] == ["model_version.artifact.format"]
    v = await registry.version(m.name, bump=PATCH)
    bad_metric = rs.AppendModelVersionMetricsRequest(name=v.name, metrics=[pb.Metric(name="acc", value=1.0, direction=9)])
    err = await expect_error(registry.stub.AppendModelVersionMetrics(bad_metric), INVALID, "INVALID_ENUM")
    assert [v.field for v in field_violations(err)] == ["metrics[0].direction"]
