"""The pure parts of the pages: what a training-job event becomes for the browser, the list's progress and ETA,
which actions a job's state offers; the lineage graph's nodes and edges, metric verdicts; the audit page's filter and rows."""

from __future__ import annotations

import math

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from neuroweaver.common.v1 import common_pb2 as cpb
from neuroweaver.registry.v1 import registry_pb2 as rpb
from neuroweaver.registry.v1 import registry_service_pb2 as rsvc
from neuroweaver.trainer.v1 import training_job_pb2 as tpb
from neuroweaver_console import audit
from neuroweaver_console.lineage import Node, lineage_graph, version_href, version_label
from neuroweaver_console.registry import latest_metrics, metric_verdict, size
from neuroweaver_console.training import _allowed_actions, event_json, job_summary
from neuroweaver_runtime.filtering import Comparison, parse_filter

S = tpb.TrainingJob


def test_step_event_with_a_nan_loss_is_valid_json_without_the_point():
    ev = tpb.TrainingJobEvent(
        sequence=7, type=tpb.EVENT_TYPE_STEP, stage="sft",
        step=tpb.StepMetrics(step=3, total_steps=10, loss=math.nan, learning_rate=1e-3, eta=Duration(seconds=75)),
    )  # fmt: skip
    out = event_json(ev)
    assert out["seq"] == 7 and out["type"] == "step" and out["stage"] == "sft"
    assert out["step"] == {"step": 3, "total": 10, "loss": None, "lr": 1e-3, "eta": "1m 15s"}  # JSON has no NaN


def test_eval_and_state_events():
    ev = event_json(tpb.TrainingJobEvent(sequence=2, type=tpb.EVENT_TYPE_EVAL, metrics={"eval_loss": 1.5, "step": 20.0}))
    assert ev["metrics"] == {"eval_loss": 1.5, "step": 20.0} and "step" not in ev
    state = event_json(tpb.TrainingJobEvent(sequence=3, type=tpb.EVENT_TYPE_STATE_CHANGED, state=S.STATE_SUCCEEDED))
    assert state["state"] == "succeeded" and state["type"] == "state changed"


def test_list_eta_comes_from_the_rate_so_far():
    start = Timestamp(seconds=1_000)
    job = S(name="projects/default/trainingJobs/tj-1", state=S.STATE_RUNNING, current_step=25, total_steps=100, start_time=start)
    row = job_summary(job, now=1_100)  # 25 steps in 100 s: 75 more take 300 s
    assert (row["id"], row["percent"], row["eta"], row["state"]) == ("tj-1", 25, "5m 00s", "running")
    assert job_summary(S(state=S.STATE_QUEUED, total_steps=100), now=1_100)["eta"] == "–"
    assert job_summary(S(state=S.STATE_SUCCEEDED, current_step=100, total_steps=100))["percent"] == 100


def test_actions_follow_the_state():
    assert _allowed_actions(S.STATE_RUNNING) == ["checkpoint", "pause", "cancel"]
    assert _allowed_actions(S.STATE_PAUSED) == ["resume", "cancel"]
    assert _allowed_actions(S.STATE_QUEUED) == ["cancel"]
    assert _allowed_actions(S.STATE_SUCCEEDED) == _allowed_actions(S.STATE_CANCELLED) == []


# --- registry: the lineage graph, metric verdicts ------------------------------------------------------------------

M = "projects/default/models/advisor"


def mv(version: str, **lineage) -> rpb.ModelVersion:
    return rpb.ModelVersion(name=f"{M}/versions/{version}", version=version, lineage=rpb.Lineage(**lineage))


