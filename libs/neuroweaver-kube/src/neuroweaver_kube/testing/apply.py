"""Server-side apply field ownership for the API stand-in: a port of ``structured-merge-diff`` (pure, no I/O).

The stand-in (:mod:`neuroweaver_kube.testing`) calls :func:`apply` for ``PATCH`` with
``application/apply-patch+yaml`` and :func:`record_update` for every other write (``POST``, ``PUT``, merge
patches, the ``scale`` subresource, status writes). Both return the object with a new
``metadata.managedFields``, the way the API server's field manager does:

- Ownership is a set of field paths per manager entry, keyed like the server keys them: ``(manager,
  operation)`` for appliers, ``(manager, operation, apiVersion)`` for updaters, plus ``subresource``.
  Paths use the ``FieldsV1`` elements: ``f:<field>``, ``k:{"name":"x"}`` (an item of an associative list by
  its keys), ``v:<json>`` (an item of a set list), and an entry's set serializes as the real ``fieldsV1`` tree
  (``".": {}`` marks a node that is owned itself and has owned children).
- Apply (``Updater.Apply``): the config is merged into the live object; the applier's set becomes exactly the
  fields of its config; fields it owned before and no longer sends are removed unless another manager owns
  them (``prune``: remove, add back what is owned or was never the applier's); a field another manager owns
  whose value the apply changes is a conflict (:class:`ApplyConflict`, 409, message and causes as the real
  server formats them) unless ``force``, which moves ownership to the applier. Same value: shared ownership.
- Update (``Updater.Update``): never conflicts; the fields it changes (added or modified) move to the
  updater's entry, removed fields leave every entry.
- Not owned by anyone: ``apiVersion``, ``kind``, ``metadata.name``/``namespace`` and the server-set metadata
  (stripped like ``stripMetaManager``), and ``status`` on the main resource (reset like the workload
  strategies' ``GetResetFields``; status writes own ``f:status`` under subresource ``status``).
- Defaults: :func:`apply_defaults` sets what the apps/v1 defaulting sets that the rules depend on
  (``spec.replicas: 1`` for Deployments and StatefulSets), unowned. A manager that stops sending
  ``spec.replicas`` while nobody else owns it therefore resets it to 1, as on a cluster.

Schema. Only what the project's kinds use is modelled; everything else is *deduced* from the value:
objects are granular structs (per field), lists are atomic (replaced whole), scalars are leaves. That is
also how CRD lists without ``x-kubernetes-list-type`` behave, so ServiceMonitor and PrometheusRule need no
table. Modelled (from ``k8s.io/api`` markers):

- associative lists (``+listType=map``): ``containers``/``initContainers``/``ephemeralContainers`` by
  ``name``; container ``ports`` by ``containerPort``+``protocol`` and Service ``ports`` by ``port``+``protocol``
  (``protocol`` defaults to ``"TCP"`` in the key, as the OpenAPI default does); ``env`` by ``name``;
  ``volumeMounts`` by ``mountPath``; ``volumeDevices`` by ``devicePath``; ``volumes``, ``imagePullSecrets``,
  ``schedulingGates``, ``resourceClaims`` and ``resources.claims`` by ``name``; ``hostAliases`` by ``ip``;
  ``topologySpreadConstraints`` by ``topologyKey``+``whenUnsatisfiable``; ``metadata.ownerReferences`` by
  ``uid``; ``metadata.finalizers`` is a set;
- granular maps: ``metadata.labels``/``annotations`` (also in pod templates), ConfigMap/Secret ``data``,
  ``stringData``, ``binaryData``, ``resources.limits``/``requests``;
- atomic: label selectors (``+structType=atomic``: Deployment/Job/PDB ``spec.selector``), Service
  ``spec.selector`` and pod ``nodeSelector`` (``+mapType=atomic``), ``tolerations``, ``args``, ``command`` and
  every other list (deduced); the ``*KeySelector`` structs under ``env[].valueFrom``.

Simplified or left out: Go non-pointer structs are never "added" by an update (only ``spec``, ``template``,
``template.metadata``/``spec``, ``strategy`` and container ``resources`` are listed; other structs get the
``"."`` marker an unstructured object would); no conversion between API versions (entries keep the version
they were written with, fields compare as written); no ``managedFields`` cap of 10 update entries
("ancient-changes"); no ``before-first-apply`` migration of objects that predate field management; no
defaulting beyond ``spec.replicas``; key fields that are neither set nor defaulted are an error, as on the
server.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

PathElement = str  # FieldsV1 form: "f:name", 'k:{"name":"x"}', 'v:"x"'
Path = tuple[PathElement, ...]
FieldSet = frozenset[Path]

APPLY = "Apply"
UPDATE = "Update"


class _Absent:
    """No value at all (distinct from a JSON null)."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


