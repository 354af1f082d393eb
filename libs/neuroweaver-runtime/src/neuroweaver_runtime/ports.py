"""Ports for processes a service starts itself (local model-server replicas, routers)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel reports free on `host` now; the caller's child must bind it soon (nothing reserves it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
