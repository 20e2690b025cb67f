"""The outbox: named effects delivered after commit, at least once, with retries.

Inside a transaction ``effect.enqueue(payload)`` records an entry; the entry
becomes real only if the transaction commits, at its write point ``t``, with
the idempotency key ``(t, seq)``, and only once the commit is durable. One
dispatcher, the same on every store, then calls the effect's handler
``handler(payload, key=(t, seq))``: a failure is retried after an exponential
backoff with jitter, until the handler succeeds or the entry runs out of
attempts and becomes a dead letter (from where it can be requeued). Entries
sharing an ``order_key`` are delivered one at a time in commit order; a
concurrency limit bounds parallel deliveries.

Where entries wait is the store's :class:`~astm.abc.OutboxStorage` (memory, the
SQLite file, or PostgreSQL, where any peer may deliver). The dispatcher runs
only while there is something to deliver, or to poll for on a shared store.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from ._backend import Waiter, spawn
from ._errors import StorageError, StoreClosed
from ._tx import current_for
from ._values import check_value
from .abc import Key, OutboxEntry, OutboxStorage

__all__ = ["DeadLetter", "Effect", "Outbox", "backoff_delay"]

log = logging.getLogger("astm")

Handler = Callable[..., Awaitable[Any]]
#: how often drain() looks again when nothing tells it (another peer may deliver)
_DRAIN_POLL = 0.05


class _Host(Protocol):
    """What the outbox needs of its store."""

    _closed: bool


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry whose every attempt failed: what it was, and the last error."""

    key: Key
    effect: str
    payload: Any
    attempts: int
    #: the last error: the exception itself in the process that saw it, else a RuntimeError with its text
    error: BaseException


