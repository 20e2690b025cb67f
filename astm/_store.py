"""The store: a named set of refs and atoms, and their timeline of commits.

A store is assembled from parts with one job each (``docs/design.md``): a
:class:`~astm._timeline.Timeline` (versions, history, pins), a committer
(``astm._commit``), a log storage and an outbox storage (``astm.abc``), and the
outbox dispatcher. The URL picks the storage; everything else is the same on
every store.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterable, MutableMapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

import anyio
import anyio.to_thread
import sniffio

from . import _telemetry
from ._agent import Agent, AgentFamily, ErrorMode
from ._atom import Atom
from ._backend import Waiter, spawn
from ._commit import Counts, LocalCommitter, validate_value
from ._db import Db, TxReport
from ._errors import HistoryUnavailable, StorageError, StoreClosed, StoreMismatchError, SyncTimeout
from ._markers import COLD, DELETED, Cold
from ._ops import apply_calls
from ._outbox import Effect, Handler, Outbox
from ._ref import Ref
from ._timeline import Timeline
from ._tx import run_transaction
from ._values import check_value
from .abc import LogStorage, OutboxStorage

log = logging.getLogger("astm")

if TYPE_CHECKING:
    from ._commit import Committer
    from .stores.postgres import PostgresStorage

__all__ = ["Stats", "Store"]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")


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
    #: reads of refs a PostgreSQL peer did not hold, so it fetched them (0 on other stores)
    misses: int = 0
    #: refs a PostgreSQL peer holds in its cache, and how many it dropped to stay in its bound
    cached: int = 0
    evicted: int = 0
    #: cached refs a PostgreSQL peer dropped because the shared log changed a version other than the one it held
    reread: int = 0
    #: reads a PostgreSQL peer's read replica served, and reads it could not serve (it lagged or failed) that
    #: went to the primary instead (0 without ``replica=``)
    replica_reads: int = 0
    replica_fallbacks: int = 0
    #: batches of other peers' commits a PostgreSQL peer applied from the rows their notifications carried,
    #: and times it read the shared log instead (a large value, a missed notification, a peer far behind)
    announced: int = 0
    log_reads: int = 0


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
    later: a crash may lose the last commits); ``"postgresql://..."`` shares
    one state between processes (open it with ``async with store``).
    ``replica="postgresql://..."`` (PostgreSQL only) adds a read replica, a hot
    standby of that database: a peer's open, its reads of refs it does not
    hold and its following of the log go there, commits and the outbox to the
    primary. A replica's answer is used only if it is as recent as what the
    peer has seen already, so no read is staler for it; one that lags or
    fails makes the peer read the primary instead (``docs/durability.md``).

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
        cache_refs: int = 100_000,
        replica: str | None = None,
    ) -> None:
        if durability not in ("sync", "async"):
            raise ValueError(f"durability must be 'sync' or 'async', got {durability!r}")
        if not isinstance(history, int) or history < 0:
            raise ValueError(f"history must be a non-negative number of commits, got {history!r}")
        if history_seconds is not None and not history_seconds >= 0:
            raise ValueError(f"history_seconds must be >= 0 or None, got {history_seconds!r}")
        if not isinstance(retry_limit, int) or retry_limit < 1:
            raise ValueError(f"retry_limit must be a positive int, got {retry_limit!r}")
        if not isinstance(cache_refs, int) or cache_refs < 1:
            raise ValueError(f"cache_refs must be a positive number of refs, got {cache_refs!r}")
        if not isinstance(outbox_concurrency, int) or outbox_concurrency < 1:
            raise ValueError(f"outbox concurrency must be a positive int, got {outbox_concurrency!r}")
        self.url = url or "memory://"
        if replica is not None and not (
            self.url.startswith(("postgresql://", "postgres://"))
            and isinstance(replica, str)
            and replica.startswith(("postgresql://", "postgres://"))
        ):
            raise ValueError(
                f"replica= is a 'postgresql://...' URL of a read replica, for a PostgreSQL store only; "
                f"got replica={replica!r} for {self.url!r}"
            )
        self._replica = replica
        self._durability = durability
        self._timeline = Timeline(history, history_seconds)
        self._timeline.deleted = self._forget
        #: the timeline's lock: every commit, claim and ref creation of this store
        self._lock = self._timeline.lock
        self._refs: MutableMapping[str, Ref[Any]] = {}
        self._next_ord = 0
        #: a PostgreSQL peer holds refs lazily: the ones it used, at most cache_refs, least recently used first
        self._lazy = False
        self._cache: dict[Ref[Any], None] = {}
        self._cache_refs = cache_refs
        self._evictions = 0
        self._dropped = 0
        self._misses = 0
        self._atoms: dict[str, Atom[Any]] = {}
        #: refs that expire, by when they may: (deadline, ordinal, ref); and the prefix policies
        self._expiring: list[tuple[float, int, Ref[Any]]] = []
        self._policies: list[tuple[str, float]] = []
        self._sweeping = False
        self._sweeper: Waiter | None = None
        self._agents: dict[str, AgentFamily[Any]] = {}
        self._closed = False
        #: aclose() has run (it runs once)
        self._shut = False
        self._nclaims = 0
        self._overruns = 0
        self._overrun_warned = float("-inf")
        self._retry_limit = retry_limit
        self._counts = Counts()
        self._retries = 0
        self._faults = 0
        self._blocked = 0
        #: the PostgreSQL peer, which opens asynchronously
        self._peer: PostgresStorage | None = None
        log, outbox = self._open_storage(self.url)
        self._log: LogStorage = log
        if self._peer is None:
            self._committer: Committer = LocalCommitter(self._timeline, log, self)
        #: the outbox: effects and their dispatcher
        self.outbox = Outbox(self, outbox, outbox_concurrency)
        _telemetry.watch_store(self)

    def _open_storage(self, url: str) -> tuple[LogStorage, OutboxStorage]:
        if url in ("memory:", "memory://"):
            from .stores.memory import MemoryLog, MemoryOutbox

            return MemoryLog(), MemoryOutbox()
        if url.startswith(("postgresql://", "postgres://")):
            from .stores.postgres import PostgresStorage

            peer = self._peer = PostgresStorage(url, self._timeline, self, replica=self._replica)
            self._lazy = True
            self._refs = weakref.WeakValueDictionary()  # held by users, the cache, or the log
            self._committer = peer.committer
            return peer.log, peer.outbox
        if url.startswith("sqlite:///"):
            from .stores.sqlite import SqliteStorage

            storage = SqliteStorage(
                url[len("sqlite:///") :],
                history=self._timeline.history,
                history_seconds=self._timeline.history_seconds,
            )
            try:
                self._recover(storage)
            except BaseException:
                storage.close()
                raise
            return storage, storage.outbox
        raise ValueError(
            f"unsupported store URL {url!r}: use Store() for memory, 'sqlite:///path/state.db' or 'postgresql://...'"
        )

    def _recover(self, storage: LogStorage) -> None:
        """Install what a log storage found: its checkpoint, then the commits after it, in order."""
        rec = storage.recover()
        where = getattr(storage, "path", self.url)
        with self._lock:
            self._install(rec.checkpoint_t, rec.refs)
            for t, when, changes in rec.log:
                self._apply_logged(t, when, changes, where)

    def _install(self, t: int, refs: list[tuple[str, int, Any]]) -> None:
        """Open at basis ``t`` with every stored ref's version as of ``t`` (under the lock)."""
        for name, rt, value in refs:
            r: Ref[Any] = self._refs.get(name) or self._new_ref(name, value)
            r._cur = (rt, value)
        self._timeline.restore(t, ())

    def _apply_logged(
        self, t: int, when: float, changes: list[tuple[str, tuple[Any, ...]]], where: str
    ) -> tuple[list[tuple[Ref[Any], Any, Any]], list[Any] | None, bool]:
        """Apply commit ``t`` read from a log: recovery replaying a file, or a peer following the shared log.

        The same ``Timeline.apply`` as a local commit (under the lock). A
        change is a whole value, or a delta (helper calls) that applies only to
        the version it was made on. A ref first committed elsewhere is created.
        """
        tl = self._timeline
        if t != tl.t + 1:
            raise StorageError(where, f"the stored log jumps from t={tl.t} to t={t}", "restore it from a backup")
        writes = []
        lazy = self._lazy
        for name, change in changes:
            r = self._refs.get(name)
            if lazy:
                if r is None or r._cur[0] == COLD or r._cur[0] >= t:
                    continue  # a ref this peer does not hold: its next read fetches it
                self._touch((r,))
            if change[0] == "x":
                if r is None or r._cur[0] == COLD:
                    continue  # nothing here to delete
                new = DELETED
            elif change[0] == "v":
                new = change[1]
                if r is None:  # first committed elsewhere: what it held before, when the log says
                    r = self._new_ref(name, change[2] if len(change) > 2 else new)
            else:
                _, base, calls = change
                if lazy and r is not None and r._cur[0] != base:
                    # a peer's cached copy that is not the delta's base: read it anew rather than guess
                    log.warning(
                        "astm peer: commit t=%d changes %r by a delta on t=%d, but this peer holds t=%d; "
                        "reading it again",
                        t,
                        name,
                        base,
                        r._cur[0],
                    )
                    self._drop_cached(r)
                    self._dropped += 1
                    continue
                if r is None or r._cur[0] != base:
                    have = "no such ref" if r is None else f"version t={r._cur[0]}"
                    raise StorageError(
                        where,
                        f"commit t={t} changes ref {name!r} by a delta on its version t={base}, but this store has "
                        f"{have}; the stored log is inconsistent",
                        "restore it from a backup",
                    )
                new = apply_calls(r._cur[1], calls)
            writes.append((r, new))
        return tl.apply(t, when, writes)

    def _forget(self, r: Ref[Any]) -> None:
        """A commit deleted ``r`` (under the lock): its name is free again."""
        if self._refs.get(r.name) is r:
            del self._refs[r.name]
        self._cache.pop(r, None)

    def _new_ref(self, name: str, value: Any) -> Ref[Any]:
        """Make and register a ref (under the lock); its creation is not a commit."""
        r = Ref(self, name, value, None, self._next_ord)
        self._next_ord += 1
        self._refs[name] = r
        return r

    # -- a PostgreSQL peer's cache of refs -------------------------------------------

    def _cold(self, refs: Iterable[Ref[Any]]) -> list[Ref[Any]]:
        return [r for r in refs if r._cur[0] == COLD]

    def _warm(self, refs: list[Ref[Any]], found: dict[str, tuple[int, Any]]) -> None:
        """Install fetched refs (under the lock): the stored version, or the initial value if none is stored."""
        for r in refs:
            cur = r._cur
            if cur[0] != COLD:
                continue  # another fetch got it first
            r._cur = found.get(r.name) or (0, cur[1].initial)
            self._cache[r] = None
        self._evict()

    def _touch(self, refs: Iterable[Ref[Any]]) -> None:
        """These refs were just used: the last to be evicted (under the lock)."""
        cache = self._cache
        for r in refs:
            if r in cache:
                del cache[r]
                cache[r] = None

    def _drop_cached(self, r: Ref[Any]) -> None:
        """Forget a peer's copy of ``r`` (under the lock): its next read fetches the stored version."""
        self._cache.pop(r, None)
        t, v = r._cur
        r._cur = (COLD, Cold(v if t == 0 else None))

    def _evict(self) -> None:
        """Past the cache bound, drop the values of the least recently used refs (under the lock)."""
        cache = self._cache
        if len(cache) <= self._cache_refs:
            return
        for r in list(itertools.islice(cache, len(cache) - int(self._cache_refs * 0.9))):
            self._drop_cached(r)
            self._evictions += 1

    def _rebase(self, t: int) -> None:
        """A peer behind what the shared log keeps starts again at ``t`` (under the lock): every ref is
        read anew when next used, and the history before ``t`` is gone."""
        for r in list(self._cache):
            self._drop_cached(r)
        self._timeline.rebase(t)

    async def _load(self, refs: list[Ref[Any]]) -> None:
        if self._peer is not None:
            await self._peer.load(refs)

    async def load(self, *refs: Ref[Any]) -> None:
        """Warm a PostgreSQL peer: read these refs now, in one query, so reads outside transactions work.

        Other stores hold every ref already; there it does nothing.
        """
        for r in refs:
            if r._store is not self:
                raise StoreMismatchError(r.name)
        await self._load(list(refs))

    # -- identities ----------------------------------------------------------

    def ref(
        self,
        name: str,
        initial: T,
        validator: Callable[[T], bool] | None = None,
        *,
        expire_after: float | None = None,
    ) -> Ref[T]:
        """Get the ref called ``name``, creating it with ``initial`` if it is new.

        The same name always gives the same ref. A ``validator`` given for an
        existing ref replaces its validator (validators are code, not state) and
        must accept the current value. ``expire_after`` (seconds): a commit
        deletes the ref once nobody has written it for that long (idempotency
        records, sessions); like a validator it is code, given again after a
        restart (``store.expire(prefix, after=...)`` covers refs nobody names
        again).
        """
        _check_name(name, "a ref")
        if expire_after is not None and not expire_after > 0:
            raise ValueError(f"expire_after must be a positive number of seconds, got {expire_after!r}")
        with self._lock:
            r = self._refs.get(name)
            if r is None:
                if name in self._atoms:
                    raise ValueError(f"{name!r} already names an atom in this store; pick another name")
                check_value(initial, name)
                if validator is not None:
                    validate_value(name, validator, initial)
                r = self._new_ref(name, initial)
                r._validator = validator
                if self._lazy:
                    r._cur = (COLD, Cold(initial))  # read from the database when first used
                if expire_after is None and self._policies:
                    expire_after = next((after for p, after in self._policies if name.startswith(p)), None)
        if validator is not None and validator is not r._validator:
            if r._cur[0] != COLD:
                validate_value(name, validator, r._cur[1])
            r._validator = validator
        if expire_after is not None and r._expire != expire_after:
            self._arm(r, expire_after)
        return r

    # -- expiry ------------------------------------------------------------------------

    def _arm(self, r: Ref[Any], after: float) -> None:
        """Delete ``r`` when it has not been written for ``after`` seconds (counted from now at the latest)."""
        with self._lock:
            first = r._expire is None
            r._expire = after
            r._written = time.time()
            if first:
                r.add_watch(_EXPIRY, _written_now)
            heapq.heappush(self._expiring, (r._written + after, r._ord, r))
            sleeper = self._sweeper
        if sleeper is not None:
            sleeper.fire()
        self._start_sweeping()

    def _start_sweeping(self) -> None:
        with self._lock:
            if self._sweeping or not self._expiring or self._closed:
                return
            try:
                sniffio.current_async_library()
            except sniffio.AsyncLibraryNotFoundError:
                return  # no event loop yet: open() starts it
            self._sweeping = True
        spawn(self._sweep)

    async def expire(self, prefix: str, *, after: float) -> int:
        """Expire every ref whose name starts with ``prefix`` after ``after`` seconds without a write.

        Covers the refs already stored (after a restart, the ones nobody names
        again) and those created later; returns how many it found now.
        """
        if not isinstance(prefix, str) or not prefix:
            raise TypeError(f"expire(prefix, ...): prefix must be a non-empty str, got {prefix!r}")
        if not after > 0:
            raise ValueError(f"after must be a positive number of seconds, got {after!r}")
        with self._lock:
            self._policies.append((prefix, after))
        names = [n for n in list(self._refs) if n.startswith(prefix)]
        if self._peer is not None:
            names = sorted(set(names) | set(await self._peer.names(prefix)))
        for name in names:
            self.ref(name, None, expire_after=after)
        return len(names)

    async def _sweep(self) -> None:
        """Delete the refs whose expiry came, each in a transaction that a concurrent write makes retry."""
        try:
            while True:
                w = Waiter()
                with self._lock:
                    if self._closed or not self._expiring:
                        return
                    wait = self._expiring[0][0] - time.time()
                    self._sweeper = w
                if wait > 0:
                    with anyio.move_on_after(wait):
                        await w.wait()
                    continue
                now = time.time()
                due: list[Ref[Any]] = []
                with self._lock:
                    self._sweeper = None
                    while self._expiring and self._expiring[0][0] <= now:
                        r = heapq.heappop(self._expiring)[2]
                        if self._refs.get(r.name) is not r or r._expire is None:
                            continue  # deleted, or no longer expiring
                        if now - r._written >= r._expire:
                            due.append(r)
                        else:
                            heapq.heappush(self._expiring, (r._written + r._expire, r._ord, r))
                if due:
                    with contextlib.suppress(StoreClosed):
                        await self.atomically(_delete_expired, due)
        finally:
            with self._lock:
                self._sweeping = False
                self._sweeper = None

    def atom(self, name: str, initial: T, validator: Callable[[T], bool] | None = None) -> Atom[T]:
        """Get the atom called ``name``, creating it with ``initial`` if it is new."""
        _check_name(name, "an atom")
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
        error_mode: ErrorMode | None = None,
        error_handler: Callable[[Agent[T], BaseException], Any] | None = None,
    ) -> Agent[T]:
        """Get the agent called ``name``, creating it with ``state`` if it is new."""
        return self._family(name, state, error_mode, error_handler, "agent")[None]

    def agents(
        self,
        name: str,
        initial: T,
        error_mode: ErrorMode | None = None,
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
        error_mode: ErrorMode | None,
        error_handler: Callable[[Agent[T], BaseException], Any] | None,
        kind: str,
    ) -> AgentFamily[T]:
        _check_name(name, "an agent")
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

    def lookup(self, name: str) -> Ref[Any] | None:
        """The ref called ``name``, or None; unlike ``ref()`` it creates nothing (safe on names from clients)."""
        return self._refs.get(name)

    def refs(self) -> dict[str, Ref[Any]]:
        """Every ref of this store by name (a copy)."""
        return dict(self._refs)

    # -- transactions ----------------------------------------------------------

    # typed with the body's own parameters; retry_limit= (an int) overrides the store's for one call
    @overload
    def atomically(
        self, fn: Callable[..., Awaitable[R]], /, *args: Any, retry_limit: int, **kwargs: Any
    ) -> Coroutine[Any, Any, R]: ...
    @overload
    def atomically(
        self, fn: Callable[..., R], /, *args: Any, retry_limit: int, **kwargs: Any
    ) -> Coroutine[Any, Any, R]: ...
    @overload
    def atomically(
        self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, R]: ...
    @overload
    def atomically(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]: ...
    def atomically(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        """Run ``fn(*args, **kwargs)`` as a transaction on this store; await it for the result.

        ``fn`` may be ``async def`` or plain ``def``. Inside another transaction
        it joins that one. ``retry_limit=`` overrides the store's for this call.
        """
        retry_limit = kwargs.pop("retry_limit", None)
        return run_transaction(self, fn, args, kwargs, retry_limit)

    @overload
    def transact(
        self, fn: Callable[..., Awaitable[R]], /, *args: Any, retry_limit: int, **kwargs: Any
    ) -> Coroutine[Any, Any, TxReport[R]]: ...
    @overload
    def transact(
        self, fn: Callable[..., R], /, *args: Any, retry_limit: int, **kwargs: Any
    ) -> Coroutine[Any, Any, TxReport[R]]: ...
    @overload
    def transact(
        self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, TxReport[R]]: ...
    @overload
    def transact(
        self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, TxReport[R]]: ...
    def transact(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, TxReport[Any]]:
        """Like ``atomically`` but the result is the commit's :class:`TxReport` (its ``result`` is the body's).

        A read-only body commits nothing; its report has ``db_before ==
        db_after`` at the read point and no changes.
        """
        retry_limit = kwargs.pop("retry_limit", None)
        return run_transaction(self, fn, args, kwargs, retry_limit, report=True)

    # -- the timeline ------------------------------------------------------------

    @property
    def t(self) -> int:
        """The basis t: the newest commit visible in this store."""
        return self._timeline.t

    def db(self) -> Db:
        """The immutable value of the store now."""
        tl = self._timeline
        with tl.lock:
            t = tl.t
            tl.pin(t)
        return Db(self, t, True)

    def as_of(self, t: int) -> Db:
        """The value of the store at an earlier ``t``, while history retention covers it."""
        if not isinstance(t, int) or isinstance(t, bool):
            raise TypeError(f"as_of(t): t must be an int, got {t!r}")
        tl = self._timeline
        with tl.lock:
            if t > tl.t:
                raise ValueError(
                    f"as_of({t}): t is ahead of this store (t={tl.t}); use `await store.sync(t)` to wait for it"
                )
            if t < tl.oldest:
                raise HistoryUnavailable(t, tl.oldest)
            tl.pin(t)
        return Db(self, t, True)

    async def sync(self, t: int, timeout: float | None = None) -> Db:
        """A db value whose basis includes ``t``, waiting while this store is behind it."""
        if not isinstance(t, int) or isinstance(t, bool):
            raise TypeError(f"sync(t): t must be an int, got {t!r}")
        tl = self._timeline
        try:
            with anyio.fail_after(timeout):
                while True:
                    with tl.lock:
                        now = tl.t
                        if now >= t:
                            tl.pin(now)
                            return Db(self, now, True)
                        if self._closed:
                            raise StoreClosed()
                    if self._peer is not None:
                        await self._peer.ask_for(t)
                    await tl.wait_for_commit(now)
        except TimeoutError:
            assert timeout is not None
            raise SyncTimeout(t, tl.t, timeout) from None

    async def reports(self, since: int | None = None) -> AsyncGenerator[TxReport[None], None]:
        """Yield one :class:`TxReport` per commit after ``since`` (default: from now on), in order.

        Lossless and resumable: pass the ``t`` of the last report you handled.
        Commits never wait for a consumer; one that falls further behind than
        the store's history gets ``HistoryUnavailable`` rather than a gap. The
        reports' db values read the retained history: they do not pin it (a
        stuck consumer must not hold memory), so keep what you need from them
        while you handle the report. Reports carry no ``result``.
        """
        tl = self._timeline
        pos = tl.t if since is None else since
        if not isinstance(pos, int) or isinstance(pos, bool) or pos < 0:
            raise TypeError(f"reports(since): since must be a non-negative int, got {since!r}")
        while True:
            with tl.lock:
                now = tl.t
                entry = tl.entry(pos + 1) if pos < now else None
                if pos < now and entry is None:
                    raise HistoryUnavailable(pos, tl.first_retained() - 1, "reports(since)")
                closed = self._closed
            if entry is None:
                if closed:
                    return
                await tl.wait_for_commit(now)
                continue
            t, when, changes = entry
            pos = t
            yield TxReport.of_commit(self, t, None, changes, when, pinned=False)
            del changes, entry

    # -- lifecycle -----------------------------------------------------------------

    def stats(self) -> Stats:
        """A snapshot of this store's counters."""
        with self._lock:
            hot = sorted(
                ((r.name, r._conflicts) for r in self._refs.values() if r._conflicts),
                key=lambda kv: -kv[1],
            )[:10]
            return Stats(
                self._counts.commits,
                self._counts.attempts,
                self._retries,
                self._faults,
                self._blocked,
                tuple(hot),
                self._misses,
                len(self._cache),
                self._evictions,
                self._dropped,
                self._peer.replica_reads if self._peer is not None else 0,
                self._peer.replica_fallbacks if self._peer is not None else 0,
                self._peer.pushed_applied if self._peer is not None else 0,
                self._peer.log_reads if self._peer is not None else 0,
            )

    @property
    def closed(self) -> bool:
        return self._closed

    async def open(self) -> Store:
        """Open the store for use (``async with store`` does this): connect, resume outbox deliveries."""
        if self._peer is not None:
            await self._peer.open()
        self.outbox.kick()
        self._start_sweeping()
        return self

    async def aclose(self, timeout: float | None = None) -> None:
        """Close the store: refuse new work, drain agents and the outbox, wake every waiter.

        After this, transactions, sends and enqueues raise ``StoreClosed``.
        Actions already queued and entries already committed are still
        delivered, within ``timeout`` seconds if given (a PostgreSQL peer
        leaves pending entries to the other peers).
        """
        with self._lock:
            if self._shut:
                return
            self._shut = True
            self._closed = True
        with anyio.move_on_after(timeout):
            for fam in list(self._agents.values()):
                await fam._drained()
            if self._peer is None:
                await self.outbox.drain()
        await self.outbox.close()
        with self._lock:
            sleeper = self._sweeper
        if sleeper is not None:
            sleeper.fire()
        self._timeline.wake_all()
        if self._peer is not None:
            await self._peer.close()
        else:
            await anyio.to_thread.run_sync(self._log.close)

    async def __aenter__(self) -> Store:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<astm.Store {self.url} t={self._timeline.t} refs={len(self._refs)}>"


def _check_name(name: object, kind: str) -> None:
    """Refuse a name storage could not keep: not a str, empty, or not valid Unicode text."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"{kind} name must be a non-empty str, got {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{kind} name must be valid Unicode text (it holds a lone surrogate): {name!r}") from None


#: the key of the watch that tells an expiring ref it was written
_EXPIRY = object()


def _written_now(key: object, r: Ref[Any], old: Any, new: Any) -> None:
    r._written = time.time()


def _delete_expired(refs: list[Ref[Any]]) -> None:
    """The sweeper's transaction: delete each ref still unwritten for its expiry (a write meanwhile retries it)."""
    now = time.time()
    for r in refs:
        r.get()  # checked: a commit to it before ours makes this transaction run again
        if r._expire is not None and now - r._written >= r._expire:
            r.delete()
