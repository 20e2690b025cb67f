"""The transaction engine: read point, in-transaction values, commit, retry.

A transaction reads a consistent snapshot at its *read point* ``rp`` (a basis
``t`` of its store) and commits all its writes at one *write point* ``t + 1``.

Reads. ``ref._cur`` is the newest committed ``(t, value)``. A read of a ref
newer than ``rp`` first tries to *extend* the read point to the store's current
``t``: allowed when nothing this attempt already read has changed since ``rp``,
because the old and new snapshots then agree on everything it has seen. When
extension fails, a checked read is doomed (it would fail validation at commit),
so the attempt retries at once; an unchecked ``peek`` reads the old version from
the ref's history. The attempt never observes a state that no single commit
produced (opacity), even across ``await``.

Commit. One synchronous section under the store's ``threading.Lock``:
validate the checked refs (every ``get``/``alter``/``set``/``ensure``), refuse to
overwrite a ref another starving transaction has claimed, re-apply commutes to
the newest values, run validators, then install every new version at ``t + 1``.
No ``await`` inside, so cancellation can never leave half a commit.

Contention. A conflict on a hot ref, or a third failure, makes the transaction
*claim* the refs involved: claims are FIFO queues per ref, taken in a global
order (no deadlock), held until the transaction ends, and no other transaction
may commit an ``alter``/``set`` of a claimed ref. Contenders for a hot ref thus
line up instead of re-running in a storm, and a long transaction gets priority
over a stream of short ones.
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
import sys
import time
import types
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from contextvars import ContextVar
from heapq import heappop
from time import monotonic as _monotonic
from time import time as _time
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar, cast, overload

import anyio

from . import codec
from ._backend import Waiter, spawn
from ._db import Db, TxReport
from ._errors import (
    CommuteConflictError,
    IOInTransactionError,
    NotInTransactionError,
    RetryLimitExceeded,
    StoreClosed,
    StoreMismatchError,
    ValidationError,
    _Blocked,
    _Conflict,
)
from ._values import check_value
from .abc import CommitRecord

if TYPE_CHECKING:
    from ._ref import Ref
    from ._store import Store
    from .abc import Storage

__all__ = [
    "Transaction",
    "after_commit",
    "check",
    "in_transaction",
    "io",
    "or_else",
    "retry",
    "run_transaction",
    "transactional",
]

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("astm")

_current: ContextVar[Transaction | None] = ContextVar("astm.transaction", default=None)
_NO: Any = object()
_CoroutineType = types.CoroutineType

#: A ref that faulted (its history lacked a version an attempt needed) keeps at
#: least this many old versions at most.
MAX_KEEP = 64
#: Claims start on the first conflict of a ref that conflicted this often since
#: its queue last drained, or on any conflict from the third failure on.
HOT_REF_CONFLICTS = 2
CLAIM_ALL_AFTER = 3
#: Others yield to a claimant for CLAIM_TIME_FACTOR times its last attempt's
#: duration, and at least CLAIM_MIN_SECONDS.
CLAIM_TIME_FACTOR = 4.0
CLAIM_MIN_SECONDS = 0.05


class Transaction:
    """The state of one transaction: its read point, reads, writes and effects.

    Refs hand every operation to the current transaction (found once per call
    in a context variable); nothing here allocates on a plain ``get``.
    """

    __slots__ = (
        "attempts",
        "budget",
        "claims",
        "commutes",
        "conflicts",
        "deadline",
        "effects",
        "outbox",
        "peeks",
        "reads",
        "rp",
        "started",
        "store",
        "vals",
    )

    def __init__(self, store: Store | None) -> None:
        self.store = store
        self.rp = store._t if store is not None else 0
        #: in-transaction values of every ref written (set/alter/commute)
        self.vals: dict[Ref[Any], Any] = {}
        #: refs checked at commit: every get/alter/set/ensure
        self.reads: set[Ref[Any]] = set()
        self.peeks: set[Ref[Any]] | None = None
        self.commutes: dict[Ref[Any], list[tuple[Callable[..., Any], tuple[Any, ...]]]] | None = None
        self.effects: list[tuple[Callable[..., Any], tuple[Any, ...]]] | None = None
        self.claims: list[Ref[Any]] | None = None
        self.attempts = 0
        self.conflicts: dict[str, int] | None = None
        #: when the current attempt started (monotonic seconds)
        self.started = 0.0
        #: while holding claims: until when other commits yield to them
        self.deadline = 0.0
        #: how long others yield to this transaction's claims once it holds them
        self.budget = CLAIM_MIN_SECONDS
        #: outbox entries of this attempt: (effect name, payload, order key)
        self.outbox: list[tuple[str, Any, Any]] | None = None

    # -- binding -------------------------------------------------------------

    def _bind(self, ref: Ref[Any]) -> None:
        """First ref of a decorated transaction fixes its store and read point."""
        store = ref._store
        if self.store is None:
            self.store = store
            self.rp = store._t
        elif self.store is not store:
            raise StoreMismatchError(ref.name)

    def bind_store(self, store: Store) -> None:
        if self.store is None:
            self.store = store
            self.rp = store._t
        elif self.store is not store:
            raise StoreMismatchError(f"<transaction of {store!r}>")

    # -- reads ---------------------------------------------------------------

    def _extend(self) -> bool:
        """Move the read point to now if nothing read so far has changed since it."""
        store = self.store
        assert store is not None
        new_rp = store._t
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
        """The newest version of ``ref`` not after ``rp``: its history ring, else the log."""
        store = self.store
        assert store is not None
        v = version_at(store, ref, self.rp)
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
        check_value(value, ref.name)
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
        return value

    def alter(self, ref: Ref[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        vals = self.vals
        v = vals.get(ref, _NO)
        if v is _NO:
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
        check_value(nv, ref.name)
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
            check_value(nv, ref.name)
            vals[ref] = nv
            return nv
        if v is _NO:
            v = self.peek(ref)
            assert self.peeks is not None
            self.peeks.discard(ref)
        nv = fn(v, *args)
        check_value(nv, ref.name)
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

    # -- commit --------------------------------------------------------------

    def commit(self, pin: bool = False) -> tuple[int, list[tuple[Ref[Any], Any, Any]], list[Waiter] | None, bool]:
        """Validate and install every write at one new ``t``; returns (t, changes, wake).

        Raises ``_Conflict`` to retry, ``ValidationError`` or a commute function's
        error to abort; in every such case nothing has been changed.
        """
        store = self.store
        vals = self.vals
        assert store is not None
        with store._lock:
            if store._closed:
                raise StoreClosed()
            rp = self.rp
            t = store._t
            if t != rp:
                bad = [r for r in self.reads if r._cur[0] > rp]
                if bad:
                    raise _Conflict(bad)
            commutes = self.commutes
            if store._nclaims:
                now = _monotonic()
                for r in vals:
                    c = r._claim
                    if c is not None and c is not self and c.deadline > now and (commutes is None or r not in commutes):
                        raise _Conflict((r,))
            self.finish_values()
            backend = store._backend
            if backend is not None:
                if backend.failed is not None:
                    raise backend.refusal()
                encoded = _encode(vals, self.outbox)  # a value the codec refuses aborts here
            # all values calculated and validated; no more client code runs below
            t += 1
            changes: list[tuple[Ref[Any], Any, Any]] = []
            wake: list[Waiter] | None = None
            watched = False
            for r, v in vals.items():
                old = r._cur
                if r._keep:
                    _keep_version(store, r, old)
                r._cur = (t, v)
                changes.append((r, old[1], v))
                if r._watches:
                    watched = True
                if r._waiters:
                    if wake is None:
                        wake = []
                    wake.extend(r._waiters)
                    r._waiters = None
            store._t = t
            log = store._log
            now = _time()
            log.append((t, now, changes))
            if backend is not None:
                _submit(backend, t, now, vals, encoded, t - store._history)
            if len(log) >= store._trim_len:
                store._trim(t)
            if store._tick:
                if wake is None:
                    wake = []
                wake.extend(store._tick)
                store._tick = []
            if pin:
                store._pin(t - 1)
                store._pin(t)
            store._commits += 1
            store._attempts += self.attempts
        return t, changes, wake, watched

    def finish_values(self) -> list[Ref[Any]]:
        """Re-apply commutes to the newest values and run validators (under the store lock).

        Returns the refs that were only commuted (not read): their values came
        from the newest versions, not from the read point.
        """
        vals = self.vals
        commuted = []
        if self.commutes:
            reads = self.reads
            for r, fns in self.commutes.items():
                if r in reads:
                    continue  # checked and unchanged: the in-tx value stands
                v = r._cur[1]
                for f, a in fns:
                    v = f(v, *a)
                check_value(v, r.name)
                vals[r] = v
                commuted.append(r)
        for r, v in vals.items():
            if r._validator is not None:
                _validate(r, v)
        return commuted

    # -- contention ----------------------------------------------------------

    async def claim(self, refs: Iterable[Ref[Any]]) -> None:
        """Hold the claims on ``refs`` (and those already held), in ref order."""
        held = self.claims
        if held is None:
            held = self.claims = []
        new = {r for r in refs if r._claim is not self} - set(held)
        if not new:
            return
        if held and min(r._ord for r in new) < max(r._ord for r in held):
            want = sorted(set(held) | new, key=_ord)
            self.release_claims()
        else:
            want = sorted(new, key=_ord)
        for r in want:
            await self._claim_one(r)

    async def _claim_one(self, ref: Ref[Any]) -> None:
        """Take the claim on ``ref``, waiting in its FIFO queue.

        Only the head of the queue times the holder: a holder that overstays
        its deadline (say, its body awaits something that needs this very ref)
        is bypassed rather than waited on forever.
        """
        store = self.store
        assert store is not None
        entry: list[Any] = [self, None]
        with store._lock:
            if ref._claim is None:
                ref._claim = self
                self.deadline = _monotonic() + self.budget
                store._nclaims += 1
                assert self.claims is not None
                self.claims.append(ref)
                return
            q = ref._queue
            if q is None:
                q = ref._queue = deque()
            q.append(entry)
        try:
            while True:
                w = Waiter()
                with store._lock:
                    holder = ref._claim
                    if holder is self:
                        break
                    assert q is not None
                    assert holder is not None
                    entry[1] = w
                    head = q[0] is entry
                    wait = holder.deadline - _monotonic()
                    if head and wait <= 0:
                        q.popleft()  # the holder is stuck: go ahead without the claim
                        if q:
                            q[0][1].fire()
                        return
                if head:
                    with anyio.move_on_after(wait):
                        await w.wait()
                else:
                    await w.wait()
        except BaseException:
            with store._lock:
                wake = []
                if ref._claim is self:
                    wake = _handoff(store, ref)
                else:
                    assert ref._queue is not None
                    was_head = ref._queue[0] is entry
                    ref._queue.remove(entry)
                    if was_head and ref._queue:
                        wake.append(ref._queue[0][1])
            for x in wake:
                if x is not None:
                    x.fire()
            raise
        assert self.claims is not None
        self.claims.append(ref)

    def release_claims(self) -> None:
        claims = self.claims
        if not claims:
            return
        store = self.store
        assert store is not None
        wake: list[Waiter | None] = []
        with store._lock:
            for r in claims:
                if r._claim is self:
                    wake.extend(_handoff(store, r))
        claims.clear()
        for w in wake:
            if w is not None:
                w.fire()

    # -- blocking retry ------------------------------------------------------

    async def wait_for_change(self) -> None:
        """After ``astm.retry()``: sleep until a ref this attempt read is committed."""
        watched = set(self.reads)
        if self.peeks:
            watched |= self.peeks
        watched.update(self.vals)
        if not watched:
            raise RuntimeError(
                "astm.retry() was called before the transaction read any ref, so no "
                "commit could ever wake it; read the refs whose change should wake it"
            )
        self.release_claims()
        store = self.store
        assert store is not None
        rp = self.rp
        w = Waiter()
        with store._lock:
            if any(r._cur[0] > rp for r in watched):
                return
            for r in watched:
                ws = r._waiters
                if ws is None:
                    r._waiters = {w}
                else:
                    ws.add(w)
            store._blocked += 1
        try:
            await w.wait()
        finally:
            with store._lock:
                for r in watched:
                    ws = r._waiters
                    if ws is not None:
                        ws.discard(w)

    def reset(self) -> None:
        """Forget the attempt's reads, writes and effects; take a fresh read point."""
        self.vals.clear()
        self.reads.clear()
        self.peeks = None
        self.commutes = None
        self.effects = None
        self.outbox = None
        if self.store is not None:
            self.rp = self.store._t


