"""The storage interface a durable backend implements.

The in-memory store is the reference implementation: a :class:`astm.Store`
with no backend. A durable backend receives every commit, in ``t`` order, from
inside the commit's critical section (``submit`` must not block), makes it
durable in the background, and says when (``wait_durable``). On open it hands
back everything it recovered.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["CommitRecord", "Recovered", "Storage"]


@dataclass(slots=True)
class CommitRecord:
    """One commit, encoded: what a backend writes."""

    t: int
    time: float
    #: (ref name, old value encoded, new value encoded)
    changes: list[tuple[str, str, str]]
    #: (seq, effect name, payload encoded, order key encoded or None)
    outbox: list[tuple[int, str, str, str | None]]
    #: the oldest t whose log entry retention still needs (older rows may go)
    floor: int


@dataclass(slots=True)
class Recovered:
    """What a backend found on open."""

    t: int = 0
    #: (name, t of its last commit, value, value encoded)
    refs: list[tuple[str, int, Any, str]] = field(default_factory=list)
    #: (t, time, [(name, old, new)])
    log: list[tuple[int, float, list[tuple[str, Any, Any]]]] = field(default_factory=list)
    #: (key, effect, payload, order key, attempts, error text or None); dead when error is set
    outbox: list[tuple[tuple[int, int], str, Any, Hashable | None, int, str | None]] = field(default_factory=list)


class Storage(Protocol):
    """A durable backend of a store."""

    #: the newest t known to be durable
    durable_t: int
    #: why the backend stopped writing (then every commit is refused), else None
    failed: BaseException | None

    def refusal(self) -> Exception:
        """The error a commit gets once the backend has failed."""
        ...

    def recover(self) -> Recovered:
        """Everything stored, read once on open."""
        ...

    def submit(self, record: CommitRecord) -> None:
        """Queue one commit for writing (called under the store lock, in t order; never blocks)."""
        ...

    async def wait_durable(self, t: int) -> None:
        """Return once every commit up to ``t`` is durable; raise ``StorageError`` if it cannot be."""
        ...

    def outbox_done(self, key: tuple[int, int]) -> None:
        """Forget a delivered outbox entry."""
        ...

    def outbox_dead(self, key: tuple[int, int], attempts: int, error: str) -> None:
        """Mark an outbox entry dead after its last failed attempt."""
        ...

    def outbox_requeued(self, key: tuple[int, int]) -> None:
        """Mark a dead outbox entry pending again."""
        ...

    def close(self) -> None:
        """Write what is queued, then release the file."""
        ...