# ----------------------------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Atomic:
    """A leaf: a scalar, or a list/map/struct replaced and owned as a whole."""


@dataclass(frozen=True)
class Struct:
    """Declared fields; a field not listed is deduced from its value. ``present``: a Go non-pointer struct."""

    fields: Mapping[str, Any] = field(default_factory=dict)
    present: bool = False


@dataclass(frozen=True)
class MapOf:
    """A granular ``map[string]T``: each key is owned on its own."""

    elem: Any = Atomic()


@dataclass(frozen=True)
class ListMap:
    """An associative list (``+listType=map``) keyed by ``keys``; ``defaults`` fill missing key fields."""

    keys: tuple[str, ...]
    elem: Any = Struct()
    defaults: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ListSet:
    """A list of scalars with set semantics (``+listType=set``)."""


@dataclass(frozen=True)
class Deduced:
    """Unknown schema: an object is a granular struct, a list atomic, a scalar a leaf."""


Type = Atomic | Struct | MapOf | ListMap | ListSet | Deduced

_LEAF = Atomic()
_DEDUCED = Deduced()
_LABELS = MapOf()


def _meta(present: bool = False) -> Struct:
    return Struct(
        {
            "labels": _LABELS,
            "annotations": _LABELS,
            "ownerReferences": ListMap(("uid",)),
            "finalizers": ListSet(),
        },
        present=present,
    )


_RESOURCES = Struct({"limits": _LABELS, "requests": _LABELS, "claims": ListMap(("name",))}, present=True)
_KEY_SELECTOR = _LEAF  # ConfigMapKeySelector, SecretKeySelector, ObjectFieldSelector, ...: +structType=atomic
_ENV = ListMap(
    ("name",),
    Struct(
        {
            "valueFrom": Struct(
                {
                    "configMapKeyRef": _KEY_SELECTOR,
                    "secretKeyRef": _KEY_SELECTOR,
                    "fieldRef": _KEY_SELECTOR,
                    "resourceFieldRef": _KEY_SELECTOR,
                    "fileKeyRef": _KEY_SELECTOR,
                }
            )
        }
    ),
)
_CONTAINER = Struct(
    {
        "ports": ListMap(("containerPort", "protocol"), defaults={"protocol": "TCP"}),
        "env": _ENV,
        "volumeMounts": ListMap(("mountPath",)),
        "volumeDevices": ListMap(("devicePath",)),
        "resources": _RESOURCES,
    }
)
_POD_SPEC = Struct(
    {
        "containers": ListMap(("name",), _CONTAINER),
        "initContainers": ListMap(("name",), _CONTAINER),
        "ephemeralContainers": ListMap(("name",), _CONTAINER),
        "volumes": ListMap(("name",)),
        "imagePullSecrets": ListMap(("name",)),
        "schedulingGates": ListMap(("name",)),
        "resourceClaims": ListMap(("name",)),
        "hostAliases": ListMap(("ip",)),
        "topologySpreadConstraints": ListMap(("topologyKey", "whenUnsatisfiable")),
        "nodeSelector": _LEAF,  # +mapType=atomic
        "tolerations": _LEAF,  # +listType=atomic
    },
    present=True,
)
_TEMPLATE = Struct({"metadata": _meta(present=True), "spec": _POD_SPEC}, present=True)
_SELECTOR = _LEAF  # metav1.LabelSelector is +structType=atomic


def _root(spec: Struct | None = None, **top: Any) -> Struct:
    fields: dict[str, Any] = {"metadata": _meta(present=True), **top}
    if spec is not None:
        fields["spec"] = spec
    return Struct(fields, present=True)


