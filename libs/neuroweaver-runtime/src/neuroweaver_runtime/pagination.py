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
from typing import Any

from .errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


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

    def decode(self, token: str, query: Any) -> list[Any] | None:
        """The cursor of a token, or None for an empty token (first page)."""
        if not token:
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            sig, body = raw[:16], raw[16:]
            if not hmac.compare_digest(sig, hmac.new(self._key, body, hashlib.sha256).digest()[:16]):
                raise ValueError("signature")
            data = json.loads(body)
        except (ValueError, TypeError, json.JSONDecodeError):
            raise InvalidArgument(
                "page_token is invalid: pass back exactly the next_page_token of the previous response",
                field="page_token",
                reason="INVALID_PAGE_TOKEN",
            ) from None
        if data.get("q") != _fingerprint(query):
            raise InvalidArgument(
                "page_token was issued for a different query: keep parent, filter and order_by unchanged while paging",
                field="page_token",
                reason="PAGE_TOKEN_QUERY_MISMATCH",
            )
        return list(data["c"])


def _fingerprint(query: Any) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True, default=str).encode()).hexdigest()[:16]
