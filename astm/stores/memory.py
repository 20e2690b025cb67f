"""The in-memory store's storage: the reference implementation of both storage interfaces.

:class:`MemoryLog` keeps nothing beyond the timeline itself: a commit is
"durable" the moment it is applied. :class:`MemoryOutbox` keeps committed
entries in this process until they are delivered; the SQLite store's outbox is
this class with every change also written to its file.
"""

from __future__ import annotations

import heapq
import sys
import threading
import time
from collections import deque
from collections.abc import Collection, Hashable
from typing import Any

from ..abc import CommitRecord, Key, OutboxEntry, Recovered

__all__ = ["MemoryLog", "MemoryOutbox"]


class MemoryLog:
    """A log storage that keeps nothing: what is applied is as durable as it will get.

    It wants no records (``encodes`` is False), so commits do not even hand
    them over, and every ``t`` counts as durable.
    """

    encodes = False
    #: every commit is as durable as memory gets
    durable_t = sys.maxsize

    def __init__(self) -> None:
        self.failed: BaseException | None = None

    def recover(self) -> Recovered:
        return Recovered()

    def refusal(self) -> Exception:  # pragma: no cover - a memory log never fails
        raise AssertionError("a memory log does not fail")

    def submit(self, t: int, record: CommitRecord | None) -> None:
        return None

    async def wait_durable(self, t: int) -> None:
        return None

    def close(self) -> None:
        return None


class MemoryOutbox:
    """Committed outbox entries kept in memory, with order keys, retries and dead letters.

    Thread-safe: commits from several threads (each with its own event loop)
    hand entries over concurrently.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: due now, order key free
        self._ready: deque[OutboxEntry] = deque()
        #: order keys owned by an entry in flight, delayed or ready; the deque holds the ones after it
        self._ordered: dict[Hashable, deque[OutboxEntry]] = {}
        #: waiting out a retry delay: (due, key, entry)
        self._delayed: list[tuple[float, Key, OutboxEntry]] = []
        self._dead: dict[Key, OutboxEntry] = {}
        self._pending = 0
        #: pending entries by effect (what drain() asks about, without walking them)
        self._by_effect: dict[str, int] = {}

    # -- the interface -------------------------------------------------------------

    def committed(self, t: int, entries: list[tuple[str, Any, Hashable | None]]) -> None:
        with self._lock:
            for seq, (name, payload, order_key) in enumerate(entries):
                self._admit(OutboxEntry((t, seq), name, payload, order_key))

    def _admit(self, entry: OutboxEntry) -> None:
        """A new pending entry (under the lock): ready now, or behind its order key."""
        self._pending += 1
        self._by_effect[entry.effect] = self._by_effect.get(entry.effect, 0) + 1
        ok = entry.order_key
        if ok is not None:
            waiting = self._ordered.get(ok)
            if waiting is not None:
                waiting.append(entry)
                return
            self._ordered[ok] = deque()
        self._ready.append(entry)

    async def claim(self, limit: int, effects: Collection[str]) -> list[OutboxEntry]:
        return self.claim_now(limit, effects)

    def claim_now(self, limit: int, effects: Collection[str]) -> list[OutboxEntry]:
        """``claim`` without awaiting (the store's own dispatcher uses this)."""
        now = time.monotonic()
        out: list[OutboxEntry] = []
        with self._lock:
            delayed = self._delayed
            while delayed and delayed[0][0] <= now:
                self._ready.append(heapq.heappop(delayed)[2])
            ready = self._ready
            skipped: list[OutboxEntry] = []
            while ready and len(out) < limit:
                entry = ready.popleft()
                if entry.effect in effects:
                    entry.attempts += 1
                    out.append(entry)
                else:
                    skipped.append(entry)  # no handler here (yet): it stays pending
            ready.extendleft(reversed(skipped))
        return out

    async def done(self, entry: OutboxEntry) -> None:
        self.finish(entry, None)

    async def retry(self, entry: OutboxEntry, error: str, delay: float) -> None:
        entry.error = error
        entry.due = time.monotonic() + delay
        with self._lock:
            heapq.heappush(self._delayed, (entry.due, entry.key, entry))

    async def dead(self, entry: OutboxEntry, error: str) -> None:
        self.finish(entry, error)

    def finish(self, entry: OutboxEntry, error: str | None) -> None:
        """The entry leaves the pending set: delivered (``error`` None) or dead; its order key moves on."""
        with self._lock:
            self._pending -= 1
            left = self._by_effect[entry.effect] - 1
            if left:
                self._by_effect[entry.effect] = left
            else:
                del self._by_effect[entry.effect]
            if error is not None:
                entry.error = error
                self._dead[entry.key] = entry
            ok = entry.order_key
            if ok is not None:
                waiting = self._ordered[ok]
                if waiting:
                    self._ready.append(waiting.popleft())
                else:
                    del self._ordered[ok]

    async def requeue(self, key: Key | None) -> int:
        return len(self.requeue_now(key))

    def requeue_now(self, key: Key | None) -> list[Key]:
        """``requeue`` without awaiting; returns the keys requeued (KeyError for an unknown key)."""
        with self._lock:
            if key is not None and key not in self._dead:
                raise KeyError(f"no dead letter with key {key!r}")
            keys = sorted(self._dead) if key is None else [key]
            for k in keys:
                entry = self._dead.pop(k)
                entry.attempts = 0
                entry.error = None
                entry.due = 0.0
                self._admit(entry)
        return keys

    async def dead_letters(self) -> list[OutboxEntry]:
        return self.dead_now()

    def dead_now(self) -> list[OutboxEntry]:
        with self._lock:
            return [self._dead[k] for k in sorted(self._dead)]

    async def pending(self, effects: Collection[str] | None = None) -> int:
        if effects is None:
            return self._pending
        by_effect = self._by_effect
        return sum(by_effect.get(e, 0) for e in effects)

    def pending_now(self) -> int:
        return self._pending

    def next_due(self) -> float | None:
        with self._lock:
            return self._delayed[0][0] if self._delayed else None

    def recovered(self, entry: OutboxEntry, dead: bool) -> None:
        """An entry found on open (the SQLite store): pending again, or a dead letter."""
        with self._lock:
            if dead:
                self._dead[entry.key] = entry
            else:
                self._admit(entry)
