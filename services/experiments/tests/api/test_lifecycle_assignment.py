"""Lifecycle, assignment and bad-input tests over gRPC (SQLite and PostgreSQL)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2

from neuroweaver.deployer.v1 import deployment_pb2
from neuroweaver.experiments.v1 import experiment_pb2 as pb
from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver_experiments.domain.assignment import AssignmentPlan
from neuroweaver_experiments.domain.experiment import ExperimentState
from neuroweaver_runtime.grpc_errors import error_info, field_violations


async def expect_error(call, code: grpc.StatusCode, reason: str):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    err = info.value
    assert err.code() == code, err.details()
    got = error_info(err)
    assert got is not None and got.reason == reason, (got, err.details())
    assert got.domain == "experiments.neuroweaver.v1"
    return err


async def test_lifecycle_states_and_etag(stub, make_experiment):
    exp = await make_experiment(start=False)
    assert exp.state == pb.Experiment.STATE_DRAFT
    assert exp.hash_seed == exp.name.rsplit("/", 1)[1] and exp.coverage == 1.0 and exp.min_sample_size == 100
    # draft experiments do not assign
    await expect_error(
        stub.AssignVariant(svc.AssignVariantRequest(experiment=exp.name, unit_id="u")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "EXPERIMENT_NOT_RUNNING",
    )
    # stop before start is not allowed
    await expect_error(
        stub.StopExperiment(svc.StopExperimentRequest(name=exp.name)), grpc.StatusCode.FAILED_PRECONDITION, "EXPERIMENT_DRAFT"
    )
    running = await stub.StartExperiment(svc.StartExperimentRequest(name=exp.name))
    assert running.state == pb.Experiment.STATE_RUNNING and running.HasField("start_time")
    assert running.etag != exp.etag
    # stale etag
    patch = pb.Experiment(name=exp.name, description="new", etag=exp.etag)
    await expect_error(
        stub.UpdateExperiment(
            svc.UpdateExperimentRequest(experiment=patch, update_mask=field_mask_pb2.FieldMask(paths=["description"]))
        ),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    patch.etag = running.etag
    updated = await stub.UpdateExperiment(
        svc.UpdateExperimentRequest(experiment=patch, update_mask=field_mask_pb2.FieldMask(paths=["description"]))
    )
    assert updated.description == "new" and updated.state == pb.Experiment.STATE_RUNNING
    # state is not updatable
    await expect_error(
        stub.UpdateExperiment(
            svc.UpdateExperimentRequest(experiment=patch, update_mask=field_mask_pb2.FieldMask(paths=["state"]))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_UPDATE_MASK",
    )
    stopped = await stub.StopExperiment(svc.StopExperimentRequest(name=exp.name, reason="pause"))
    assert stopped.state == pb.Experiment.STATE_STOPPED
    restarted = await stub.StartExperiment(svc.StartExperimentRequest(name=exp.name))
    assert restarted.state == pb.Experiment.STATE_RUNNING
    concluded = await stub.ConcludeExperiment(svc.ConcludeExperimentRequest(name=exp.name, winner="treatment", reason="done"))
    assert concluded.state == pb.Experiment.STATE_CONCLUDED and concluded.winner == "treatment" and "done" in concluded.conclusion
    await expect_error(
        stub.StartExperiment(svc.StartExperimentRequest(name=exp.name)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "EXPERIMENT_CONCLUDED",
    )
    got = await stub.GetExperiment(svc.GetExperimentRequest(name=exp.name))
    assert got == concluded
    listed = await stub.ListExperiments(
        svc.ListExperimentsRequest(parent="projects/default", filter="state = CONCLUDED", page_size=1000)
    )
    assert exp.name in [e.name for e in listed.experiments]
    for spelling in ("STATE_CONCLUDED", "concluded"):  # the contract's name, or bare; any case
        same = await stub.ListExperiments(
            svc.ListExperimentsRequest(parent="projects/default", filter=f"state = {spelling}", page_size=1000)
        )
        assert [e.name for e in same.experiments] == [e.name for e in listed.experiments]
        others = await stub.ListExperiments(
            svc.ListExperimentsRequest(parent="projects/default", filter=f"state != {spelling}", page_size=1000)
        )
        assert exp.name not in [e.name for e in others.experiments]
    for bad in ("FINISHED", "STATE_UNSPECIFIED"):  # would silently match nothing
        err = await expect_error(
            stub.ListExperiments(svc.ListExperimentsRequest(parent="projects/default", filter=f"state = {bad}")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FILTER",
        )
        assert [v.field for v in field_violations(err)] == ["filter"]
        assert "one of: STATE_CONCLUDED, STATE_DRAFT, STATE_RUNNING, STATE_STOPPED" in err.details()
    await expect_error(
        stub.GetExperiment(svc.GetExperimentRequest(name="projects/default/experiments/nope")),
        grpc.StatusCode.NOT_FOUND,
        "EXPERIMENT_NOT_FOUND",
    )


def test_filter_states_are_the_contracts():
    """The filter's allowed states (the domain's) are the contract's enum names without prefix and UNSPECIFIED."""
    assert {s.value for s in ExperimentState} == {n.removeprefix("STATE_") for n in pb.Experiment.State.keys()} - {"UNSPECIFIED"}


