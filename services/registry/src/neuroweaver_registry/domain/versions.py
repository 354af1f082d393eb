"""Semantic versions: parsing, exact precedence (prerelease included) and a sortable database key."""

from __future__ import annotations

import semver

from neuroweaver_runtime.errors import InvalidArgument

MAX_COMPONENT = 2**31 - 1


def parse_version(text: str, field: str = "version") -> semver.Version:
    """A semver 2.0 version without build metadata (it has no precedence, so it cannot identify a version)."""
    try:
        version = semver.Version.parse(text or "")
    except (ValueError, TypeError):
        raise InvalidArgument(
            f"{text!r} is not a semantic version (MAJOR.MINOR.PATCH[-PRERELEASE], e.g. 1.4.0 or 2.0.0-rc.1)",
            field=field,
            reason="INVALID_VERSION",
        ) from None
    if version.build:
        raise InvalidArgument(
            "build metadata (+...) is not allowed in a version; put it in labels", field=field, reason="INVALID_VERSION"
        )
    if max(version.major, version.minor, version.patch) > MAX_COMPONENT:
        raise InvalidArgument("version components must be below 2^31", field=field, reason="INVALID_VERSION")
    for ident in (version.prerelease or "").split(".") if version.prerelease else []:
        if ident.isdigit() and int(ident) > MAX_COMPONENT:
            raise InvalidArgument("numeric prerelease identifiers must be below 2^31", field=field, reason="INVALID_VERSION")
    return version


def looks_like_version(text: str) -> bool:
    return semver.Version.is_valid(text)


def sort_key(version: semver.Version) -> str:
    """A string whose plain byte order equals semver precedence (hex of a big-endian encoding).

    major.minor.patch as 4-byte integers; then 0x02 for a release, or 0x01 plus each prerelease identifier
    (numeric: 0x01 + 4-byte integer; alphanumeric: 0x02 + ASCII + 0x00) and a 0x00 terminator, so that
    numeric < alphanumeric identifiers, fewer identifiers < more, and any prerelease < the release.
    """
    out = bytearray()
    for part in (version.major, version.minor, version.patch):
        out += part.to_bytes(4, "big")
    if not version.prerelease:
        out += b"\x02"
    else:
        out += b"\x01"
        for ident in version.prerelease.split("."):
            if ident.isdigit():
                out += b"\x01" + int(ident).to_bytes(4, "big")
            else:
                out += b"\x02" + ident.encode("ascii") + b"\x00"
        out += b"\x00"
    return out.hex()


def bump(highest: semver.Version | None, level: str) -> semver.Version:
    """Next version from the highest existing one; 0.0.0 is the starting point when there is none."""
    base = highest or semver.Version(0, 0, 0)
    if level == "major":
        return base.bump_major()
    if level == "minor":
        return base.bump_minor()
    if level == "patch":
        if base.prerelease:  # 1.0.0-rc.1 + patch → 1.0.0 would collide with the release; semver's bump drops the tag
            return semver.Version(base.major, base.minor, base.patch + 1)
        return base.bump_patch()
    raise InvalidArgument("bump must be major, minor or patch", field="bump", reason="INVALID_BUMP")


def compare(a: semver.Version, b: semver.Version) -> int:
    return a.compare(b)
