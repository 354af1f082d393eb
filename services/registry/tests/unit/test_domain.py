"""Registry domain rules: validation limits, etags, judge configs (comparison: test_compare.py; rules: test_rules.py)."""

from __future__ import annotations

import pytest

from neuroweaver_registry.domain.judges import validate_judge_config
from neuroweaver_registry.domain.model import (
    Artifact,
    Lineage,
    Metric,
    Model,
    ModelVersion,
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
    priced = {"base_url": "http://x", "model": "m", "price_per_1k_prompt_tokens": 0.15, "price_per_1k_completion_tokens": 0.6}
    assert judge_fields(_judge(openai=priced)) == []


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
        (
            {"openai": {"base_url": "http://x", "model": "m", "price_per_1k_prompt_tokens": -0.5}},
            "jv.openai.price_per_1k_prompt_tokens",
        ),
        (
            {"openai": {"base_url": "http://x", "model": "m", "price_per_1k_completion_tokens": "NaN"}},
            "jv.openai.price_per_1k_completion_tokens",
        ),
        ({"rubric": "r" * 16001}, "jv.rubric"),
    ],
)
def test_invalid_judge_configs(overrides, field):
    assert field in judge_fields(_judge(**overrides))