def _ord(ref: Ref[Any]) -> int:
    return ref._ord


def _handoff(store: Store, ref: Ref[Any]) -> list[Waiter | None]:
    """Pass the claim on ``ref`` to the next in line (under the store lock); returns whom to wake.

    Wakes the new holder, and the new head of the queue so that it starts
    timing that holder.
    """
    q = ref._queue
    if q:
        tx, w = q.popleft()
        ref._claim = tx
        tx.deadline = _monotonic() + tx.budget
        return [w, q[0][1]] if q else [w]
    ref._claim = None
    ref._heat = 0
    store._nclaims -= 1
    return []


def _validate(ref: Ref[Any], value: Any) -> None:
    validator = ref._validator
    assert validator is not None
    _validate_value(ref.name, validator, value)


def _validate_value(name: str, validator: Callable[[Any], Any], value: Any) -> None:
    """Raise ``ValidationError`` unless ``validator(value)`` is true."""
    try:
        ok = validator(value)
    except Exception as exc:
        raise ValidationError(name, value, f"the validator raised {exc!r}") from exc
    if not ok:
        raise ValidationError(name, value)


def _keep_version(store: Store, ref: Ref[Any], old: tuple[int, Any]) -> None:
    """Keep the superseded version in the ref's ring of ``ref._keep`` versions.

    Only refs whose readers faulted (needed a version nobody kept) have a ring;
    it grows on each fault and shrinks again while nobody faults (``decay``).
    """
    h = ref._hist
    if h is None:
        h = ref._hist = deque()
        store._versioned.add(ref)
    h.append(old)
    while len(h) > ref._keep:
        h.popleft()


