"""Update masks (AIP-134): only listed, allowed paths change; an unknown path is INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import Iterable

from .errors import InvalidArgument


def validate_update_mask(paths: Iterable[str], allowed: Iterable[str], *, field: str = "update_mask") -> set[str]:
    """Returns the set of paths to apply. An empty mask is rejected: updates must say what they change."""
    allowed_set = set(allowed)
    requested = [p for p in paths]
    if not requested:
        raise InvalidArgument(
            f"{field} is required; updatable fields: {', '.join(sorted(allowed_set))}",
            field=field,
            reason="MISSING_UPDATE_MASK",
        )
    for path in requested:
        if path not in allowed_set:
            raise InvalidArgument(
                f"{field} path {path!r} cannot be updated; updatable fields: {', '.join(sorted(allowed_set))}",
                field=f"{field}.paths",
                reason="INVALID_UPDATE_MASK",
            )
    return set(requested)