async def test_create_rejects_bad_input(stub, make_experiment):
    err = await expect_error(make_experiment(weights=(0.5, 0.4)), grpc.StatusCode.INVALID_ARGUMENT, "WEIGHTS_DO_NOT_SUM_TO_ONE")
    assert field_violations(err)[0].field == "experiment.variants"
    await expect_error(make_experiment(weights=(1.0,)), grpc.StatusCode.INVALID_ARGUMENT, "TOO_FEW_VARIANTS")
    await expect_error(make_experiment(coverage=1.5), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_COVERAGE")
    err = await expect_error(make_experiment(model="nonsense"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert any(v.field == "experiment.variants[0].model_version" for v in field_violations(err))
    await expect_error(make_experiment(primary_kind=99), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_METRIC_KIND")


async def test_assignment_is_deterministic_and_matches_the_domain_plan(stub, make_experiment):
    exp = await make_experiment(weights=(0.3, 0.7))
    plan = AssignmentPlan(exp.hash_seed, [0.3, 0.7])
    units = [f"user-{i}" for i in range(200)]
    first = [await stub.AssignVariant(svc.AssignVariantRequest(experiment=exp.name, unit_id=u)) for u in units]
    again = await stub.BatchAssignVariants(svc.BatchAssignVariantsRequest(experiment=exp.name, unit_ids=units))
    for u, a, b in zip(units, first, again.assignments, strict=True):
        expected = plan.assign(u)
        assert a.bucket == expected.bucket and a.in_experiment
        assert a.variant.id == ["control", "treatment"][expected.variant]
        assert b.variant.id == a.variant.id and b.bucket == a.bucket
        assert a.variant.model_version.endswith(f"/versions/1.0.{expected.variant}")
    await expect_error(
        stub.AssignVariant(svc.AssignVariantRequest(experiment=exp.name, unit_id="")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_UNIT_ID",
    )


async def test_sticky_assignment_survives_a_weight_update(stub, make_experiment, backend):
    exp = await make_experiment(weights=(0.5, 0.5))
    units = [f"sticky-{i}" for i in range(300)]
    before = await stub.BatchAssignVariants(svc.BatchAssignVariantsRequest(experiment=exp.name, unit_ids=units))
    patch = pb.Experiment(
        name=exp.name,
        etag=exp.etag,
        variants=[
            pb.Variant(id=v.id, model_version=v.model_version, weight=w) for v, w in zip(exp.variants, (0.1, 0.9), strict=True)
        ],
    )
    updated = await stub.UpdateExperiment(
        svc.UpdateExperimentRequest(experiment=patch, update_mask=field_mask_pb2.FieldMask(paths=["variants"]))
    )
    assert [v.weight for v in updated.variants] == [0.1, 0.9]
    # a fresh process cache must not matter: drop this process's caches, the store answers
    backend.service.experiments.assigner.cache._units.clear()
    after = await stub.BatchAssignVariants(svc.BatchAssignVariantsRequest(experiment=exp.name, unit_ids=units))
    assert [a.variant.id for a in after.assignments] == [a.variant.id for a in before.assignments]
    # new units follow the new weights
    plan = AssignmentPlan(exp.hash_seed, [0.1, 0.9])
    fresh = [f"new-{i}" for i in range(300)]
    got = await stub.BatchAssignVariants(svc.BatchAssignVariantsRequest(experiment=exp.name, unit_ids=fresh))
    assert [a.variant.id for a in got.assignments] == [["control", "treatment"][plan.assign(u).variant] for u in fresh]
    # changing variants themselves after start is refused
    patch.etag = updated.etag
    patch.variants[1].model_version = "projects/default/models/m/versions/9.9.9"
    await expect_error(
        stub.UpdateExperiment(
            svc.UpdateExperimentRequest(experiment=patch, update_mask=field_mask_pb2.FieldMask(paths=["variants"]))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "VARIANTS_IMMUTABLE",
    )
    patch.variants[1].model_version = exp.variants[1].model_version
    patch.variants[1].weight = 0.3
    await expect_error(
        stub.UpdateExperiment(
            svc.UpdateExperimentRequest(experiment=patch, update_mask=field_mask_pb2.FieldMask(paths=["variants"]))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "WEIGHTS_DO_NOT_SUM_TO_ONE",
    )


async def test_coverage_gives_control_without_exposure(stub, make_experiment):
    exp = await make_experiment(coverage=0.2)
    plan = AssignmentPlan(exp.hash_seed, [0.5, 0.5], 0.2)
    units = [f"cov-{i}" for i in range(500)]
    got = await stub.BatchAssignVariants(svc.BatchAssignVariantsRequest(experiment=exp.name, unit_ids=units))
    inside = 0
    for u, a in zip(units, got.assignments, strict=True):
        expected = plan.assign(u)
        assert a.in_experiment == expected.in_experiment
        if not a.in_experiment:
            assert a.variant.id == "control"
        inside += a.in_experiment
    assert 50 < inside < 150
    # an out-of-coverage unit was never exposed: its events are rejected
    outside = next(u for u, a in zip(units, got.assignments, strict=True) if not a.in_experiment)
    err = await expect_error(
        stub.RecordMetricEvents(
            svc.RecordMetricEventsRequest(experiment=exp.name, events=[pb.MetricEvent(unit_id=outside, metric="score", value=1)])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNIT_NOT_EXPOSED",
    )
    assert field_violations(err)[0].field == "events[0].unit_id"


async def test_batch_assign_limits(stub, make_experiment):
    exp = await make_experiment()
    units = [f"b-{i}" for i in range(10_000)]
    got = await stub.BatchAssignVariants(svc.BatchAssignVariantsRequest(experiment=exp.name, unit_ids=units))
    assert len(got.assignments) == 10_000
    await expect_error(
        stub.BatchAssignVariants(svc.BatchAssignVariantsRequest(experiment=exp.name, unit_ids=units + ["one-more"])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BATCH_TOO_LARGE",
    )


async def test_start_resolves_deployment_endpoints(stub, deployer, make_experiment):
    deployer.deployments["projects/default/deployments/blue"] = deployment_pb2.Deployment(
        name="projects/default/deployments/blue",
        endpoint="10.0.0.1:50051",
        openai_base_url="http://10.0.0.1:8080/v1",
        served_model_name="m-1.0.1",
    )
    exp = await make_experiment(start=False)
    patch = pb.Experiment(name=exp.name, variants=list(exp.variants))
    patch.variants[1].deployment = "projects/default/deployments/blue"
    await stub.UpdateExperiment(
        svc.UpdateExperimentRequest(experiment=patch, update_mask=field_mask_pb2.FieldMask(paths=["variants"]))
    )
    started = await stub.StartExperiment(svc.StartExperimentRequest(name=exp.name))
    # The name to send is the deployment's stable name, not its current version-specific served_model_name (which
    # stops working at the deployment's next rollover); the deprecated field carries the same stable name.
    blue = started.variants[1]
    assert blue.endpoint == "10.0.0.1:50051"
    assert blue.model == blue.served_model_name == "projects/default/deployments/blue"
    plan = AssignmentPlan(exp.hash_seed, [0.5, 0.5])
    unit = next(f"d-{i}" for i in range(100) if plan.assign(f"d-{i}").variant == 1)
    a = await stub.AssignVariant(svc.AssignVariantRequest(experiment=exp.name, unit_id=unit))
    assert a.variant.endpoint == "10.0.0.1:50051" and a.variant.openai_base_url == "http://10.0.0.1:8080/v1"
    assert a.variant.model == "projects/default/deployments/blue"
    # unknown deployment → FAILED_PRECONDITION, the experiment stays a draft
    exp2 = await make_experiment(start=False)
    patch = pb.Experiment(name=exp2.name, variants=list(exp2.variants))
    patch.variants[0].deployment = "projects/default/deployments/missing"
    await stub.UpdateExperiment(
        svc.UpdateExperimentRequest(experiment=patch, update_mask=field_mask_pb2.FieldMask(paths=["variants"]))
    )
    await expect_error(
        stub.StartExperiment(svc.StartExperimentRequest(name=exp2.name)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "DEPLOYMENT_NOT_FOUND",
    )
    assert (await stub.GetExperiment(svc.GetExperimentRequest(name=exp2.name))).state == pb.Experiment.STATE_DRAFT


async def test_unreachable_deployer_fails_start_clearly(backend, make_experiment, stub):
    from neuroweaver_runtime.testing import free_port

    exp = await make_experiment(start=False)
    patch = pb.Experiment(name=exp.name, variants=list(exp.variants))
    patch.variants[0].deployment = "projects/default/deployments/blue"
    await stub.UpdateExperiment(
        svc.UpdateExperimentRequest(experiment=patch, update_mask=field_mask_pb2.FieldMask(paths=["variants"]))
    )
    deployer = backend.service.experiments.deployer
    saved = deployer.target
    await deployer.close()  # the next call opens a channel to the new target
    deployer.target = f"127.0.0.1:{free_port()}"
    try:
        await expect_error(
            stub.StartExperiment(svc.StartExperimentRequest(name=exp.name)), grpc.StatusCode.UNAVAILABLE, "DEPLOYER_UNAVAILABLE"
        )
    finally:
        await deployer.close()
        deployer.target = saved


def test_variants_stored_before_stable_names_still_load():
    """Rows written when a variant stored a version-specific `served_model_name` load; the name to send is derived."""
    from neuroweaver_experiments.adapters.repository import _variant

    stored = {"id": "b", "model_version": "projects/p/models/m/versions/1", "deployment": "projects/p/deployments/blue",
              "weight": 0.5, "endpoint": "10.0.0.1:1", "openai_base_url": "", "served_model_name": "m-1-0-0-abcdef12"}  # fmt: skip
    v = _variant(stored)
    assert (v.endpoint, v.model) == ("10.0.0.1:1", "projects/p/deployments/blue")
