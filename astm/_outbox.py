"""The outbox: named effects delivered after commit, at least once, with retries.

Inside a transaction ``effect.enqueue(payload)`` records an entry; the entry
becomes real only if the transaction commits, at its write point ``t``, with
the idempotency key ``(t, seq)``. A dispatcher then calls the effect's handler
``handler(payload, key=(t, seq))``, retrying failures with exponential backoff,
until it succeeds or runs out of attempts and goes to the dead letters (from
where it can be requeued). Entries sharing an ``order_key`` are delivered one
at a time in commit order; a concurrency limit bounds parallel deliveries. The
dispatcher runs only while entries are pending.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from ._backend import Waiter, spawn
from ._errors import NotInTransactionError, StoreClosed
from ._tx import _current

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["DeadLetter", "Effect", "Outbox", "OutboxEntry"]

log = logging.getLogger("astm")

Key = tuple[int, int]
Handler = Callable[..., Awaitable[Any]]


class OutboxEntry:
    """One committed effect awaiting delivery."""

    __slots__ = ("attempts", "error", "key", "name", "order_key", "payload")

    def __init__(self, key: Key, name: str, payload: Any, order_key: Hashable | None) -> None:
        self.key = key
        self.name = name
        self.payload = payload
        self.order_key = order_key
        self.attempts = 0
        self.error: BaseException | None = None

    def __repr__(self) -> str:
        return f"<OutboxEntry {self.name!r} key={self.key} attempts={self.attempts}>"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry whose every attempt failed: what it was, and the last error."""

    key: Key
    effect: str
    payload: Any
    attempts: int
    error: BaseException


class Effect:
    """A named, retried effect; ``enqueue(payload)`` inside a transaction schedules it."""

    __slots__ = ("__wrapped__", "backoff", "handler", "max_attempts", "max_backoff", "name", "outbox")

    def __init__(
        self,
        outbox: Outbox,
        name: str,
        handler: Handler,
        max_attempts: int,
        backoff: float,
        max_backoff: float,
    ) -> None:
        self.outbox = outbox
        self.name = name
        self.handler = handler
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.__wrapped__ = handler

    def enqueue(self, payload: Any, *, order_key: Hashable | None = None) -> None:
        """Deliver ``payload`` to the handler after the current transaction commits.

        Entries with the same ``order_key`` are delivered in commit order, one
        at a time.
        """
        tx = _current.get()
        if tx is None:
            raise NotInTransactionError(f"effect {self.name!r}: enqueue()")
        store = self.outbox.store
        if store._closed:
            raise StoreClosed(f"store of effect {self.name!r}")
        tx.bind_store(store)
        if tx.outbox is None:
            tx.outbox = []
        tx.outbox.append((self.name, payload, order_key))

    async def __call__(self, payload: Any, *, key: Key) -> Any:
        """Call the handler directly (no outbox): handy in tests."""
        return await self.handler(payload, key=key)

    def __repr__(self) -> str:
        return f"<astm.Effect {self.name!r}>"


