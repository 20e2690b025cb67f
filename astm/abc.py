"""The storage interfaces: what a store's storage implements.

A store is built from three parts (see ``docs/design.md``):

* a **committer** (``astm._commit.Committer``) that turns a frozen commit
  request into a ``t`` or a conflict: the local one (memory, SQLite) validates
  under the timeline's lock; the PostgreSQL one validates in the database;
* a :class:`LogStorage` that keeps commits: it receives every local commit's
  record, in ``t`` order, from inside the commit's critical section
  (``submit`` must not block), makes it durable, and says when;
* an :class:`OutboxStorage` that keeps committed outbox entries until they are
  delivered or dead.

``astm.stores.memory`` is the reference implementation of both storage
interfaces; ``astm.stores.sqlite`` and ``astm.stores.postgres`` stand beside it.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["CommitRecord", "LogStorage", "OutboxEntry", "OutboxStorage", "Recovered"]

Key = tuple[int, int]


@dataclass(slots=True)
class CommitRecord:
    """One commit, encoded: what a durable log storage writes."""

    t: int
    time: float
    #: (ref name, kind, text, value): kind "v" with the value encoded, or "d" (a delta)
    #: with ``[base t, helper calls]`` encoded; ``value`` is the new value itself
    changes: list[tuple[str, str, str, Any]]
    #: (seq, effect name, payload encoded, order key encoded or None)
    outbox: list[tuple[int, str, str, str | None]]


@dataclass(slots=True)
class Recovered:
    """What a log storage found on open: a checkpoint of ref values, and the commits after it.

    The store installs the checkpoint and applies the later commits in order
    (``Timeline.apply``), which rebuilds the history they cover.
    """

    checkpoint_t: int = 0
    #: (name, t of its last commit, value): every stored ref as of checkpoint_t
    refs: list[tuple[str, int, Any]] = field(default_factory=list)
    #: (t, time, [(name, change)]) for every commit after checkpoint_t, oldest first; a change is
    #: ("v", value) or ("d", base t, helper calls)
    log: list[tuple[int, float, list[tuple[str, tuple[Any, ...]]]]] = field(default_factory=list)


class LogStorage(Protocol):
    """Where a store's local commits go, in ``t`` order."""

    #: whether this storage wants encoded records (a memory log does not)
    encodes: bool
    #: why the storage stopped writing (then every commit is refused), else None
    failed: BaseException | None

    @property
    def durable_t(self) -> int:
        """The newest t known to be durable."""
        ...

    def recover(self) -> Recovered:
        """Everything stored, read once on open."""
        ...

    def refusal(self) -> Exception:
        """The error a commit gets once the storage has failed (that commit was not applied)."""
        ...

    def submit(self, t: int, record: CommitRecord | None) -> None:
        """Take commit ``t`` (under the timeline's lock, in t order; never blocks); only if ``encodes``."""
        ...

    async def wait_durable(self, t: int) -> None:
        """Return once every commit up to ``t`` is durable.

        Raise ``CommitOutcomeUnknown`` when the write of ``t`` failed (it may
        or may not be found after reopening).
        """
        ...

    def close(self) -> None:
        """Write what is queued, then release the storage (blocking: run it off the event loop)."""
        ...


class OutboxEntry:
    """One committed outbox entry: its key ``(t, seq)``, effect, payload, order key and attempts so far."""

    __slots__ = ("attempts", "due", "effect", "error", "exc", "key", "order_key", "payload")

    def __init__(self, key: Key, effect: str, payload: Any, order_key: Hashable | None, attempts: int = 0) -> None:
        self.key = key
        self.effect = effect
        self.payload = payload
        self.order_key = order_key
        self.attempts = attempts
        #: the last failure, as text (kept with a dead letter)
        self.error: str | None = None
        #: the last failure itself, in the process that saw it
        self.exc: BaseException | None = None
        #: when it may be tried again (monotonic seconds; 0 = now)
        self.due = 0.0

    def __repr__(self) -> str:
        return f"<OutboxEntry {self.effect!r} key={self.key} attempts={self.attempts}>"


class OutboxStorage(Protocol):
    """Where committed outbox entries wait for delivery; one dispatcher drives every implementation.

    ``claim`` hands out entries that are due, at most one in flight per order
    key and never one while an earlier entry of its order key is pending.
    Every claimed entry comes back through exactly one of ``done``, ``retry``
    or ``dead``. One of those that cannot reach its storage raises
    :class:`~astm.StorageError` and must lose nothing: the entry stays claimed
    until its claim ends, then it is delivered again (at least once).
    """

    def committed(self, t: int, entries: list[tuple[str, Any, Hashable | None]]) -> None:
        """Entries of commit ``t`` are durable: make them claimable (memory, SQLite) or announce them."""
        ...

    async def claim(self, limit: int, effects: Collection[str]) -> list[OutboxEntry]:
        """Up to ``limit`` due entries of these effects, marked in flight, ``attempts`` counted."""
        ...

    async def done(self, entry: OutboxEntry) -> None:
        """The entry was delivered: forget it."""
        ...

    async def retry(self, entry: OutboxEntry, error: str, delay: float) -> None:
        """The delivery failed: try again after ``delay`` seconds (its order key stays blocked)."""
        ...

    async def dead(self, entry: OutboxEntry, error: str) -> None:
        """The last attempt failed: keep it as a dead letter (its order key moves on)."""
        ...

    async def requeue(self, key: Key | None) -> int:
        """Make one dead letter (or all of them) pending again; how many."""
        ...

    async def dead_letters(self) -> list[OutboxEntry]:
        """Every dead letter, oldest first."""
        ...

    async def pending(self, effects: Collection[str] | None = None) -> int:
        """Entries committed and neither delivered nor dead (of these effects, or of all)."""
        ...

    def next_due(self) -> float | None:
        """When to look again though nothing was announced (monotonic seconds), or None to wait for ``committed``."""
        ...
