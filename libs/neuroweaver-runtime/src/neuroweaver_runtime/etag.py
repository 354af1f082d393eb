"""Etags for optimistic concurrency (AIP-154), shared by every service: derived from the resource name and its revision counter."""

from __future__ import annotations

import hashlib

from neuroweaver_runtime.errors import Aborted


def etag_for(name: str, revision: int) -> str:
    return hashlib.sha256(f"{name}#{revision}".encode()).hexdigest()[:16]


def check_etag(name: str, revision: int, etag: str) -> None:
    """An empty etag means "unconditional"; a stale one is ABORTED so the caller re-reads and retries."""
    if etag and etag != etag_for(name, revision):
        raise Aborted(
            f"etag {etag!r} is stale: {name} changed since it was read; get it again and retry",
            reason="ETAG_MISMATCH",
            metadata={"resource": name},
        )
