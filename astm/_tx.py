"""The transaction engine: read point, in-transaction values, the runner, contention.

A transaction reads a consistent snapshot at its *read point* ``rp`` (a basis
``t`` of its store) and commits all its writes at one *write point* ``t + 1``.
Each run of the body is an *attempt*, one :class:`Transaction` object; the
context variable names the current attempt, so a task spawned inside a body
that outlives its attempt finds it sealed and cannot write into a commit it
does not belong to.

Reads. ``ref._cur`` is the newest committed ``(t, value)``. A read of a ref
newer than ``rp`` first tries to *extend* the read point to the store's current
``t``: allowed when nothing this attempt already read has changed since ``rp``,
because the old and new snapshots then agree on everything it has seen. When
extension fails, a checked read is doomed (it would fail validation at commit),
so the attempt retries at once; an unchecked ``peek`` reads the old version
from the timeline. The attempt never observes a state that no single commit
produced (opacity), even across ``await``.

Commit. The body's result is sealed into a :class:`~astm._commit.CommitRequest`
and handed to the store's committer, which validates the checked refs, re-applies
commutes to the newest values, runs validators, and makes the writes the next
``t`` (locally under one lock, or in PostgreSQL). No ``await`` inside a local
commit, so cancellation can never leave half a commit.

Contention. A conflict on a hot ref, or a third failure, makes the transaction
*claim* the refs involved: claims are FIFO queues per ref, taken in a global
order (no deadlock), held until the transaction ends, and no other transaction
may commit an ``alter``/``set`` of a claimed ref. Contenders for a hot ref thus
line up instead of re-running in a storm, and a long transaction gets priority
over a stream of short ones.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
import types
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from contextvars import ContextVar
from time import monotonic as _monotonic
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol, cast

import anyio

from . import _telemetry
from ._backend import Waiter, spawn
from ._commit import CommitRequest, Committer, Counts, validate_value
from ._db import Db, TxReport
from ._errors import (
    CommuteConflictError,
    NotInTransactionError,
    RefDeleted,
    RetryLimitExceeded,
    StoreClosed,
    StoreMismatchError,
    TransactionEndedError,
    _Blocked,
    _Conflict,
)
from ._markers import COLD, DELETED, Tombstone
from ._ops import STRUCTURAL, check_args
from ._values import _IMMUTABLE_FAST, LARGE_TYPES, UNTRACK_AT, check_changed_value, check_value, untrack_large

if TYPE_CHECKING:
    from ._outbox import Outbox
    from ._ref import Ref
    from ._timeline import Timeline
    from .abc import LogStorage

__all__ = [
    "Claimant",
    "Transaction",
    "current_for",
    "run_transaction",
]

log = logging.getLogger("astm")

_current: Final[ContextVar[Transaction | None]] = ContextVar("astm.transaction", default=None)
#: (values, commutes, number of effects, number of outbox entries, delta calls) at a savepoint
_Savepoint = tuple[
    "dict[Ref[Any], Any] | None",
    "dict[Ref[Any], list[tuple[Callable[..., Any], tuple[Any, ...]]]] | None",
    int,
    int,
    "dict[Ref[Any], list[tuple[Callable[..., Any], tuple[Any, ...]]] | None] | None",
]
_NO: Final[Any] = object()
_CoroutineType = types.CoroutineType


def _is_coroutine(r: object) -> bool:
    """Whether a body's result is a coroutine to await: a native one, or any other kind.

    The common case is one type check. The ABC check catches coroutines that
    are not ``types.CoroutineType``: those of compiled code, among them the
    engine's own runner when it is compiled (a body that returns the call of
    another ``@transactional`` function hands back the runner's coroutine).
    """
    return type(r) is _CoroutineType or (r is not None and isinstance(r, Coroutine))


#: Claims start on the first conflict of a ref that conflicted this often since
#: its queue last drained, or on any conflict from the third failure on.
HOT_REF_CONFLICTS = 2
CLAIM_ALL_AFTER = 3
#: Others yield to a claimant for CLAIM_TIME_FACTOR times its last attempt's
#: duration, and at least CLAIM_MIN_SECONDS.
CLAIM_TIME_FACTOR = 4.0
CLAIM_MIN_SECONDS = 0.05
#: Each new attempt under claims already held starts a new claim period, this
#: many times in a row at most: then the claimant's queue goes ahead.
CLAIM_RENEWALS = 8
#: A claim held past its deadline is logged at most once per this many seconds per store, with a count.
CLAIM_WARN_SECONDS = 10.0
#: while positive, every body's first attempt is discarded (astm.pytest_plugin's bodies_twice)
BODIES_TWICE = 0


class Host(Protocol):
    """What the engine needs of a store."""

    _timeline: Timeline
    _committer: Committer
    _log: LogStorage
    _closed: bool
    _durability: str
    _retry_limit: int
    _nclaims: int
    #: claims held past their deadline since the last warning, and when that was logged
    _overruns: int
    _overrun_warned: float
    _counts: Counts
    _retries: int
    _faults: int
    _blocked: int
    _misses: int
    outbox: Outbox

    async def _load(self, refs: list[Ref[Any]]) -> None:
        """Fetch refs this process does not hold (a PostgreSQL peer's cache misses)."""
        ...


class _Sealed:
    """What an ended attempt's values become: any use raises ``TransactionEndedError``."""

    __slots__ = ()

    def get(self, ref: Any, default: Any = None) -> NoReturn:
        raise TransactionEndedError(f"ref {getattr(ref, 'name', ref)!r}: a transactional operation")

    def __setitem__(self, ref: Any, value: Any) -> NoReturn:
        raise TransactionEndedError(f"ref {getattr(ref, 'name', ref)!r}: set()")

    __getitem__ = get

    def __contains__(self, ref: Any) -> NoReturn:
        self.get(ref)

    def __len__(self) -> int:
        return 0


_SEALED: Final[Any] = _Sealed()


class Claimant:
    """The claims of one transaction, shared by its attempts: held refs, and for how long others yield."""

    __slots__ = ("budget", "deadline", "refs", "renewals")

    def __init__(self) -> None:
        self.refs: list[Ref[Any]] = []
        #: new claim periods started without new claims (see CLAIM_RENEWALS)
        self.renewals = 0
        #: while holding claims: until when other commits yield to them
        self.deadline = 0.0
        #: how long others yield once it holds them
        self.budget = CLAIM_MIN_SECONDS


class Transaction:
    """One attempt of a transaction: its read point, reads, writes and effects.

    Refs hand every operation to the current attempt (found once per call in a
    context variable); nothing here allocates on a plain ``get``.
    """

    __slots__ = (
        "attempts",
        "claimant",
        "commutes",
        "conflicts",
        "effects",
        "ops",
        "outbox",
        "peeks",
        "reads",
        "rp",
        "started",
        "store",
        "vals",
    )

    def __init__(self, store: Host | None) -> None:
        self.store = store
        self.rp = store._timeline.t if store is not None else 0
        #: in-transaction values of every ref written (set/alter/commute), a dict; ``_SEALED`` when the
        #: attempt ends (typed Any, not a union: compiled, a dict-typed attribute refuses ``_SEALED``)
        self.vals: Any = {}
        #: refs checked at commit: every get/alter/set/ensure
        self.reads: set[Ref[Any]] = set()
        self.peeks: set[Ref[Any]] | None = None
        self.commutes: dict[Ref[Any], list[tuple[Callable[..., Any], tuple[Any, ...]]]] | None = None
        self.effects: list[tuple[Callable[..., Any], tuple[Any, ...]]] | None = None
        #: outbox entries of this attempt: (effect name, payload, order key)
        self.outbox: list[tuple[str, Any, Any]] | None = None
        #: per ref written only by structural helpers from its committed value: those calls (a delta);
        #: None once anything else wrote it
        self.ops: dict[Ref[Any], list[tuple[Callable[..., Any], tuple[Any, ...]]] | None] | None = None
        #: body runs so far, this one included
        self.attempts = 0
        self.conflicts: dict[str, int] | None = None
        self.claimant: Claimant | None = None
        #: when the current attempt started (monotonic seconds; 0 = unknown)
        self.started = 0.0

    # -- binding -------------------------------------------------------------

    def _bind(self, ref: Ref[Any]) -> None:
        """First ref of a decorated transaction fixes its store and read point."""
        store = ref._store
        if self.store is None and self.vals is not _SEALED:
            self.store = store
            self.rp = store._timeline.t
        else:
            self.bind_store(store, ref.name)

    def bind_store(self, store: Host, what: str | None = None) -> None:
        if self.store is None:
            if self.vals is _SEALED:
                raise TransactionEndedError(f"ref {what!r}: a transactional operation")
            self.store = store
            self.rp = store._timeline.t
        elif self.store is not store:
            raise StoreMismatchError(what or f"<transaction of {store!r}>")

    # -- reads ---------------------------------------------------------------

    def _extend(self) -> bool:
        """Move the read point to now if nothing read so far has changed since it."""
        store = self.store
        assert store is not None
        new_rp = store._timeline.t
        rp = self.rp
        for r in self.reads:
            if r._cur[0] > rp:
                return False
        if self.peeks:
            for r in self.peeks:
                if r._cur[0] > rp:
                    return False
        self.rp = new_rp
        return True

    def _version_at(self, ref: Ref[Any]) -> tuple[int, Any]:
        """The newest version of ``ref`` not after ``rp``, from the timeline."""
        store = self.store
        assert store is not None
        v = store._timeline.version_at(ref, self.rp)
        if v is None:
            raise _Conflict((ref,), fault=True)
        return v

    def _stale_checked(self, ref: Ref[Any]) -> tuple[int, Any]:
        """A checked read of a ref that changed after ``rp``: extend or retry now."""
        if not self._extend():
            rp = self.rp
            changed = [r for r in self.reads if r._cur[0] > rp]
            raise _Conflict(changed or (ref,))
        return self._version_at(ref)

    def get(self, ref: Ref[Any]) -> Any:
        v = self.vals.get(ref, _NO)
        if v is not _NO:
            return v
        if ref._store is not self.store:
            self._bind(ref)
        cur = ref._cur
        if cur[0] > self.rp:
            cur = self._stale_checked(ref)
        self.reads.add(ref)
        return cur[1]

    def peek(self, ref: Ref[Any]) -> Any:
        v = self.vals.get(ref, _NO)
        if v is not _NO:
            return v
        if ref._store is not self.store:
            self._bind(ref)
        cur = ref._cur
        if cur[0] > self.rp:
            self._extend()
            cur = self._version_at(ref)
        if self.peeks is None:
            self.peeks = {ref}
        else:
            self.peeks.add(ref)
        return cur[1]

    # -- writes --------------------------------------------------------------

    def set(self, ref: Ref[Any], value: Any) -> Any:
        vals = self.vals
        if vals is _SEALED:
            vals[ref] = value  # raises
        check_value(value, ref.name)
        self._overwrite(ref, value)
        return value

    def delete(self, ref: Ref[Any]) -> None:
        vals = self.vals
        if vals is _SEALED:
            vals[ref] = DELETED  # raises
        self._overwrite(ref, DELETED)

    def _overwrite(self, ref: Ref[Any], value: Any) -> None:
        """``set`` and ``delete``: a write that does not depend on the value (still a read of the version)."""
        if ref._store is not self.store:
            self._bind(ref)
        if self.commutes is not None and ref in self.commutes:
            raise CommuteConflictError(ref.name)
        reads = self.reads
        if ref not in reads:
            if ref._cur[0] > self.rp:
                self._stale_checked(ref)
            reads.add(ref)
        self.vals[ref] = value
        ops = self.ops
        if ops is not None and ref in ops:
            ops[ref] = None

    def alter(self, ref: Ref[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        vals = self.vals
        v = vals.get(ref, _NO)
        fresh = v is _NO
        if fresh:
            if ref._store is not self.store:
                self._bind(ref)
            cur = ref._cur
            if cur[0] > self.rp:
                cur = self._stale_checked(ref)
            self.reads.add(ref)
            v = cur[1]
        elif self.commutes is not None and ref in self.commutes:
            raise CommuteConflictError(ref.name)
        nv = fn(v, *args)
        self.note(ref, fn, args, nv, v, fresh)
        vals[ref] = nv
        return nv

    def commute(self, ref: Ref[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        vals = self.vals
        commutes = self.commutes
        v = vals.get(ref, _NO)
        if v is not _NO and (commutes is None or ref not in commutes):
            # already altered/set here: the ref is checked, so its in-transaction
            # value is exactly what the commit will build on
            nv = fn(v, *args)
            self.note(ref, fn, args, nv, v, False)
            vals[ref] = nv
            return nv
        if v is _NO:
            v = self.peek(ref)
            assert self.peeks is not None
            self.peeks.discard(ref)
        nv = fn(v, *args)
        checked(fn, args, nv, v, ref.name)  # a commuted ref's delta is its commute list (re-applied at commit)
        vals[ref] = nv
        if commutes is None:
            commutes = self.commutes = {}
        fns = commutes.get(ref)
        if fns is None:
            commutes[ref] = [(fn, args)]
        else:
            fns.append((fn, args))
        return nv

    def ensure(self, ref: Ref[Any]) -> Any:
        return self.get(ref)

    def note(
        self, ref: Ref[Any], fn: Callable[..., Any], args: tuple[Any, ...], nv: Any, base: Any, fresh: bool
    ) -> None:
        """Check ``fn``'s result and remember whether the ref's change is still a delta of helper calls.

        ``base``: the (checked) value ``fn`` was applied to; ``fresh``: that was
        the ref's committed value (not an earlier in-transaction one).
        """
        ops = self.ops
        if type(nv) in LARGE_TYPES and len(nv) >= UNTRACK_AT:
            untrack_large(nv)  # before the collector next runs: it would walk every element
        if fn in STRUCTURAL:
            check_args(fn, args, ref.name)
            if ops is None:
                ops = self.ops = {}
            calls = ops.get(ref, _NO)
            if calls is _NO:
                ops[ref] = [(fn, args)] if fresh else None
            elif calls is not None:
                calls.append((fn, args))
        else:
            if type(nv) not in _IMMUTABLE_FAST:
                check_changed_value(nv, base, ref.name)
            if ops is not None and ref in ops:
                ops[ref] = None

    # -- savepoints (nested calls, or_else alternatives) -------------------------

    def savepoint(self) -> _Savepoint:
        """What ``rollback`` needs to undo everything done from here: writes, commutes, effects, entries.

        Effects and outbox entries only grow within an attempt, so their
        lengths suffice; the values and commutes are copied (an attempt
        usually holds a few).
        """
        commutes = self.commutes
        ops = self.ops
        return (
            self.vals.copy() if self.vals else None,
            {r: list(fns) for r, fns in commutes.items()} if commutes else None,
            len(self.effects) if self.effects else 0,
            len(self.outbox) if self.outbox else 0,
            {r: None if calls is None else list(calls) for r, calls in ops.items()} if ops else None,
        )

    def rollback(self, saved: _Savepoint) -> None:
        """Undo the writes, commutes, agent sends, after-commit effects and outbox entries since ``saved``.

        What was read stays read: the decision to raise may rest on it, so it
        is still checked at commit.
        """
        if self.vals is _SEALED:
            return
        vals, commutes, neffects, noutbox, ops = saved
        self.vals = {} if vals is None else vals
        self.commutes = commutes
        self.ops = ops
        if self.effects is not None:
            del self.effects[neffects:]
        if self.outbox is not None:
            del self.outbox[noutbox:]

    # -- ending an attempt ------------------------------------------------------

    def request(self, pin: bool) -> CommitRequest:
        """Seal this attempt and hand its changes over as one commit request."""
        req = CommitRequest(
            self.rp, self.reads, self.vals, self.commutes, self.outbox, self.claimant, self.attempts, pin, self.ops
        )
        self.vals = _SEALED
        return req

    def seal(self) -> None:
        """End this attempt: a task that still holds it can no longer change anything."""
        self.vals = _SEALED

    def next_attempt(self) -> Transaction:
        """Seal this attempt and start the next one at a fresh read point (it becomes the current one)."""
        self.vals = _SEALED
        nxt = Transaction(self.store)
        nxt.attempts = self.attempts
        nxt.conflicts = self.conflicts
        nxt.claimant = self.claimant
        nxt.started = _monotonic()
        _current.set(nxt)
        return nxt

    # -- contention ----------------------------------------------------------

    async def claim(self, refs: Iterable[Ref[Any]]) -> None:
        """Hold the claims on ``refs`` (and those already held), in ref order."""
        me = self.claimant
        if me is None:
            me = self.claimant = Claimant()
        held = me.refs
        new = {r for r in refs if r._claim is not me} - set(held)
        if not new:
            # a new attempt under claims already held: others yield to it for a budget of its own (an
            # attempt that overran, the loop stalled, must not leave the claims passed for good), but not
            # forever: a claimant that keeps failing under its claims (commutes pass them) must not hold
            # its queue until its retry limit
            if me.renewals < CLAIM_RENEWALS:
                me.renewals += 1
                me.deadline = _monotonic() + me.budget
            return
        if held and min(r._ord for r in new) < max(r._ord for r in held):
            want = sorted(set(held) | new, key=_ord)
            self.release_claims()
        else:
            want = sorted(new, key=_ord)
        for r in want:
            await self._claim_one(me, r)

    async def _claim_one(self, me: Claimant, ref: Ref[Any]) -> None:
        """Take the claim on ``ref``, waiting in its FIFO queue.

        Only the head of the queue times the holder: a holder that overstays
        its deadline (say, its body awaits something that needs this very ref)
        is bypassed rather than waited on forever.
        """
        store = self.store
        assert store is not None
        lock = store._timeline.lock
        entry: list[Any] = [me, None]
        with lock:
            if ref._claim is None:
                ref._claim = me
                me.deadline = _monotonic() + me.budget
                store._nclaims += 1
                me.refs.append(ref)
                return
            q = ref._queue
            if q is None:
                q = ref._queue = deque()
            q.append(entry)
        try:
            while True:
                w = Waiter()
                with lock:
                    holder = ref._claim
                    mine = holder is me  # (no break inside ``with``: mypyc cannot compile one)
                    if not mine:
                        assert holder is not None
                        entry[1] = w
                        head = q[0] is entry
                        wait = holder.deadline - _monotonic()
                        if head and wait <= 0:
                            q.popleft()  # the holder is stuck: go ahead without the claim
                            if q and q[0][1] is not None:
                                q[0][1].fire()
                            _claim_overrun(store, ref, len(q) + 1)
                            return
                if mine:
                    break
                if head:
                    with anyio.move_on_after(wait):
                        await w.wait()
                else:
                    await w.wait()
        except BaseException:
            wake: list[Waiter | None] = []
            with lock:
                if ref._claim is me:
                    wake = _handoff(store, ref)
                elif entry in q:
                    was_head = q[0] is entry
                    q.remove(entry)
                    if was_head and q:
                        wake.append(q[0][1])
            for x in wake:
                if x is not None:
                    x.fire()
            raise
        me.refs.append(ref)

    def release_claims(self) -> None:
        me = self.claimant
        if me is None or not me.refs:
            return
        store = self.store
        assert store is not None
        wake: list[Waiter | None] = []
        with store._timeline.lock:
            for r in me.refs:
                if r._claim is me:
                    wake.extend(_handoff(store, r))
        me.refs.clear()
        for w in wake:
            if w is not None:
                w.fire()

    # -- blocking retry ------------------------------------------------------

    async def wait_for_change(self) -> None:
        """After ``astm.retry()``: sleep until a ref this attempt read is committed."""
        watched = set(self.reads)
        if self.peeks:
            watched |= self.peeks
        if self.vals is not _SEALED:
            watched.update(self.vals)
        self.seal()
        if not watched:
            raise RuntimeError(
                "astm.retry() was called before the transaction read any ref, so no "
                "commit could ever wake it; read the refs whose change should wake it"
            )
        self.release_claims()
        store = self.store
        assert store is not None
        with store._timeline.lock:
            store._blocked += 1
        await store._timeline.sleep_until_changed(watched, self.rp)


def checked(fn: Callable[..., Any], args: tuple[Any, ...], nv: Any, base: Any, name: str) -> None:
    """Check the result of ``fn`` on the checked value ``base``: what a helper added, or what differs."""
    if type(nv) in LARGE_TYPES and len(nv) >= UNTRACK_AT:
        untrack_large(nv)
    if fn in STRUCTURAL:
        check_args(fn, args, name)
    else:
        check_changed_value(nv, base, name)


def _ord(ref: Ref[Any]) -> int:
    return ref._ord


def _claim_overrun(store: Host, ref: Ref[Any], waiting: int) -> None:
    """A claim's holder ran past its deadline and a waiter went ahead (under the lock): warn, rarely.

    Under overload every claim can run late at once; one line per store per
    CLAIM_WARN_SECONDS with a count says so without flooding the log.
    """
    store._overruns += 1
    now = _monotonic()
    if now - store._overrun_warned < CLAIM_WARN_SECONDS:
        return
    log.warning(
        "%d transaction(s) held a claim on a contended ref past its deadline (last: ref %r, %d waiting); "
        "the waiters went ahead without it (do bodies await something slow, or is the loop overloaded?)",
        store._overruns,
        ref.name,
        waiting,
    )
    store._overruns = 0
    store._overrun_warned = now


def _handoff(store: Host, ref: Ref[Any]) -> list[Waiter | None]:
    """Pass the claim on ``ref`` to the next in line (under the lock); returns whom to wake.

    Wakes the new holder, and the new head of the queue so that it starts
    timing that holder.
    """
    q = ref._queue
    if q:
        claimant, w = q.popleft()
        ref._claim = claimant
        claimant.deadline = _monotonic() + claimant.budget
        return [w, q[0][1]] if q else [w]
    ref._claim = None
    ref._heat = 0
    store._nclaims -= 1
    return []


# -- the runner ---------------------------------------------------------------


async def run_transaction(
    store: Host | None,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    retry_limit: int | None = None,
    report: bool = False,
) -> Any:
    """Run ``fn`` as a transaction, retrying on conflict; joins an outer one.

    Returns the body's result, or with ``report`` a :class:`TxReport`.
    """
    outer = _current.get()
    if outer is not None:
        if outer.vals is _SEALED:
            raise TransactionEndedError("a nested transaction")
        if report:
            raise RuntimeError(
                "store.transact() reports one commit and cannot run inside another "
                "transaction; use store.atomically() to join the outer transaction"
            )
        if store is not None:
            outer.bind_store(store)
        saved = outer.savepoint()
        try:
            r = fn(*args, **kwargs)
            if _is_coroutine(r):
                r = await r
        except (_Conflict, _Blocked):
            raise  # the whole attempt runs again: nothing to undo here
        except BaseException:
            outer.rollback(saved)  # a nested call that raises leaves no trace (a savepoint)
            raise
        return r
    if store is not None and store._closed:
        raise StoreClosed()
    tx = Transaction(store)
    token = _current.set(tx)
    counted = False  # the attempts are in the store's counters
    started = time.time_ns() if _telemetry.ON and _telemetry.active() else 0
    try:
        while True:
            tx.attempts += 1
            try:
                r = fn(*args, **kwargs)
                if _is_coroutine(r):
                    r = await r
                if BODIES_TWICE and tx.attempts == 1:
                    raise _Conflict(())  # the testing mode: this attempt is discarded, the body runs again
                if not tx.vals and not tx.outbox:
                    tx.seal()
                    counted = True
                    r = await _finish_read_only(tx, r, report)
                    if started and tx.store is not None:
                        _telemetry.record(tx.store, started, tx.attempts, tx.conflicts, None, 0.0, None)  # type: ignore[arg-type]
                    return r
                st = tx.store
                assert st is not None
                req = tx.request(report)
                done = st._committer.commit(req)
                if type(done) is not tuple:
                    done = await cast(Awaitable[Any], done)
                t, changes, wake, watched = done
                counted = True
            except _Conflict as c:
                tx = await _after_conflict(tx, c, retry_limit)
                continue
            except _Blocked:
                await tx.wait_for_change()
                tx = tx.next_attempt()
                continue
            break
        if wake is not None:
            for w in wake:
                w.fire()
        if tx.claimant is not None:
            tx.release_claims()
        # the dbs of a report own their pins from here on: a cancelled wait below releases them
        rep = _report(tx, r, t, changes) if report else None
        waited = 0.0
        if tx.outbox is not None or st._log.durable_t < t:
            if started:
                t0 = time.perf_counter()
                await _after_durable(st, t, tx.outbox)
                waited = time.perf_counter() - t0
            else:
                await _after_durable(st, t, tx.outbox)
        if watched or tx.effects is not None:
            await _after_commit(tx, changes)
        if started:
            _telemetry.record(st, started, tx.attempts, tx.conflicts, t, waited, None)  # type: ignore[arg-type]
        return r if rep is None else rep
    except BaseException as exc:
        if started and tx.store is not None and not isinstance(exc, (_Conflict, _Blocked)):
            _telemetry.record(tx.store, started, tx.attempts, tx.conflicts, None, 0.0, exc)  # type: ignore[arg-type]
        tx.seal()
        if tx.claimant is not None:
            tx.release_claims()
        st2 = tx.store
        if st2 is not None and not counted and not isinstance(exc, RetryLimitExceeded):
            with st2._timeline.lock:
                st2._counts.attempts += tx.attempts
        raise
    finally:
        _current.reset(token)


def _report(tx: Transaction, result: Any, t: int | None, changes: list[tuple[Ref[Any], Any, Any]]) -> TxReport[Any]:
    """The TxReport of a finished transaction (its dbs were pinned under the commit lock)."""
    store = tx.store
    now = time.time()
    if store is None:
        raise RuntimeError("store.transact(): the body touched no ref of the store")
    if t is None:
        db = Db(store, tx.rp, True)
        return TxReport(tx.rp, result, db, db, (), now)
    return TxReport.of_commit(store, t, result, changes, now, pinned=True)


async def _after_durable(store: Host, t: int, outbox: list[tuple[str, Any, Any]] | None) -> None:
    """Acknowledge only what is durable; hand outbox entries over once they are.

    With ``durability="async"`` the transaction returns at once and its outbox
    entries follow when the storage has made them durable.
    """
    storage = store._log
    if storage.durable_t < t:
        if store._durability != "sync":
            if outbox:
                spawn(_hand_over_when_durable, store, t, outbox)
            return
        await storage.wait_durable(t)
    if outbox:
        store.outbox.committed(t, outbox)


async def _hand_over_when_durable(store: Host, t: int, entries: list[tuple[str, Any, Any]]) -> None:
    await store._log.wait_durable(t)
    store.outbox.committed(t, entries)


async def _finish_read_only(tx: Transaction, result: Any, report: bool) -> Any:
    store = tx.store
    rep = None
    if store is not None:
        with store._timeline.lock:
            store._counts.attempts += tx.attempts
            if report:
                store._timeline.pin(tx.rp)
        if report:
            rep = _report(tx, result, None, [])
        if tx.rp > store._log.durable_t:
            # it read a commit that is not durable yet: do not acknowledge before it is
            await store._log.wait_durable(tx.rp)
    if tx.claimant is not None:
        tx.release_claims()
    if tx.effects:
        await _run_effects(tx.effects)
    if report:
        return rep if rep is not None else _report(tx, result, None, [])
    return result


async def _after_conflict(tx: Transaction, c: _Conflict, retry_limit: int | None) -> Transaction:
    """Count the conflict, back off or claim, and start the next attempt (returned)."""
    tx.seal()
    store = tx.store
    assert store is not None
    if c.fault:
        cold = [r for r in c.refs if r._cur[0] == COLD]
        for r in cold:
            mark = r._cur[1]
            if type(mark) is Tombstone:
                raise RefDeleted(r.name, mark.t)
        if cold:  # a cache miss, not a conflict: fetch what the body wanted and run it again
            store._misses += len(cold)
            await store._load(cold)
            return tx.next_attempt()
    conflicts = tx.conflicts
    if conflicts is None:
        conflicts = tx.conflicts = {}
    for r in c.refs:
        r._conflicts += 1
        r._heat += 1
        conflicts[r.name] = conflicts.get(r.name, 0) + 1
        if c.fault:
            store._timeline.faulted(r)
    failures = tx.attempts
    limit = store._retry_limit if retry_limit is None else retry_limit
    if c.fault:
        store._faults += 1
    store._retries += 1
    if failures >= limit:
        with store._timeline.lock:
            store._counts.attempts += tx.attempts
        raise RetryLimitExceeded(failures, conflicts)
    if failures >= CLAIM_ALL_AFTER:
        to_claim: set[Ref[Any]] = set(tx.reads)
        to_claim.update(c.refs)
    else:
        to_claim = {r for r in c.refs if r._heat >= HOT_REF_CONFLICTS or r._claim is not None}
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "transaction retry %d after a conflict on %s%s",
            failures,
            ", ".join(repr(r.name) for r in c.refs),
            f"; claiming {len(to_claim)} ref(s)" if to_claim else "",
        )
    if to_claim:
        # unknown for a first attempt: then the minimum deadline applies
        took = _monotonic() - tx.started if tx.started else 0.0
        me = tx.claimant
        if me is None:
            me = tx.claimant = Claimant()
        # others yield to our claims for about as long as the body took, then no more
        me.budget = max(CLAIM_MIN_SECONDS, CLAIM_TIME_FACTOR * took)
        await tx.claim(to_claim)
    elif failures >= 2:
        # exponential backoff with full jitter, 0.1 ms doubling up to 10 ms
        await anyio.sleep(random.uniform(0, min(0.01, 0.0001 * (1 << min(failures, 7)))))
    return tx.next_attempt()


async def _after_commit(tx: Transaction, changes: list[tuple[Ref[Any], Any, Any]]) -> None:
    """Watches, then after-commit effects: outside the transaction, in order."""
    token = _current.set(None)
    try:
        await run_watches(changes)
        if tx.effects:
            await _run_effects(tx.effects)
    finally:
        _current.reset(token)


async def run_watches(changes: Iterable[tuple[Ref[Any], Any, Any]]) -> None:
    """Call every watch of every changed ref with ``(key, ref, old, new)``; a failing watch is logged."""
    for r, old, new in changes:
        watches = r._watches
        if watches:
            for key, wfn in list(watches.items()):
                try:
                    res = wfn(key, r, old, new)
                    if inspect.isawaitable(res):
                        await res
                except Exception:
                    log.exception("watch %r on ref %r failed", key, r.name)


async def _run_effects(effects: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> None:
    for fn, args in effects:
        try:
            res = fn(*args)
            if inspect.isawaitable(res):
                await res
        except Exception:
            log.exception("after-commit effect %r failed", getattr(fn, "__qualname__", fn))


# -- the current attempt ---------------------------------------------------------


def current_for(operation: str) -> Transaction:
    """The current attempt, for ``operation``; raises when there is none or it has ended."""
    tx = _current.get()
    if tx is None:
        raise NotInTransactionError(operation)
    if tx.vals is _SEALED:
        raise TransactionEndedError(operation)
    return tx


def _validate_value(name: str, validator: Callable[[Any], Any], value: Any) -> None:
    validate_value(name, validator, value)
