"""Deployment screens: the deployments list and a deployment's page (state, replicas, revisions, live performance)."""

from __future__ import annotations

from aiohttp import web


def routes(app: web.Application) -> None:
    """Filled in by the screen's handlers."""
