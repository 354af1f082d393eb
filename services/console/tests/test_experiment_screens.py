"""Experiment screens in a real browser against the real experiments service (SQLite) and registry: the list, the
results page whose numbers are GetExperimentResults' (read back from the page and compared with the RPC's), the
sample-ratio-mismatch banner that takes ship/conclude away, concluding with the winner promoted to a registry alias
through the confirmation page, start/stop, and an unknown experiment's 404.

Experiments only reference model versions by name (no deployment is needed to start one); the versions are registered
in the registry so that promotion can move a real alias. Units reach the experiment through BatchAssignVariants (which
logs their exposure) and outcomes through RecordMetricEvents, as RelayCore reports them."""

from __future__ import annotations

import hashlib
import math

import pytest

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.experiments.v1 import experiment_pb2 as epb
from neuroweaver.experiments.v1 import experiments_service_pb2 as esvc
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver_runtime.assignment import AssignmentPlan

pytestmark = pytest.mark.slow
MODEL = "projects/default/models/ab-bot"
HIGHER, LOWER = cpb.METRIC_DIRECTION_HIGHER_IS_BETTER, cpb.METRIC_DIRECTION_LOWER_IS_BETTER


@pytest.fixture(scope="module")
async def ab_bot(registry):
    """A model with two versions and `production` on the first: what the experiments compare and promote."""
    stub = registry.stub
    await stub.CreateModel(
        rsvc.CreateModelRequest(parent="projects/default", model_id="ab-bot", model=rpb.Model(display_name="A/B bot"))
    )
    for n, version in enumerate(("1.0.0", "1.1.0")):
        artifact = rpb.Artifact(uri=f"file:///models/ab-bot/{n}", sha256=hashlib.sha256(version.encode()).hexdigest())
        await stub.CreateModelVersion(
            rsvc.CreateModelVersionRequest(parent=MODEL, version=version, model_version=rpb.ModelVersion(artifact=artifact))
        )
    await stub.SetModelAlias(rsvc.SetModelAliasRequest(model=MODEL, alias="production", version="1.0.0", reason="first"))
    return MODEL


async def create(experiments, exp_id: str, *, start: bool = True, analysis=epb.ANALYSIS_METHOD_FIXED_HORIZON) -> epb.Experiment:
    exp = epb.Experiment(
        display_name=exp_id.replace("-", " "),
        variants=[
            epb.Variant(id="control", model_version=f"{MODEL}/versions/1.0.0", weight=0.5),
            epb.Variant(id="treatment", model_version=f"{MODEL}/versions/1.1.0", weight=0.5),
        ],
        primary_metric=epb.MetricSpec(name="score", kind=epb.METRIC_KIND_MEAN, direction=HIGHER),
        guardrail_metrics=[epb.MetricSpec(name="latency_ms", kind=epb.METRIC_KIND_MEAN, direction=LOWER, tolerance=0.2)],
        secondary_metrics=[epb.MetricSpec(name="thumbs_up", kind=epb.METRIC_KIND_PROPORTION, direction=HIGHER)],
        analysis=analysis,
        min_sample_size=50,
        promote_alias="production",
    )
    created = await experiments.stub.CreateExperiment(
        esvc.CreateExperimentRequest(parent="projects/default", experiment_id=exp_id, experiment=exp)
    )
    if start:
        return await experiments.stub.StartExperiment(esvc.StartExperimentRequest(name=created.name))
    return created


async def expose_and_measure(experiments, exp: epb.Experiment, units: list[str]) -> None:
    """Assigns (exposes) the units, then records one outcome per unit and metric: treatment scores about 1 higher,
    latency and thumbs-up the same in both arms (deterministic spread, no randomness)."""
    got = await experiments.stub.BatchAssignVariants(esvc.BatchAssignVariantsRequest(experiment=exp.name, unit_ids=units))
    events = []
    for i, (unit, a) in enumerate(zip(units, got.assignments, strict=True)):
        lift = 1.0 if a.variant.id == "treatment" else 0.0
        events += [
            epb.MetricEvent(unit_id=unit, metric="score", value=2.0 + lift + (i * 37 % 11) / 10),
            epb.MetricEvent(unit_id=unit, metric="latency_ms", value=200.0 + i * 13 % 17),
            epb.MetricEvent(unit_id=unit, metric="thumbs_up", value=float(i % 3 == 0)),
        ]
    await experiments.stub.RecordMetricEvents(esvc.RecordMetricEventsRequest(experiment=exp.name, events=events))


