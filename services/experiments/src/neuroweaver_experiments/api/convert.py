"""Protobuf ⇄ domain conversions for the experiments API.

Undefined numbers in results are reported as 0, never NaN or ±inf (proto doubles could carry them, but most
JSON clients choke on them), and the accompanying counts say when a value is undefined:
- `VariantStatistics.mean` is 0 when `units` is 0; `standard_deviation` is 0 below 2 units (MEAN);
- an interval that does not exist (fewer than 2 units, zero variance everywhere, no relative scale because
  the control mean is 0) is reported as `ci_lower = ci_upper = 0` (and `lift_ci_lower = lift_ci_upper = 0`);
- `Comparison.difference` is 0 when an arm is empty, `relative_lift` is 0 when the control mean is 0;
- p-values that cannot be computed are already 1.0 in the domain (no evidence), `power` is 0 when undefined.
"""

from __future__ import annotations

import math

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.experiments.v1 import experiment_pb2 as pb
from neuroweaver.experiments.v1 import experiments_service_pb2 as svc
from neuroweaver_runtime.errors import InvalidArgument
from neuroweaver_runtime.etag import etag_for
from neuroweaver_runtime.timestamps import from_timestamp, to_timestamp

from ..domain import statistics as st
from ..domain.assignment import Assignment
from ..domain.experiment import Experiment, ExperimentState, Variant
from ..domain.judging import AnswerJudging, JudgingStatus, RecordedAnswer
from ..service.ingest import EventBatch
from ..service.local_eval import ExposureIn

_STATE = {
    ExperimentState.DRAFT: pb.Experiment.STATE_DRAFT,
    ExperimentState.RUNNING: pb.Experiment.STATE_RUNNING,
    ExperimentState.STOPPED: pb.Experiment.STATE_STOPPED,
    ExperimentState.CONCLUDED: pb.Experiment.STATE_CONCLUDED,
}
_KIND = {st.MetricKind.MEAN: pb.METRIC_KIND_MEAN, st.MetricKind.PROPORTION: pb.METRIC_KIND_PROPORTION}
_KIND_FROM_PB = {v: k for k, v in _KIND.items()}
_DIRECTION = {
    st.Direction.INCREASE: cpb.METRIC_DIRECTION_HIGHER_IS_BETTER,
    st.Direction.DECREASE: cpb.METRIC_DIRECTION_LOWER_IS_BETTER,
}
_DIRECTION_FROM_PB = {v: k for k, v in _DIRECTION.items()}
_ANALYSIS = {
    st.AnalysisMethod.FIXED_HORIZON: pb.ANALYSIS_METHOD_FIXED_HORIZON,
    st.AnalysisMethod.SEQUENTIAL: pb.ANALYSIS_METHOD_SEQUENTIAL,
}
_ANALYSIS_FROM_PB = {v: k for k, v in _ANALYSIS.items()}
_DECISION = {
    st.Decision.KEEP_RUNNING: pb.DECISION_KEEP_RUNNING,
    st.Decision.SHIP_VARIANT: pb.DECISION_SHIP_VARIANT,
    st.Decision.NO_DETECTABLE_DIFFERENCE: pb.DECISION_NO_DETECTABLE_DIFFERENCE,
    st.Decision.STOP_FOR_HARM: pb.DECISION_STOP_FOR_HARM,
    st.Decision.INVALID_SAMPLE_RATIO: pb.DECISION_INVALID_SAMPLE_RATIO,
}


def num(x: float) -> float:
    """NaN and ±inf → 0 (see the module docstring)."""
    return x if math.isfinite(x) else 0.0


def _interval(iv: st.Interval) -> tuple[float, float]:
    if not (math.isfinite(iv.lower) and math.isfinite(iv.upper)):
        return 0.0, 0.0
    return iv.lower, iv.upper


# -- experiments -----------------------------------------------------------------------------------


def metric_to_pb(m: st.MetricSpec | None) -> pb.MetricSpec | None:
    return None if m is None else _metric_pb(m)


def _metric_pb(m: st.MetricSpec) -> pb.MetricSpec:
    return pb.MetricSpec(name=m.name, kind=_KIND[m.kind], direction=_DIRECTION[m.direction], tolerance=m.tolerance)


