"""An in-process cache of resolved model versions (GetModelVersion), invalidated by the registry's own events.

Correctness argument (why a cached value is never older than the last invalidation):

* Every registry write appends an event in its transaction. On commit the writing process wakes its Notifier
  for the project, and on PostgreSQL the event's `pg_notify` reaches every replica's LISTEN connection, which
  wakes that replica's Notifier. Waking a project drops all of its cached entries (`invalidate`), so any write to
  a model (version state, labels, metrics, alias moves, new versions moving `latest`, deletes) clears it.
* A reader that misses notes the project's generation before reading the database and stores its result only if
  no invalidation happened in between: a read that may have seen pre-commit data is never cached after the
  commit's invalidation.
* Entries are only used while the invalidation channel is known to be live (`enabled()`: the LISTEN connection is
  open); when it is not, the cache is emptied and bypassed, and the listener wakes everything on reconnect.
  A TTL bounds staleness if a connection dies silently (no FIN/RST) and notifications are lost unnoticed.

Bound: a write committed on replica B is visible to reads on replica A once A has processed the NOTIFY
(≈ 0.2 ms p50 on one host, DESIGN §7) — reads on the writing replica see it as soon as the write returns. With
SQLite (no cross-process notifications) the cache is off.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from neuroweaver_runtime.notify import Notifier

from ..domain.model import ModelVersion


class VersionCache:
    def __init__(self, max_entries: int = 10_000, ttl_seconds: float = 5.0, enabled: Callable[[], bool] = lambda: True) -> None:
        self.max_entries = max_entries
        self.ttl = ttl_seconds
        self.enabled = enabled
        self._entries: dict[str, tuple[float, str, ModelVersion]] = {}  # name → (expires, project, version)
        self._names: dict[str, set[str]] = {}  # project → cached names
        self._generation: dict[str, int] = {}  # project → invalidations so far
        self._epoch = 0  # invalidations of everything so far
        self.hits = self.misses = 0

    def get(self, name: str) -> ModelVersion | None:
        entry = self._entries.get(name)
        if entry is None:
            self.misses += 1
            return None
        if entry[0] < time.monotonic() or not self.enabled():
            self._drop(name)
            self.misses += 1
            return None
        self.hits += 1
        return entry[2]

    def token(self, project: str) -> tuple[int, int] | None:
        """Taken before a read; `put` stores only if nothing was invalidated since. None: do not fill now."""
        if self.max_entries <= 0:
            return None
        if not self.enabled():
            self._clear()
            return None
        return self._epoch, self._generation.get(project, 0)

    def put(self, name: str, project: str, token: tuple[int, int] | None, value: ModelVersion) -> None:
        if token is None or token != (self._epoch, self._generation.get(project, 0)) or not self.enabled():
            return  # invalidated while we read: the value may predate the write
        if name not in self._entries and len(self._entries) >= self.max_entries:
            self._drop(next(iter(self._entries)))  # oldest insertion first
        self._entries[name] = (time.monotonic() + self.ttl, project, value)
        self._names.setdefault(project, set()).add(name)

    def invalidate(self, project: str) -> None:
        """Drops the project's entries; `*` drops everything (e.g. the listener reconnected)."""
        if project == "*":
            self._epoch += 1
            self._clear()
            return
        self._generation[project] = self._generation.get(project, 0) + 1
        for name in self._names.pop(project, ()):
            self._entries.pop(name, None)

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            names = self._names.get(entry[1])
            if names is not None:
                names.discard(name)

    def _clear(self) -> None:
        self._entries.clear()
        self._names.clear()


class InvalidatingNotifier(Notifier):
    """The registry's Notifier: every wake-up (local commit or a replica's NOTIFY) also invalidates the cache."""

    def __init__(self, cache: VersionCache) -> None:
        super().__init__()
        self.cache = cache

    def wake(self, key: str) -> None:
        self.cache.invalidate(key)
        super().wake(key)