async def results(experiments, exp: epb.Experiment) -> epb.ExperimentResults:
    return await experiments.stub.GetExperimentResults(esvc.GetExperimentResultsRequest(name=exp.name))


def sig(text: str, value: float, digits: int) -> bool:
    """`text` is `value` rounded to `digits` significant digits."""
    if value == 0:
        return float(text) == 0
    step = 10 ** (math.floor(math.log10(abs(value))) - digits + 1)
    return abs(float(text) - value) <= 0.5 * step * 1.001


def pct(text: str, value: float) -> bool:
    """`text` is the fraction `value` as a signed percentage with two decimals."""
    return text == f"{value * 100:+.2f}%"


def interval(text: str) -> tuple[str, str]:
    lo, hi = text.strip("[]").split(", ")
    return lo, hi


async def table_rows(page, table_id: str) -> dict[str, dict[str, str]]:
    headers = await page.locator(f"#{table_id} thead th").all_inner_texts()
    rows = {}
    for tr in await page.locator(f"#{table_id} tbody tr").all():
        cells = await tr.locator("th, td").all_inner_texts()
        rows[cells[0]] = dict(zip(headers, cells, strict=True))
    return rows


def check_metric(rows: dict[str, dict[str, str]], mr: epb.MetricResult) -> None:
    """Every variant's mean and CI, every treatment's lift, lift interval and p-value as the RPC gave them."""
    assert set(rows) == {v.variant for v in mr.variants}
    for v in mr.variants:
        row = rows[v.variant]
        assert int(row["Units"]) == v.units
        assert sig(row["Mean"], v.mean, 4), (row, v)
        lo, hi = interval(row["95% CI"])
        assert sig(lo, v.ci_lower, 4) and sig(hi, v.ci_upper, 4), (row, v)
    for c in mr.comparisons:
        row = rows[c.variant]
        assert pct(row["Lift"], c.relative_lift), (row, c)
        lo, hi = interval(row["Lift 95% CI"])
        assert pct(lo, c.lift_ci_lower) and pct(hi, c.lift_ci_upper), (row, c)
        assert sig(row["p-value"], c.p_value, 3), (row, c)
        assert sig(row["Difference"], c.difference, 4), (row, c)
    assert rows["control"]["Verdict"] == "baseline"


async def test_results_page_shows_the_rpc_numbers_and_offers_ship(page, console, experiments, ab_bot, h):
    exp = await create(experiments, "balanced")
    await expose_and_measure(experiments, exp, [f"b-{i}" for i in range(300)])
    res = await results(experiments, exp)
    assert res.decision == epb.DECISION_SHIP_VARIANT and res.recommended_variant == "treatment", res.reason

    await page.goto(f"{console.url}/experiments")
    row = page.locator("#experiments tbody tr", has_text="balanced")
    text = await row.inner_text()
    smallest = min(v.units for v in res.primary.variants)
    assert "ab-bot 1.0.0" in text and "ab-bot 1.1.0" in text and f"{smallest} of 50 planned (smallest variant)" in text, text
    assert "running" in text and "ship variant" in text
    await h.check_screen(page, "experiments")

    await row.get_by_role("link", name="balanced").click()
    await page.wait_for_url("**/experiments/balanced")
    check_metric(await table_rows(page, "metric-primary-0"), res.primary)
    check_metric(await table_rows(page, "metric-guardrail-0"), res.guardrails[0])
    check_metric(await table_rows(page, "metric-secondary-0"), res.secondary[0])
    assert (await table_rows(page, "metric-primary-0"))["treatment"]["Verdict"] == "better"
    assert "not violated" in await page.locator("#guardrail-0").inner_text()
    decision = await page.locator("#decision").inner_text()
    assert "Decision: ship variant — treatment" in decision and res.reason in decision
    assert await page.locator("#srm-banner").count() == 0
    assert "as planned" in await page.locator("#srm-check").inner_text()
    assert f"the smallest variant has {smallest} units of the 50 planned" in await page.locator("#sample").inner_text()
    assert (
        await page.locator("#power").inner_text() == f"{res.power * 100:.0f}% to detect the observed effect at this sample size"
    )
    await page.locator("canvas[data-drawn='1']").first.wait_for()  # the lift plot drew (chart.js, no console errors)
    assert await page.get_by_role("button", name="Ship treatment…").is_visible()
    assert await page.get_by_role("button", name="Stop").is_visible()
    await h.check_screen(page, "experiment-results")


