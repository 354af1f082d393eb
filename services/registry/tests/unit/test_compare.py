"""The compare recommendation: declared directions only, a relative tolerance per metric (default 1 %)."""

from __future__ import annotations

import pytest

from neuroweaver_registry.domain.compare import DEFAULT_RELATIVE_TOLERANCE, compare_versions, validate_tolerances
from neuroweaver_registry.domain.model import Artifact, Direction, Lineage, Metric, ModelVersion, VersionState
from neuroweaver_runtime.errors import Violations

UP, DOWN, NONE = Direction.HIGHER, Direction.LOWER, Direction.UNSPECIFIED


def _mv(metrics: dict[str, tuple[float, Direction]], base_model="b", state=VersionState.REGISTERED, **hp) -> ModelVersion:
    return ModelVersion(
        name="",
        version="",
        artifact=Artifact("file:///a", "0f" * 32, 1),
        metrics=[Metric(k, value, direction) for k, (value, direction) in metrics.items()],
        state=state,
        lineage=Lineage(base_model=base_model, hyperparameters=hp),
    )


def _deltas(cmp):
    return {d.name: d for d in cmp.metric_deltas}


def test_promote_when_better_and_worse_on_nothing():
    cmp = compare_versions(
        _mv({"accuracy": (0.8, UP), "loss": (1.0, DOWN)}), _mv({"accuracy": (0.9, UP), "loss": (0.8, DOWN)}), "NEWER"
    )
    assert cmp.recommendation == "PROMOTE"
    deltas = _deltas(cmp)
    assert deltas["accuracy"].improved and deltas["loss"].improved
    assert deltas["loss"].delta == pytest.approx(-0.2) and deltas["loss"].relative_delta == pytest.approx(-0.2)
    assert cmp.base_model_compatible


def test_promote_notes_a_different_base_model():
    cmp = compare_versions(_mv({"accuracy": (0.8, UP)}), _mv({"accuracy": (0.9, UP)}, base_model="other"), "NEWER")
    assert cmp.recommendation == "PROMOTE" and not cmp.base_model_compatible
    assert "different base model" in cmp.reason
    assert ("lineage.base_model", "b", "other") in cmp.lineage_diffs


def test_mixed_evidence_means_experiment():
    cmp = compare_versions(
        _mv({"accuracy": (0.8, UP), "latency_ms": (10, DOWN)}), _mv({"accuracy": (0.9, UP), "latency_ms": (20, DOWN)}), "NEWER"
    )
    assert cmp.recommendation == "EXPERIMENT"
    assert "accuracy" in cmp.reason and "latency_ms" in cmp.reason


def test_regression_keeps_base():
    assert compare_versions(_mv({"accuracy": (0.9, UP)}), _mv({"accuracy": (0.8, UP)}), "NEWER").recommendation == "KEEP_BASE"
    assert compare_versions(_mv({"accuracy": (0.9, UP)}), _mv({"accuracy": (0.9, UP)}), "NEWER").recommendation == "KEEP_BASE"


def test_no_shared_metric_means_experiment():
    cmp = compare_versions(_mv({"accuracy": (0.9, UP)}), _mv({"bleu": (0.3, UP)}), "NEWER")
    assert cmp.recommendation == "EXPERIMENT"
    assert {d.name: (d.base_value, d.candidate_value) for d in cmp.metric_deltas} == {
        "accuracy": (0.9, None),
        "bleu": (None, 0.3),
    }


def test_deprecated_candidate_is_never_promoted():
    cmp = compare_versions(_mv({"accuracy": (0.5, UP)}), _mv({"accuracy": (0.9, UP)}, state=VersionState.DEPRECATED), "NEWER")
    assert cmp.recommendation == "KEEP_BASE"


def test_latest_metric_value_wins():
    base = _mv({"score": (5.0, DOWN)})
    cand = _mv({})
    cand.metrics = [Metric("score", 9.0, DOWN), Metric("score", 3.0, DOWN)]
    cmp = compare_versions(base, cand, "NEWER")
    assert cmp.metric_deltas[0].candidate_value == 3.0 and cmp.metric_deltas[0].improved
    assert cmp.recommendation == "PROMOTE"


def test_hyperparameter_diffs():
    cmp = compare_versions(_mv({}, lr="1e-4", r="8"), _mv({}, lr="2e-4", alpha="16"), "NEWER")
    assert cmp.hyperparameter_diffs == [
        ("hyperparameters.alpha", "", "16"), ("hyperparameters.lr", "1e-4", "2e-4"), ("hyperparameters.r", "8", ""),
    ]  # fmt: skip


# -- tolerance -----------------------------------------------------------------------------------


def test_default_tolerance_is_one_percent_of_the_base():
    assert DEFAULT_RELATIVE_TOLERANCE == 0.01
    within = compare_versions(_mv({"accuracy": (0.800, UP)}), _mv({"accuracy": (0.8079, UP)}), "NEWER")
    d = _deltas(within)["accuracy"]
    assert d.delta == pytest.approx(0.0079) and not (d.changed or d.improved or d.regressed)
    assert within.recommendation == "KEEP_BASE" and "tolerance" in within.reason
    beyond = compare_versions(_mv({"accuracy": (0.800, UP)}), _mv({"accuracy": (0.8081, UP)}), "NEWER")
    assert _deltas(beyond)["accuracy"].improved and beyond.recommendation == "PROMOTE"


