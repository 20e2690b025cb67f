"""The store: a named set of refs and atoms, and their timeline of commits."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass
from heapq import heappush
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread

from . import codec
from ._agent import Agent, AgentFamily, ErrorMode
from ._atom import Atom
from ._backend import Waiter
from ._db import Db, TxReport
from ._errors import HistoryUnavailable, StoreClosed, SyncTimeout
from ._outbox import Effect, Handler, Outbox
from ._ref import Ref
from ._tx import _validate_value, decay_history, pin_floor, run_transaction
from ._values import check_value
from .abc import Storage

if TYPE_CHECKING:
    from .stores.postgres import PostgresStorage

__all__ = ["Stats", "Store"]

T = TypeVar("T")
R = TypeVar("R")

#: a log entry: (t, wall-clock time, [(ref, old, new), ...])
LogEntry = tuple[int, float, list[tuple[Ref[Any], Any, Any]]]

_SWEEP_EVERY = 1024


@dataclass(frozen=True, slots=True)
class Stats:
    """Counters of a store since it opened (``store.stats()``)."""

    #: commits that advanced t
    commits: int
    #: body runs, including read-only transactions and retried attempts
    attempts: int
    #: attempts discarded because of a conflict
    retries: int
    #: retries caused by history a reader needed and no longer had
    faults: int
    #: times a transaction waited in astm.retry()
    blocked: int
    #: the refs that caused the most conflicts: (name, count), most first
    conflicts: tuple[tuple[str, int], ...]


class Store:
    """A transactional store of refs and atoms with a timeline of commits.

    ``Store()`` keeps everything in this process's memory. ``history`` and
    ``history_seconds`` set how much of the past stays readable through
    ``as_of`` and ``reports(since=...)``: a commit is kept while it is among the
    newest ``history`` commits or younger than ``history_seconds``.
    ``retry_limit`` bounds the attempts of every transaction (per call with
    ``atomically(..., retry_limit=...)``). ``outbox_concurrency`` bounds the
    outbox's parallel deliveries.

    ``url`` picks the storage: none (or ``"memory://"``) keeps everything in
    this process's memory; ``"sqlite:///path/state.db"`` is the durable
    embedded store, where a transaction is acknowledged only once its commit is
    on disk (``durability="async"`` acknowledges at once and flushes moments
    later: a crash may lose the last commits).

    On the in-memory store, outbox entries not yet delivered when the process
    ends are lost; the durable stores keep them.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        history: int = 1000,
        history_seconds: float | None = None,
        retry_limit: int = 10_000,
        outbox_concurrency: int = 16,
        durability: str = "sync",
    ) -> None:
        if durability not in ("sync", "async"):
            raise ValueError(f"durability must be 'sync' or 'async', got {durability!r}")
        if not isinstance(history, int) or history < 0:
            raise ValueError(f"history must be a non-negative number of commits, got {history!r}")
        if history_seconds is not None and not history_seconds >= 0:
            raise ValueError(f"history_seconds must be >= 0 or None, got {history_seconds!r}")
        if not isinstance(retry_limit, int) or retry_limit < 1:
            raise ValueError(f"retry_limit must be a positive int, got {retry_limit!r}")
        self.url = url or "memory://"
        self._durability = durability
        self._backend: Storage | None = None
        #: the PostgreSQL peer backend (commits are validated remotely)
        self._remote: PostgresStorage | None = None
        self._lock = threading.Lock()
        self._t = 0
        self._refs: dict[str, Ref[Any]] = {}
        self._atoms: dict[str, Atom[Any]] = {}
        self._agents: dict[str, AgentFamily[Any]] = {}
        #: the outbox: effects, pending entries, dead letters
        self.outbox = Outbox(self, outbox_concurrency)
        self._closed = False
        #: aclose() has run (it runs once)
        self._shut = False
        self._history = history
        self._history_seconds = history_seconds
        self._time_floor = 0 if history_seconds is not None else math.inf
        self._oldest = 0
        self._pins: dict[int, int] = {}
        self._pin_heap: list[int] = []
        self._unpins: deque[int] = deque()
        self._log: deque[LogEntry] = deque()
        self._trim_len = history + max(1, history // 8)
        self._versioned: set[Ref[Any]] = set()
        self._last_sweep = (0, time.time())
        self._tick: list[Waiter] = []
        self._nclaims = 0
        self._retry_limit = retry_limit
        self._commits = 0
        self._attempts = 0
        self._retries = 0
        self._faults = 0
        self._blocked = 0
        if url not in (None, "memory:", "memory://"):
            self._open_backend(url)

    def _open_backend(self, url: str) -> None:
        if url.startswith(("postgresql://", "postgres://")):
            from .stores.postgres import PostgresStorage

            self._remote = PostgresStorage(url, self)
            return
        if url.startswith("sqlite:///"):
            from .stores.sqlite import SqliteStorage

            backend = SqliteStorage(
                url[len("sqlite:///") :], history=self._history, history_seconds=self._history_seconds
            )
        else:
            raise ValueError(f"unsupported store URL {url!r}: use Store() for memory or 'sqlite:///path/state.db'")
        rec = backend.recover()
        self._backend = backend
        self._t = rec.t
        for name, t, value, enc in rec.refs:
            r = Ref(self, name, value, None, len(self._refs))
            r._cur = (t, value)
            r._enc = enc
            self._refs[name] = r
        for t, when, changes in rec.log:
            self._log.append((t, when, [(self._refs[n], old, new) for n, old, new in changes]))
        if self._log:
            self._oldest = self._log[0][0] - 1
        else:
            self._oldest = self._t
        self._trim_len = len(self._log) + max(1, self._history // 8)
        self.outbox.recover(rec.outbox)

    # -- identities ----------------------------------------------------------

    def ref(self, name: str, initial: T, validator: Callable[[T], bool] | None = None) -> Ref[T]:
        """Get the ref called ``name``, creating it with ``initial`` if it is new.

        The same name always gives the same ref. A ``validator`` given for an
        existing ref replaces its validator (validators are code, not state) and
        must accept the current value.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"a ref name must be a non-empty str, got {name!r}")
        with self._lock:
            r = self._refs.get(name)
            if r is None:
                if name in self._atoms:
                    raise ValueError(f"{name!r} already names an atom in this store; pick another name")
                check_value(initial, name)
                if validator is not None:
                    _validate_value(name, validator, initial)
                durable = self._backend is not None or self._remote is not None
                enc = codec.dumps(initial, f"ref {name!r}") if durable else ""
                r = Ref(self, name, initial, validator, len(self._refs))
                r._enc = enc
                self._refs[name] = r
                return r
        if validator is not None and validator is not r._validator:
            _validate_value(name, validator, r._cur[1])
            r._validator = validator
        return r

    def atom(self, name: str, initial: T, validator: Callable[[T], bool] | None = None) -> Atom[T]:
        """Get the atom called ``name``, creating it with ``initial`` if it is new."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"an atom name must be a non-empty str, got {name!r}")
        with self._lock:
            a = self._atoms.get(name)
            if a is None:
                if name in self._refs:
                    raise ValueError(f"{name!r} already names a ref in this store; pick another name")
                a = self._atoms[name] = Atom(name, initial, validator)
        return a

    def agent(
        self,
        name: str,
        state: T,
        error_mode: ErrorMode = "fail",
        error_handler: Callable[[Agent[T], BaseException], Any] | None = None,
    ) -> Agent[T]:
        """Get the agent called ``name``, creating it with ``state`` if it is new."""
        return self._family(name, state, error_mode, error_handler, "agent")[None]

    def agents(
        self,
        name: str,
        initial: T,
        error_mode: ErrorMode = "fail",
        error_handler: Callable[[Agent[T], BaseException], Any] | None = None,
    ) -> AgentFamily[T]:
        """A family of agents: ``family[key]`` is the agent of that identity, created on first use.

        Idle identities cost only their state: no task, no queue.
        """
        return self._family(name, initial, error_mode, error_handler, "family")

    def _family(
        self,
        name: str,
        initial: T,
        error_mode: ErrorMode,
        error_handler: Callable[[Agent[T], BaseException], Any] | None,
        kind: str,
    ) -> AgentFamily[T]:
        if not isinstance(name, str) or not name:
            raise TypeError(f"an agent name must be a non-empty str, got {name!r}")
        with self._lock:
            fam = self._agents.get(name)
            if fam is None:
                fam = self._agents[name] = AgentFamily(self, name, initial, error_mode, error_handler)
                fam.kind = kind
            elif fam.kind != kind:
                raise ValueError(f"{name!r} already names an agent {fam.kind} in this store; pick another name")
        return fam

    def effect(
        self, name: str, *, max_attempts: int = 5, backoff: float = 0.1, max_backoff: float = 30.0
    ) -> Callable[[Handler], Effect]:
        """Register a durable outbox effect: ``@store.effect("send-confirmation")``.

        The handler is ``async def handler(payload, *, key)``; ``key`` is the
        entry's idempotency key ``(t, seq)``, the same on every redelivery.
        """
        return self.outbox.effect(name, max_attempts=max_attempts, backoff=backoff, max_backoff=max_backoff)

    def refs(self) -> dict[str, Ref[Any]]:
        """Every ref of this store by name (a copy)."""
        return dict(self._refs)

    # -- transactions ----------------------------------------------------------

    def atomically(
        self, fn: Callable[..., Any], /, *args: Any, retry_limit: int | None = None, **kwargs: Any
    ) -> Coroutine[Any, Any, Any]:
        """Run ``fn(*args, **kwargs)`` as a transaction on this store; await it for the result.

        ``fn`` may be ``async def`` or plain ``def``. Inside another transaction
        it joins that one. ``retry_limit`` overrides the store's for this call.
        """
        return run_transaction(self, fn, args, kwargs, retry_limit)

    def transact(
        self, fn: Callable[..., Any], /, *args: Any, retry_limit: int | None = None, **kwargs: Any
    ) -> Coroutine[Any, Any, TxReport[Any]]:
        """Like ``atomically`` but the result is the commit's :class:`TxReport`.

        A read-only body commits nothing; its report has ``db_before ==
        db_after`` at the read point and no changes.
        """
        return run_transaction(self, fn, args, kwargs, retry_limit, report=True)

    # -- the timeline ------------------------------------------------------------

    @property
    def t(self) -> int:
        """The basis t: the newest commit visible in this store."""
        return self._t

    def db(self) -> Db:
        """The immutable value of the store now."""
        with self._lock:
            t = self._t
            self._pin(t)
        return Db(self, t, True)

    def as_of(self, t: int) -> Db:
        """The value of the store at an earlier ``t``, while history retention covers it."""
        if not isinstance(t, int) or isinstance(t, bool):
            raise TypeError(f"as_of(t): t must be an int, got {t!r}")
        with self._lock:
            if t > self._t:
                raise ValueError(
                    f"as_of({t}): t is ahead of this store (t={self._t}); use `await store.sync(t)` to wait for it"
                )
            if t < self._oldest:
                raise HistoryUnavailable(t, self._oldest)
            self._pin(t)
        return Db(self, t, True)

    async def sync(self, t: int, timeout: float | None = None) -> Db:
        """A db value whose basis includes ``t``, waiting while this store is behind it."""
        if not isinstance(t, int) or isinstance(t, bool):
            raise TypeError(f"sync(t): t must be an int, got {t!r}")
        try:
            with anyio.fail_after(timeout):
                while True:
                    w = Waiter()
                    with self._lock:
                        if self._t >= t:
                            now = self._t
                            self._pin(now)
                            return Db(self, now, True)
                        if self._closed:
                            raise StoreClosed()
                        self._tick.append(w)
                    await w.wait()
        except TimeoutError:
            assert timeout is not None
            raise SyncTimeout(t, self._t, timeout) from None

    async def reports(self, since: int | None = None) -> AsyncGenerator[TxReport[None], None]:
        """Yield one :class:`TxReport` per commit after ``since`` (default: from now on), in order.

        Lossless and resumable: pass the ``t`` of the last report you handled.
        Commits never wait for a consumer; one that falls further behind than
        the store's history gets ``HistoryUnavailable`` rather than a gap. The
        reports' db values read the retained history: they do not pin it (a
        stuck consumer must not hold memory), so keep what you need from them
        while you handle the report. Reports carry no ``result``.
        """
        pos = self._t if since is None else since
        if not isinstance(pos, int) or isinstance(pos, bool) or pos < 0:
            raise TypeError(f"reports(since): since must be a non-negative int, got {since!r}")
        while True:
            w = None
            with self._lock:
                if pos < self._t:
                    log = self._log
                    first = log[0][0] if log else self._t + 1
                    if pos + 1 < first:
                        raise HistoryUnavailable(pos, first - 1, "reports(since)")
                    t, when, changes = log[pos + 1 - first]
                elif self._closed:
                    return
                else:
                    w = Waiter()
                    self._tick.append(w)
            if w is not None:
                await w.wait()
                continue
            pos = t
            yield TxReport.of_commit(self, t, None, changes, when, pinned=False)
            del changes

    # -- internal: history -------------------------------------------------------

    def _pin(self, t: int) -> None:
        """Keep the versions db values at ``t`` need (call under the lock)."""
        pins = self._pins
        c = pins.get(t)
        if c:
            pins[t] = c + 1
        else:
            pins[t] = 1
            heappush(self._pin_heap, t)

    def _trim(self, t: int) -> None:
        """Drop log entries neither retention nor a pin needs (under the lock; never raises).

        The log is the store's history: it keeps every superseded value, so
        ``as_of``, db values and ``reports`` read the past from it. Commits call
        this once the log reaches ``_trim_len`` entries, so the bookkeeping is
        paid once per batch rather than on every commit.
        """
        log = self._log
        now = log[-1][1] if log else time.time()
        if t - self._last_sweep[0] >= _SWEEP_EVERY or (
            self._history_seconds is not None and now - self._last_sweep[1] >= 1.0
        ):
            self._sweep(t, now)
        floor = t - self._history
        if self._time_floor < floor:
            floor = int(self._time_floor)
        if self._unpins:
            pins = self._pins
            unpins = self._unpins
            while unpins:
                p = unpins.popleft()
                c = pins[p] - 1
                if c:
                    pins[p] = c
                else:
                    del pins[p]
        if self._pin_heap:
            oldest_pin = pin_floor(self._pins, self._pin_heap)
            if oldest_pin is not None and oldest_pin < floor:
                floor = oldest_pin
        # entry t holds the values visible at t - 1: as_of(floor) needs the entries after floor
        while log and log[0][0] <= floor:
            log.popleft()
        if floor > self._oldest:
            self._oldest = floor
        # trim again after about an eighth of the retention window more commits
        self._trim_len = len(log) + max(1, self._history // 8)

    def _sweep(self, t: int, now: float) -> None:
        """Move the time-retention floor; shrink the history rings nobody faulted on."""
        self._last_sweep = (t, now)
        if self._history_seconds is not None:
            cutoff = now - self._history_seconds
            self._time_floor = next((e[0] - 1 for e in self._log if e[1] >= cutoff), t)
        done = [r for r in self._versioned if decay_history(r)]
        self._versioned.difference_update(done)

    # -- lifecycle -----------------------------------------------------------------

    def stats(self) -> Stats:
        """A snapshot of this store's counters."""
        with self._lock:
            hot = sorted(
                ((r.name, r._conflicts) for r in self._refs.values() if r._conflicts),
                key=lambda kv: -kv[1],
            )[:10]
            return Stats(
                self._commits,
                self._attempts,
                self._retries,
                self._faults,
                self._blocked,
                tuple(hot),
            )

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self, timeout: float | None = None) -> None:
        """Close the store: refuse new work, drain agents and the outbox, wake every waiter.

        After this, transactions, sends and enqueues raise ``StoreClosed``.
        Actions already queued and entries already committed are still
        delivered, within ``timeout`` seconds if given.
        """
        with self._lock:
            if self._shut:
                return
            self._shut = True
            self._closed = True
        with anyio.move_on_after(timeout):
            for fam in list(self._agents.values()):
                await fam._drained()
            if self._remote is None:  # a peer leaves pending entries to the other peers
                await self.outbox.drain()
        with self._lock:
            tick, self._tick = self._tick, []
        for w in tick:
            w.fire()
        if self._backend is not None:
            await anyio.to_thread.run_sync(self._backend.close)
        if self._remote is not None:
            await self._remote.close()

    async def __aenter__(self) -> Store:
        if self._remote is not None:
            await self._remote.open()
        self.outbox.resume()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<astm.Store {self.url} t={self._t} refs={len(self._refs)}>"
