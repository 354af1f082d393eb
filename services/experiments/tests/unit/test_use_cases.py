"""Experiment use cases on in-memory repositories: create (idempotent), get/list, start, assign, record, conclude."""

from __future__ import annotations

import pytest

from neuroweaver_experiments.adapters.clients import DeploymentEndpoint
from neuroweaver_experiments.domain.experiment import Experiment, ExperimentState, Variant
from neuroweaver_experiments.domain.statistics import AnalysisMethod, MetricKind, MetricSpec
from neuroweaver_experiments.service.ingest import EventBatch
from neuroweaver_runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable

P = "projects/default"
REQUEST = "7d7b1e4a-55f4-4f25-9d0e-3d2a4f1c2b11"


def _exp(deployment: str = "") -> Experiment:
    return Experiment(
        name="",
        variants=[
            Variant("control", f"{P}/models/m/versions/1.0.0", deployment=deployment, weight=0.5),
            Variant("treatment", f"{P}/models/m/versions/1.1.0", weight=0.5),
        ],
        primary_metric=MetricSpec("score"),
        secondary_metrics=[MetricSpec("thumbs_up", MetricKind.PROPORTION)],
        analysis=AnalysisMethod.FIXED_HORIZON,
        promote_alias="prod",
    )


def _batch(*events: tuple[str, str, float, str]) -> EventBatch:
    batch = EventBatch()
    for unit, metric, value, key in events:
        batch.experiments.append("")
        batch.unit_ids.append(unit)
        batch.metrics.append(metric)
        batch.values.append(value)
        batch.times.append(None)
        batch.keys.append(key)
        batch.covariates.append(None)
    return batch


async def _running(fakes, exp_id: str = "e1") -> Experiment:
    await fakes.service.create(P, exp_id, _exp(), "", "fp")
    return await fakes.service.start(f"{P}/experiments/{exp_id}")


async def test_create_is_idempotent_and_names_are_unique(fakes):
    svc = fakes.service
    created = await svc.create(P, "e1", _exp(), REQUEST, "body")
    assert (created.name, created.state, created.revision) == (f"{P}/experiments/e1", ExperimentState.DRAFT, 1)
    assert created.hash_seed == "e1" and created.weights_history == [[0.5, 0.5]]
    again = await svc.create(P, "e1", _exp(), REQUEST, "body")  # a retry answers with the first result
    assert again == created and len(fakes.store.experiments) == 1
    with pytest.raises(InvalidArgument) as caught:
        await svc.create(P, "e2", _exp(), REQUEST, "another body")
    assert caught.value.reason == "REQUEST_ID_REUSED"
    with pytest.raises(AlreadyExists) as caught:
        await svc.create(P, "e1", _exp(), "", "body")
    assert caught.value.reason == "EXPERIMENT_ALREADY_EXISTS"
    with pytest.raises(InvalidArgument) as caught:
        await svc.create(P, "e3", _exp(), "not-a-uuid", "body")
    assert caught.value.reason == "INVALID_REQUEST_ID" and f"{P}/experiments/e3" not in fakes.store.experiments


async def test_get_and_list_pages(fakes):
    svc = fakes.service
    for i in range(5):
        await svc.create(P, f"e{i}", _exp(), "", "fp")
    assert (await svc.get(f"{P}/experiments/e3")).name == f"{P}/experiments/e3"
    with pytest.raises(NotFound) as caught:
        await svc.get(f"{P}/experiments/missing")
    assert caught.value.reason == "EXPERIMENT_NOT_FOUND"
    first = await svc.list(P, 2, "", "", "")
    names = [e.name for e in first.items]
    token = first.next_page_token
    while token:
        page = await svc.list(P, 2, token, "", "")
        names += [e.name for e in page.items]
        token = page.next_page_token
    assert names == [f"{P}/experiments/e{i}" for i in range(5)]


async def test_start_resolves_endpoints_and_a_failed_start_changes_nothing(fakes):
    svc = fakes.service
    name = (await svc.create(P, "e1", _exp(deployment=f"{P}/deployments/d"), "", "fp")).name
    with pytest.raises(KeyError):  # the deployer stand-in knows no such deployment
        await svc.start(name)
    assert (await svc.get(name)).state is ExperimentState.DRAFT
    fakes.deployer.endpoints[f"{P}/deployments/d"] = DeploymentEndpoint("10.0.0.1:80", "http://10.0.0.1/v1")
    started = await svc.start(name)
    assert started.state is ExperimentState.RUNNING and started.start_time is not None and started.revision == 2
    # The model name to send is the deployment's stable name, derived: it survives the deployment's rollovers.
    assert (started.variants[0].endpoint, started.variants[0].model) == ("10.0.0.1:80", f"{P}/deployments/d")
    with pytest.raises(FailedPrecondition) as caught:
        await svc.start(name)
    assert caught.value.reason == "EXPERIMENT_RUNNING"


async def test_assignments_are_sticky_and_counted_once_as_exposures(fakes):
    draft = await fakes.service.create(P, "draft", _exp(), "", "fp")
    with pytest.raises(FailedPrecondition) as caught:
        await fakes.service.assign(draft.name, ["u"])
    assert caught.value.reason == "EXPERIMENT_NOT_RUNNING"
    exp = await _running(fakes)
    _, first = await fakes.service.assign(exp.name, [f"u{i}" for i in range(40)], batch=True)
    _, again = await fakes.service.assign(exp.name, [f"u{i}" for i in range(40)], batch=True)
    assert [a.variant for a in again] == [a.variant for a in first] and all(a.sticky for a in again)
    exposures = {variant: n for (key, epoch, _, variant), n in fakes.store.exposures.items() if key == exp.key and epoch == 0}
    assert sum(exposures.values()) == 40 and set(exposures) == {"control", "treatment"}
    with pytest.raises(InvalidArgument) as caught:
        await fakes.service.assign(exp.name, [], batch=True)
    assert caught.value.reason == "INVALID_UNIT_ID"