SCHEMAS: dict[str, Struct] = {
    "Deployment": _root(
        Struct(
            {"selector": _SELECTOR, "template": _TEMPLATE, "strategy": Struct(present=True)},
            present=True,
        )
    ),
    "StatefulSet": _root(
        Struct(
            {"selector": _SELECTOR, "template": _TEMPLATE, "volumeClaimTemplates": _LEAF},
            present=True,
        )
    ),
    "Job": _root(Struct({"selector": _SELECTOR, "template": _TEMPLATE}, present=True)),
    "Pod": _root(_POD_SPEC),
    "Service": _root(
        Struct(
            {"ports": ListMap(("port", "protocol"), defaults={"protocol": "TCP"}), "selector": _LEAF},
            present=True,
        )
    ),
    "PodDisruptionBudget": _root(Struct({"selector": _SELECTOR}, present=True)),
    "HorizontalPodAutoscaler": _root(Struct(present=True)),
    "ConfigMap": _root(None, data=_LABELS, binaryData=_LABELS),
    "Secret": _root(None, data=_LABELS, stringData=_LABELS),
}
#: Kinds without a table (CRDs, ServiceAccount, Namespace, ...): metadata modelled, the rest deduced.
GENERIC: Struct = Struct({"metadata": _meta()})


def schema_for(kind: str) -> Struct:
    return SCHEMAS.get(kind, GENERIC)


def _child(t: Type, key: str) -> Type:
    if isinstance(t, Struct):
        return t.fields.get(key, _DEDUCED)
    if isinstance(t, MapOf):
        return t.elem
    return _DEDUCED


def _resolve(t: Type, value: Any) -> Type:
    """The type to walk ``value`` with: deduced types and values that do not fit their type become leaves."""
    if isinstance(t, Deduced):
        if isinstance(value, dict):
            return Struct()
        return _LEAF
    if value is None or value is ABSENT:
        return t
    if isinstance(t, Struct | MapOf) and not isinstance(value, dict):
        return _LEAF
    if isinstance(t, ListMap | ListSet) and not isinstance(value, list):
        return _LEAF
    return t


def _type_at(root: Type, path: Path) -> Type:
    """Type of the node at ``path`` from the path alone (deduced nodes with field children are structs)."""
    t: Type = root
    for pe in path:
        if isinstance(t, Deduced):
            t = Struct()
        if pe.startswith("f:") and isinstance(t, Struct | MapOf):
            t = _child(t, pe[2:])
        elif pe.startswith("k:") and isinstance(t, ListMap):
            t = t.elem
        else:
            t = _LEAF
    return t


# ----------------------------------------------------------------------------------------------- errors


class ApplyInvalid(ValueError):
    """The config cannot be walked (duplicate keys, an item without its key fields): 422 Invalid."""


@dataclass(frozen=True)
class Conflict:
    manager: Entry
    path: Path


class ApplyConflict(Exception):
    """Apply changed fields other managers own (409 Conflict); ``message``/``causes`` as the server sends them."""

    def __init__(self, conflicts: list[Conflict]) -> None:
        self.conflicts = conflicts
        self.message = _conflict_message(conflicts)
        self.causes = [
            {
                "type": "FieldManagerConflict",
                "message": f"conflict with {c.manager.describe()}",
                "field": path_string(c.path),
            }
            for c in conflicts
        ]
        super().__init__(self.message)


def _conflict_message(conflicts: list[Conflict]) -> str:
    # apimachinery managedfields/internal/conflict.go getConflictMessage
    if len(conflicts) == 1:
        c = conflicts[0]
        return f"Apply failed with 1 conflict: conflict with {c.manager.describe()}: {path_string(c.path)}"
    by_manager: dict[str, list[str]] = {}
    for c in conflicts:
        by_manager.setdefault(c.manager.describe(), []).append(path_string(c.path))
    lines: list[str] = []
    for who in sorted(by_manager):
        lines.append(f"conflicts with {who}:")
        lines.extend(f"- {p}" for p in by_manager[who])
    return f"Apply failed with {len(conflicts)} conflicts: " + "\n".join(lines)