def test_lineage_graph_shares_inputs_and_links_versions_to_their_parent():
    base = "builtin:smollm2-135m-instruct"
    v1 = mv(
        "1.0.0",
        base_model=base,
        dataset_uri="file:///d/a.jsonl",
        dataset_digest="aa" * 32,
        training_job="projects/default/trainingJobs/tj-1",
    )
    v2 = mv(
        "1.1.0",
        base_model=base,
        dataset_uri="file:///d/b.jsonl",
        dataset_digest="bb" * 32,
        parent_version=v1.name,
        training_job="projects/default/trainingJobs/tj-2",
        judge_version="projects/default/judges/helpful/versions/2",
    )
    v3 = mv("2.0.0", base_model=base, dataset_uri="file:///d/a.jsonl", dataset_digest="aa" * 32, parent_version=v1.name)
    v3.aliases.append("production")
    g = lineage_graph([v1, v3, v2], "default", M, focus=v2.name)  # fmt: skip
    nodes = {n.id: n for n in g.nodes}
    edges = {(e.source, e.target): e.kind for e in g.edges}
    # One node per distinct input: the base model and dataset a.jsonl@aa… are shared.
    assert sorted(n.kind for n in g.nodes) == [
        "base",
        "dataset",
        "dataset",
        "job",
        "job",
        "judge",
        "version",
        "version",
        "version",
    ]
    a = f"file:///d/a.jsonl@{'aa' * 32}"
    assert edges[(a, "projects/default/trainingJobs/tj-1")] == "input"  # through the job that read it
    assert edges[(a, v3.name)] == "input"  # no job: straight to the version
    assert edges[("projects/default/trainingJobs/tj-1", v1.name)] == "job"
    assert edges[(v1.name, v2.name)] == edges[(v1.name, v3.name)] == "parent"
    assert edges[("projects/default/judges/helpful/versions/2", "projects/default/trainingJobs/tj-2")] == "input"
    assert len(g.edges) == 11  # tj-1: base, a; tj-2: base, b, judge; v3: base, a; jobs; parents
    assert nodes[v2.name].focus and not nodes[v1.name].focus
    assert nodes[v3.name].caption == "version · production" and nodes[v3.name].label == "2.0.0"
    assert nodes["projects/default/judges/helpful/versions/2"].label == "helpful v2"
    assert nodes[a].caption == "dataset · sha256 aaaaaaaa" and nodes[a].label == "a.jsonl"
    assert nodes["projects/default/trainingJobs/tj-1"].href == "/jobs/tj-1"
    assert nodes[v2.name].href == "/models/advisor/versions/1.1.0" and nodes[a].href == ""
    assert nodes[base].short == base  # fits; a longer label keeps its end, which tells model ids and files apart
    assert Node("m", "base", "base model", "/srv/models/acme/smollm2-135m-instruct").short == "…ls/acme/smollm2-135m-instruct"
    # The table: depth-first in the given order (v3 before v2).
    assert [r.version.label for r in g.rows] == ["1.0.0", "2.0.0", "1.1.0"] and g.rows[2].parent is nodes[v1.name]
    # What the page carries as JSON for static/lineage.js: labels cut to fit, every edge by its ends.
    elements = g.elements()
    assert [n["id"] for n in elements["nodes"]] == [n.id for n in g.nodes]
    (drawn,) = [n for n in elements["nodes"] if n["id"] == base]
    assert drawn == {"id": base, "kind": "base", "caption": "base model", "label": nodes[base].short, "href": "", "focus": False}
    assert {"source": v1.name, "target": v2.name, "kind": "parent"} in elements["edges"]
    assert len(elements["edges"]) == len(g.edges)


def test_lineage_graph_draws_parents_it_was_not_given_and_needs_no_inputs():
    other = "projects/default/models/base-advisor/versions/3.0.0"
    g = lineage_graph([mv("1.0.0", parent_version=other)], "default", M)
    nodes = {n.id: n for n in g.nodes}
    assert nodes[other].label == "base-advisor 3.0.0" and nodes[other].kind == "version"
    assert nodes[other].href == "/models/base-advisor/versions/3.0.0"  # same project: its page is here
    assert [r.version.id for r in g.rows] == [M + "/versions/1.0.0"] and g.rows[0].parent is nodes[other]
    assert [(e.source, e.kind) for e in g.edges] == [(other, "parent")]
    assert lineage_graph([], "default", M).elements() == {"nodes": [], "edges": []}
    assert version_label("projects/acme/models/x/versions/1.0.0", M) == "acme/x 1.0.0"
    assert version_href("projects/acme/models/x/versions/1.0.0", "default") == ""  # another project: no page here


