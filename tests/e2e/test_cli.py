"""The `nw` CLI against the real registry process: tables, --json, error output and exit codes; and the PNG charts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from neuroweaver.experiments.v1 import experiment_pb2 as epb
from neuroweaver.trainer.v1 import training_job_pb2 as tpb
from neuroweaver_runtime.testing import serving_process
from neuroweaver_sdk.plots import plot_experiment, plot_training

SHA = "ab" * 32


@pytest.fixture
def registry(tmp_path):
    with serving_process("neuroweaver_registry", "--data-dir", str(tmp_path), timeout=30) as target:
        yield target


def nw(target: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "NW_REGISTRY_TARGET": target}
    return subprocess.run(
        [sys.executable, "-m", "neuroweaver_sdk.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_cli_drives_models_versions_and_aliases(registry):
    created = nw(registry, "models", "create", "advisor", "--specialization", "service_advisor", "--label", "team=ml")
    assert created.returncode == 0, created.stderr
    assert "projects/default/models/advisor" in created.stdout

    for _ in range(2):
        made = nw(registry, "versions", "create", "advisor", "--bump", "minor", "--artifact-uri", "file:///a", "--sha256", SHA)
        assert made.returncode == 0, made.stderr
    assert nw(registry, "alias", "set", "advisor", "production", "0.1.0", "--expect", "-", "--reason", "first").returncode == 0
    moved = nw(registry, "alias", "set", "advisor", "production", "0.2.0", "--expect", "0.1.0", "--reason", "better")
    assert moved.returncode == 0, moved.stderr

    listed = nw(registry, "--json", "versions", "list", "advisor")
    versions = [v["version"] for v in json.loads(listed.stdout)["model_versions"]]
    assert versions == ["0.2.0", "0.1.0"]

    history = json.loads(nw(registry, "--json", "alias", "history", "advisor", "production").stdout)["entries"]
    assert [(e.get("from_version", ""), e["to_version"], e["reason"]) for e in history] == [
        ("0.1.0", "0.2.0", "better"),
        ("", "0.1.0", "first"),
    ]

    rolled = nw(registry, "--json", "alias", "rollback", "advisor", "production")
    assert json.loads(rolled.stdout)["version"] == "0.1.0"

    table = nw(registry, "models", "list")
    assert "advisor" in table.stdout and "service_advisor" in table.stdout


def test_cli_errors_show_status_reason_and_field(registry):
    bad = nw(registry, "versions", "create", "advisor", "--version", "1.0.0", "--artifact-uri", "file:///a", "--sha256", "nothex")
    assert bad.returncode == 1
    assert "NOT_FOUND" in bad.stderr or "INVALID_ARGUMENT" in bad.stderr
    nw(registry, "models", "create", "advisor")
    bad = nw(registry, "versions", "create", "advisor", "--version", "1.0.0", "--artifact-uri", "file:///a", "--sha256", "nothex")
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT" in bad.stderr
    assert "model_version.artifact.sha256" in bad.stderr  # the field at fault
    stale = nw(registry, "alias", "set", "advisor", "production", "1.0.0", "--expect", "9.9.9")
    assert stale.returncode == 1


def test_training_and_experiment_charts_are_real_pngs(tmp_path):
    events = []
    for step in range(1, 21):
        events.append(
            tpb.TrainingJobEvent(sequence=step, type=tpb.EVENT_TYPE_STEP, step=tpb.StepMetrics(step=step, loss=2.0 / step))
        )
        if step % 10 == 0:
            events.append(
                tpb.TrainingJobEvent(type=tpb.EVENT_TYPE_EVAL, step=tpb.StepMetrics(step=step), metrics={"eval_loss": 1.5 / step})
            )
    training_png = Path(plot_training(events, str(tmp_path / "training.png"), title="job"))
    results = epb.ExperimentResults(
        experiment="projects/default/experiments/ab",
        primary=epb.MetricResult(
            metric=epb.MetricSpec(name="judge_score"),
            variants=[
                epb.VariantStatistics(variant="control", units=40, mean=5.1, ci_lower=4.8, ci_upper=5.4),
                epb.VariantStatistics(variant="tuned", units=41, mean=6.0, ci_lower=5.7, ci_upper=6.3),
            ],
        ),
        reason="tuned is better",
        compute_time=Timestamp(seconds=1),
    )
    experiment_png = Path(plot_experiment(results, str(tmp_path / "experiment.png")))
    for png in (training_png, experiment_png):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_cli_compare_shows_the_registrys_verdicts(registry):
    """Verdicts only for declared directions beyond the tolerance; an undirected change is shown as such."""
    from neuroweaver.common.v1 import common_pb2 as cpb
    from neuroweaver.registry.v1 import registry_pb2 as rpb
    from neuroweaver.registry.v1 import registry_service_pb2 as rs
    from neuroweaver.registry.v1 import registry_service_pb2_grpc as rs_grpc

    lower, higher = cpb.METRIC_DIRECTION_LOWER_IS_BETTER, cpb.METRIC_DIRECTION_HIGHER_IS_BETTER
    with grpc.insecure_channel(registry) as channel:
        stub = rs_grpc.RegistryServiceStub(channel)
        model = stub.CreateModel(rs.CreateModelRequest(parent="projects/default", model_id="cmp", model=rpb.Model()))
        for version, (loss, acc, bleu) in (("1.0.0", (2.0, 0.800, 0.3)), ("1.1.0", (1.5, 0.801, 0.5))):
            metrics = [
                rpb.Metric(name="eval_loss", value=loss, direction=lower),
                rpb.Metric(name="accuracy", value=acc, direction=higher),
                rpb.Metric(name="bleu", value=bleu),
            ]
            artifact = rpb.Artifact(uri="file:///a", sha256=SHA, size_bytes=1)
            stub.CreateModelVersion(
                rs.CreateModelVersionRequest(
                    parent=model.name, version=version, model_version=rpb.ModelVersion(artifact=artifact, metrics=metrics)
                )
            )
    shown = nw(registry, "versions", "compare", "cmp", "1.0.0", "1.1.0")
    assert shown.returncode == 0, shown.stderr
    rows = {line.split("│")[1].strip(): line for line in shown.stdout.splitlines() if line.count("│") >= 5}
    assert "better" in rows["eval_loss"]
    assert "same (within tolerance)" in rows["accuracy"]
    assert "changed (no direction declared)" in rows["bleu"]