def test_noise_within_tolerance_does_not_block_a_real_improvement():
    """The old rule called any non-zero delta worse: a 0.1 % wobble in latency turned a clear win into EXPERIMENT."""
    cmp = compare_versions(
        _mv({"accuracy": (0.80, UP), "latency_ms": (100.0, DOWN)}),
        _mv({"accuracy": (0.90, UP), "latency_ms": (100.1, DOWN)}),
        "NEWER",
    )
    assert not _deltas(cmp)["latency_ms"].regressed
    assert cmp.recommendation == "PROMOTE", cmp.reason


def test_a_small_regression_within_tolerance_is_no_regression():
    cmp = compare_versions(_mv({"loss": (2.0, DOWN)}), _mv({"loss": (2.019, DOWN)}), "NEWER")
    assert not _deltas(cmp)["loss"].regressed and cmp.recommendation == "KEEP_BASE"
    worse = compare_versions(_mv({"loss": (2.0, DOWN)}), _mv({"loss": (2.021, DOWN)}), "NEWER")
    assert _deltas(worse)["loss"].regressed and worse.recommendation == "KEEP_BASE" and "worse on loss" in worse.reason


def test_per_metric_tolerance_overrides_the_default():
    base, cand = _mv({"accuracy": (0.80, UP), "p99_ms": (100.0, DOWN)}), _mv({"accuracy": (0.84, UP), "p99_ms": (104.0, DOWN)})
    assert compare_versions(base, cand, "NEWER").recommendation == "EXPERIMENT"  # +5 % accuracy, +4 % latency
    loose = compare_versions(base, cand, "NEWER", {"p99_ms": 0.05})
    assert not _deltas(loose)["p99_ms"].changed and loose.recommendation == "PROMOTE"
    strict = compare_versions(_mv({"accuracy": (0.8, UP)}), _mv({"accuracy": (0.8001, UP)}), "NEWER", {"accuracy": 0.0})
    assert _deltas(strict)["accuracy"].improved  # tolerance 0: any change counts


def test_from_zero_any_change_counts():
    cmp = compare_versions(_mv({"errors": (0.0, DOWN)}), _mv({"errors": (0.001, DOWN)}), "NEWER")
    d = _deltas(cmp)["errors"]
    assert d.relative_delta is None and d.changed and d.regressed


# -- direction -----------------------------------------------------------------------------------


def test_direction_is_never_guessed_from_the_name():
    """`eval_loss` going down is no verdict unless the metric says lower is better."""
    cmp = compare_versions(_mv({"eval_loss": (1.2, NONE)}), _mv({"eval_loss": (1.0, NONE)}), "NEWER")
    d = _deltas(cmp)["eval_loss"]
    assert d.direction is NONE and d.changed and not d.improved and not d.regressed
    assert cmp.recommendation == "EXPERIMENT" and "eval_loss" in cmp.reason and "direction" in cmp.reason
    declared = compare_versions(_mv({"eval_loss": (1.2, UP)}), _mv({"eval_loss": (1.0, UP)}), "NEWER")
    assert _deltas(declared)["eval_loss"].regressed  # a name that sounds like a loss, declared higher-is-better


def test_an_undirected_change_blocks_promotion_but_unchanged_ones_do_not():
    base = _mv({"accuracy": (0.8, UP), "tokens": (100.0, NONE)})
    assert compare_versions(base, _mv({"accuracy": (0.9, UP), "tokens": (150.0, NONE)}), "NEWER").recommendation == "EXPERIMENT"
    assert compare_versions(base, _mv({"accuracy": (0.9, UP), "tokens": (100.5, NONE)}), "NEWER").recommendation == "PROMOTE"


def test_one_side_declaring_is_enough_and_conflicting_declarations_give_no_verdict():
    one_side = compare_versions(_mv({"acc": (0.8, NONE)}), _mv({"acc": (0.9, UP)}), "NEWER")
    assert _deltas(one_side)["acc"].direction is UP and one_side.recommendation == "PROMOTE"
    conflict = compare_versions(_mv({"acc": (0.8, DOWN)}), _mv({"acc": (0.9, UP)}), "NEWER")
    d = _deltas(conflict)["acc"]
    assert d.direction is NONE and not d.improved and not d.regressed and conflict.recommendation == "EXPERIMENT"


@pytest.mark.parametrize(
    ("tolerances", "field"),
    [
        ({"acc": -0.1}, "t['acc']"),
        ({"acc": float("nan")}, "t['acc']"),
        ({"acc": float("inf")}, "t['acc']"),
        ({"": 0.1}, "t['']"),
        ({"x" * 129: 0.1}, "t['xxxxxxxxxxxxxxxxxxxx']"),
    ],
)
def test_invalid_tolerances(tolerances, field):
    v = Violations()
    validate_tolerances(tolerances, v, "t")
    assert [i.field for i in v.items] == [field]


def test_valid_tolerances():
    v = Violations()
    validate_tolerances({"acc": 0.0, "p99_ms": 0.05}, v, "t")
    assert v.items == []