def metric_from_pb(m: pb.MetricSpec, field: str) -> st.MetricSpec:
    if m.kind not in _KIND_FROM_PB:
        raise InvalidArgument(
            f"{field}.kind must be METRIC_KIND_MEAN or METRIC_KIND_PROPORTION",
            field=f"{field}.kind",
            reason="INVALID_METRIC_KIND",
        )
    if m.direction not in _DIRECTION_FROM_PB and m.direction != cpb.METRIC_DIRECTION_UNSPECIFIED:
        raise InvalidArgument(
            f"{field}.direction has unknown value {m.direction}", field=f"{field}.direction", reason="INVALID_ENUM"
        )
    if not math.isfinite(m.tolerance) or m.tolerance < 0:
        raise InvalidArgument("tolerance must be a finite number >= 0", field=f"{field}.tolerance", reason="INVALID_TOLERANCE")
    if not m.name:
        raise InvalidArgument("metric name must not be empty", field=f"{field}.name", reason="INVALID_METRIC")
    return st.MetricSpec(m.name, _KIND_FROM_PB[m.kind], _DIRECTION_FROM_PB.get(m.direction, st.Direction.INCREASE), m.tolerance)


def variant_to_pb(v: Variant) -> pb.Variant:
    return pb.Variant(
        id=v.id,
        model_version=v.model_version,
        deployment=v.deployment,
        weight=v.weight,
        endpoint=v.endpoint,
        openai_base_url=v.openai_base_url,
        model=v.model,
        served_model_name=v.model,  # deprecated field, kept filled for callers that still read it
    )


def experiment_to_pb(e: Experiment) -> pb.Experiment:
    return pb.Experiment(
        name=e.name,
        display_name=e.display_name,
        description=e.description,
        variants=[variant_to_pb(v) for v in e.variants],
        hash_seed=e.hash_seed,
        coverage=e.coverage,
        primary_metric=metric_to_pb(e.primary_metric),
        guardrail_metrics=[_metric_pb(m) for m in e.guardrail_metrics],
        secondary_metrics=[_metric_pb(m) for m in e.secondary_metrics],
        min_sample_size=e.min_sample_size,
        significance_level=e.significance_level,
        analysis=_ANALYSIS[e.analysis],
        auto_conclude=e.auto_conclude,
        promote_alias=e.promote_alias,
        labels=e.labels,
        answer_judging=judging_to_pb(e.answer_judging),
        state=_STATE[e.state],
        winner=e.winner,
        conclusion=e.conclusion,
        create_time=to_timestamp(e.create_time),
        start_time=to_timestamp(e.start_time),
        end_time=to_timestamp(e.end_time),
        etag=etag_for(e.name, e.revision),
    )


def experiment_from_pb(e: pb.Experiment) -> Experiment:
    """Input fields only (output-only fields are ignored)."""
    if e.analysis not in _ANALYSIS_FROM_PB and e.analysis != pb.ANALYSIS_METHOD_UNSPECIFIED:
        raise InvalidArgument(f"analysis has unknown value {e.analysis}", field="experiment.analysis", reason="INVALID_ENUM")
    return Experiment(
        name=e.name,
        display_name=e.display_name,
        description=e.description,
        variants=[Variant(v.id, v.model_version, v.deployment, v.weight) for v in e.variants],
        hash_seed=e.hash_seed,
        coverage=e.coverage,
        primary_metric=metric_from_pb(e.primary_metric, "experiment.primary_metric") if e.HasField("primary_metric") else None,
        guardrail_metrics=[metric_from_pb(m, f"experiment.guardrail_metrics[{i}]") for i, m in enumerate(e.guardrail_metrics)],
        secondary_metrics=[metric_from_pb(m, f"experiment.secondary_metrics[{i}]") for i, m in enumerate(e.secondary_metrics)],
        min_sample_size=e.min_sample_size,
        significance_level=e.significance_level,
        analysis=_ANALYSIS_FROM_PB.get(e.analysis, st.AnalysisMethod.SEQUENTIAL),
        auto_conclude=e.auto_conclude,
        promote_alias=e.promote_alias,
        labels=dict(e.labels),
        answer_judging=judging_from_pb(e.answer_judging) if e.HasField("answer_judging") else None,
    )


# -- judge-scored answers --------------------------------------------------------------------------


def judging_to_pb(j: AnswerJudging | None) -> pb.AnswerJudging | None:
    if j is None:
        return None
    return pb.AnswerJudging(
        judge_version=j.judge_version, metric=j.metric, sample_rate=j.sample_rate, max_concurrency=j.max_concurrency
    )


def judging_from_pb(j: pb.AnswerJudging) -> AnswerJudging:
    return AnswerJudging(j.judge_version, j.metric, j.sample_rate, j.max_concurrency)


def judging_status_to_pb(s: JudgingStatus) -> pb.JudgingStatus:
    return pb.JudgingStatus(
        judge_version=s.judge_version,
        metric=s.metric,
        received=s.received,
        sampled=s.sampled,
        scored=s.scored,
        failed=s.failed,
        pending=s.pending,
        last_error=s.last_error,
        last_error_time=to_timestamp(s.last_error_time),
    )


