"""A model's lineage as a graph: its nodes and edges (pure, no I/O), drawn in the browser by static/lineage.js with
Cytoscape.js (its dagre extension lays the graph out), with the same facts as a table (templates/_lineage.html).
The graph is a picture for the mouse; the table is its text alternative, what keyboards and screen readers use (and
where the full URIs and digests are).

Inputs are shared nodes: two versions trained on the same dataset digest point at one node. Parents that are not among
the versions drawn (another model's, or older than the page shows) are plain version nodes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from neuroweaver.registry.v1 import registry_pb2 as rpb

LABEL_CHARS = 30  # what fits in a node's box (static/lineage.js: 212px, monospace 11px)


@dataclass
class Node:
    id: str  # the full value: a resource name, `uri@digest`, a base model
    kind: str  # base | dataset | judge | job | version (its colours in static/lineage.js)
    caption: str  # the small line above the label, e.g. `dataset · sha256 1a2b3c4d`
    label: str  # for people: a semver, a file name, a job id
    href: str = ""
    focus: bool = False

    @property
    def short(self) -> str:
        """The label cut to fit the box: its end, which is what tells a file name or a model id from another."""
        return self.label if len(self.label) <= LABEL_CHARS else "…" + self.label[-(LABEL_CHARS - 1) :]


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    kind: str  # input | job | parent


@dataclass(frozen=True)
class LineageRow:
    """One version in the text alternative, with full values."""

    version: Node
    lineage: rpb.Lineage
    parent: Node | None
    job: Node | None
    judge: Node | None


@dataclass(frozen=True)
class LineageGraph:
    nodes: list[Node]
    edges: list[Edge]
    rows: list[LineageRow]

    def elements(self) -> dict[str, list[dict[str, Any]]]:
        """What static/lineage.js draws: the page carries it as JSON."""
        return {
            "nodes": [
                {"id": n.id, "kind": n.kind, "caption": n.caption, "label": n.short, "href": n.href, "focus": n.focus}
                for n in self.nodes
            ],
            "edges": [{"source": e.source, "target": e.target, "kind": e.kind} for e in self.edges],
        }


def version_href(name: str, project: str) -> str:
    """The console page of `projects/{project}/models/{m}/versions/{v}`, when it is this console's project."""
    parts = name.split("/")
    if len(parts) == 6 and parts[0] == "projects" and parts[2] == "models" and parts[4] == "versions" and parts[1] == project:
        return f"/models/{quote(parts[3], safe='')}/versions/{quote(parts[5], safe='')}"
    return ""


def job_href(name: str, project: str) -> str:
    parts = name.split("/")
    if len(parts) == 4 and parts[0] == "projects" and parts[2] == "trainingJobs" and parts[1] == project:
        return f"/jobs/{quote(parts[3], safe='')}"
    return ""


def version_label(name: str, model: str) -> str:
    """`1.2.0` for a version of `model`, `other-model 1.2.0` for another model's, the name itself when it is no
    version name."""
    parts = name.split("/")
    if len(parts) != 6 or parts[4] != "versions":
        return name
    if "/".join(parts[:4]) == model:
        return parts[5]
    if model.split("/")[:2] == parts[:2]:
        return f"{parts[3]} {parts[5]}"
    return f"{parts[1]}/{parts[3]} {parts[5]}"


def judge_label(name: str) -> str:
    """`projects/p/judges/helpful/versions/3` -> `helpful v3`."""
    parts = name.split("/")
    if len(parts) == 6 and parts[2] == "judges" and parts[4] == "versions":
        return f"{parts[3]} v{parts[5]}"
    return name


def _depth_first(versions: Sequence[rpb.ModelVersion]) -> list[str]:
    """Version names with each version's children right after it (the table's order); siblings and roots in the
    given order. A parent that is not in `versions` is a root of its own."""
    listed = {v.name for v in versions}
    children: dict[str, list[str]] = {}
    roots: list[str] = []
    for v in versions:
        parent = v.lineage.parent_version
        if parent and parent != v.name:
            children.setdefault(parent, []).append(v.name)
            if parent not in listed and parent not in roots:
                roots.append(parent)
        else:
            roots.append(v.name)
    order: list[str] = []
    seen: set[str] = set()
    # Whatever a cycle would hide (the registry cannot make one: a parent exists before its child) becomes a root too.
    for root in roots + [v.name for v in versions]:
        stack = [root]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            order.append(name)
            stack.extend(reversed(children.get(name, [])))
    return order


def _inputs(lin: rpb.Lineage) -> list[tuple[str, str, str, str]]:
    """(id, kind, caption, label) of what went into a version, besides its parent and job."""
    out = []
    if lin.base_model:
        out.append((lin.base_model, "base", "base model", lin.base_model))
    for uri, digest, what in (
        (lin.dataset_uri, lin.dataset_digest, "dataset"),
        (lin.eval_dataset_uri, lin.eval_dataset_digest, "eval dataset"),
    ):
        if uri or digest:
            caption = f"{what} · sha256 {digest[:8]}" if digest else what
            out.append((f"{uri}@{digest}", "dataset", caption, uri.rstrip("/").rsplit("/", 1)[-1] or digest))
    if lin.judge_version:
        out.append((lin.judge_version, "judge", "judge", judge_label(lin.judge_version)))
    return out


def lineage_graph(versions: Sequence[rpb.ModelVersion], project: str, model: str, focus: str = "") -> LineageGraph:
    """`versions` oldest first; `model` the page's model (its versions are labelled by their semver alone); `focus` a
    version name to highlight."""
    by_name = {v.name: v for v in versions}
    nodes: dict[str, Node] = {}
    edges: dict[tuple[str, str], str] = {}
    rows: list[LineageRow] = []
    for name in _depth_first(versions):
        v = by_name.get(name)
        aliases = f" · {', '.join(v.aliases)}" if v is not None and v.aliases else ""
        label, href = version_label(name, model), version_href(name, project)
        vnode = nodes[name] = Node(name, "version", "version" + aliases, label, href, focus=name == focus)
        if v is None:
            continue
        lin = v.lineage
        target = vnode
        job = None
        if lin.training_job:
            job = nodes.get(lin.training_job)
            if job is None:
                job_id, href = lin.training_job.rsplit("/", 1)[-1], job_href(lin.training_job, project)
                job = nodes[lin.training_job] = Node(lin.training_job, "job", "training job", job_id, href)
            edges[(job.id, name)] = "job"
            target = job
        for input_id, kind, caption, label in _inputs(lin):
            nodes.setdefault(input_id, Node(input_id, kind, caption, label))
            edges[(input_id, target.id)] = "input"
        if lin.parent_version and lin.parent_version in nodes:
            edges[(lin.parent_version, name)] = "parent"
        parent = nodes.get(lin.parent_version) if lin.parent_version else None
        judge = nodes.get(lin.judge_version) if lin.judge_version else None
        rows.append(LineageRow(vnode, lin, parent, job, judge))
    return LineageGraph(list(nodes.values()), [Edge(s, t, kind) for (s, t), kind in edges.items()], rows)