async def test_sequential_results_show_the_always_valid_p_and_confidence_sequences(page, console, experiments, ab_bot):
    exp = await create(experiments, "sequential", analysis=epb.ANALYSIS_METHOD_SEQUENTIAL)
    await expose_and_measure(experiments, exp, [f"q-{i}" for i in range(200)])
    res = await results(experiments, exp)  # no data arrives after this look: the page's look gives the same numbers

    await page.goto(f"{console.url}/experiments/sequential")
    rows = await table_rows(page, "metric-primary-0")
    treatment, c = rows["treatment"], res.primary.comparisons[0]
    assert sig(treatment["Always-valid p"], c.sequential_p_value, 3) and sig(treatment["p-value"], c.p_value, 3)
    lo, hi = interval(treatment["Lift 95% confidence sequence"])
    assert pct(lo, c.lift_ci_lower) and pct(hi, c.lift_ci_upper), treatment
    assert rows["control"]["Always-valid p"] == "–"
    assert "sequential" in await page.locator("#progress-h + dl").inner_text()


async def test_sample_ratio_mismatch_blocks_ship_and_conclude(page, console, experiments, ab_bot, h):
    exp = await create(experiments, "mismatched")
    plan = AssignmentPlan(exp.hash_seed, [0.5, 0.5])
    pool = [f"m-{i}" for i in range(3000)]
    # Planned 50/50, but 700 control and 300 treatment units are exposed (broken logging on the treatment side).
    control = [u for u in pool if plan.assign(u).variant == 0][:700]
    treatment = [u for u in pool if plan.assign(u).variant == 1][:300]
    await expose_and_measure(experiments, exp, control + treatment)
    res = await results(experiments, exp)
    assert res.srm_detected and res.decision == epb.DECISION_INVALID_SAMPLE_RATIO

    await page.goto(f"{console.url}/experiments/mismatched")
    banner = page.locator("#srm-banner")
    assert await banner.is_visible()
    assert await banner.get_attribute("role") == "alert"
    assert sig(await page.locator("#srm-p").inner_text(), res.srm_p_value, 3)
    assert "no winner can be shipped or concluded" in await banner.inner_text()
    assert await page.locator("#ship").count() == 0 and await page.locator("#conclude-none").count() == 0
    assert "not offered while the sample ratio mismatch holds" in await page.locator("#conclude-blocked").inner_text()
    assert "invalid sample ratio" in await page.locator("#decision-h").inner_text()
    await h.check_screen(page, "experiment-srm")

    # The confirmation page refuses too (someone with an old link), with the reason in words; nothing is concluded.
    response = await page.goto(f"{console.url}/experiments/mismatched/conclude?winner=treatment")
    assert response is not None and response.status == 409
    assert "sample-ratio mismatch" in await page.locator("#conclude-refused").inner_text()
    assert await page.locator("#conclude-confirm").count() == 0
    page.errors[:] = [e for e in page.errors if "409" not in e]  # the refusal page's own status, expected
    assert (await experiments.stub.GetExperiment(esvc.GetExperimentRequest(name=exp.name))).state == epb.Experiment.STATE_RUNNING

    await page.goto(f"{console.url}/experiments?state=running")
    assert "sample ratio mismatch" in await page.locator("#experiments tbody tr", has_text="mismatched").inner_text()


async def test_ship_concludes_and_promotes_the_winner(page, console, experiments, registry, ab_bot, h):
    exp = await create(experiments, "promote-me")
    await expose_and_measure(experiments, exp, [f"p-{i}" for i in range(300)])

    await page.goto(f"{console.url}/experiments/promote-me")
    await page.get_by_role("button", name="Ship treatment…").click()
    await page.wait_for_url("**/experiments/promote-me/conclude?winner=treatment")
    change = await page.locator("#promotion-change").inner_text()
    assert "production of ab-bot points at 1.0.0 now; it will point at 1.1.0 (treatment's version)" in change, change
    await page.get_by_label("Reason (kept in the conclusion and the alias history)").fill("score +1 at p < 0.001")
    await h.check_screen(page, "experiment-confirm")
    await page.get_by_role("button", name="Conclude and promote treatment to production").click()
    await page.wait_for_url("**/experiments/promote-me?done=concluded")
    assert await page.locator("#exp-state").inner_text() == "concluded"
    conclusion = await page.locator("#conclusion").inner_text()
    assert "winner treatment" in conclusion and "promoted" in conclusion and "score +1 at p < 0.001" in conclusion
    assert await page.locator("#ship").count() == 0 and await page.locator(".actions button").count() == 0

    alias = await registry.stub.GetModelAlias(rsvc.GetModelAliasRequest(name=f"{MODEL}/aliases/production"))
    assert alias.version == "1.1.0" and exp.name in alias.reason
    concluded = await experiments.stub.GetExperiment(esvc.GetExperimentRequest(name=exp.name))
    assert concluded.state == epb.Experiment.STATE_CONCLUDED and concluded.winner == "treatment"