def answers_from_pb(answers) -> list[RecordedAnswer]:
    return [
        RecordedAnswer(
            a.unit_id,
            a.variant,
            a.prompt,
            a.answer,
            a.reference,
            a.idempotency_key,
            from_timestamp(a.answer_time, f"answers[{i}].answer_time")
            if a.HasField("answer_time") and (a.answer_time.seconds or a.answer_time.nanos)
            else None,
        )
        for i, a in enumerate(answers)
    ]


# -- assignment ------------------------------------------------------------------------------------


def assignment_to_pb(exp: Experiment, a: Assignment) -> svc.AssignVariantResponse:
    return svc.AssignVariantResponse(
        variant=variant_to_pb(exp.variants[a.served_variant]), in_experiment=a.in_experiment, bucket=a.bucket
    )


def config_to_pb(e: Experiment) -> pb.ExperimentConfig:
    """What an SDK needs to evaluate AssignVariant in-process (see ExperimentConfig)."""
    phases = e.weights_history or [e.weights]
    return pb.ExperimentConfig(
        experiment=e.name,
        revision=e.revision,
        hash_seed=e.hash_seed,
        coverage=e.coverage,
        variants=[variant_to_pb(v) for v in e.variants],
        phases=[pb.AssignmentPhase(epoch=i, weights=w) for i, w in enumerate(phases)],
    )


def exposures_from_pb(exposures) -> list[ExposureIn]:
    return [
        ExposureIn(
            x.experiment,
            x.unit_id,
            x.variant,
            x.epoch,
            from_timestamp(x.exposure_time, f"exposures[{i}].exposure_time") if x.HasField("exposure_time") else None,
        )
        for i, x in enumerate(exposures)
    ]


# -- events ----------------------------------------------------------------------------------------


def events_from_pb(events) -> EventBatch:
    batch = EventBatch()
    exps, units, metrics, values, times, keys = (
        batch.experiments,
        batch.unit_ids,
        batch.metrics,
        batch.values,
        batch.times,
        batch.keys,
    )
    for e in events:
        exps.append(e.experiment)
        units.append(e.unit_id)
        metrics.append(e.metric)
        values.append(e.value)
        keys.append(e.idempotency_key)
        batch.covariates.append(e.covariate if e.HasField("covariate") else None)
        if e.HasField("event_time") and ((ts := e.event_time).seconds or ts.nanos):
            times.append(from_timestamp(ts, "events.event_time"))
        else:
            times.append(None)
    return batch


# -- results ---------------------------------------------------------------------------------------


def _metric_result(r: st.MetricResult) -> pb.MetricResult:
    variants = []
    for v in r.variants:
        lo, hi = _interval(v.ci) if v.units else (0.0, 0.0)
        variants.append(
            pb.VariantStatistics(
                variant=v.variant, units=v.units, mean=num(v.mean), standard_deviation=num(v.std), ci_lower=lo, ci_upper=hi
            )
        )
    comparisons = []
    for c in r.comparisons:
        lo, hi = _interval(c.decision_lift_interval)
        d_lo, d_hi = _interval(c.difference_ci)
        u_lo, u_hi = _interval(c.unadjusted_ci)
        comparisons.append(
            pb.Comparison(
                variant=c.variant,
                difference=num(c.difference),
                relative_lift=num(c.relative_lift),
                lift_ci_lower=lo,
                lift_ci_upper=hi,
                p_value=num(c.p_value),
                sequential_p_value=num(c.sequential_p_value),
                significant=c.significant,
                improvement=c.improvement,
                difference_ci_lower=d_lo,
                difference_ci_upper=d_hi,
                unadjusted_difference_ci_lower=u_lo,
                unadjusted_difference_ci_upper=u_hi,
            )
        )
    return pb.MetricResult(
        metric=metric_to_pb(r.metric),
        variants=variants,
        comparisons=comparisons,
        guardrail_violated=r.guardrail_violated,
        cuped_applied=r.cuped_applied,
        variance_reduction=num(r.variance_reduction),
        covariate_coverage=num(r.covariate_coverage),
        cuped_note=r.cuped_note,
    )


def results_to_pb(name: str, analysis: st.ExperimentAnalysis, compute_time) -> pb.ExperimentResults:
    outcome = analysis.outcome
    return pb.ExperimentResults(
        experiment=name,
        primary=_metric_result(analysis.primary),
        guardrails=[_metric_result(g) for g in analysis.guardrails],
        secondary=[_metric_result(s) for s in analysis.secondary],
        srm_p_value=num(analysis.srm.p_value),
        srm_detected=analysis.srm.detected,
        progress=num(outcome.progress),
        power=num(outcome.power),
        decision=_DECISION[outcome.decision],
        recommended_variant=outcome.recommended_variant or "",
        reason=outcome.reason,
        compute_time=to_timestamp(compute_time),
    )
