"""Registry domain rules: validation limits, etags, the compare recommendation, judge configs."""

from __future__ import annotations

import pytest

from neuroweaver_registry.domain.judges import validate_judge_config
from neuroweaver_registry.domain.model import (
    Artifact,
    Direction,
    Lineage,
    Metric,
    Model,
    ModelVersion,
    VersionState,
    compare_versions,
    infer_direction,
    validate_metrics,
    validate_model_fields,
    validate_new_version,
)
from neuroweaver_runtime.errors import Aborted, InvalidArgument, Violations
from neuroweaver_runtime.etag import check_etag, etag_for

SHA = "0f" * 32


def violations_of(fn, *args) -> list[str]:
    v = Violations()
    fn(*args, v)
    return [item.field for item in v.items]


# -- validation ----------------------------------------------------------------------------------


def test_valid_model_has_no_violations():
    assert violations_of(validate_model_fields, Model("x", description="d" * 4000, labels={"team": "ml"})) == []


@pytest.mark.parametrize(
    ("model", "field"),
    [
        (Model("x", description="d" * 4001), "model.description"),
        (Model("x", display_name="n" * 201), "model.display_name"),
        (Model("x", specialization="s" * 64), "model.specialization"),
        (Model("x", labels={f"k{i}": "v" for i in range(65)}), "model.labels"),
        (Model("x", labels={"Team": "v"}), "model.labels['Team']"),
        (Model("x", labels={"9lives": "v"}), "model.labels['9lives']"),
        (Model("x", labels={"": "v"}), "model.labels['']"),
        (Model("x", labels={"ok": "v" * 64}), "model.labels['ok']"),
    ],
)
def test_model_field_violations(model, field):
    assert field in violations_of(validate_model_fields, model)


def test_exactly_64_labels_are_allowed():
    assert violations_of(validate_model_fields, Model("x", labels={f"k{i}": "v" for i in range(64)})) == []


def _version(**kwargs) -> ModelVersion:
    defaults = dict(name="", version="", artifact=Artifact("file:///a", SHA, 1))
    defaults.update(kwargs)
    return ModelVersion(**defaults)


def test_new_version_rules():
    assert violations_of(validate_new_version, _version()) == []
    assert "model_version.artifact.sha256" in violations_of(validate_new_version, _version(artifact=Artifact("file:///a", "")))
    assert "model_version.artifact.sha256" in violations_of(
        validate_new_version, _version(artifact=Artifact("file:///a", SHA.upper()))
    )
    assert "model_version.artifact.uri" in violations_of(validate_new_version, _version(artifact=Artifact("", SHA)))
    assert "model_version.artifact.size_bytes" in violations_of(validate_new_version, _version(artifact=Artifact("u", SHA, -1)))
    bad_digest = _version(lineage=Lineage(dataset_digest="nothex"))
    assert "model_version.lineage.dataset_digest" in violations_of(validate_new_version, bad_digest)
    assert "model_version.notes" in violations_of(validate_new_version, _version(notes="n" * 4001))


def test_metric_values_must_be_finite_and_named():
    v = Violations()
    validate_metrics([Metric("", 1.0), Metric("a", float("nan")), Metric("b", float("inf"))], v, "m")
    assert [i.field for i in v.items] == ["m[0].name", "m[1].value", "m[2].value"]


def test_violations_raise_once_with_all_fields():
    v = Violations()
    v.add("a", "bad")
    v.add("b", "bad")
    with pytest.raises(InvalidArgument) as caught:
        v.raise_if_any()
    assert [x.field for x in caught.value.violations] == ["a", "b"]
    assert "(and 1 more)" in caught.value.message


# -- etag ----------------------------------------------------------------------------------------


def test_etag_changes_with_revision_and_name():
    assert etag_for("m", 1) == etag_for("m", 1)
    assert etag_for("m", 1) != etag_for("m", 2) != etag_for("n", 2)
    check_etag("m", 3, "")  # empty = unconditional
    check_etag("m", 3, etag_for("m", 3))
    with pytest.raises(Aborted) as caught:
        check_etag("m", 3, etag_for("m", 2))
    assert caught.value.reason == "ETAG_MISMATCH"


# -- comparison ----------------------------------------------------------------------------------


def _mv(metrics: dict[str, float], base_model="b", state=VersionState.REGISTERED, **hp) -> ModelVersion:
    return _version(
        metrics=[Metric(k, v) for k, v in metrics.items()],
        state=state,
        lineage=Lineage(base_model=base_model, hyperparameters=hp),
    )


def test_infer_direction():
    assert infer_direction("eval_loss") is Direction.LOWER
    assert infer_direction("p99_latency_ms") is Direction.LOWER
    assert infer_direction("accuracy") is Direction.HIGHER


def test_promote_when_better_and_worse_on_nothing():
    cmp = compare_versions(_mv({"accuracy": 0.8, "loss": 1.0}), _mv({"accuracy": 0.9, "loss": 0.8}), "NEWER")
    assert cmp.recommendation == "PROMOTE"
    deltas = {d.name: d for d in cmp.metric_deltas}
    assert deltas["accuracy"].improved and deltas["loss"].improved
    assert deltas["loss"].delta == pytest.approx(-0.2) and deltas["loss"].relative_delta == pytest.approx(-0.2)
    assert cmp.base_model_compatible