async def test_start_stop_and_conclude_without_a_winner(page, console, experiments, ab_bot):
    exp = await create(experiments, "draft-one", start=False)
    await page.goto(f"{console.url}/experiments?state=draft")
    assert "not started" in await page.locator("#experiments tbody tr", has_text="draft one").inner_text()
    await page.goto(f"{console.url}/experiments/draft-one")
    assert await page.locator("#exp-state").inner_text() == "draft"
    assert await page.locator("#ship").count() == 0 and await page.locator("#conclude-none").count() == 0
    await page.get_by_role("button", name="Start").click()
    await page.wait_for_url("**/experiments/draft-one?done=start")
    assert await page.locator("#exp-state").inner_text() == "running"
    await page.get_by_role("button", name="Stop").click()
    await page.wait_for_url("**/experiments/draft-one?done=stop")
    assert await page.locator("#exp-state").inner_text() == "stopped"
    assert await page.get_by_role("button", name="Start").is_visible()  # a stopped experiment may run again

    await page.get_by_role("button", name="Conclude without a winner…").click()
    assert "ends without a winner; no alias moves" in await page.locator("#promotion-change").inner_text()
    await page.get_by_label("Reason (kept in the conclusion)").fill("abandoned")
    await page.get_by_role("button", name="Conclude without a winner").click()
    await page.wait_for_url("**/experiments/draft-one?done=concluded")
    assert "without a winner" in await page.locator("#conclusion").inner_text()
    got = await experiments.stub.GetExperiment(esvc.GetExperimentRequest(name=exp.name))
    assert got.state == epb.Experiment.STATE_CONCLUDED and got.winner == ""


async def test_unknown_experiment_is_a_404_page_with_the_reason(page, console):
    response = await page.goto(f"{console.url}/experiments/no-such-experiment")
    assert response is not None and response.status == 404
    assert await page.locator("h1").inner_text() == "The service said NOT_FOUND"
    assert await page.locator("#error-reason").inner_text() == "EXPERIMENT_NOT_FOUND"  # docs/errors.md's reason
    assert "projects/default/experiments/no-such-experiment does not exist" in await page.locator(".error").inner_text()
    response = await page.goto(f"{console.url}/experiments/Bad%20Name")
    assert response is not None and response.status == 400  # a malformed id: INVALID_ARGUMENT, not a crash
    page.errors[:] = [e for e in page.errors if "404" not in e and "400" not in e]  # the pages' own statuses


async def test_stale_promotion_is_refused_and_the_experiment_keeps_running(page, console, experiments, registry, ab_bot):
    """Compare-and-set: the confirmation carries the alias version it showed; a move in between wins, the service
    refuses the promotion and the experiment is not concluded."""
    exp = await create(experiments, "stale-promotion")
    alias_name = f"{MODEL}/aliases/production"
    before = (await registry.stub.GetModelAlias(rsvc.GetModelAliasRequest(name=alias_name))).version
    await page.goto(f"{console.url}/experiments/stale-promotion/conclude?winner=treatment")
    assert f"points at {before} now" in await page.locator("#promotion-change").inner_text()
    other = "1.0.0" if before != "1.0.0" else "1.1.0"
    await registry.stub.SetModelAlias(
        rsvc.SetModelAliasRequest(model=MODEL, alias="production", version=other, reason="someone else")
    )
    await page.get_by_label("Reason (kept in the conclusion and the alias history)").fill("mine")
    await page.get_by_role("button", name="Conclude and promote treatment to production").click()
    assert await page.locator("h1").inner_text() == "The service said ABORTED"
    page.errors[:] = [e for e in page.errors if "409" not in e]  # the refusal page's own status, expected
    assert (await registry.stub.GetModelAlias(rsvc.GetModelAliasRequest(name=alias_name))).version == other
    got = await experiments.stub.GetExperiment(esvc.GetExperimentRequest(name=exp.name))
    assert got.state == epb.Experiment.STATE_RUNNING and got.winner == ""