def test_metric_verdicts_say_why_there_is_none():
    D = rsvc.MetricDelta
    higher = cpb.METRIC_DIRECTION_HIGHER_IS_BETTER
    assert metric_verdict(D(direction=higher, base_value=1, candidate_value=2, delta=1, improved=True)) == "improved"
    assert metric_verdict(D(direction=higher, base_value=2, candidate_value=1, delta=-1, regressed=True)) == "regressed"
    assert metric_verdict(D(direction=higher, base_value=1, candidate_value=1.001, delta=0.001)) == "within tolerance"
    assert metric_verdict(D(base_value=1, candidate_value=2, delta=1)) == "no direction"
    assert metric_verdict(D(direction=higher, base_value=1, candidate_value=1, delta=0)) == "unchanged"
    assert metric_verdict(D(direction=higher, candidate_value=1)) == "only in candidate"
    assert metric_verdict(D(direction=higher, base_value=1)) == "only in base"


def test_latest_metric_of_each_name_and_sizes():
    old, new = Timestamp(seconds=1), Timestamp(seconds=2)
    ms = [rpb.Metric(name="loss", value=2, record_time=new), rpb.Metric(name="loss", value=3, record_time=old),
          rpb.Metric(name="acc", value=0.5, record_time=old)]  # fmt: skip
    assert [(m.name, m.value) for m in latest_metrics(ms)] == [("acc", 0.5), ("loss", 2)]
    assert (size(0), size(512), size(3 * 1024 * 1024)) == ("–", "512 B", "3.0 MiB")


# --- audit: filters, rows -------------------------------------------------------------------------------------------


def test_audit_filter_and_rows():
    f = audit.Filter.parse({"type": "alias_set", "actor": "ALI", "model": "advisor"})
    assert f.query() == "model=advisor&type=alias_set&actor=ALI"
    assert f.text() == 'type = TYPE_ALIAS_SET AND actor = "ALI"'
    assert audit.Filter.parse({"model": "advisor"}).text() == ""
    odd = 'a "quoted" \\ actor AND type = TYPE_MODEL_DELETED'
    assert parse_filter(audit.Filter(actor=odd).text(), {"actor"}) == [Comparison("actor", "=", odd)]  # the registry's parser
    with pytest.raises(ValueError, match="unknown event type"):
        audit.Filter.parse({"type": "drop_table"})

    ev = rpb.ModelEvent(sequence=9, type=rpb.ModelEvent.TYPE_ALIAS_SET, resource=f"{M}/aliases/production", model=M,
                        actor="alice", details={"to_version": "1.1.0", "from_version": "1.0.0"})  # fmt: skip
    row = audit.event_row(ev, "default")
    assert (row["model"], row["model_href"], row["resource"], row["resource_href"], row["type"]) == (
        "advisor",
        "/models/advisor",
        "alias production",
        "/models/advisor#aliases",
        "alias set",
    )
    assert row["details"] == [("from_version", "1.0.0"), ("to_version", "1.1.0")]
    version = audit.event_row(rpb.ModelEvent(resource=f"{M}/versions/1.1.0", model=M), "default")
    assert (version["resource"], version["resource_href"]) == ("version 1.1.0", "/models/advisor/versions/1.1.0")
    assert audit.event_row(rpb.ModelEvent(resource=M, model=M), "default")["resource"] == ""
    judge = audit.event_row(rpb.ModelEvent(resource="projects/default/judges/helpful/versions/2"), "default")
    assert (judge["model"], judge["resource"]) == ("", "judge helpful v2")
