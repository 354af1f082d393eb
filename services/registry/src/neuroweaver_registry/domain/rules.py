"""Rules of the registry's resources that use cases apply: model lifecycle, version state changes and aliases.

Aliases route production traffic, so they move only by compare-and-set when the caller asks, never onto a
deprecated version, and never on an archived model.
"""

from __future__ import annotations

from neuroweaver_runtime.errors import Aborted, FailedPrecondition, InvalidArgument
from neuroweaver_runtime.names import validate_id

from .model import RESERVED_ALIASES, Model, ModelState, ModelVersion, VersionState


def require_active(model: Model) -> None:
    if model.state is not ModelState.ACTIVE:
        raise FailedPrecondition(
            f"model {model.name} is archived; restore it first", reason="MODEL_ARCHIVED", metadata={"model": model.name}
        )


def change_version_state(version: ModelVersion, target: VersionState) -> bool:
    """Checks that `version` (loaded with its aliases) may move to `target`; False when it already is there.

    Any state may follow any other, except that a version some alias points at cannot be deprecated.
    """
    if target is VersionState.DEPRECATED and version.aliases:
        raise FailedPrecondition(
            f"aliases {', '.join(version.aliases)} point at {version.version}; move them before deprecating it",
            reason="VERSION_HAS_ALIASES",
        )
    return version.state is not target


def check_alias_id(alias: str, field: str) -> None:
    validate_id(alias, field, "alias")
    if alias in RESERVED_ALIASES:
        raise InvalidArgument(
            f"alias {alias!r} is reserved (versions/{alias} always resolves to the highest version)",
            field=field,
            reason="RESERVED_ALIAS",
        )


def check_aliasable(version: ModelVersion) -> None:
    if version.state is VersionState.DEPRECATED:
        raise FailedPrecondition(
            f"version {version.version} is deprecated; an alias cannot point at it", reason="VERSION_DEPRECATED"
        )


def check_expected(current: str | None, expected: str, alias: str) -> None:
    """Compare-and-set: `expected` empty = unconditional; `-` = the alias must not exist; else its current version."""
    if not expected:
        return
    want = None if expected == "-" else expected
    if current != want:
        raise Aborted(
            f"alias {alias} points at {current or 'nothing'}, not {expected}; re-read it and retry",
            reason="ALIAS_VERSION_MISMATCH",
            metadata={"current_version": current or "", "expected_version": expected},
        )
