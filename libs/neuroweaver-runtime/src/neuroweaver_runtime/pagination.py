"""List pagination (AIP-158): page-size rules and opaque, tamper-evident keyset page tokens.

A token carries the keyset cursor (the sort key of the last row returned) and a fingerprint of the
query (filter, order_by, parent). It is signed with HMAC-SHA256, so an edited or foreign token, or a
token reused with a different query, is rejected with INVALID_ARGUMENT instead of returning wrong rows.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from .errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

T = TypeVar("T")


@dataclass
class Page(Generic[T]):
    """One page of a List call as the use cases return it; an empty `next_page_token` means the last page."""

    items: list[T]
    next_page_token: str


def page_size(requested: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    """0 → default, above maximum → maximum (AIP-158 coerces), negative → INVALID_ARGUMENT."""
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", field="page_size", reason="INVALID_PAGE_SIZE")
    if requested == 0:
        return default
    return min(requested, maximum)


class PageTokens:
    """Encodes and decodes page tokens signed with a service secret."""

    def __init__(self, secret: str | bytes) -> None:
        self._key = secret.encode() if isinstance(secret, str) else secret

    def encode(self, cursor: list[Any], query: Any) -> str:
        body = json.dumps({"c": cursor, "q": _fingerprint(query)}, separators=(",", ":")).encode()
        sig = hmac.new(self._key, body, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(sig + body).decode().rstrip("=")

    def decode(self, token: str, query: Any, *kinds: type) -> list[Any] | None:
        """The cursor of a token, or None for an empty token (first page).

        `kinds` is the cursor's shape, one type per position: `str`, `int`, or `datetime` (an ISO-8601 string,
        returned as the string). A token that is not exactly that shape is refused like a forged one, even when its
        signature is valid: the cursor reaches SQL, and a wrong type there would be an internal error.
        """
        if not token:
            return None
        invalid = InvalidArgument(
            "page_token is invalid: pass back exactly the next_page_token of the previous response",
            field="page_token",
            reason="INVALID_PAGE_TOKEN",
        )
        if len(token) > MAX_TOKEN_CHARS:
            raise invalid
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            sig, body = raw[:16], raw[16:]
            if not hmac.compare_digest(sig, hmac.new(self._key, body, hashlib.sha256).digest()[:16]):
                raise ValueError("signature")
            data = json.loads(body)
        except (ValueError, TypeError, UnicodeDecodeError):
            raise invalid from None
        if not isinstance(data, dict) or not isinstance(data.get("c"), list):
            raise invalid
        if data.get("q") != _fingerprint(query):
            raise InvalidArgument(
                "page_token was issued for a different query: keep parent, filter and order_by unchanged while paging",
                field="page_token",
                reason="PAGE_TOKEN_QUERY_MISMATCH",
            )
        cursor = data["c"]
        if kinds and (len(cursor) != len(kinds) or not all(map(_fits, cursor, kinds))):
            raise invalid
        return list(cursor)


MAX_TOKEN_CHARS = 4096
_INT64 = 2**63


def _fits(value: Any, kind: type) -> bool:
    if kind is int:
        return type(value) is int and -_INT64 <= value < _INT64
    if not isinstance(value, str) or len(value) > 1024 or "\x00" in value:
        return False
    if kind is datetime:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            return False
    return True


def _fingerprint(query: Any) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True, default=str).encode()).hexdigest()[:16]
