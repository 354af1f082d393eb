"""What the interceptor checks in every request message before a handler sees it.

- every resource name at any depth (nested, repeated, map values) for authorization: `projects/...` strings;
- characters no database accepts (NUL) in any string, refused as INVALID_ARGUMENT with the field's path;
- bytes that are not a valid message (invalid UTF-8 in a string field), refused as INVALID_ARGUMENT.

The walk follows a per-message-type plan built once (which fields hold strings or messages), and the wire
bytes tell up front whether a walk can find anything: no `projects/` and no NUL byte → nothing to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from .errors import InvalidArgument, Violations, truncate

# What a call acts on (writes into): these top-level fields, and the `name` of a resource message at the top level
# (`UpdateModelRequest.model.name`). Every other name in a request is a reference, which a read grant may cover.
TARGET_FIELDS = frozenset({"name", "parent", "target_model", "experiment", "model"})
_PROJECTS = b"projects/"
_MAX_VIOLATIONS = 20


@dataclass(frozen=True)
class Incoming:
    """A deserialized request plus what its wire bytes say about it."""

    message: Any
    may_hold_names: bool
    may_hold_nul: bool


@dataclass(frozen=True)
class Undecodable:
    """Bytes that do not parse as the request type; refused after authentication."""

    type_name: str


@dataclass
class Findings:
    targets: set[str] = field(default_factory=set)  # names acted on
    references: set[str] = field(default_factory=set)  # names only referenced


def lenient_deserializer(deserialize, type_name: str):
    """Wraps a handler's request deserializer so that bad bytes reach the interceptor instead of grpc's UNKNOWN."""

    def parse(raw: bytes):
        try:
            message = deserialize(raw)
        except (DecodeError, ValueError, TypeError):
            return Undecodable(type_name)
        return Incoming(message, _PROJECTS in raw, b"\x00" in raw)

    return parse


def refuse_undecodable(item: Undecodable) -> NoReturn:
    raise InvalidArgument(
        f"the request is not a valid {item.type_name}: every string field must be valid UTF-8",
        reason="MALFORMED_REQUEST",
    )


def inspect(incoming: Incoming, prefix: str = "") -> Findings:
    """Names found in the message (by role) after refusing NUL characters anywhere in it."""
    findings = Findings()
    if not (incoming.may_hold_names or incoming.may_hold_nul):
        return findings
    message = incoming.message
    strings: list[str] = []
    for desc, kind in _plan(message.DESCRIPTOR):  # the top level: where targets are
        if kind == "str":
            value = getattr(message, desc.name)
            if desc.name in TARGET_FIELDS and value.startswith("projects/"):
                findings.targets.add(value)
            else:
                strings.append(value)
        elif kind == "msg" and message.HasField(desc.name):
            resource = getattr(message, desc.name)
            value = getattr(resource, "name", None) if "name" in resource.DESCRIPTOR.fields_by_name else None
            if isinstance(value, str) and value.startswith("projects/"):
                findings.targets.add(value)
    _collect([message], strings, top=True)
    if incoming.may_hold_nul and "\x00" in "\n".join(strings):
        violations = Violations()  # rare: walk again, slowly, for the paths of the offending fields
        _walk(message, prefix, True, Findings(), violations, True)
        violations.raise_if_any(reason="INVALID_CHARACTERS")
    if incoming.may_hold_names:
        findings.references.update(v for v in set(strings) if v.startswith("projects/"))
    return findings


def _collect(messages: list, out: list[str], top: bool = False) -> None:
    """Appends every string below `messages` (all of one type) to `out`, one field across all messages at a time:
    a batch of thousands of events costs a few list comprehensions, not a call per field per event."""
    for desc, kind in _plan(messages[0].DESCRIPTOR):
        name = desc.name
        if kind == "str":
            if not top:
                out.extend([getattr(m, name) for m in messages])
        elif kind == "strs":
            for m in messages:
                out.extend(getattr(m, name))
        elif kind == "msg":
            children = [getattr(m, name) for m in messages if m.HasField(name)]
            if children:
                _collect(children, out)
        elif kind == "msgs":
            children = [c for m in messages for c in getattr(m, name)]
            if children:
                _collect(children, out)
        elif kind == "map_str":
            for m in messages:
                for key, value in getattr(m, name).items():
                    out.append(key)
                    out.append(value)
        elif kind == "map_keys":
            for m in messages:
                out.extend(getattr(m, name).keys())
        elif kind == "map_msg":
            for m in messages:
                entries = getattr(m, name)
                out.extend(entries.keys())
                children = list(entries.values())
                if children:
                    _collect(children, out)


def _walk(message, path: str, top: bool, found: Findings, violations: Violations, check_nul: bool) -> None:
    for desc, kind in _plan(message.DESCRIPTOR):
        value = getattr(message, desc.name)
        where = f"{path}{desc.name}"
        if kind == "str":
            _string(value, where, top and desc.name in TARGET_FIELDS, found, violations, check_nul)
        elif kind == "strs":
            for i, item in enumerate(value):
                _string(item, f"{where}[{i}]", False, found, violations, check_nul)
        elif kind == "msg":
            if message.HasField(desc.name):
                _walk(value, where + ".", False, found, violations, check_nul)
        elif kind == "msgs":
            for i, item in enumerate(value):
                _walk(item, f"{where}[{i}].", False, found, violations, check_nul)
        elif kind == "map_str":
            for key, item in value.items():
                _string(key, f"{where}.key", False, found, violations, check_nul)
                _string(item, f"{where}[{truncate(key, 40)!r}]", False, found, violations, check_nul)
        elif kind == "map_keys":
            for key in value:
                _string(key, f"{where}.key", False, found, violations, check_nul)
        elif kind == "map_msg":
            for key, item in value.items():
                _string(key, f"{where}.key", False, found, violations, check_nul)
                _walk(item, f"{where}[{truncate(key, 40)!r}].", False, found, violations, check_nul)
        if len(violations.items) >= _MAX_VIOLATIONS:
            return


def _string(value: str, where: str, target: bool, found: Findings, violations: Violations, check_nul: bool) -> None:
    if check_nul and "\x00" in value:
        violations.add(where, "must not contain NUL characters")
    if value.startswith("projects/"):
        if target:
            found.targets.add(value)
        else:
            found.references.add(value)


_PLANS: dict[str, tuple[tuple[FieldDescriptor, str], ...]] = {}


def _plan(descriptor) -> tuple[tuple[FieldDescriptor, str], ...]:
    plan = _PLANS.get(descriptor.full_name)
    if plan is None:
        steps = []
        for desc in descriptor.fields:
            repeated = desc.is_repeated
            if desc.type == FieldDescriptor.TYPE_STRING:
                steps.append((desc, "strs" if repeated else "str"))
            elif desc.type == FieldDescriptor.TYPE_MESSAGE:
                entry = desc.message_type
                if entry.GetOptions().map_entry:
                    value = entry.fields_by_name["value"]
                    if value.type == FieldDescriptor.TYPE_STRING:
                        steps.append((desc, "map_str"))
                    elif value.type == FieldDescriptor.TYPE_MESSAGE:
                        steps.append((desc, "map_msg"))
                    elif entry.fields_by_name["key"].type == FieldDescriptor.TYPE_STRING:
                        steps.append((desc, "map_keys"))  # e.g. map<string, double>: only the keys are text
                elif _holds_strings(entry, set()):
                    steps.append((desc, "msgs" if repeated else "msg"))
        plan = _PLANS[descriptor.full_name] = tuple(steps)
    return plan


def _holds_strings(descriptor, seen: set[str]) -> bool:
    if descriptor.full_name in seen:
        return False
    seen.add(descriptor.full_name)
    for desc in descriptor.fields:
        if desc.type == FieldDescriptor.TYPE_STRING:
            return True
        if desc.type == FieldDescriptor.TYPE_MESSAGE and _holds_strings(desc.message_type, seen):
            return True
    return False
