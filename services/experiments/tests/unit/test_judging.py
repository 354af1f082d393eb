"""Judging rules in the domain: deterministic, nested sampling; settings validation; the judge fixed after start."""

from __future__ import annotations

import pytest

from neuroweaver_experiments.domain.judging import (
    AnswerJudging,
    apply_judging_defaults,
    check_judge_kept,
    derived_key,
    sampled,
    validate_judging,
)
from neuroweaver_experiments.domain.statistics import Direction, MetricKind, MetricSpec
from neuroweaver_runtime.errors import FailedPrecondition, InvalidArgument, Violations

JUDGE = "projects/p/judges/j/versions/3"
METRICS = [MetricSpec("judge_score", MetricKind.MEAN, Direction.INCREASE), MetricSpec("thumbs_up", MetricKind.PROPORTION, Direction.INCREASE)]  # fmt: skip


def test_sampling_is_deterministic_nested_and_at_the_rate():
    keys = [f"req-{i}:answer" for i in range(20_000)]
    at = {rate: {k for k in keys if sampled(k, rate)} for rate in (0.05, 0.3, 0.5, 1.0)}
    assert at[1.0] == set(keys)
    assert at[0.05] <= at[0.3] <= at[0.5]  # raising the rate keeps every answer already sampled
    for rate in (0.05, 0.3, 0.5):
        assert abs(len(at[rate]) / len(keys) - rate) < 0.015, rate  # 20,000 keys: sd of the share <= 0.0036
    assert [sampled(k, 0.3) for k in keys[:100]] == [sampled(k, 0.3) for k in keys[:100]]


def test_derived_keys_name_the_content():
    assert derived_key("u", "control", "p", "a", "") == derived_key("u", "control", "p", "a", "")
    assert derived_key("u", "control", "p", "a", "") != derived_key("u", "control", "p", "a ", "")
    assert derived_key("u", "control", "p", "a", "").startswith("sha256:")


def _violations(j: AnswerJudging) -> list[str]:
    v = Violations()
    apply_judging_defaults(j)
    validate_judging(j, METRICS, v)
    return [f.field for f in v.items]


def test_settings_are_validated():
    assert _violations(AnswerJudging(JUDGE, "judge_score")) == []
    assert _violations(AnswerJudging("projects/p/judges/j/versions/latest", "judge_score")) == []
    assert _violations(AnswerJudging("projects/p/judges/j", "judge_score")) == ["experiment.answer_judging.judge_version"]
    assert _violations(AnswerJudging(JUDGE, "nope")) == ["experiment.answer_judging.metric"]
    assert _violations(AnswerJudging(JUDGE, "thumbs_up")) == ["experiment.answer_judging.metric"]  # not MEAN
    for bad in (-0.1, 1.5, float("nan"), float("inf")):
        assert _violations(AnswerJudging(JUDGE, "judge_score", sample_rate=bad)) == ["experiment.answer_judging.sample_rate"]
    for bad in (-1, 65):
        assert _violations(AnswerJudging(JUDGE, "judge_score", max_concurrency=bad)) == [
            "experiment.answer_judging.max_concurrency"
        ]
    defaults = AnswerJudging(JUDGE, "judge_score", 0.0, 0)
    apply_judging_defaults(defaults)
    assert (defaults.sample_rate, defaults.max_concurrency) == (1.0, 4)


def test_the_judge_and_metric_are_fixed_after_start():
    old = AnswerJudging(JUDGE, "judge_score", 0.5, 4)
    check_judge_kept(old, AnswerJudging(JUDGE, "judge_score", 0.1, 8), started=True)  # rate and concurrency may change
    check_judge_kept(old, AnswerJudging("projects/p/judges/j/versions/4", "judge_score"), started=False)  # draft
    check_judge_kept(None, AnswerJudging(JUDGE, "judge_score"), started=True)  # judging added later
    for new in (AnswerJudging("projects/p/judges/j/versions/4", "judge_score"), AnswerJudging(JUDGE, "other"), None):
        with pytest.raises(FailedPrecondition) as caught:
            check_judge_kept(old, new, started=True)
        assert caught.value.reason == "JUDGE_FIXED_AFTER_START"
    with pytest.raises(InvalidArgument):
        v = Violations()
        validate_judging(AnswerJudging("", "judge_score", 1.0, 4), METRICS, v)
        v.raise_if_any()
