"""The pure parts of the experiment pages: the results table's formatting (the RPC's numbers, undefined ones as –),
the lift plot's data, the sample-ratio block on shipping, and the actions each state offers."""

from __future__ import annotations

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.experiments.v1 import experiment_pb2 as epb
from neuroweaver_console import experiments as ex

EXP = epb.Experiment
VARIANTS = [
    epb.Variant(id="control", model_version="projects/default/models/bot/versions/1.0.0"),
    epb.Variant(id="treatment", model_version="projects/other/models/bot/versions/2.0.0"),
]


def test_metric_table_formats_the_rpc_numbers_and_marks_undefined_ones():
    mr = epb.MetricResult(
        metric=epb.MetricSpec(name="score", kind=epb.METRIC_KIND_MEAN),
        variants=[
            epb.VariantStatistics(variant="control", units=120, mean=2.5, ci_lower=2.41234, ci_upper=2.58766),
            epb.VariantStatistics(variant="treatment", units=1, mean=3.0),  # one unit: no interval (0, 0)
        ],
        comparisons=[
            epb.Comparison(variant="treatment", difference=0.5, relative_lift=0.2, p_value=1.234e-5, sequential_p_value=0.02,
                           significant=True, improvement=True)  # no lift interval: (0, 0)
        ],
    )  # fmt: skip
    t = ex.metric_table(mr, VARIANTS, "default", sequential=True)
    control, treatment = t["rows"]
    assert (control["mean"], control["ci"], control["lift"], control["p"], control["verdict"]) == (
        "2.5",
        "[2.412, 2.588]",
        "–",
        "–",
        "baseline",
    )
    assert control["model"] == {"text": "bot 1.0.0", "href": "/models/bot", "full": VARIANTS[0].model_version}
    assert treatment["model"]["href"] == ""  # another project's model: no link into this project's pages
    assert (treatment["ci"], treatment["lift"], treatment["lift_ci"]) == ("–", "+20.00%", "–")
    assert (treatment["p"], treatment["seq_p"], treatment["difference"], treatment["verdict"]) == (
        "1.23e-05",
        "0.02",
        "+0.5",
        "better",
    )
    assert t["chart"] == "" and t["direction"] == "higher is better"  # UNSPECIFIED direction means higher


def test_lift_is_undefined_against_a_zero_control_mean_and_the_chart_has_defined_intervals_only():
    mr = epb.MetricResult(
        metric=epb.MetricSpec(name="errors", kind=epb.METRIC_KIND_PROPORTION, direction=cpb.METRIC_DIRECTION_LOWER_IS_BETTER),
        variants=[
            epb.VariantStatistics(variant="control", units=50),
            epb.VariantStatistics(variant="treatment", units=50, mean=0.1),
        ],
        comparisons=[epb.Comparison(variant="treatment", difference=0.1, lift_ci_lower=-0.1, lift_ci_upper=0.3, p_value=0.04)],
    )
    t = ex.metric_table(mr, VARIANTS, "default", sequential=False)
    assert t["rows"][1]["lift"] == t["rows"][1]["lift_ci"] == "–" and t["chart"] == ""
    assert t["rows"][1]["seq_p"] == "–" and t["direction"] == "lower is better" and t["kind"] == "proportion"
    mr.variants[0].mean = 0.2
    assert ex.metric_table(mr, VARIANTS, "default", sequential=False)["chart"] == (
        '{"labels":["treatment"],"lift":[0.0],"lower":[-10.0],"upper":[30.0]}'
    )


def test_sample_ratio_mismatch_blocks_ship_with_the_reason_in_words():
    running = EXP(state=EXP.STATE_RUNNING)
    ok = epb.ExperimentResults(decision=epb.DECISION_SHIP_VARIANT, recommended_variant="treatment", srm_p_value=0.4)
    assert ex.srm_block(ok) == "" and ex.ship_variant(running, ok) == "treatment"
    srm = epb.ExperimentResults(decision=epb.DECISION_INVALID_SAMPLE_RATIO, srm_detected=True, srm_p_value=1.13e-36)
    assert "p = 1.13e-36 < 0.001" in ex.srm_block(srm) and "no winner can be shipped" in ex.srm_block(srm)
    assert ex.ship_variant(running, srm) == ""
    assert ex.ship_variant(EXP(state=EXP.STATE_CONCLUDED), ok) == ""
    keep = epb.ExperimentResults(decision=epb.DECISION_KEEP_RUNNING)
    assert ex.ship_variant(running, keep) == ""


def test_experiment_actions_follow_the_state():
    assert ex.allowed_actions(EXP.STATE_DRAFT) == ex.allowed_actions(EXP.STATE_STOPPED) == ["start"]
    assert ex.allowed_actions(EXP.STATE_RUNNING) == ["stop"]
    assert ex.allowed_actions(EXP.STATE_CONCLUDED) == []
    assert [ex.can_conclude(s) for s in (EXP.STATE_DRAFT, EXP.STATE_RUNNING, EXP.STATE_STOPPED, EXP.STATE_CONCLUDED)] == [
        False, True, True, False,
    ]  # fmt: skip
