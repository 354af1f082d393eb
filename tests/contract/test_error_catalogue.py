"""docs/errors.md is the one catalogue of ErrorInfo reasons: every reason the code raises is in it with its status
code, and every reason in it is still raised somewhere.

The reasons are read from the source (services/*/src, libs/*/src) with `ast`, in the shapes the code uses:
- `reason="X"` on any call (also `reason=a if c else "X"` and `remote or "X"`: every UPPER_SNAKE literal in it);
- a literal passed to a function that has a `reason` parameter (`path_refused(..., "X")`, `bad.add(..., "X")`,
  `violations.raise_if_any("X")`);
- `for what, value, reason in checks:` over tuple literals of the same function;
- `default_reason = "X"` of the error classes;
- f-strings such as `f"EXPERIMENT_{state.value}"`, which become patterns: each must match a catalogue entry, and they
  count as raising the entries they match.
Where the raising class is known (`NotFound(..., reason=...)`), its code must be one the catalogue lists.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = ROOT / "docs" / "errors.md"
REASON = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*$")
ROW = re.compile(r"^\| `([A-Z0-9_]+)` \| ([A-Z_, ]+) \|")
CODES = {
    "ABORTED", "ALREADY_EXISTS", "DEADLINE_EXCEEDED", "FAILED_PRECONDITION", "INTERNAL", "INVALID_ARGUMENT",
    "NOT_FOUND", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "UNAVAILABLE", "UNKNOWN",
}  # fmt: skip
# Error classes of neuroweaver_runtime.errors -> the code each is sent with.
ERROR_CLASSES = {
    "InvalidArgument": "INVALID_ARGUMENT",
    "NotFound": "NOT_FOUND",
    "AlreadyExists": "ALREADY_EXISTS",
    "FailedPrecondition": "FAILED_PRECONDITION",
    "Aborted": "ABORTED",
    "PermissionDenied": "PERMISSION_DENIED",
    "Unauthenticated": "UNAUTHENTICATED",
    "ResourceExhausted": "RESOURCE_EXHAUSTED",
    "Unavailable": "UNAVAILABLE",
    "DeadlineExceeded": "DEADLINE_EXCEEDED",
    "DomainError": "UNKNOWN",
}


@dataclass
class Raised:
    # reason -> codes seen with it ("" when the raising class is not visible at the call)
    reasons: dict[str, set[str]] = field(default_factory=dict)
    # f-string patterns -> where they are
    patterns: dict[str, str] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, code: str, where: str) -> None:
        self.reasons.setdefault(reason, set()).add(code)
        self.where.setdefault(reason, where)


def _sources() -> list[Path]:
    return sorted([*ROOT.glob("services/*/src/**/*.py"), *ROOT.glob("libs/*/src/**/*.py")])


def _callee(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _pattern(node: ast.JoinedStr) -> str | None:
    """`f"EXPERIMENT_{state.value}"` -> `EXPERIMENT_[A-Z0-9_]+`; None when the f-string is not reason-shaped."""
    parts = []
    for v in node.values:
        if isinstance(v, ast.Constant):
            if not re.fullmatch(r"[A-Z0-9_]*", str(v.value)):
                return None
            parts.append(re.escape(str(v.value)))
        else:
            parts.append("[A-Z0-9_]+")
    return "".join(parts)


def _collect(expr: ast.AST, code: str, where: str, out: Raised) -> None:
    """Every reason-shaped literal (and f-string pattern) inside a `reason` argument."""
    for node in ast.walk(expr):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and REASON.match(node.value):
            out.add(node.value, code, where)
        elif isinstance(node, ast.JoinedStr) and (p := _pattern(node)):
            out.patterns[p] = where


def _reason_parameters(trees: dict[Path, ast.Module]) -> dict[str, int]:
    """Functions with a `reason` parameter -> its position in a call (methods: without self)."""
    params: dict[str, int] = {}
    for tree in trees.values():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in fn.args.args]
                if "reason" in names:
                    skip = 1 if names and names[0] in ("self", "cls") else 0
                    params[fn.name] = names.index("reason") - skip
    return params


@functools.cache
def raised_in_code() -> Raised:
    trees = {p: ast.parse(p.read_text(), filename=str(p)) for p in _sources()}
    params = _reason_parameters(trees)
    out = Raised()
    for path, tree in trees.items():
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = _callee(node)
                code = ERROR_CLASSES.get(name, "")
                where = f"{rel}:{node.lineno}"
                for kw in node.keywords:
                    if kw.arg == "reason":
                        _collect(kw.value, code, where, out)
                pos = params.get(name)
                if pos is not None and pos < len(node.args) and name not in ERROR_CLASSES:
                    _collect(node.args[pos], code, where, out)
            elif isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == ["default_reason"]:
                _collect(node.value, "", f"{rel}:{node.lineno}", out)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                _loop_reasons(node, rel, out)
    return out


def _loop_reasons(fn: ast.FunctionDef | ast.AsyncFunctionDef, rel: str, out: Raised) -> None:
    """`for what, value, reason in checks:`: the matching element of every same-sized tuple literal in the function."""
    for loop in ast.walk(fn):
        if isinstance(loop, ast.For) and isinstance(loop.target, ast.Tuple):
            names = [getattr(e, "id", "") for e in loop.target.elts]
            if "reason" not in names:
                continue
            index = names.index("reason")
            for t in ast.walk(fn):
                if isinstance(t, ast.Tuple) and t is not loop.target and len(t.elts) == len(names):
                    _collect(t.elts[index], "", f"{rel}:{t.lineno}", out)


def catalogue() -> dict[str, set[str]]:
    entries: dict[str, set[str]] = {}
    for line in CATALOGUE.read_text().splitlines():
        if m := ROW.match(line):
            assert m.group(1) not in entries, f"{m.group(1)} is documented twice in docs/errors.md"
            entries[m.group(1)] = {c.strip() for c in m.group(2).split(",")}
    return entries


def test_the_extraction_sees_every_shape():
    """Guards the reader itself: one known reason per shape, so a refactor of the reader cannot silently see nothing."""
    raised = raised_in_code()
    assert "VERSION_ALREADY_EXISTS" in raised.reasons  # reason= on an error class
    assert raised.reasons["MODEL_ARCHIVED"] == {"FAILED_PRECONDITION"}
    assert "DEPLOYMENT_UNUSABLE" in raised.reasons  # inside a conditional expression
    assert "DATASET_PATH_NOT_ALLOWED" in raised.reasons  # a helper's reason parameter
    assert "UNIT_NOT_EXPOSED" in raised.reasons  # the experiments ingest's bad.add(..., reason)
    assert "INVALID_GENERATION_REQUEST" in raised.reasons  # violations.raise_if_any("...")
    assert "ARTIFACT_PATH_NOT_ALLOWED" in raised.reasons  # for what, value, reason in checks
    assert "NOT_FOUND" in raised.reasons  # default_reason
    assert "EXPERIMENT_[A-Z0-9_]+" in raised.patterns  # f-string
    assert len(raised.reasons) > 100


def test_catalogue_rows_are_well_formed_and_sorted():
    entries = catalogue()
    assert entries, "docs/errors.md has no reason rows"
    for reason, codes in entries.items():
        assert codes <= CODES, f"{reason}: unknown status code(s) {sorted(codes - CODES)}"
    assert list(entries) == sorted(entries), "keep docs/errors.md sorted by reason"


def test_every_reason_raised_in_code_is_in_the_catalogue():
    entries = catalogue()
    raised = raised_in_code()
    missing = sorted(f"{r} ({raised.where[r]})" for r in raised.reasons if r not in entries)
    assert not missing, "reasons raised in code but missing from docs/errors.md:\n  " + "\n  ".join(missing)
    wrong = sorted(
        f"{r}: raised as {sorted(codes - {''} - entries[r])} ({raised.where[r]}), documented as {sorted(entries[r])}"
        for r, codes in raised.reasons.items()
        if codes - {""} - entries[r]
    )
    assert not wrong, "status codes differ from docs/errors.md:\n  " + "\n  ".join(wrong)
    for pattern, where in raised.patterns.items():
        assert any(re.fullmatch(pattern, r) for r in entries), f"{where}: no documented reason matches {pattern}"


def test_nothing_in_the_catalogue_is_stale():
    raised = raised_in_code()
    stale = sorted(r for r in catalogue() if r not in raised.reasons and not any(re.fullmatch(p, r) for p in raised.patterns))
    assert not stale, "docs/errors.md documents reasons no code raises any more: " + ", ".join(stale)
