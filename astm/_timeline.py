"""The timeline: basis ``t``, the in-memory commit log, history retention, pins and waits.

One :class:`Timeline` per store. Every new version enters through
:meth:`Timeline.apply`, whoever produced it: a local commit, recovery
replaying a durable log on open, or a PostgreSQL peer following the shared
log. Reads of the past (``as_of``, db values, a ``peek`` whose snapshot moved
on, ``reports(since=...)``) go through :meth:`Timeline.version_at` and
:meth:`Timeline.entry`.

The log keeps every superseded value for the history window: entry ``t`` is
``(t, wall time, [(ref, old, new), ...])``. It is trimmed in batches, past both
retention (``history`` commits, ``history_seconds``) and the oldest pinned
``t`` (db values and commit reports pin what they read). A ref whose readers
*faulted* (needed a version nobody kept) also keeps a small ring of its own
old versions, grown on each fault and halved while nobody faults.

Every method that changes state is called with :attr:`Timeline.lock` held,
except where its docstring says it takes the lock.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from heapq import heappop, heappush
from typing import TYPE_CHECKING, Any, Final

from ._backend import Waiter
from ._markers import COLD, DELETED, Tombstone
from ._values import LARGE_TYPES, UNTRACK_AT, untrack_large

if TYPE_CHECKING:
    from ._ref import Ref

__all__ = ["LogEntry", "Timeline"]

#: a log entry: (t, wall-clock time, [(ref, old, new), ...])
LogEntry = tuple[int, float, list[tuple["Ref[Any]", Any, Any]]]

#: A ref that faulted keeps at most this many old versions of its own.
MAX_KEEP: Final = 64
_SWEEP_EVERY: Final = 1024


class Timeline:
    """The versions of a store's refs over time (see the module docstring)."""

    __slots__ = (
        "_last_sweep",
        "_pin_heap",
        "_pins",
        "_time_floor",
        "_trim_len",
        "_versioned",
        "deleted",
        "history",
        "history_seconds",
        "lock",
        "log",
        "oldest",
        "t",
        "tick",
        "unpins",
    )

    def __init__(self, history: int, history_seconds: float | None) -> None:
        #: guards every version, the log and the pins; commits hold it for their critical section
        self.lock = threading.Lock()
        #: the basis: the newest commit applied
        self.t = 0
        self.log: deque[LogEntry] = deque()
        #: the oldest t whose values are still readable
        self.oldest = 0
        self.history = history
        self.history_seconds = history_seconds
        self._time_floor: float = 0 if history_seconds is not None else math.inf
        self._pins: dict[int, int] = {}
        self._pin_heap: list[int] = []
        #: pins released by db values being dropped (appended without the lock, drained at trim)
        self.unpins: deque[int] = deque()
        self._trim_len = history + max(1, history // 8)
        self._versioned: set[Ref[Any]] = set()
        self._last_sweep = (0, time.time())
        #: woken by every commit: sync(t), reports(), closing
        self.tick: list[Waiter] = []
        #: told of every ref a commit deletes (the store forgets its name)
        self.deleted: Callable[[Ref[Any]], None] = lambda r: None

    # -- new versions ------------------------------------------------------------

    def apply(
        self, t: int, when: float, writes: Iterable[tuple[Ref[Any], Any]]
    ) -> tuple[list[tuple[Ref[Any], Any, Any]], list[Waiter] | None, bool]:
        """Install every write as the version at ``t`` (the next t); returns (changes, to wake, any watched).

        The caller fires the waiters and runs the watches after releasing the
        lock. Nothing here can fail, so a commit that got this far is whole.
        """
        changes: list[tuple[Ref[Any], Any, Any]] = []
        wake: list[Waiter] | None = None
        watched = False
        for r, v in writes:
            old = r._cur
            if r._keep:
                self._keep_version(r, old)
            if v is DELETED:
                r._cur = (COLD, Tombstone(t))  # every later read takes the slow path and finds it gone
                self.deleted(r)
            else:
                r._cur = (t, v)
                if type(v) in LARGE_TYPES and len(v) >= UNTRACK_AT:
                    untrack_large(v)
            changes.append((r, old[1], v))
            if r._watches:
                watched = True
            if r._waiters:
                if wake is None:
                    wake = []
                wake.extend(r._waiters)
                r._waiters = None
        self.t = t
        log = self.log
        log.append((t, when, changes))
        if len(log) >= self._trim_len:
            self.trim(t)
        if self.tick:
            if wake is None:
                wake = []
            wake.extend(self.tick)
            self.tick = []
        return changes, wake, watched

    def restore(self, t: int, history: Iterable[LogEntry]) -> None:
        """On open: the basis is ``t`` and ``history`` (entries up to ``t``, oldest first) is the past."""
        self.t = t
        self.log.extend(history)
        self.oldest = self.log[0][0] - 1 if self.log else t
        self._trim_len = len(self.log) + max(1, self.history // 8)

    def rebase(self, t: int) -> None:
        """Jump to basis ``t`` with no history (a peer that fell behind the shared log); waiters look again."""
        self.log.clear()
        self.t = t
        self.oldest = t
        self._trim_len = max(1, self.history // 8)
        tick, self.tick = self.tick, []
        for w in tick:
            w.fire()

    def _keep_version(self, ref: Ref[Any], old: tuple[int, Any]) -> None:
        h = ref._hist
        if h is None:
            h = ref._hist = deque()
            self._versioned.add(ref)
        h.append(old)
        while len(h) > ref._keep:
            h.popleft()

    @staticmethod
    def faulted(ref: Ref[Any]) -> None:
        """A reader needed an old version of ``ref`` that was gone: keep more of its versions."""
        ref._keep = min(max(1, ref._keep * 2), MAX_KEEP)

    # -- reading the past ------------------------------------------------------------

    def version_at(self, ref: Ref[Any], t: int) -> tuple[int, Any] | None:
        """The version of ``ref`` visible at ``t``, or None when no longer kept (takes the lock).

        The newest version, then the ref's own ring, then the log, which holds
        every superseded value of its window.
        """
        cur = ref._cur
        if cur[0] <= t:
            return cur
        with self.lock:
            h = ref._hist
            if h is not None:
                for v in reversed(h):
                    if v[0] <= t:
                        return (v[0], v[1])
            log = self.log
            if not log:
                return None
            first = log[0][0]
            if t + 1 < first:
                return None
            for i in range(t + 1 - first, len(log)):
                for r, old, _new in log[i][2]:
                    if r is ref:
                        # the first change after t replaced the value visible at t
                        return (t, old)
        return None

    def entry(self, t: int) -> LogEntry | None:
        """Log entry ``t``, or None when it is older than the retained log (call under the lock)."""
        log = self.log
        first = log[0][0] if log else self.t + 1
        if t < first or t > self.t:
            return None
        return log[t - first]

    def first_retained(self) -> int:
        """The oldest t whose log entry is kept (``t + 1`` when the log is empty; under the lock)."""
        return self.log[0][0] if self.log else self.t + 1

    # -- pins --------------------------------------------------------------------------

    def pin(self, t: int) -> None:
        """Keep the versions db values at ``t`` need (call under the lock; released through ``unpins``)."""
        pins = self._pins
        c = pins.get(t)
        if c:
            pins[t] = c + 1
        else:
            pins[t] = 1
            heappush(self._pin_heap, t)

    def _oldest_pin(self) -> int | None:
        heap, pins = self._pin_heap, self._pins
        while heap and heap[0] not in pins:
            heappop(heap)
        return heap[0] if heap else None

    def trim(self, t: int) -> None:
        """Drop log entries neither retention nor a pin needs (under the lock; never raises).

        Commits call this once the log reaches a length, so the bookkeeping is
        paid once per batch of commits rather than on each.
        """
        log = self.log
        now = log[-1][1] if log else time.time()
        if t - self._last_sweep[0] >= _SWEEP_EVERY or (
            self.history_seconds is not None and now - self._last_sweep[1] >= 1.0
        ):
            self._sweep(t, now)
        floor = t - self.history
        if self._time_floor < floor:
            floor = int(self._time_floor)
        if self.unpins:
            pins, unpins = self._pins, self.unpins
            while unpins:
                p = unpins.popleft()
                c = pins[p] - 1
                if c:
                    pins[p] = c
                else:
                    del pins[p]
        oldest_pin = self._oldest_pin()
        if oldest_pin is not None and oldest_pin < floor:
            floor = oldest_pin
        # entry t holds the values visible at t - 1: as_of(floor) needs the entries after floor
        while log and log[0][0] <= floor:
            log.popleft()
        if floor > self.oldest:
            self.oldest = floor
        self._trim_len = len(log) + max(1, self.history // 8)

    def _sweep(self, t: int, now: float) -> None:
        """Move the time-retention floor; shrink the history rings nobody faulted on."""
        self._last_sweep = (t, now)
        if self.history_seconds is not None:
            cutoff = now - self.history_seconds
            self._time_floor = float(next((e[0] - 1 for e in self.log if e[1] >= cutoff), t))
        done = [r for r in self._versioned if _decay(r)]
        self._versioned.difference_update(done)

    def pinned_count(self) -> int:
        """How many pins are held (under the lock); for tests of leaks."""
        while self.unpins:
            p = self.unpins.popleft()
            c = self._pins[p] - 1
            if c:
                self._pins[p] = c
            else:
                del self._pins[p]
        return sum(self._pins.values())

    # -- waiting for commits -------------------------------------------------------------

    async def wait_for_commit(self, seen: int) -> None:
        """Return once the basis has moved past ``seen`` or the timeline is woken (takes the lock).

        A waiter left behind by a cancelled or timed-out wait is removed, so no
        later commit fires it.
        """
        w = Waiter()
        with self.lock:
            if self.t > seen:
                return
            self.tick.append(w)
        try:
            await w.wait()
        finally:
            if not w.fired:
                with self.lock, contextlib.suppress(ValueError):  # ValueError: a commit took it just now
                    self.tick.remove(w)

    def wake_all(self) -> None:
        """Wake every waiter (closing): they look again and find the store closed (takes the lock)."""
        with self.lock:
            tick, self.tick = self.tick, []
        for w in tick:
            w.fire()

    async def sleep_until_changed(self, refs: Iterable[Ref[Any]], rp: int) -> bool:
        """After ``astm.retry()``: wait until one of ``refs`` has a version after ``rp`` (takes the lock).

        Returns False at once when one already has.
        """
        watched = list(refs)
        w = Waiter()
        with self.lock:
            if any(r._cur[0] > rp for r in watched):
                return False
            for r in watched:
                ws = r._waiters
                if ws is None:
                    r._waiters = {w}
                else:
                    ws.add(w)
        try:
            await w.wait()
        finally:
            with self.lock:
                for r in watched:
                    ws = r._waiters
                    if ws is not None:
                        ws.discard(w)
        return True


def _decay(ref: Ref[Any]) -> bool:
    """Halve a ref's kept history (no reader faulted on it lately); True when none is left."""
    ref._keep //= 2
    h = ref._hist
    if h is not None:
        while len(h) > ref._keep:
            h.popleft()
        if h:
            return False
        ref._hist = None
    return ref._keep == 0