# ----------------------------------------------------------------------------------------------- paths


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _go_string(value: Any) -> str:
    """``value.ToString`` of structured-merge-diff (strings quoted, numbers and bools bare)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def path_string(path: Path) -> str:
    """``fieldpath.Path.String()``: ``.spec.template.spec.containers[name="app"].image``."""
    out = []
    for pe in path:
        kind, rest = pe[0], pe[2:]
        if kind == "f":
            out.append("." + rest)
        elif kind == "k":
            keys = json.loads(rest)
            out.append("[" + ",".join(f"{k}={_go_string(v)}" for k, v in keys.items()) + "]")
        elif kind == "v":
            out.append(f"[={_go_string(json.loads(rest))}]")
        else:
            out.append(f"[{rest}]")
    return "".join(out)


def _pe_sort_key(pe: PathElement) -> tuple[int, str]:
    return ({"f": 0, "k": 1, "v": 2, "i": 3}.get(pe[0], 4), pe[2:])


def _path_sort_key(path: Path) -> list[tuple[int, str]]:
    return [_pe_sort_key(pe) for pe in path]


def _item_pe(t: ListMap | ListSet, item: Any) -> PathElement:
    if isinstance(t, ListSet):
        if isinstance(item, dict | list) or item is None:
            raise ApplyInvalid("associative list without keys has an element that is not a scalar")
        return "v:" + _json(item)
    if not isinstance(item, dict):
        raise ApplyInvalid("associative list with keys may not have non-map elements")
    key: dict[str, Any] = {}
    for name in sorted(t.keys):
        if name in item:
            key[name] = item[name]
        elif name in t.defaults:
            key[name] = t.defaults[name]
    if not key:
        raise ApplyInvalid(f"associative list with keys has an element that omits all key fields {list(t.keys)}")
    return "k:" + _json(key)


def fields_v1(fields: Iterable[Path]) -> dict[str, Any]:
    """Serialize a set of paths as a ``fieldsV1`` tree."""
    paths = set(fields)
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        for pe in path:
            node = node.setdefault(pe, {})
    for path in paths:  # a member that also has owned children is marked with "."
        node = tree
        for pe in path:
            node = node[pe]
        if node:
            node["."] = {}
    return _sorted_tree(tree)


def _sorted_tree(node: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "." in node:
        out["."] = {}
    for k in sorted((k for k in node if k != "."), key=_pe_sort_key):
        out[k] = _sorted_tree(node[k])
    return out


def parse_fields_v1(tree: Mapping[str, Any], prefix: Path = ()) -> FieldSet:
    """The set of paths a ``fieldsV1`` tree holds (a leaf ``{}`` or a ``"."`` marks a member)."""
    out: set[Path] = set()
    for pe, sub in tree.items():
        if pe == ".":
            out.add(prefix)
            continue
        path = (*prefix, pe)
        if not sub:
            out.add(path)
        else:
            out |= parse_fields_v1(sub, path)
    return frozenset(out)


# ----------------------------------------------------------------------------------------------- walks


def to_field_set(value: Any, t: Type) -> set[Path]:
    """``TypedValue.ToFieldSet``: every leaf, every associative-list item, every empty or null map field."""
    out: set[Path] = set()
    _fs(value, t, (), out)
    return out


def _fs(value: Any, t: Type, path: Path, out: set[Path]) -> None:
    t = _resolve(t, value)
    if isinstance(t, Atomic):
        out.add(path)
    elif isinstance(t, Struct | MapOf):
        for k, v in (value or {}).items():
            child = (*path, "f:" + k)
            _fs(v, _child(t, k), child, out)
            if v is None or v == {} or isinstance(t, MapOf):
                out.add(child)
    elif isinstance(t, ListMap | ListSet):
        items = value or []
        pes = [_item_pe(t, item) for item in items]
        dups = {pe for pe in pes if pes.count(pe) > 1}
        for pe, item in zip(pes, items, strict=True):
            child = (*path, pe)
            if pe not in dups and isinstance(t, ListMap):
                _fs(item, t.elem, child, out)
            out.add(child)


def validate(value: Any, t: Type, path: Path = ()) -> None:
    """What makes a config untyped on the server: an associative list with a duplicate or key-less item."""
    t = _resolve(t, value)
    if isinstance(t, Struct | MapOf):
        for k, v in (value or {}).items():
            validate(v, _child(t, k), (*path, "f:" + k))
    elif isinstance(t, ListMap | ListSet):
        seen: set[PathElement] = set()
        for item in value or []:
            try:
                pe = _item_pe(t, item)
            except ApplyInvalid as e:
                raise ApplyInvalid(f"{path_string(path)}: {e}") from None
            if pe in seen:
                raise ApplyInvalid(f"{path_string(path)}: duplicate entries for key {path_string((pe,))}")
            seen.add(pe)
            if isinstance(t, ListMap):
                validate(item, t.elem, (*path, pe))


@dataclass
class Comparison:
    added: set[Path] = field(default_factory=set)
    modified: set[Path] = field(default_factory=set)
    removed: set[Path] = field(default_factory=set)

    def changed(self) -> set[Path]:
        return self.added | self.modified


def compare(lhs: Any, rhs: Any, t: Type) -> Comparison:
    """``TypedValue.Compare``: paths added, modified and removed from ``lhs`` to ``rhs``."""
    out = Comparison()
    _cmp(lhs, rhs, t, (), out)
    return out


def _empty(v: Any) -> bool:
    return v is ABSENT or v is None or v == {} or v == []


def _leaf_cmp(lhs: Any, rhs: Any, path: Path, out: Comparison) -> None:
    if lhs is ABSENT:
        out.added.add(path)
    elif rhs is ABSENT:
        out.removed.add(path)
    elif lhs != rhs:
        out.modified.add(path)


def _cmp(lhs: Any, rhs: Any, t: Type, path: Path, out: Comparison) -> None:
    lt = _resolve(t, lhs if lhs is not ABSENT else rhs)
    rt = _resolve(t, rhs if rhs is not ABSENT else lhs)
    if type(lt) is not type(rt) or isinstance(lt, Atomic):
        _leaf_cmp(lhs, rhs, path, out)
        return
    if _empty(lhs) and _empty(rhs):
        _leaf_cmp(lhs, rhs, path, out)
        return
    if isinstance(lt, Struct | MapOf):
        lm = lhs if isinstance(lhs, dict) else {}
        rm = rhs if isinstance(rhs, dict) else {}
        for k in {**lm, **rm}:
            _cmp(lm.get(k, ABSENT), rm.get(k, ABSENT), _child(lt, k), (*path, "f:" + k), out)
        if isinstance(lt, Struct) and lt.present:
            return  # a Go non-pointer struct exists (empty) on both sides
    elif isinstance(lt, ListMap | ListSet):
        _cmp_list(lhs if isinstance(lhs, list) else [], rhs if isinstance(rhs, list) else [], lt, path, out)
    if lhs is ABSENT:
        out.added.add(path)
    elif rhs is ABSENT:
        out.removed.add(path)


def _index(t: ListMap | ListSet, items: list[Any]) -> tuple[list[PathElement], dict[PathElement, list[Any]]]:
    order: list[PathElement] = []
    by_pe: dict[PathElement, list[Any]] = {}
    for item in items:
        pe = _item_pe(t, item)
        if pe not in by_pe:
            order.append(pe)
        by_pe.setdefault(pe, []).append(item)
    return order, by_pe


def _cmp_list(lhs: list[Any], rhs: list[Any], t: ListMap | ListSet, path: Path, out: Comparison) -> None:
    elem: Type = t.elem if isinstance(t, ListMap) else _LEAF
    lorder, lvals = _index(t, lhs)
    rorder, rvals = _index(t, rhs)
    for pe in lorder + [pe for pe in rorder if pe not in lvals]:
        ll, rl = lvals.get(pe, []), rvals.get(pe, [])
        child = (*path, pe)
        if len(ll) <= 1 and len(rl) <= 1:
            _cmp(ll[0] if ll else ABSENT, rl[0] if rl else ABSENT, elem, child, out)
        elif len(ll) >= 2 and len(rl) >= 2:
            if ll != rl:
                out.modified.add(child)
        elif len(ll) >= 2:
            if rl:
                _cmp(ABSENT, rl[0], elem, child, out)
            out.removed.add(child)
        else:
            if ll:
                _cmp(ll[0], ABSENT, elem, child, out)
            out.added.add(child)


def merge(lhs: Any, rhs: Any, t: Type) -> Any:
    """``TypedValue.Merge``: ``rhs`` (the applied config) over ``lhs`` (the live object)."""
    if rhs is ABSENT:
        return copy.deepcopy(lhs)
    if lhs is ABSENT:
        return copy.deepcopy(rhs)
    lt, rt = _resolve(t, lhs), _resolve(t, rhs)
    if type(lt) is not type(rt) or isinstance(lt, Atomic) or (_empty(lhs) and _empty(rhs)):
        return copy.deepcopy(rhs)
    if isinstance(lt, Struct | MapOf):
        lm = lhs if isinstance(lhs, dict) else {}
        rm = rhs if isinstance(rhs, dict) else {}
        return {k: merge(lm.get(k, ABSENT), rm.get(k, ABSENT), _child(lt, k)) for k in {**lm, **rm}}
    assert isinstance(lt, ListMap | ListSet)
    return _merge_list(lhs if isinstance(lhs, list) else [], rhs if isinstance(rhs, list) else [], lt)


def _merge_list(lhs: list[Any], rhs: list[Any], t: ListMap | ListSet) -> list[Any]:
    # mergingWalker.visitListItems: live items keep their place, the config's order wins among shared items.
    elem: Type = t.elem if isinstance(t, ListMap) else _LEAF
    rpes = [_item_pe(t, item) for item in rhs]
    seen: set[PathElement] = set()
    for pe in rpes:
        if pe in seen:
            raise ApplyInvalid(f"duplicate entries for key {path_string((pe,))}")
        seen.add(pe)
    robs = dict(zip(rpes, rhs, strict=True))
    lpes = [_item_pe(t, item) for item in lhs]
    lobs: dict[PathElement, Any] = {}
    for pe, item in zip(lpes, lhs, strict=True):
        lobs[pe] = ABSENT if pe in lobs else item  # a duplicated live key merges as absent
    shared = [pe for pe in rpes if pe in lobs]
    next_shared = shared.pop(0) if shared else None
    merged_rhs: set[PathElement] = set()
    out: list[Any] = []
    li = ri = 0
    while li < len(lpes) or ri < len(rpes):
        if li < len(lpes) and ri < len(rpes):
            pe = lpes[li]
            if pe == rpes[ri]:
                merged_rhs.add(pe)
                out.append(merge(lobs[pe], robs[pe], elem))
                li, ri = li + 1, ri + 1
                next_shared = shared.pop(0) if shared else None
                continue
            if pe in robs and next_shared is not None and next_shared != pe:
                li += 1
                continue
        if li < len(lpes):
            pe = lpes[li]
            if pe not in robs:
                out.append(merge(lhs[li], ABSENT, elem))
                li += 1
                continue
            if pe in merged_rhs:
                li += 1
        if ri < len(rpes):
            pe = rpes[ri]
            merged_rhs.add(pe)
            out.append(merge(lobs.get(pe, ABSENT), robs[pe], elem))
            ri += 1
            if next_shared is not None and next_shared == pe:
                next_shared = shared.pop(0) if shared else None
    return out


def remove_items(value: Any, paths: set[Path], t: Type) -> Any:
    """``TypedValue.RemoveItems``: drop the nodes at ``paths`` (and what is under them); ABSENT when emptied."""
    t = _resolve(t, value)
    if isinstance(t, Atomic) or _empty(value):
        return value
    if isinstance(t, Struct | MapOf):
        out: dict[str, Any] = {}
        for k, v in value.items():
            pe = "f:" + k
            if (pe,) in paths:
                continue
            sub = {p[1:] for p in paths if len(p) > 1 and p[0] == pe}
            if sub:
                v = remove_items(v, sub, _child(t, k))
                if v is ABSENT:
                    continue
            out[k] = v
        return out if out else ABSENT
    assert isinstance(t, ListMap | ListSet)
    elem: Type = t.elem if isinstance(t, ListMap) else _LEAF
    items: list[Any] = []
    for item in value:
        pe = _item_pe(t, item)
        if (pe,) in paths:
            continue
        sub = {p[1:] for p in paths if len(p) > 1 and p[0] == pe}
        if sub:
            item = remove_items(item, sub, elem)
            if item is ABSENT:
                continue
        items.append(item)
    return items if items else ABSENT


def ensure_named_fields_are_members(paths: Iterable[Path], t: Type) -> set[Path]:
    """``Set.EnsureNamedFieldsAreMembers``: add every struct field that has owned children (not map keys)."""
    out = set(paths)
    for path in list(out):
        for i in range(1, len(path)):
            if path[i - 1].startswith("f:") and isinstance(_as_struct(_type_at(t, path[: i - 1])), Struct):
                out.add(path[:i])
    return out


def _as_struct(t: Type) -> Type:
    return Struct() if isinstance(t, Deduced) else t


# ----------------------------------------------------------------------------------------------- managers


@dataclass(frozen=True)
class Entry:
    """One ``metadata.managedFields`` entry, decoded."""

    manager: str
    operation: str
    api_version: str
    fields: FieldSet
    subresource: str = ""
    time: str | None = None

    @property
    def identity(self) -> tuple[str, str, str, str]:
        # BuildManagerIdentifier: appliers are one entry whatever apiVersion they applied with.
        return (self.manager, self.operation, "" if self.operation == APPLY else self.api_version, self.subresource)

    def describe(self) -> str:
        """``printManager`` of the conflict message."""
        who = json.dumps(self.manager)
        if self.subresource:
            who += f" with subresource {json.dumps(self.subresource)}"
        if self.operation == UPDATE:
            who += f" using {self.api_version}"
        return who

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"manager": self.manager, "operation": self.operation, "apiVersion": self.api_version}
        if self.time:
            out["time"] = self.time
        out["fieldsType"] = "FieldsV1"
        out["fieldsV1"] = fields_v1(self.fields)
        if self.subresource:
            out["subresource"] = self.subresource
        return out


Managers = dict[tuple[str, str, str, str], Entry]


def decode_managed_fields(obj: Mapping[str, Any] | None) -> Managers:
    out: Managers = {}
    for raw in ((obj or {}).get("metadata") or {}).get("managedFields") or []:
        e = Entry(
            manager=raw.get("manager", ""),
            operation=raw.get("operation", UPDATE),
            api_version=raw.get("apiVersion", ""),
            fields=parse_fields_v1(raw.get("fieldsV1") or {}),
            subresource=raw.get("subresource", ""),
            time=raw.get("time"),
        )
        out[e.identity] = e
    return out


def encode_managed_fields(managers: Managers) -> list[dict[str, Any]]:
    # sortEncodedManagedFields: Apply before Update, then oldest first, then by name.
    entries = sorted(
        managers.values(), key=lambda e: (e.operation, e.time or "", e.manager, e.api_version, e.subresource)
    )
    return [e.encode() for e in entries]


#: Never owned (stripMetaManager); server-set metadata is taken off before the walk, so these are what is left.
_STRIPPED: frozenset[Path] = frozenset(
    {("f:apiVersion",), ("f:kind",), ("f:metadata",), ("f:metadata", "f:name"), ("f:metadata", "f:namespace")}
)
#: Metadata the server sets; carried over from the live object, never part of a config or a comparison.
SERVER_METADATA = (
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)


def _body(obj: Mapping[str, Any] | None, *, keep_status: bool = False) -> dict[str, Any]:
    """What field management walks: the object without server-set metadata (and without status)."""
    if not obj:
        return {}
    out = copy.deepcopy(dict(obj))
    if not keep_status:
        out.pop("status", None)
    md = out.get("metadata")
    if isinstance(md, dict):
        for k in SERVER_METADATA:
            md.pop(k, None)
    return out


def _strip(paths: set[Path], *, status_owned: bool = False) -> set[Path]:
    """Drop what no entry may own: stripped metadata, and ``status`` unless this is a status write."""
    out = paths - _STRIPPED
    if not status_owned:
        out = {p for p in out if p[:1] != ("f:status",)}
    return out


def _finish(result: dict[str, Any], live: Mapping[str, Any] | None, managers: Managers) -> dict[str, Any]:
    md = result.setdefault("metadata", {})
    live_md = (live or {}).get("metadata") or {}
    for k in SERVER_METADATA:
        if k in live_md and k != "managedFields":
            md[k] = copy.deepcopy(live_md[k])
    encoded = encode_managed_fields(managers)
    if encoded:
        md["managedFields"] = encoded
    else:
        md.pop("managedFields", None)
    return result


def _other_managers(
    cmp: Comparison, managers: Managers, workflow: tuple[str, str, str, str] | None, force: bool
) -> Managers:
    """``Updater.update``: conflicts (fields another entry owns that changed) and removals from every entry."""
    conflicts: list[Conflict] = []
    changed = cmp.changed()
    out: Managers = {}
    for ident, e in managers.items():
        if ident == workflow:
            out[ident] = e
            continue
        lost = e.fields & changed
        conflicts.extend(Conflict(e, p) for p in sorted(lost, key=_path_sort_key))
        out[ident] = replace(e, fields=frozenset(e.fields - lost - cmp.removed))
    if conflicts and not force:
        raise ApplyConflict(conflicts)
    return {i: e for i, e in out.items() if e.fields}


def apply(
    kind: str,
    live: Mapping[str, Any] | None,
    config: Mapping[str, Any],
    *,
    manager: str,
    api_version: str,
    force: bool,
    now: str,
) -> dict[str, Any]:
    """Server-side apply of ``config`` by ``manager`` onto ``live`` (``None``: create).

    Returns the new object (server-set metadata and ``status`` carried over from ``live``, new
    ``managedFields``; no defaults applied), equal to ``live`` when the apply changes nothing. Raises
    :class:`ApplyConflict` (409) or :class:`ApplyInvalid` (422).
    """
    t = schema_for(kind)
    live_body, cfg = _body(live), _body(config)
    try:
        validate(cfg, t)
    except ApplyInvalid as e:
        group_version = config.get("apiVersion", "")
        group, _, version = group_version.rpartition("/")
        raise ApplyInvalid(f"failed to create typed patch object ({group}/{version}, Kind={kind}): {e}") from None
    managers = decode_managed_fields(live)
    ident = (manager, APPLY, "", "")
    last = managers.get(ident)
    merged = merge(live_body, cfg, t) if live_body else merge(ABSENT, cfg, t)
    # During the operation the applier owns all it sent, name and kind included (so prune keeps them);
    # stripMetaManager takes those off afterwards.
    managers[ident] = Entry(manager, APPLY, api_version, frozenset(to_field_set(cfg, t)), time=now)
    new = _prune(merged, managers, ident, last, t) if last and last.fields else merged
    cmp = compare(live_body if live_body else ABSENT, new, t)
    cmp = Comparison(_strip(cmp.added), _strip(cmp.modified), _strip(cmp.removed))
    managers = _other_managers(cmp, managers, ident, force)
    managers[ident] = replace(managers[ident], fields=frozenset(_strip(set(managers[ident].fields))))
    if new == live_body and last is not None:
        managers[ident] = replace(managers[ident], time=last.time)  # a no-op apply keeps its timestamp
    if not managers[ident].fields:
        del managers[ident]
    result = new if isinstance(new, dict) else {}
    if live is not None and "status" in live:
        result["status"] = copy.deepcopy(live["status"])
    return _finish(result, live, managers)


def _prune(merged: Any, managers: Managers, ident: tuple[str, str, str, str], last: Entry, t: Type) -> Any:
    # Updater.prune: remove what the applier applied last time and not now, unless someone else owns it.
    last_set = ensure_named_fields_are_members(last.fields, t)
    pruned = remove_items(merged, last_set, t)
    # addBackOwnedItems
    owned: set[Path] = set()
    for e in managers.values():
        owned |= e.fields
    owned = ensure_named_fields_are_members(owned, t)
    merged_set = ensure_named_fields_are_members(to_field_set(merged, t), t)
    pruned_set = ensure_named_fields_are_members(_fs_or_empty(pruned, t), t)
    pruned = remove_items(merged, merged_set - (pruned_set | owned), t)
    # addBackDanglingItems: only what the applier owned may go
    pruned_set = ensure_named_fields_are_members(_fs_or_empty(pruned, t), t)
    out = remove_items(merged, (merged_set - pruned_set) & last_set, t)
    return out if out is not ABSENT else {}


def _fs_or_empty(value: Any, t: Type) -> set[Path]:
    return set() if value is ABSENT else to_field_set(value, t)


def record_update(
    kind: str,
    live: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    *,
    manager: str,
    api_version: str,
    now: str,
    subresource: str = "",
) -> dict[str, Any]:
    """Field ownership of a non-apply write (``Updater.Update``): returns ``new`` with its ``managedFields``.

    The fields this write added or changed move to the ``(manager, Update, api_version, subresource)`` entry,
    removed fields leave every entry; an Update never conflicts. ``subresource="status"`` owns ``f:status``;
    any other write ignores status. ``new``'s server-set metadata is replaced by ``live``'s.
    """
    t = schema_for(kind)
    status = subresource == "status"
    live_body, new_body = _body(live, keep_status=status), _body(new, keep_status=status)
    managers = decode_managed_fields(live)
    cmp = compare(live_body if live_body else ABSENT, new_body, t)
    cmp = Comparison(
        _strip(cmp.added, status_owned=status),
        _strip(cmp.modified, status_owned=status),
        _strip(cmp.removed, status_owned=status),
    )
    managers = _other_managers(cmp, managers, None, force=True)
    took = cmp.changed()
    if took:
        ident = (manager, UPDATE, api_version, subresource)
        prev = managers.get(ident)
        fields = (prev.fields if prev else frozenset()) | took
        managers[ident] = Entry(manager, UPDATE, api_version, frozenset(fields), subresource, time=now)
    result = copy.deepcopy(dict(new))
    return _finish(result, live, managers)


def apply_defaults(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    """The defaults the ownership rules depend on (apps/v1 ``spec.replicas: 1``), set unowned, in place."""
    if kind in ("Deployment", "StatefulSet") and isinstance(obj.get("spec"), dict):
        obj["spec"].setdefault("replicas", 1)
    return obj


__all__ = [
    "APPLY",
    "UPDATE",
    "ApplyConflict",
    "ApplyInvalid",
    "Entry",
    "apply",
    "apply_defaults",
    "compare",
    "decode_managed_fields",
    "fields_v1",
    "merge",
    "parse_fields_v1",
    "path_string",
    "record_update",
    "to_field_set",
]