def test_promote_notes_a_different_base_model():
    cmp = compare_versions(_mv({"accuracy": 0.8}), _mv({"accuracy": 0.9}, base_model="other"), "NEWER")
    assert cmp.recommendation == "PROMOTE" and not cmp.base_model_compatible
    assert "different base model" in cmp.reason
    assert ("lineage.base_model", "b", "other") in cmp.lineage_diffs


def test_mixed_evidence_means_experiment():
    cmp = compare_versions(_mv({"accuracy": 0.8, "latency_ms": 10}), _mv({"accuracy": 0.9, "latency_ms": 20}), "NEWER")
    assert cmp.recommendation == "EXPERIMENT"
    assert "accuracy" in cmp.reason and "latency_ms" in cmp.reason


def test_regression_keeps_base():
    assert compare_versions(_mv({"accuracy": 0.9}), _mv({"accuracy": 0.8}), "NEWER").recommendation == "KEEP_BASE"
    assert compare_versions(_mv({"accuracy": 0.9}), _mv({"accuracy": 0.9}), "NEWER").recommendation == "KEEP_BASE"


def test_no_shared_metric_means_experiment():
    cmp = compare_versions(_mv({"accuracy": 0.9}), _mv({"bleu": 0.3}), "NEWER")
    assert cmp.recommendation == "EXPERIMENT"
    assert {d.name: (d.base_value, d.candidate_value) for d in cmp.metric_deltas} == {
        "accuracy": (0.9, None),
        "bleu": (None, 0.3),
    }


def test_deprecated_candidate_is_never_promoted():
    cmp = compare_versions(_mv({"accuracy": 0.5}), _mv({"accuracy": 0.9}, state=VersionState.DEPRECATED), "NEWER")
    assert cmp.recommendation == "KEEP_BASE"


def test_latest_metric_value_wins_and_explicit_direction_overrides_the_name():
    base = _version(metrics=[Metric("score", 5.0, Direction.LOWER)])
    cand = _version(metrics=[Metric("score", 9.0, Direction.LOWER), Metric("score", 3.0, Direction.LOWER)])
    cmp = compare_versions(base, cand, "NEWER")
    assert cmp.metric_deltas[0].candidate_value == 3.0 and cmp.metric_deltas[0].improved
    assert cmp.recommendation == "PROMOTE"


def test_hyperparameter_diffs():
    cmp = compare_versions(_mv({}, lr="1e-4", r="8"), _mv({}, lr="2e-4", alpha="16"), "NEWER")
    assert cmp.hyperparameter_diffs == [
        ("hyperparameters.alpha", "", "16"), ("hyperparameters.lr", "1e-4", "2e-4"), ("hyperparameters.r", "8", ""),
    ]  # fmt: skip


# -- judges --------------------------------------------------------------------------------------


def _judge(**overrides) -> dict:
    config = {
        "kind": "OPENAI_COMPATIBLE", "mode": "POINTWISE", "score_min": 1.0, "score_max": 10.0,
        "prompt_template": "Rate {response}", "openai": {"base_url": "http://127.0.0.1:8081/v1", "model": "judge", "api_key_env": "JUDGE_KEY"},
    }  # fmt: skip
    config.update(overrides)
    return config


def judge_fields(config: dict) -> list[str]:
    v = Violations()
    validate_judge_config(config, v, "jv")
    return [i.field for i in v.items]


def test_valid_judge_configs():
    assert judge_fields(_judge()) == []
    assert judge_fields({"kind": "LOCAL_EMBEDDING", "mode": "POINTWISE", "score_min": 0.0, "score_max": 1.0}) == []
    assert judge_fields(_judge(mode="PAIRWISE", prompt_template="{response_a} vs {response_b}")) == []


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"kind": "UNSPECIFIED"}, "jv.kind"),
        ({"mode": "UNSPECIFIED"}, "jv.mode"),
        ({"score_max": 1.0}, "jv.score_max"),
        ({"prompt_template": "no placeholder"}, "jv.prompt_template"),
        ({"mode": "PAIRWISE", "prompt_template": "{response_a} only"}, "jv.prompt_template"),
        ({"openai": {"base_url": "ftp://x", "model": "m"}}, "jv.openai.base_url"),
        ({"openai": {"base_url": "http://x", "model": ""}}, "jv.openai.model"),
        ({"openai": {"base_url": "http://x", "model": "m", "api_key_env": "sk-abcdef"}}, "jv.openai.api_key_env"),
        ({"openai": {"base_url": "http://x", "model": "m", "api_key_env": "lower_case"}}, "jv.openai.api_key_env"),
        ({"openai": {"base_url": "http://x", "model": "m", "max_tokens": -1}}, "jv.openai.max_tokens"),
        ({"rubric": "r" * 16001}, "jv.rubric"),
    ],
)
def test_invalid_judge_configs(overrides, field):
    assert field in judge_fields(_judge(**overrides))
