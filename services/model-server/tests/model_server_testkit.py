"""Test helpers of the model server's tests: serving an aiohttp app, waiting on a condition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def start_http_app(app) -> tuple[object, int]:
    """Serves an aiohttp app on a free port of 127.0.0.1; returns its runner (clean it up) and the port."""
    from aiohttp import web

    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


async def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Polls a cheap in-process condition (never a fixed sleep): fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
