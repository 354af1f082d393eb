"""Promotion through the real registry (in-process): the alias moves, its history names the experiment,
a stale expected version aborts and leaves the experiment un-concluded. Also auto-conclude."""

from __future__ import annotations

import uuid

import grpc
import pytest

from neuroweaver.experiments.v1 import experiment_pb2 as pb
from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver_runtime.grpc_errors import error_info


async def make_model(registry) -> str:
    model_id = "m-" + uuid.uuid4().hex[:8]
    model = await registry.CreateModel(
        rsvc.CreateModelRequest(parent="projects/default", model_id=model_id, model=rpb.Model(display_name="m"))
    )
    for i in range(2):
        await registry.CreateModelVersion(
            rsvc.CreateModelVersionRequest(
                parent=model.name,
                version=f"1.0.{i}",
                model_version=rpb.ModelVersion(artifact=rpb.Artifact(uri=f"file:///a/{i}", sha256="a" * 64)),
            )
        )
    await registry.SetModelAlias(
        rsvc.SetModelAliasRequest(model=model.name, alias="production", version="1.0.0", reason="initial")
    )
    return model.name


async def alias_version(registry, model: str) -> str:
    return (await registry.GetModelAlias(rsvc.GetModelAliasRequest(name=f"{model}/aliases/production"))).version


async def test_conclude_with_promote_moves_the_alias(stub, registry, make_experiment):
    model = await make_model(registry)
    exp = await make_experiment(model=model, promote_alias="production")
    # stale compare-and-set: ABORTED, the alias and the experiment stay as they were
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ConcludeExperiment(
            svc.ConcludeExperimentRequest(name=exp.name, winner="treatment", promote=True, expected_current_version="0.9.0")
        )
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert error_info(info.value).reason == "ALIAS_VERSION_MISMATCH"
    assert (await stub.GetExperiment(svc.GetExperimentRequest(name=exp.name))).state == pb.Experiment.STATE_RUNNING
    assert await alias_version(registry, model) == "1.0.0"
    # unknown winner
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ConcludeExperiment(svc.ConcludeExperimentRequest(name=exp.name, winner="nobody", promote=True))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(info.value).reason == "UNKNOWN_VARIANT"
    # the real thing
    done = await stub.ConcludeExperiment(
        svc.ConcludeExperimentRequest(
            name=exp.name, winner="treatment", promote=True, expected_current_version="1.0.0", reason="judge score +12%"
        )
    )
    assert done.state == pb.Experiment.STATE_CONCLUDED and done.winner == "treatment"
    assert await alias_version(registry, model) == "1.0.1"
    history = await registry.ListModelAliasHistory(rsvc.ListModelAliasHistoryRequest(parent=f"{model}/aliases/production"))
    latest = max(history.entries, key=lambda e: e.sequence)
    assert latest.from_version == "1.0.0" and latest.to_version == "1.0.1"
    assert exp.name in latest.reason and "judge score +12%" in latest.reason


async def test_auto_conclude_promotes_when_the_sequential_test_decides(stub, registry, make_experiment):
    model = await make_model(registry)
    exp = await make_experiment(
        model=model, promote_alias="production", auto_conclude=True, analysis=pb.ANALYSIS_METHOD_SEQUENTIAL, min_sample_size=50
    )
    units = [f"auto-{i}" for i in range(400)]
    got = await stub.BatchAssignVariants(svc.BatchAssignVariantsRequest(experiment=exp.name, unit_ids=units))
    events = [
        pb.MetricEvent(unit_id=u, metric="score", value=(3.0 if a.variant.id == "treatment" else 1.0) + (i % 7) * 0.1)
        for i, (u, a) in enumerate(zip(units, got.assignments, strict=True))
    ]
    await stub.RecordMetricEvents(svc.RecordMetricEventsRequest(experiment=exp.name, events=events))
    res = await stub.GetExperimentResults(svc.GetExperimentResultsRequest(name=exp.name))
    assert res.decision == pb.DECISION_SHIP_VARIANT and res.recommended_variant == "treatment", res.reason
    after = await stub.GetExperiment(svc.GetExperimentRequest(name=exp.name))
    assert after.state == pb.Experiment.STATE_CONCLUDED and after.winner == "treatment"
    assert "auto-concluded" in after.conclusion
    assert await alias_version(registry, model) == "1.0.1"
