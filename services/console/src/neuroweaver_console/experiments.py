"""Experiment screens: the list and a results page (per metric and variant: mean, CI, lift, p-value, SRM)."""

from __future__ import annotations

from aiohttp import web


def routes(app: web.Application) -> None:
    """Filled in by the screen's handlers."""
