"""What the interceptor checks in every request message before a handler sees it.

- every resource name at any depth (nested, repeated, map values) for authorization: `projects/...` values of
  name fields (see `is_name_field`); free text (prompts, answers, descriptions, label values, ...) is never read
  as a name, whatever it starts with;
- characters no database accepts (NUL) in any string, refused as INVALID_ARGUMENT with the field's path;
- bytes that are not a valid message (invalid UTF-8 in a string field), refused as INVALID_ARGUMENT.

The walk follows a per-message-type plan built once (which fields hold names, free text or messages), and the wire
bytes tell up front whether a walk can find anything: no `projects/` and no NUL byte → nothing to do; without a NUL
byte only the fields that can hold names are visited.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NoReturn

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from .errors import InvalidArgument, Violations, truncate

# What a call acts on (writes into): these top-level fields, and the `name` of a resource message at the top level
# (`UpdateModelRequest.model.name`). Every other name in a request is a reference, which a read grant may cover.
TARGET_FIELDS = frozenset({"name", "parent", "target_model", "experiment", "model"})
# A string field holds resource names when it carries `google.api.resource_reference` or its name says so
# (`name`, `parent`, `model_version`, `training_job`, `model_alias`, `aliases`, ...). Every other string is free
# text. `display_name` is free text by convention (AIP-148) although it ends in `_name`.
NAME_FIELD = re.compile(r"(^|_)(name|parent|model|version|experiment|deployment|job|judge|alias)(s|es)?$")
FREE_TEXT_FIELDS = frozenset({"display_name"})
_RESOURCE_REFERENCE = "google.api.resource_reference"
_PROJECTS = b"projects/"
_MAX_VIOLATIONS = 20


def is_name_field(desc: FieldDescriptor) -> bool:
    """Whether a string field (or a map field's keys and string values) holds resource names to authorize."""
    if any(ext.full_name == _RESOURCE_REFERENCE for ext, _ in desc.GetOptions().ListFields()):
        return True
    return desc.name not in FREE_TEXT_FIELDS and NAME_FIELD.search(desc.name) is not None


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
    """Names found in name fields of the message (by role) after refusing NUL characters anywhere in it."""
    findings = Findings()
    if not (incoming.may_hold_names or incoming.may_hold_nul):
        return findings
    message = incoming.message
    names: list[str] = []
    # Free text is gathered only to look for NUL: without a NUL byte on the wire, only name fields are visited.
    texts: list[str] | None = [] if incoming.may_hold_nul else None
    for desc, kind, named, _ in _plan(message.DESCRIPTOR, texts is not None):  # the top level: where targets are
        if kind == "str":
            value = getattr(message, desc.name)
            if not named:
                texts.append(value)  # type: ignore[union-attr]  # only the full plan has free-text steps
            elif desc.name in TARGET_FIELDS and value.startswith("projects/"):
                findings.targets.add(value)
            else:
                names.append(value)
        elif kind == "msg" and message.HasField(desc.name):
            resource = getattr(message, desc.name)
            name_field = resource.DESCRIPTOR.fields_by_name.get("name")
            if name_field is not None and name_field.type == FieldDescriptor.TYPE_STRING:
                value = resource.name
                if value.startswith("projects/"):
                    findings.targets.add(value)
    _collect([message], names, texts, top=True)
    if texts is not None and any("\x00" in "\n".join(part) for part in (texts, names, findings.targets)):
        violations = Violations()  # rare: walk again, slowly, for the paths of the offending fields
        _walk(message, prefix, violations)
        violations.raise_if_any(reason="INVALID_CHARACTERS")
    if incoming.may_hold_names:
        findings.references.update(v for v in set(names) if v.startswith("projects/"))
    return findings


def _collect(messages: list, names: list[str], texts: list[str] | None, top: bool = False) -> None:
    """Appends every name-field string below `messages` (all of one type) to `names` and, when `texts` is given,
    every other string to `texts`, one field across all messages at a time: a batch of thousands of events costs
    a few list comprehensions, not a call per field per event."""
    for desc, kind, named, _ in _plan(messages[0].DESCRIPTOR, texts is not None):
        name = desc.name
        out = names if named else texts
        if kind == "str":
            if not top:
                out.extend([getattr(m, name) for m in messages])  # type: ignore[union-attr]
        elif kind == "strs":
            for m in messages:
                out.extend(getattr(m, name))  # type: ignore[union-attr]
        elif kind == "msg":
            children = [getattr(m, name) for m in messages if m.HasField(name)]
            if children:
                _collect(children, names, texts)
        elif kind == "msgs":
            children = [c for m in messages for c in getattr(m, name)]
            if children:
                _collect(children, names, texts)
        elif kind == "map_str":
            for m in messages:
                for key, value in getattr(m, name).items():
                    out.append(key)  # type: ignore[union-attr]
                    out.append(value)  # type: ignore[union-attr]
        elif kind == "map_keys":
            for m in messages:
                out.extend(getattr(m, name).keys())  # type: ignore[union-attr]
        elif kind == "map_vals":
            for m in messages:
                out.extend(getattr(m, name).values())  # type: ignore[union-attr]
        elif kind == "map_vals_msg":
            children = [c for m in messages for c in getattr(m, name).values()]
            if children:
                _collect(children, names, texts)
        elif kind == "map_msg":
            for m in messages:
                entries = getattr(m, name)
                if out is not None:
                    out.extend(entries.keys())
                children = list(entries.values())
                if children:
                    _collect(children, names, texts)


def _walk(message, path: str, violations: Violations) -> None:
    """Adds a violation for every string (name or free text, map keys included) holding a NUL character."""
    for desc, kind, _, _ in _plan(message.DESCRIPTOR, True):
        value = getattr(message, desc.name)
        where = f"{path}{desc.name}"
        if kind == "str":
            _nul(value, where, violations)
        elif kind == "strs":
            for i, item in enumerate(value):
                _nul(item, f"{where}[{i}]", violations)
        elif kind == "msg":
            if message.HasField(desc.name):
                _walk(value, where + ".", violations)
        elif kind == "msgs":
            for i, item in enumerate(value):
                _walk(item, f"{where}[{i}].", violations)
        elif kind == "map_str":
            for key, item in value.items():
                _nul(key, f"{where}.key", violations)
                _nul(item, f"{where}[{truncate(key, 40)!r}]", violations)
        elif kind == "map_keys":
            for key in value:
                _nul(key, f"{where}.key", violations)
        elif kind == "map_vals":
            for key, item in value.items():
                _nul(item, f"{where}[{key!r}]", violations)
        elif kind == "map_vals_msg":
            for key, item in value.items():
                _walk(item, f"{where}[{key!r}].", violations)
        elif kind == "map_msg":
            for key, item in value.items():
                _nul(key, f"{where}.key", violations)
                _walk(item, f"{where}[{truncate(key, 40)!r}].", violations)
        if len(violations.items) >= _MAX_VIOLATIONS:
            return


def _nul(value: str, where: str, violations: Violations) -> None:
    if "\x00" in value:
        violations.add(where, "must not contain NUL characters")


# A step: (field, kind, named, subtree_named). `named`: the field's own strings (map keys and string values
# included) are names; `subtree_named`: a message (or map value message) below it has name fields.
Step = tuple[FieldDescriptor, str, bool, bool]
_PLANS: dict[tuple[str, bool], tuple[Step, ...]] = {}


def _plan(descriptor, full: bool) -> tuple[Step, ...]:
    """The steps for one message type: every string-holding field (`full`), or only those that can hold names."""
    plan = _PLANS.get((descriptor.full_name, full))
    if plan is None:
        steps: list[Step] = []
        for desc in descriptor.fields:
            repeated = desc.is_repeated
            named = is_name_field(desc)
            if desc.type == FieldDescriptor.TYPE_STRING:
                steps.append((desc, "strs" if repeated else "str", named, False))
            elif desc.type == FieldDescriptor.TYPE_MESSAGE:
                entry = desc.message_type
                if entry.GetOptions().map_entry:
                    value = entry.fields_by_name["value"]
                    key_is_string = entry.fields_by_name["key"].type == FieldDescriptor.TYPE_STRING
                    if value.type == FieldDescriptor.TYPE_STRING:
                        steps.append((desc, "map_str" if key_is_string else "map_vals", named, False))
                    elif value.type == FieldDescriptor.TYPE_MESSAGE:
                        sub = _holds_strings(value.message_type, set(), True)
                        if key_is_string:
                            steps.append((desc, "map_msg", named, sub))
                        elif _holds_strings(value.message_type, set(), False):
                            steps.append((desc, "map_vals_msg", False, sub))
                    elif key_is_string:
                        steps.append((desc, "map_keys", named, False))  # e.g. map<string, double>: only the keys
                elif _holds_strings(entry, set(), False):
                    steps.append((desc, "msgs" if repeated else "msg", False, _holds_strings(entry, set(), True)))
        if not full:
            steps = [step for step in steps if step[2] or step[3]]
        plan = _PLANS[(descriptor.full_name, full)] = tuple(steps)
    return plan


def _holds_strings(descriptor, seen: set[str], names_only: bool) -> bool:
    """Whether messages of this type can hold strings (`names_only`: strings of name fields) at any depth."""
    if descriptor.full_name in seen:
        return False
    seen.add(descriptor.full_name)
    for desc in descriptor.fields:
        if desc.type == FieldDescriptor.TYPE_STRING:
            if not names_only or is_name_field(desc):
                return True
        elif desc.type == FieldDescriptor.TYPE_MESSAGE:
            entry = desc.message_type
            if entry.GetOptions().map_entry:
                key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
                if key.type == FieldDescriptor.TYPE_STRING or value.type == FieldDescriptor.TYPE_STRING:
                    if not names_only or is_name_field(desc):
                        return True
                if value.type == FieldDescriptor.TYPE_MESSAGE and _holds_strings(value.message_type, seen, names_only):
                    return True
            elif _holds_strings(entry, seen, names_only):
                return True
    return False
