"""A small, strict subset of AIP-160 filters: `a = "x" AND labels.team != "y"`.

Grammar: comparison (AND comparison)*; comparison := field ("=" | "!=") value; value is a quoted
string, a bare word or a number. Fields are checked against what each List method allows.

An enum-valued field is declared with the contract's prefix of its value names and the values the service stores
(`enums={"state": ("STATE_", {"ACTIVE", "ARCHIVED"})}`): its value may be the contract's name (`STATE_ACTIVE`) or the
name without the prefix (`ACTIVE`), in any case, and the comparison carries the stored value. An unknown value (or
`*_UNSPECIFIED`) is INVALID_FILTER: it would otherwise silently match nothing.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from .errors import InvalidArgument

_TOKEN = re.compile(r'\s*(?:(?P<op>!=|=)|(?P<str>"(?:[^"\\]|\\.)*")|(?P<word>[A-Za-z0-9_.:/\-]+))')


@dataclass(frozen=True)
class Comparison:
    field: str
    op: str  # "=" or "!="
    value: str

    @property
    def label_key(self) -> str | None:
        return self.field[len("labels.") :] if self.field.startswith("labels.") else None


def parse_filter(
    text: str,
    allowed_fields: set[str],
    *,
    allow_labels: bool = True,
    enums: Mapping[str, tuple[str, Collection[str]]] | None = None,
) -> list[Comparison]:
    """The comparisons of `text`. `allowed_fields` plus the `enums` fields (field -> (prefix, stored values)) may be
    compared, and `labels.<key>` when `allow_labels`."""
    enums = enums or {}
    allowed_fields = set(allowed_fields) | set(enums)
    if not text or not text.strip():
        return []
    if len(text) > 2000:
        raise InvalidArgument("filter is longer than 2000 characters", field="filter", reason="INVALID_FILTER")
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise _bad(f"unexpected character at position {pos}: {text[pos : pos + 10]!r}")
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    out: list[Comparison] = []
    i = 0
    while True:
        if i + 3 > len(tokens):
            raise _bad("expected `field = value`")
        (k1, field), (k2, op), (k3, raw) = tokens[i], tokens[i + 1], tokens[i + 2]
        if k1 != "word" or k2 != "op" or k3 not in ("str", "word"):
            raise _bad("expected `field = value`")
        value = _unquote(raw) if k3 == "str" else raw
        is_label = field.startswith("labels.") and len(field) > len("labels.")
        if not ((allow_labels and is_label) or field in allowed_fields):
            fields = sorted(allowed_fields) + (["labels.<key>"] if allow_labels else [])
            raise _bad(f"unknown field {field!r}; filterable fields: {', '.join(fields)}")
        if field in enums:
            value = _enum_value(field, value, *enums[field])
        out.append(Comparison(field, op, value))
        i += 3
        if i == len(tokens):
            return out
        if tokens[i] != ("word", "AND"):
            raise _bad("comparisons must be joined with AND")
        i += 1


def _enum_value(field: str, value: str, prefix: str, stored: Collection[str]) -> str:
    name = value.upper().removeprefix(prefix)
    if name not in stored:
        names = ", ".join(sorted(prefix + v for v in stored))
        raise _bad(f"unknown {field} {value!r}; one of: {names} (the {prefix} prefix may be left out)")
    return name


def _unquote(raw: str) -> str:
    return re.sub(r"\\(.)", r"\1", raw[1:-1])


def _bad(message: str) -> InvalidArgument:
    return InvalidArgument(f"filter: {message}", field="filter", reason="INVALID_FILTER")


def parse_order_by(text: str, allowed: set[str], default: str) -> tuple[str, bool]:
    """`field [asc|desc]` → (field, descending)."""
    text = (text or default).strip()
    parts = text.split()
    if not parts or len(parts) > 2 or parts[0] not in allowed or (len(parts) == 2 and parts[1] not in ("asc", "desc")):
        raise InvalidArgument(
            f"order_by {text!r} is invalid; use one of {', '.join(sorted(allowed))}, optionally followed by asc or desc",
            field="order_by",
            reason="INVALID_ORDER_BY",
        )
    return parts[0], len(parts) == 2 and parts[1] == "desc"