def backoff_delay(backoff: float, max_backoff: float, attempts: int) -> float:
    """Seconds before attempt ``attempts + 1``: exponential from ``backoff``, capped, with jitter (0.5 to 1 times)."""
    return float(min(max_backoff, backoff * (2.0 ** (attempts - 1))) * random.uniform(0.5, 1.0))


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
        at a time. ``payload`` and ``order_key`` must be values a ref could
        hold (they are stored with the commit).
        """
        tx = current_for(f"effect {self.name!r}: enqueue()")
        host = self.outbox._host
        if host._closed:
            raise StoreClosed(f"store of effect {self.name!r}")
        check_value(payload, self.name, "outbox entry of effect")
        if order_key is not None:
            check_value(order_key, self.name, "order key of effect")
        tx.bind_store(host)  # type: ignore[arg-type]
        if tx.outbox is None:
            tx.outbox = []
        tx.outbox.append((self.name, payload, order_key))

    async def __call__(self, payload: Any, *, key: Key) -> Any:
        """Call the handler directly (no outbox): handy in tests."""
        return await self.handler(payload, key=key)

    def __repr__(self) -> str:
        return f"<astm.Effect {self.name!r}>"


class Outbox:
    """A store's outbox: its effects and the one dispatcher that delivers their entries."""

    def __init__(self, host: _Host, storage: OutboxStorage, concurrency: int = 16) -> None:
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"outbox concurrency must be a positive int, got {concurrency!r}")
        self._host = host
        self._storage = storage
        self.concurrency = concurrency
        self._effects: dict[str, Effect] = {}
        self._lock = threading.Lock()
        self._delivered = 0
        self._inflight = 0
        #: the dispatcher is running (or starting)
        self._running = False
        #: something changed since the dispatcher last looked
        self._kicked = False
        self._sleeper: Waiter | None = None
        self._finished: list[Waiter] = []
        self._stopping = False
        #: the cancel scopes of deliveries in flight (closing cancels them)
        self._scopes: set[anyio.CancelScope] = set()

    def effect(
        self,
        name: str,
        *,
        max_attempts: int = 5,
        backoff: float = 0.1,
        max_backoff: float = 30.0,
    ) -> Callable[[Handler], Effect]:
        """Register ``async def handler(payload, *, key)`` as the effect called ``name``."""
        if not isinstance(name, str) or not name or not name.isprintable():
            raise TypeError(f"an effect name must be a non-empty printable str, got {name!r}")
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

    # -- the engine's side -------------------------------------------------------------

    def committed(self, t: int, entries: list[tuple[str, Any, Hashable | None]]) -> None:
        """A durable commit's entries (called by the engine, in the committing task)."""
        self._storage.committed(t, entries)
        self.kick()

    def kick(self) -> None:
        """Have the dispatcher look again; start it if it is not running (needs a running event loop)."""
        with self._lock:
            if self._stopping:
                return
            self._kicked = True
            sleeper = self._sleeper
            start = not self._running
            if start:
                self._running = True
        if sleeper is not None:
            sleeper.fire()
        if start:
            spawn(self._dispatch)

    async def close(self) -> None:
        """Stop dispatching; deliveries still in flight are cancelled and their entries handed back.

        A handed-back entry stays pending in a durable store (delivered after
        the next open, or by another peer), with the same key.
        """
        with self._lock:
            self._stopping = True
            sleeper = self._sleeper
            scopes = list(self._scopes)
        if sleeper is not None:
            sleeper.fire()
        for scope in scopes:
            scope.cancel()
        while True:
            w = Waiter()
            with self._lock:
                if self._inflight == 0:
                    return
                self._finished.append(w)
            with anyio.move_on_after(_DRAIN_POLL):
                await w.wait()

    # -- the dispatcher ------------------------------------------------------------------

    async def _dispatch(self) -> None:
        """Claim due entries and start their deliveries, within the concurrency limit, while there is work."""
        storage = self._storage
        try:
            while True:
                with self._lock:
                    self._kicked = False
                    free = self.concurrency - self._inflight
                    if self._stopping:
                        return
                entries = await storage.claim(free, self._effects.keys()) if free > 0 and self._effects else []
                if entries:
                    with self._lock:
                        self._inflight += len(entries)
                    for entry in entries:
                        spawn(self._deliver, entry)
                    continue
                due = storage.next_due()
                w = Waiter()
                with self._lock:
                    if self._kicked or self._stopping:
                        continue
                    if due is None and self._inflight == 0:
                        self._running = False  # nothing to wait for: a commit or requeue kicks a new one
                        return
                    self._sleeper = w
                timeout = None if due is None else max(0.0, due - time.monotonic())
                with anyio.move_on_after(timeout):
                    await w.wait()
                with self._lock:
                    self._sleeper = None
        finally:
            with self._lock:
                self._running = False
                self._sleeper = None

    async def _deliver(self, entry: OutboxEntry) -> None:
        storage = self._storage
        eff = self._effects[entry.effect]
        scope = anyio.CancelScope()
        with self._lock:
            self._scopes.add(scope)
        try:
            with scope:
                try:
                    await eff.handler(entry.payload, key=entry.key)
                except Exception as exc:
                    entry.exc = exc
                    if entry.attempts >= eff.max_attempts:
                        log.warning(
                            "effect %r gave up on %s after %d attempts: %r",
                            entry.effect,
                            entry.key,
                            entry.attempts,
                            exc,
                        )
                        await self._settle(storage.dead, entry, repr(exc))
                    else:
                        delay = backoff_delay(eff.backoff, eff.max_backoff, entry.attempts)
                        await self._settle(storage.retry, entry, repr(exc), delay)
                else:
                    await self._settle(storage.done, entry)
                    with self._lock:
                        self._delivered += 1
                    return
                return
            # cancelled (the store is closing, or the loop is ending): hand the entry back
            with anyio.CancelScope(shield=True):
                await self._settle(storage.retry, entry, "the delivery was cancelled", 0.0)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._settle(storage.retry, entry, "the delivery was cancelled", 0.0)
            raise
        finally:
            with self._lock:
                self._scopes.discard(scope)
                self._inflight -= 1
                finished, self._finished = self._finished, []
            for w in finished:
                w.fire()
            self.kick()

    @staticmethod
    async def _settle(record: Callable[..., Awaitable[None]], entry: OutboxEntry, *args: Any) -> None:
        """Record a delivery's outcome; a storage that fails here loses nothing (the entry comes again)."""
        try:
            await record(entry, *args)
        except StorageError as exc:
            log.warning("outbox entry %s (%r): %s", entry.key, entry.effect, exc)

    # -- public ----------------------------------------------------------------------------

    async def dead_letters(self) -> list[DeadLetter]:
        """The entries that failed every attempt, oldest first (on every store)."""
        return [
            DeadLetter(e.key, e.effect, e.payload, e.attempts, e.exc or RuntimeError(e.error))
            for e in await self._storage.dead_letters()
        ]

    async def requeue_letters(self, key: Key | None = None) -> int:
        """Put one dead letter (by key) or all of them back for delivery; returns how many (on every store)."""
        n = await self._storage.requeue(key)
        if n:
            self.kick()
        return n

    async def pending_count(self) -> int:
        """Entries committed and neither delivered nor dead (on PostgreSQL: of every peer)."""
        return await self._storage.pending()

    @property
    def delivered(self) -> int:
        """Entries this process delivered since the store opened."""
        return self._delivered

    async def drain(self) -> None:
        """Wait until no entry is pending (delivered or dead-lettered); on PostgreSQL, of any peer.

        Entries of an effect that is not registered on this store stay pending
        (a durable store keeps them for a process that registers it), so drain
        waits only while entries of registered effects are pending.
        """
        storage = self._storage
        while await storage.pending(self._effects.keys()):
            w = Waiter()
            with self._lock:
                self._finished.append(w)
            with anyio.move_on_after(_DRAIN_POLL):
                await w.wait()

    # -- the old synchronous API (local stores) ---------------------------------------------

    def dead(self) -> list[DeadLetter]:
        """Deprecated: use ``await outbox.dead_letters()``, which works on every store."""
        warnings.warn("outbox.dead() is deprecated; use `await outbox.dead_letters()`", DeprecationWarning, 2)
        return [
            DeadLetter(e.key, e.effect, e.payload, e.attempts, e.exc or RuntimeError(e.error))
            for e in self._local().dead_now()
        ]

    def requeue(self, key: Key | None = None) -> int:
        """Deprecated: use ``await outbox.requeue_letters(key)``, which works on every store."""
        warnings.warn("outbox.requeue() is deprecated; use `await outbox.requeue_letters()`", DeprecationWarning, 2)
        n = len(self._local().requeue_now(key))
        if n:
            self.kick()
        return n

    @property
    def pending(self) -> int:
        """Deprecated: use ``await outbox.pending_count()``, which works on every store."""
        warnings.warn("outbox.pending is deprecated; use `await outbox.pending_count()`", DeprecationWarning, 2)
        return int(self._local().pending_now())

    def _local(self) -> Any:
        storage: Any = self._storage
        if not hasattr(storage, "pending_now"):
            raise TypeError("this store keeps its outbox in a database: use the async outbox API")
        return storage