async def test_record_folds_events_into_statistics_and_skips_duplicates(fakes):
    exp = await _running(fakes)
    _, assigned = await fakes.service.assign(exp.name, ["a", "b"], batch=True)
    variant_of = {u: exp.variants[a.variant].id for u, a in zip(["a", "b"], assigned, strict=True)}
    result = await fakes.service.record(
        exp.name, _batch(("a", "score", 2.0, "k1"), ("a", "score", 4.0, "k2"), ("b", "score", 1.0, ""))
    )
    assert (result.accepted, result.duplicates) == (3, 0)
    result = await fakes.service.record(
        exp.name, _batch(("a", "score", 9.0, "k1"), ("b", "thumbs_up", 1.0, "k3"), ("b", "thumbs_up", 1.0, "k3"))
    )
    assert (result.accepted, result.duplicates) == (1, 2)  # k1 stored before, k3 repeated in the batch
    stats = {(m, v): s.y for (k, m, v), s in fakes.store.variant_stats.items() if k == exp.key}
    a, b = variant_of["a"], variant_of["b"]
    if a == b:
        assert stats[("score", a)].n == 2 and stats[("score", a)].sum == pytest.approx(3.0 + 1.0)
    else:
        assert (stats[("score", a)].n, stats[("score", a)].mean, stats[("score", a)].m2) == (1, 3.0, 0.0)  # unit mean
        assert (stats[("score", b)].n, stats[("score", b)].sum) == (1, 1.0)
    assert stats[("thumbs_up", b)].n == 1


async def test_a_bad_batch_records_nothing(fakes):
    exp = await _running(fakes)
    await fakes.service.assign(exp.name, ["a"], batch=True)
    with pytest.raises(InvalidArgument) as caught:
        await fakes.service.record(
            exp.name, _batch(("a", "score", 1.0, ""), ("never-seen", "score", 1.0, ""), ("a", "nope", 1.0, ""))
        )
    assert caught.value.reason == "UNIT_NOT_EXPOSED" and caught.value.metadata["bad_events"] == "2"
    assert fakes.store.events == [] and fakes.store.variant_stats == {}
    await fakes.service.stop(exp.name, "enough")
    with pytest.raises(FailedPrecondition) as caught:
        await fakes.service.record(exp.name, _batch(("a", "score", 1.0, "")))
    assert caught.value.reason == "EXPERIMENT_NOT_RUNNING"


async def test_conclude_promotes_through_the_registry_or_changes_nothing(fakes):
    exp = await _running(fakes)
    fakes.registry.refuse = Unavailable("registry down", reason="REGISTRY_UNAVAILABLE")
    with pytest.raises(Unavailable):
        await fakes.service.conclude(exp.name, "treatment", True, "", "1.0.0", "better")
    assert (await fakes.service.get(exp.name)).state is ExperimentState.RUNNING and fakes.registry.moves == []
    with pytest.raises(InvalidArgument) as caught:
        await fakes.service.conclude(exp.name, "nobody", False, "", "", "")
    assert caught.value.reason == "UNKNOWN_VARIANT"
    fakes.registry.refuse = None
    done = await fakes.service.conclude(exp.name, "treatment", True, "", "1.0.0", "better")
    assert done.state is ExperimentState.CONCLUDED and done.winner == "treatment"
    assert fakes.registry.moves == [(f"{P}/models/m", "prod", "1.1.0", "1.0.0")]
    assert "promoted" in done.conclusion and done.end_time is not None
    with pytest.raises(FailedPrecondition):
        await fakes.service.conclude(exp.name, "", False, "", "", "")


async def test_fixed_horizon_results_wait_for_the_planned_size_then_keep_their_decision(fakes):
    exp = _exp()
    exp.min_sample_size = 20
    await fakes.service.create(P, "fh", exp, "", "fp")
    name = f"{P}/experiments/fh"
    await fakes.service.start(name)
    units = [f"u{i}" for i in range(200)]
    _, assigned = await fakes.service.assign(name, units, batch=True)
    arm = {u: a.variant for u, a in zip(units, assigned, strict=True)}
    control, treatment = [u for u in units if arm[u] == 0], [u for u in units if arm[u] == 1]

    first = control[:10] + treatment[:10]
    await fakes.service.record(name, _batch(*((u, "score", float(i % 7), "") for i, u in enumerate(first))))
    waiting = (await fakes.service.results(name)).analysis.outcome
    assert waiting.decision.value == "keep_running" and "waiting for planned sample size 20" in waiting.reason

    # at the planned size: no difference (the same values in both arms)
    more = control[10:20] + treatment[10:20]
    await fakes.service.record(name, _batch(*((u, "score", float(i % 7), "") for i, u in enumerate(more))))
    at_horizon = (await fakes.service.results(name)).analysis.outcome
    assert at_horizon.decision.value == "no_detectable_difference" and at_horizon.at_horizon

    # later data with a huge effect does not turn it into a ship decision: the test was decided at its horizon
    late = [(u, "score", 100.0 + i % 3, "") for i, u in enumerate(treatment[20:60])] + [
        (u, "score", float(i % 3), "") for i, u in enumerate(control[20:60])
    ]
    await fakes.service.record(name, _batch(*late))
    for _ in range(2):
        later = (await fakes.service.results(name)).analysis
        assert later.primary.comparisons[0].p_value < 1e-6  # the statistics themselves stay current
        assert later.outcome.decision.value == "no_detectable_difference" and not later.outcome.at_horizon
        assert "fixed horizon: decided at the first look with the planned 20 units" in later.outcome.reason
