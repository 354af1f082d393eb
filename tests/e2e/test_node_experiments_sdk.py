"""The TypeScript local-evaluation SDK (`ExperimentsSdk` in @neuroweaver/client) against a real experiments process.

clients/typescript/test/experiments-sdk.ts runs each scenario in Node (compiled with tsc from the committed sources)
against `python -m neuroweaver_experiments` (SQLite); it prints what it saw as one JSON line, checked here.

- agreement: 24 experiments (hash seeds with non-ASCII and astral characters, 2-4 variants, weights such as
  0.1/0.2/0.7, 1/3 each, 0/0.5/0.5 and random ones, coverages 0.05..1): 96,000 units evaluated by the SDK from the
  config WatchExperimentConfigs delivered equal BatchAssignVariants unit by unit (variant, in_experiment, bucket);
  then SDK.assign() for fresh units, exposures flushed over IngestEvents, and the server's answers equal the SDK's;
  GrowthBook's JS SDK (`@growthbook/growthbook`, a dev dependency) gives the same answers for the same units.
- weight-change: 7 experiments over three phases (two UpdateExperiment weight changes, coverage 0.05..1); units
  exposed in every phase by the server (another evaluator) and by an SDK; afterwards that SDK and a fresh one assign
  every unit plus new ones, and each answer equals the server's (stickiness after weight changes included): local
  answers for unambiguous buckets, AssignVariant for ambiguous ones, no exposure conflict.
- delivery: metric events with idempotency keys (a resent key counted once), an invalid event isolated by
  splitting its batch and dropped alone, the memory bound refusing events, flush and close.
- restart: while Node assigns and tracks, the server is frozen (SIGSTOP for 3 s: batches unanswered, the SDK's ack
  timeout gives the stream up and resends), then SIGTERMed and started again (same port and database); after the
  flush the stored units and per-variant means equal what Node served and sent: nothing lost, nothing twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neuroweaver.experiments.v1 import experiments_service_pb2 as esvc
from neuroweaver.experiments.v1 import experiments_service_pb2_grpc as egrpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_node_client import (  # noqa: E402 - the Node client tests' helpers
    HEALTH,
    NODE,
    ServiceProcess,
    node_client,  # noqa: F401 - builds clients/typescript (dist/, dist-test/)
    open_grpc,
    run_node,
    stopped_at_exit,
)

SERVICE = HEALTH["experiments"]


class ExperimentsAt(ServiceProcess):
    """`python -m neuroweaver_experiments` on a given port (a restart on the same port and database)."""

    def __init__(self, data_dir: Path, port: int, log_name: str) -> None:
        self.service = "experiments"
        self.port = port
        self.log_path = data_dir / log_name
        self.log = open(self.log_path, "w")  # noqa: SIM115
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "neuroweaver_experiments",
                "--port",
                str(port),
                "--metrics-port",
                "-1",
                "--data-dir",
                str(data_dir),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )


@pytest.fixture
def experiments(tmp_path: Path):
    with stopped_at_exit([]) as procs:
        proc = ServiceProcess("experiments", tmp_path / "experiments")
        procs.append(proc)
        proc.wait_serving(SERVICE)
        yield proc


def run_scenario(node_client: Path, experiments: ServiceProcess, scenario: str, *args: str) -> dict:  # noqa: F811
    out = run_node(
        node_client / "dist-test" / "experiments-sdk.js", "--experiments", experiments.target, "--scenario", scenario, *args,
        timeout=300,
    )  # fmt: skip
    assert out["ok"] is True and out["scenario"] == scenario
    return out


def test_sdk_agrees_with_assign_variant(node_client: Path, experiments: ServiceProcess) -> None:  # noqa: F811
    out = run_scenario(node_client, experiments, "agreement", "--seed", "18")
    assert out["mismatchCount"] == 0, out["mismatches"]
    assert out["experiments"] == 24 and out["units"] == 24 * 4000
    assert 0 < out["inCoverage"] < out["units"]  # coverages < 1 put units on both sides
    # GrowthBook's own JS SDK on the same seeds, weights, coverages and units: same variant and in-experiment flag for
    # all, same hash value wherever it reports one (units it puts in the experiment).
    assert out["growthbook"]["mismatchCount"] == 0, out["growthbook"]["examples"]
    assert out["growthbook"]["bucketsCompared"] == out["inCoverage"]
    assert out["sdk"]["mismatchCount"] == 0, out["sdk"]["mismatches"]
    assert out["sdk"]["local"] == out["sdk"]["assigned"] == 4000  # one phase: nothing needs the server
    stats = out["stats"]
    assert stats["serverAssignments"] == 0
    # Every in-coverage local answer was one exposure, stored once.
    assert stats["exposuresAccepted"] == stats["exposuresQueued"] > 0 and stats["exposuresDuplicate"] == 0
    assert stats["exposureConflicts"] == 0 and stats["pending"] == 0
    assert out["vectors"] == {"exp-1/user-42": 7191}  # the reference implementation's doctest value
    assert out["remoteOnly"] == [False, False, False]  # empty, 257 characters, lone surrogate: the server decides
    assert out["errors"] == []


def test_sdk_sticky_across_weight_changes(node_client: Path, experiments: ServiceProcess) -> None:  # noqa: F811
    out = run_scenario(node_client, experiments, "weight-change", "--seed", "18")
    assert out["mismatchCount"] == 0, out["mismatches"]
    assert len(out["experiments"]) == 7
    for exp in out["experiments"]:
        sources = exp["sources"]
        assert sum(sources["B"].values()) == exp["units"]
        assert "sticky" not in sources["B"]  # the fresh SDK knew nothing
        assert sources["B"].get("server", 0) > 0 and sources["B"].get("local", 0) > 0, exp
        assert sources["A"].get("sticky", 0) > 0, exp  # units the first SDK exposed in earlier phases
        assert exp["ambiguousBuckets"] > 0
    for label in ("A", "B"):
        stats = out["stats"][label]
        assert stats["exposureConflicts"] == 0 and stats["rejected"] == 0 and stats["pending"] == 0
        assert stats["exposuresAccepted"] + stats["exposuresDuplicate"] == stats["exposuresQueued"]
    assert out["errors"] == []


def test_sdk_event_delivery(node_client: Path, experiments: ServiceProcess) -> None:  # noqa: F811
    out = run_scenario(node_client, experiments, "delivery", "--seed", "18")
    flushed = out["afterFlush"]
    assert flushed["exposuresAccepted"] == out["exposed"] == 300
    # 300 keyed events, the 100 first sent again with the same keys, one invalid event.
    assert flushed["eventsQueued"] == 401
    assert flushed["eventsAccepted"] == 300 and flushed["eventsDuplicate"] == 100
    assert flushed["rejected"] == 1 and flushed["pending"] == 0
    assert out["rejected"] == [{"metric": "no_such_metric", "error": "rejected: InvalidArgument UNKNOWN_METRIC"}]
    assert sum(out["primaryUnits"].values()) == 300
    # The memory bound: 10 taken, 15 refused, the 10 delivered by close().
    assert out["small"]["taken"] == 10 and out["small"]["refused"] == 15
    assert out["small"]["stats"]["eventsAccepted"] == 10 and out["small"]["stats"]["eventsRefused"] == 15
    assert out["closedError"] == "FailedPrecondition"
    # A shared sticky store: after a weight change a fresh SDK answers the first SDK's units from it, as the server.
    assert out["store"] == {"units": 300, "sources": {"sticky": 300}, "mismatches": 0, "entries": 300}
    # Not running / not there: the SDK holds no config and throws the server's own error.
    assert out["stopped"] == {
        "sdk": "FailedPrecondition EXPERIMENT_NOT_RUNNING",
        "server": "FailedPrecondition EXPERIMENT_NOT_RUNNING",
    }
    assert out["missing"] == {"sdk": "NotFound EXPERIMENT_NOT_FOUND", "server": "NotFound EXPERIMENT_NOT_FOUND"}
    assert out["refusal"] == "InvalidArgument MALFORMED_NAME"  # ready() reports a refused watch, not a timeout
    # The staleness window, made long on purpose (the SDK's watch held after the first snapshot, then a weight change):
    # the units the server had assigned under the new phase in buckets whose answer changed were served the old answer
    # once; each came back as an exposure conflict, and afterwards the SDK answers them all as the server does.
    # A sticky cache of 50 units: acknowledged entries are evicted; evicted units get the same answer again and their
    # repeated exposures are duplicates on the server (300 distinct units stored, whatever was resent).
    bounded = out["bounded"]
    assert bounded["changed"] == 0
    assert bounded["stats"]["exposuresAccepted"] == 300 and bounded["stats"]["pending"] == 0
    assert bounded["stats"]["exposuresDuplicate"] == bounded["stats"]["exposuresQueued"] - 300 > 0
    stale = out["stale"]
    assert stale["expectedConflicts"] > 0
    assert stale["servedDifferently"] == stale["conflicts"] == stale["expectedConflicts"]
    assert stale["wrongAfter"] == 0
    assert out["errors"] == []


def test_sdk_survives_server_restart(node_client: Path, tmp_path: Path) -> None:  # noqa: F811
    assert NODE is not None
    data_dir = tmp_path / "experiments"
    flag = tmp_path / "restarted"
    with stopped_at_exit([]) as procs:
        first = ServiceProcess("experiments", data_dir)
        procs.append(first)
        first.wait_serving(SERVICE)
        node = subprocess.Popen(
            [NODE, str(node_client / "dist-test" / "experiments-sdk.js"), "--experiments", first.target,
             "--scenario", "restart", "--seed", "18", "--restarted-flag", str(flag)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert node.stdout is not None
            line = node.stdout.readline()
            assert json.loads(line) == {"stage": "running"}, line + (node.stderr.read() if node.stderr else "")
            # Frozen: connections stay open, nothing is answered; the SDK gives its stream up after the 1 s ack
            # timeout and keeps retrying while Node goes on assigning and tracking.
            first.proc.send_signal(signal.SIGSTOP)
            try:
                time.sleep(3)  # how long the server stays frozen (no assertion on timing)
            finally:
                first.proc.send_signal(signal.SIGCONT)
            first.stop()  # SIGTERM while the SDK's streams are open and batches in flight
            second = ExperimentsAt(data_dir, first.port, "experiments-restarted.log")
            procs.append(second)
            second.wait_serving(SERVICE)
            flag.touch()
            stdout, stderr = node.communicate(timeout=240)
        finally:
            if node.poll() is None:
                node.kill()
        assert node.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
        out = json.loads(stdout.strip().splitlines()[-1])
        assert out["afterFlag"] > 0  # units were assigned and tracked after the restart too
        stats = out["stats"]
        assert stats["pending"] == 0 and stats["rejected"] == 0 and stats["exposureConflicts"] == 0
        assert stats["ingestReconnects"] >= 2 and stats["watchReconnects"] >= 1 and stats["ackTimeouts"] >= 1
        # Batches stored but not acknowledged before the stop were resent: counted as duplicates, never twice.
        assert stats["exposuresAccepted"] <= out["exposed"] <= stats["exposuresAccepted"] + stats["exposuresDuplicate"]
        assert stats["eventsAccepted"] <= out["events"] <= stats["eventsAccepted"] + stats["eventsDuplicate"]
        with open_grpc(second.target) as channel:
            results = egrpc.ExperimentsServiceStub(channel).GetExperimentResults(
                esvc.GetExperimentResultsRequest(name=out["name"]), timeout=30
            )
        got = {v.variant: v for v in results.primary.variants}
        for variant, expected in out["variants"].items():
            assert got[variant].units == expected["units"]
            assert got[variant].mean == pytest.approx(expected["mean"], rel=1e-12)
