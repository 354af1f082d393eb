"""Wake-ups for live streams: "something new was committed on channel X".

Watchers read durable rows from the database (the source of truth) and wait on a `Notifier` between
reads. In-process commits wake them directly; with PostgreSQL, commits also `NOTIFY` and every replica
LISTENs, so a watcher on any replica sees rows written by another. Payloads are tiny (a channel key);
the data itself is always read from the table. A periodic timeout bounds the delay if a notification
is ever lost (e.g. while the LISTEN connection reconnects).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)

    def wake(self, key: str) -> None:
        for event in list(self._waiters.get(key, ())):
            event.set()
        for event in list(self._waiters.get("*", ())):
            event.set()

    async def wait(self, key: str, timeout: float) -> None:
        """Returns when `key` (or anything, for `*`) is woken, or after `timeout` seconds."""
        event = asyncio.Event()
        self._waiters[key].add(event)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that races the wake-up.
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            pass
        finally:
            self._waiters[key].discard(event)
            if not self._waiters[key]:
                del self._waiters[key]

    def subscribe(self, key: str) -> Subscription:
        """An event that stays registered between reads, so a wake-up during a read is not lost."""
        return Subscription(self, key)


class Subscription:
    def __init__(self, notifier: Notifier, key: str) -> None:
        self._notifier = notifier
        self._key = key
        self.event = asyncio.Event()
        notifier._waiters[key].add(self.event)

    async def wait(self, timeout: float | None) -> None:
        """Returns when woken (a wake-up since the last wait counts), or after `timeout` seconds (None: never)."""
        try:
            async with asyncio.timeout(timeout):
                await self.event.wait()
        except TimeoutError:
            pass
        self.event.clear()

    def close(self) -> None:
        waiters = self._notifier._waiters.get(self._key)
        if waiters is not None:
            waiters.discard(self.event)
            if not waiters:
                del self._notifier._waiters[self._key]


class PostgresListener:
    """LISTENs on a PostgreSQL channel and forwards payloads (channel keys) to a Notifier."""

    def __init__(self, dsn: str, channel: str, notifier: Notifier) -> None:
        self._dsn = dsn.replace("postgresql+asyncpg://", "postgresql://")
        self._channel = channel
        self._notifier = notifier
        self._task: asyncio.Task | None = None
        self._connected = asyncio.Event()
        self._conn = None

    @property
    def listening(self) -> bool:
        """True while the LISTEN connection is open (notifications are being received)."""
        return self._conn is not None and not self._conn.is_closed()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._connected.wait(), 30)

    async def _run(self) -> None:
        import asyncpg

        delay = 0.2
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self._dsn)
                await conn.add_listener(self._channel, lambda *args: self._notifier.wake(args[3]))
                self._conn = conn
                self._connected.set()
                self._notifier.wake("*")  # anything missed while disconnected is re-read from tables
                delay = 0.2
                while not conn.is_closed():
                    await asyncio.sleep(1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect forever; watchers fall back to polling meanwhile
                log.warning("LISTEN %s failed: %s; reconnecting", self._channel, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                self._conn = None
                if conn is not None and not conn.is_closed():
                    conn.terminate()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