class Outbox:
    """A store's outbox: its effects, pending entries, dead letters and dispatcher."""

    def __init__(self, store: Store, concurrency: int = 16) -> None:
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"outbox concurrency must be a positive int, got {concurrency!r}")
        self.store = store
        self.concurrency = concurrency
        self._effects: dict[str, Effect] = {}
        self._ready: deque[OutboxEntry] = deque()
        #: order keys with an entry in flight or ready; the deque holds the ones after it
        self._ordered: dict[Hashable, deque[OutboxEntry]] = {}
        self._dead: dict[Key, tuple[OutboxEntry, DeadLetter]] = {}
        self._pending = 0
        self._delivered = 0
        self._workers = 0
        self._idle: list[Waiter] = []
        self._lock = threading.Lock()

    def effect(
        self,
        name: str,
        *,
        max_attempts: int = 5,
        backoff: float = 0.1,
        max_backoff: float = 30.0,
    ) -> Callable[[Handler], Effect]:
        """Register ``async def handler(payload, *, key)`` as the effect called ``name``."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"an effect name must be a non-empty str, got {name!r}")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be a positive int, got {max_attempts!r}")
        if backoff < 0 or max_backoff < 0:
            raise ValueError("backoff and max_backoff must be >= 0 seconds")

        def register(handler: Handler) -> Effect:
            if not inspect.iscoroutinefunction(handler):
                raise TypeError(f"effect {name!r}: the handler must be an `async def handler(payload, *, key)`")
            if name in self._effects:
                raise ValueError(f"an effect called {name!r} is already registered on this store")
            eff = Effect(self, name, handler, max_attempts, backoff, max_backoff)
            self._effects[name] = eff
            return eff

        return register

    # -- called by the engine ----------------------------------------------------

    def add_committed(self, t: int, entries: list[tuple[str, Any, Hashable | None]]) -> None:
        """Take a committed transaction's entries (``t`` is its write point)."""
        with self._lock:
            for seq, (name, payload, order_key) in enumerate(entries):
                self._admit_locked(OutboxEntry((t, seq), name, payload, order_key))
            hire = self._hire_locked()
        self._hire(hire)

    def _admit_locked(self, entry: OutboxEntry) -> None:
        self._pending += 1
        ok = entry.order_key
        if ok is not None:
            waiting = self._ordered.get(ok)
            if waiting is not None:
                waiting.append(entry)
                return
            self._ordered[ok] = deque()
        self._ready.append(entry)

    def recover(self, entries: list[tuple[Key, str, Any, Hashable | None, int, str | None]]) -> None:
        """Take the entries a durable store found on open (dead ones have an error)."""
        with self._lock:
            for key, name, payload, order_key, attempts, error in entries:
                entry = OutboxEntry(key, name, payload, order_key)
                entry.attempts = attempts
                if error is not None:
                    entry.error = RuntimeError(error)
                    self._dead[key] = (entry, DeadLetter(key, name, payload, attempts, entry.error))
                else:
                    self._admit_locked(entry)

    def resume(self) -> None:
        """Start delivering recovered entries (needs a running event loop)."""
        with self._lock:
            hire = self._hire_locked()
        self._hire(hire)

    # -- the dispatcher ------------------------------------------------------------

    def _hire_locked(self) -> int:
        """How many more workers the ready entries need (call under the lock)."""
        n = min(self.concurrency - self._workers, len(self._ready))
        self._workers += n
        return n

    def _hire(self, n: int) -> None:
        for _ in range(n):
            spawn(self._work)

    async def _work(self) -> None:
        """One of at most ``concurrency`` workers: deliver ready entries until there are none."""
        while True:
            with self._lock:
                if not self._ready:
                    self._workers -= 1
                    return
                entry = self._ready.popleft()
            try:
                await self._deliver(entry)
            except BaseException:
                with self._lock:
                    self._workers -= 1
                raise

    async def _deliver(self, entry: OutboxEntry) -> None:
        try:
            eff = self._effects.get(entry.name)
            while True:
                if eff is None:
                    entry.error = LookupError(f"no effect called {entry.name!r} is registered on this store")
                    self._to_dead(entry, entry.attempts)
                    return
                entry.attempts += 1
                try:
                    await eff.handler(entry.payload, key=entry.key)
                except Exception as exc:
                    entry.error = exc
                    if entry.attempts >= eff.max_attempts:
                        log.error("effect %r gave up on %s after %d attempts", entry.name, entry.key, entry.attempts)
                        self._to_dead(entry, entry.attempts)
                        return
                    delay = min(eff.max_backoff, eff.backoff * (2 ** (entry.attempts - 1)))
                    await anyio.sleep(delay * random.uniform(0.5, 1.0))
                else:
                    with self._lock:
                        self._delivered += 1
                    backend = self.store._backend
                    if backend is not None:
                        backend.outbox_done(entry.key)
                    return
        finally:
            self._finished(entry)

    def _to_dead(self, entry: OutboxEntry, attempts: int) -> None:
        assert entry.error is not None
        backend = self.store._backend
        if backend is not None:
            backend.outbox_dead(entry.key, attempts, repr(entry.error))
        with self._lock:
            self._dead[entry.key] = (
                entry,
                DeadLetter(entry.key, entry.name, entry.payload, attempts, entry.error),
            )

    def _finished(self, entry: OutboxEntry) -> None:
        """Release the entry's order key to the next entry, and wake drainers when idle."""
        wake: list[Waiter] = []
        with self._lock:
            self._pending -= 1
            ok = entry.order_key
            if ok is not None:
                waiting = self._ordered[ok]
                if waiting:
                    self._ready.append(waiting.popleft())
                else:
                    del self._ordered[ok]
            if self._pending == 0:
                wake, self._idle = self._idle, []
        for w in wake:
            w.fire()

    # -- public ------------------------------------------------------------------

    def dead(self) -> list[DeadLetter]:
        """The entries that failed every attempt, oldest first."""
        with self._lock:
            return [d for _, d in sorted(self._dead.values(), key=lambda ed: ed[0].key)]

    def requeue(self, key: Key | None = None) -> int:
        """Put one dead letter (by key) or all of them back for delivery; returns how many."""
        with self._lock:
            keys = sorted(self._dead) if key is None else [key]
            if key is not None and key not in self._dead:
                raise KeyError(f"no dead letter with key {key!r}")
            backend = self.store._backend
            for k in keys:
                entry, _ = self._dead.pop(k)
                entry.attempts = 0
                entry.error = None
                self._admit_locked(entry)
                if backend is not None:
                    backend.outbox_requeued(k)
            hire = self._hire_locked()
        self._hire(hire)
        return len(keys)

    @property
    def pending(self) -> int:
        """Entries committed but not yet delivered or dead-lettered."""
        return self._pending

    @property
    def delivered(self) -> int:
        """Entries delivered since the store opened."""
        return self._delivered

    async def dead_letters(self) -> list[DeadLetter]:
        """``dead()`` for every store, the PostgreSQL store included (where entries live in the database)."""
        remote = self.store._remote
        if remote is None:
            return self.dead()
        return [DeadLetter(k, e, p, a, RuntimeError(err)) for k, e, p, a, err in await remote.dead()]

    async def requeue_letters(self, key: Key | None = None) -> int:
        """``requeue()`` for every store, the PostgreSQL store included."""
        remote = self.store._remote
        if remote is None:
            return self.requeue(key)
        return await remote.requeue(key)

    async def drain(self) -> None:
        """Wait until no entry is pending (delivered or dead-lettered).

        On the PostgreSQL store: until no entry of any peer is pending.
        """
        if self.store._remote is not None:
            await self.store._remote.drain()
            return
        with self._lock:
            if self._pending == 0:
                return
            w = Waiter()
            self._idle.append(w)
        await w.wait()