def decay_history(ref: Ref[Any]) -> bool:
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


def version_at(store: Store, ref: Ref[Any], t: int) -> tuple[int, Any] | None:
    """The version of ``ref`` visible at ``t``, or None when no longer kept anywhere.

    Looks at the newest version, then the ref's own ring, then the store's
    commit log (which retains every superseded value for its window).
    """
    cur = ref._cur
    if cur[0] <= t:
        return cur
    h = ref._hist
    if h is not None:
        for i in range(len(h) - 1, -1, -1):
            v = h[i]
            if v[0] <= t:
                return v
    with store._lock:
        log = store._log
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


def _encode(
    vals: dict[Ref[Any], Any], outbox: list[tuple[str, Any, Any]] | None
) -> tuple[list[str], list[tuple[int, str, str, str | None]]]:
    """Encode a commit for durable storage (under the lock, before anything is applied)."""
    encs = [codec.dumps(v, f"ref {r.name!r}") for r, v in vals.items()]
    entries = []
    if outbox:
        for seq, (name, payload, order_key) in enumerate(outbox):
            where = f"outbox entry of effect {name!r}"
            entries.append(
                (seq, name, codec.dumps(payload, where), None if order_key is None else codec.dumps(order_key, where))
            )
    return encs, entries


def _submit(
    backend: Storage,
    t: int,
    now: float,
    vals: dict[Ref[Any], Any],
    encoded: tuple[list[str], list[tuple[int, str, str, str | None]]],
    floor: int,
) -> None:
    """Queue an applied commit to the backend's writer (under the lock, so in t order)."""
    encs, entries = encoded
    changes = []
    for r, enc in zip(vals, encs, strict=True):
        changes.append((r.name, r._enc, enc))
        r._enc = enc
    backend.submit(CommitRecord(t, now, changes, entries, floor))


