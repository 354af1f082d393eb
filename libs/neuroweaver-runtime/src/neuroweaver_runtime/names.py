"""Resource names (AIP-122): `projects/{project}/models/{model}/...`.

A `ResourceName` pattern parses a full name into its ids and rejects anything malformed with an
INVALID_ARGUMENT that names the field, so servicers never split strings themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidArgument

# Resource ids: lowercase letters, digits and hyphens, starting with a letter, at most 63 characters.
ID_PATTERN = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
_VAR = re.compile(r"\{(\w+)\}")


def validate_id(value: str, field: str, what: str = "id") -> str:
    if not ID_PATTERN.match(value or ""):
        raise InvalidArgument(
            f"{what} {value!r} is invalid: use 1-63 lowercase letters, digits and hyphens, starting with a letter",
            field=field,
            reason="INVALID_ID",
        )
    return value


@dataclass(frozen=True)
class ResourceName:
    """A name template such as `projects/{project}/models/{model}`.

    `segment_patterns` overrides the id rule for particular variables (versions are semver, not ids).
    """

    template: str
    segment_patterns: tuple[tuple[str, str], ...] = ()

    @property
    def variables(self) -> list[str]:
        return _VAR.findall(self.template)

    def parse(self, name: str, field: str = "name") -> dict[str, str]:
        parts = (name or "").split("/")
        tparts = self.template.split("/")
        if not name:
            raise InvalidArgument(f"{field} is required (format {self.template})", field=field, reason="MISSING_NAME")
        if len(parts) != len(tparts):
            raise InvalidArgument(f"{field} {name!r} does not match {self.template}", field=field, reason="MALFORMED_NAME")
        overrides = dict(self.segment_patterns)
        values: dict[str, str] = {}
        for part, tpart in zip(parts, tparts, strict=True):
            m = _VAR.fullmatch(tpart)
            if m is None:
                if part != tpart:
                    raise InvalidArgument(
                        f"{field} {name!r} does not match {self.template}", field=field, reason="MALFORMED_NAME"
                    )
                continue
            var = m.group(1)
            pattern = overrides.get(var)
            ok = re.fullmatch(pattern, part) if pattern else ID_PATTERN.match(part)
            if not ok or len(part) > 256:
                raise InvalidArgument(
                    f"{field} {name!r}: segment {var} {part!r} is invalid", field=field, reason="MALFORMED_NAME"
                )
            values[var] = part
        return values

    def format(self, **values: str) -> str:
        return _VAR.sub(lambda m: values[m.group(1)], self.template)


PROJECT = ResourceName("projects/{project}")


def project_of(name: str) -> str | None:
    """The `{project}` of any name under `projects/`, or None."""
    if name.startswith("projects/"):
        rest = name[len("projects/") :]
        return rest.split("/", 1)[0] or None
    return None
