"""The audit screen: the registry's event stream, live and filterable."""

from __future__ import annotations

from aiohttp import web


def routes(app: web.Application) -> None:
    """Filled in by the screen's handlers."""