def pin_floor(pins: dict[int, int], heap: list[int]) -> int | None:
    """The oldest pinned ``t`` (dropping released pins from the heap top)."""
    while heap and heap[0] not in pins:
        heappop(heap)
    return heap[0] if heap else None


# -- the runner ---------------------------------------------------------------


async def run_transaction(
    store: Store | None,
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
        if report:
            raise RuntimeError(
                "store.transact() reports one commit and cannot run inside another "
                "transaction; use store.atomically() to join the outer transaction"
            )
        if store is not None:
            outer.bind_store(store)
        r = fn(*args, **kwargs)
        if type(r) is _CoroutineType:
            r = await r
        return r
    if store is not None and store._closed:
        raise StoreClosed()
    tx = Transaction(store)
    token = _current.set(tx)
    try:
        while True:
            tx.attempts += 1
            try:
                r = fn(*args, **kwargs)
                if type(r) is _CoroutineType:
                    r = await r
                if not tx.vals and not tx.outbox:
                    return await _finish_read_only(tx, r, report)
                remote = tx.store._remote if tx.store is not None else None
                if remote is None:
                    t, changes, wake, watched = tx.commit(report)
                else:
                    t, changes = await remote.commit(tx)
                    wake, watched = None, False  # applying the log woke waiters and ran watches
                    _count_remote(tx, t, report)
            except _Conflict as c:
                await _after_conflict(tx, c, retry_limit)
                continue
            except _Blocked:
                await tx.wait_for_change()
                tx.reset()
                tx.started = _monotonic()
                continue
            break
        if tx.claims:
            tx.release_claims()
        store = tx.store
        assert store is not None
        if store._backend is not None:
            await _durable(store, tx, t)
        elif tx.outbox and store._remote is None:
            store.outbox.add_committed(t, tx.outbox)
        if wake is not None:
            for w in wake:
                w.fire()
        if watched or tx.effects is not None:
            await _after_commit(tx, changes)
        if report:
            return _report(tx, r, t, changes)
        return r
    except BaseException:
        if tx.claims:
            tx.release_claims()
        store = tx.store
        if store is not None and not isinstance(sys.exc_info()[1], RetryLimitExceeded):
            with store._lock:
                store._attempts += tx.attempts
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


def _count_remote(tx: Transaction, t: int, report: bool) -> None:
    """Stats (and report pins) for a commit made through a remote store."""
    store = tx.store
    assert store is not None
    with store._lock:
        store._commits += 1
        store._attempts += tx.attempts
        if report:
            store._pin(t - 1)
            store._pin(t)


async def _durable(store: Store, tx: Transaction, t: int) -> None:
    """Acknowledge only what is durable; hand outbox entries over once they are.

    With ``durability="async"`` the transaction returns at once and its outbox
    entries follow when the writer has flushed them.
    """
    backend = store._backend
    assert backend is not None
    if store._durability == "sync":
        await backend.wait_durable(t)
        if tx.outbox:
            store.outbox.add_committed(t, tx.outbox)
    elif tx.outbox:
        spawn(_hand_over_when_durable, store, t, tx.outbox)


async def _hand_over_when_durable(store: Store, t: int, entries: list[tuple[str, Any, Any]]) -> None:
    assert store._backend is not None
    await store._backend.wait_durable(t)
    store.outbox.add_committed(t, entries)


async def _finish_read_only(tx: Transaction, result: Any, report: bool) -> Any:
    store = tx.store
    if store is not None and store._backend is not None and tx.rp > store._backend.durable_t:
        # it read a commit that is not durable yet: do not acknowledge before it is
        await store._backend.wait_durable(tx.rp)
    if store is not None:
        with store._lock:
            store._attempts += tx.attempts
            if report:
                store._pin(tx.rp)
    if tx.claims:
        tx.release_claims()
    if tx.effects:
        await _run_effects(tx.effects)
    if report:
        return _report(tx, result, None, [])
    return result


async def _after_conflict(tx: Transaction, c: _Conflict, retry_limit: int | None) -> None:
    store = tx.store
    assert store is not None
    conflicts = tx.conflicts
    if conflicts is None:
        conflicts = tx.conflicts = {}
    for r in c.refs:
        r._conflicts += 1
        r._heat += 1
        conflicts[r.name] = conflicts.get(r.name, 0) + 1
        if c.fault:
            r._keep = min(max(1, r._keep * 2), MAX_KEEP)
    failures = tx.attempts
    limit = store._retry_limit if retry_limit is None else retry_limit
    if c.fault:
        store._faults += 1
    store._retries += 1
    if failures >= limit:
        with store._lock:
            store._attempts += tx.attempts
        raise RetryLimitExceeded(failures, conflicts)
    if failures >= CLAIM_ALL_AFTER:
        to_claim: set[Ref[Any]] = set(tx.reads)
        to_claim.update(c.refs)
    else:
        to_claim = {r for r in c.refs if r._heat >= HOT_REF_CONFLICTS or r._claim is not None}
    if to_claim:
        # unknown for a first attempt: then the minimum deadline applies
        took = _monotonic() - tx.started if tx.started else 0.0
        # others yield to our claims for about as long as the body took, then no more
        tx.budget = max(CLAIM_MIN_SECONDS, CLAIM_TIME_FACTOR * took)
        await tx.claim(to_claim)
    elif failures >= 2:
        # exponential backoff with full jitter, 0.1 ms doubling up to 10 ms
        await anyio.sleep(random.uniform(0, min(0.01, 0.0001 * (1 << min(failures, 7)))))
    tx.reset()
    tx.started = _monotonic()


async def _after_commit(tx: Transaction, changes: list[tuple[Ref[Any], Any, Any]]) -> None:
    """Watches, then after-commit effects: outside the transaction, in order."""
    token = _current.set(None)
    try:
        for r, old, new in changes:
            watches = r._watches
            if watches:
                for key, wfn in list(watches.items()):
                    try:
                        res = wfn(key, r, old, new)
                        if type(res) is _CoroutineType:
                            await res
                    except Exception:
                        log.exception("watch %r on ref %r failed", key, r.name)
        if tx.effects:
            await _run_effects(tx.effects)
    finally:
        _current.reset(token)


async def _run_effects(effects: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> None:
    for fn, args in effects:
        try:
            res = fn(*args)
            if inspect.isawaitable(res):
                await res
        except Exception:
            log.exception("after-commit effect %r failed", getattr(fn, "__qualname__", fn))


# -- the public functions -------------------------------------------------------


def current() -> Transaction:
    tx = _current.get()
    if tx is None:
        raise NotInTransactionError("this operation")
    return tx


def in_transaction() -> bool:
    """True when called inside a transaction body."""
    return _current.get() is not None


def retry() -> NoReturn:
    """Abandon this attempt and run the body again once a ref it read has changed.

    Blocking retry in the style of Haskell's STM: the transaction sleeps (no
    polling) until another transaction commits a change to something this
    attempt read. Bound the wait with ``anyio.fail_after``.
    """
    if _current.get() is None:
        raise NotInTransactionError("astm.retry()")
    raise _Blocked()


def check(condition: object) -> None:
    """``astm.retry()`` unless ``condition`` is true."""
    if not condition:
        retry()


async def or_else(*alternatives: Callable[[], Any]) -> Any:
    """Run the first alternative that does not ``retry()``; its result is returned.

    An alternative that retries has its writes and effects rolled back; what it
    read still counts, so when every alternative retries the transaction waits
    for a change to anything any of them read.
    """
    tx = _current.get()
    if tx is None:
        raise NotInTransactionError("astm.or_else()")
    if not alternatives:
        raise TypeError("or_else() needs at least one alternative")
    for i, alt in enumerate(alternatives):
        saved_vals = dict(tx.vals)
        saved_commutes = {k: list(v) for k, v in tx.commutes.items()} if tx.commutes else None
        saved_effects = list(tx.effects) if tx.effects else None
        saved_outbox = list(tx.outbox) if tx.outbox else None
        try:
            r = alt()
            if inspect.isawaitable(r):
                r = await r
            return r
        except _Blocked:
            tx.vals = saved_vals
            tx.commutes = saved_commutes
            tx.effects = saved_effects
            tx.outbox = saved_outbox
            if i == len(alternatives) - 1:
                raise
    raise AssertionError("unreachable")


def after_commit(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` after the current transaction commits (never on retry or abort)."""
    tx = _current.get()
    if tx is None:
        raise NotInTransactionError("astm.after_commit()")
    if tx.effects is None:
        tx.effects = [(fn, args)]
    else:
        tx.effects.append((fn, args))


@overload
def transactional(
    fn: Callable[P, Awaitable[R]], *, retry_limit: int | None = None
) -> Callable[P, Coroutine[Any, Any, R]]: ...
@overload
def transactional(fn: Callable[P, R], *, retry_limit: int | None = None) -> Callable[P, Coroutine[Any, Any, R]]: ...
@overload
def transactional(
    fn: None = None, *, retry_limit: int | None = None
) -> Callable[[Callable[P, Any]], Callable[P, Coroutine[Any, Any, Any]]]: ...
def transactional(fn: Any = None, *, retry_limit: int | None = None) -> Any:
    """Make a function a transaction: calling it runs it atomically, retried on conflict.

    Works on ``async def`` and plain ``def``; the call always returns an
    awaitable. The store is the one of the first ref the body touches. Called
    inside another transaction, it joins that one.
    """
    if fn is None:
        return functools.partial(transactional, retry_limit=retry_limit)

    # a plain function returning the runner's coroutine: one frame, not two
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        return run_transaction(None, fn, args, kwargs, retry_limit)

    return wrapper


def io(fn: Callable[P, R]) -> Callable[P, R]:
    """Mark ``fn`` as side-effecting: calling it inside a transaction raises ``IOInTransactionError``."""
    name = getattr(fn, "__qualname__", repr(fn))
    if inspect.iscoroutinefunction(fn):
        afn = cast(Callable[..., Awaitable[Any]], fn)

        @functools.wraps(fn)
        async def aguard(*args: Any, **kwargs: Any) -> Any:
            if _current.get() is not None:
                raise IOInTransactionError(name)
            return await afn(*args, **kwargs)

        return cast(Callable[P, R], aguard)

    @functools.wraps(fn)
    def guard(*args: P.args, **kwargs: P.kwargs) -> R:
        if _current.get() is not None:
            raise IOInTransactionError(name)
        return fn(*args, **kwargs)

    return guard
