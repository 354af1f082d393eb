"""The playground: chat with a deployment (or two side by side), streamed token by token."""

from __future__ import annotations

from aiohttp import web


def routes(app: web.Application) -> None:
    """Filled in by the screen's handlers."""
