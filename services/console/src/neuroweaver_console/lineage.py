"""A model's lineage as a small layered graph: laid out here (pure, no I/O), drawn by templates/_lineage.html as SVG,
with the same facts as a table. The SVG is a picture for the mouse; the table is its text alternative, what keyboards
and screen readers use (and where the full URIs and digests are).

Columns, left to right: what went in (base models, datasets, judges), the training jobs, then the versions, one column
per generation (a version trained from another sits one column right of it). Each version has its own row in
depth-first order (children under their parent), its job sits on that row, and each input as near to the rows that use
it as the inputs above it allow. Inputs are shared nodes: two versions trained on the same dataset digest point at one
box. Parents that are not among the versions drawn (another model's, or older than the page shows) are plain nodes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

from neuroweaver.registry.v1 import registry_pb2 as rpb

NODE_W, NODE_H = 184, 38
COL_GAP, ROW_H, PAD = 56, 48, 4
LABEL_CHARS = 24  # what fits in NODE_W at the label's monospace 12px


@dataclass
class Node:
    id: str  # the full value: a resource name, `uri@digest`, a base model
    kind: str  # base | dataset | judge | job | version (the CSS class)
    caption: str  # the small line above the label, e.g. `dataset · sha256 1a2b3c4d`
    label: str  # for people: a semver, a file name, a job id (`id` is the tooltip)
    href: str = ""
    focus: bool = False
    col: int = 0
    row: float = 0.0

    @property
    def short(self) -> str:
        """The label cut to fit the box: its end, which is what tells a file name or a model id from another."""
        return self.label if len(self.label) <= LABEL_CHARS else "…" + self.label[-(LABEL_CHARS - 1) :]

    @property
    def x(self) -> int:
        return PAD + self.col * (NODE_W + COL_GAP)

    @property
    def y(self) -> int:
        return PAD + round(self.row * ROW_H)


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    kind: str  # input | job | parent
    path: str  # SVG path data: a curve from the source's right side to the target's left side


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
    width: int
    height: int
    node_width: int = NODE_W
    node_height: int = NODE_H


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


def _depth_first(versions: Sequence[rpb.ModelVersion]) -> list[tuple[str, int]]:
    """(version name, generation) with each version's children right under it; siblings and roots in the given order.
    A parent that is not in `versions` is a root of its own."""
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
    order: list[tuple[str, int]] = []
    seen: set[str] = set()
    # Whatever a cycle would hide (the registry cannot make one: a parent exists before its child) becomes a root too.
    for root in roots + [v.name for v in versions]:
        stack = [(root, 0)]
        while stack:
            name, depth = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            order.append((name, depth))
            stack.extend((child, depth + 1) for child in reversed(children.get(name, [])))
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


def _curve(a: Node, b: Node) -> str:
    x1, y1 = a.x + NODE_W, a.y + NODE_H // 2
    x2, y2 = b.x - 2, b.y + NODE_H // 2  # the arrowhead ends at the box
    mid = (x1 + x2) // 2
    return f"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}"


def lineage_graph(versions: Sequence[rpb.ModelVersion], project: str, model: str, focus: str = "") -> LineageGraph:
    """`versions` oldest first; `model` the page's model (its versions are labelled by their semver alone); `focus` a
    version name to highlight."""
    by_name = {v.name: v for v in versions}
    order = _depth_first(versions)
    has_inputs = any(_inputs(v.lineage) for v in versions)
    job_col = 1 if has_inputs else 0
    version_col = job_col + (1 if any(v.lineage.training_job for v in versions) else 0)

    nodes: dict[str, Node] = {}
    edges: dict[tuple[str, str], str] = {}
    uses: dict[str, list[int]] = {}  # input id -> rows of the versions it went into
    rows: list[LineageRow] = []
    for row, (name, depth) in enumerate(order):
        v = by_name.get(name)
        aliases = f" · {', '.join(v.aliases)}" if v is not None and v.aliases else ""
        vnode = Node(name, "version", "version" + aliases, version_label(name, model), version_href(name, project))
        vnode.col, vnode.row, vnode.focus = version_col + depth, row, name == focus
        nodes[name] = vnode
        if v is None:
            continue
        lin = v.lineage
        target = vnode
        job = None
        if lin.training_job:
            job = nodes.get(lin.training_job)
            if job is None:
                job_id = lin.training_job.rsplit("/", 1)[-1]
                job = Node(lin.training_job, "job", "training job", job_id, job_href(lin.training_job, project))
                job.col, job.row = job_col, row
                nodes[job.id] = job
            edges[(job.id, name)] = "job"
            target = job
        for input_id, kind, caption, label in _inputs(lin):
            nodes.setdefault(input_id, Node(input_id, kind, caption, label))
            uses.setdefault(input_id, []).append(row)
            edges[(input_id, target.id)] = "input"
        if lin.parent_version and lin.parent_version in nodes:
            edges[(lin.parent_version, name)] = "parent"
        parent = nodes.get(lin.parent_version) if lin.parent_version else None
        judge = nodes.get(lin.judge_version) if lin.judge_version else None
        rows.append(LineageRow(vnode, lin, parent, job, judge))

    # Inputs: each at the mean row of the versions it went into, pushed down where the one above is in the way, then
    # the column moved up as far as the pushes moved it on average (not above the top): shared inputs centre there.
    want = {i: sum(rows_) / len(rows_) for i, rows_ in uses.items()}
    ordered = sorted(want, key=want.__getitem__)
    floor = -1.0
    for input_id in ordered:
        nodes[input_id].row = floor = max(want[input_id], floor + 1)
    if ordered:
        lift = min(sum(nodes[i].row - want[i] for i in ordered) / len(ordered), nodes[ordered[0]].row)
        for input_id in ordered:
            nodes[input_id].row -= lift

    placed = list(nodes.values())
    last_col = max((n.col for n in placed), default=0)
    last_row = max((n.row for n in placed), default=0.0)
    return LineageGraph(
        nodes=placed,
        edges=[Edge(s, t, kind, _curve(nodes[s], nodes[t])) for (s, t), kind in edges.items()],
        rows=rows,
        width=2 * PAD + (last_col + 1) * NODE_W + last_col * COL_GAP,
        height=2 * PAD + round(last_row * ROW_H) + NODE_H,
    )
