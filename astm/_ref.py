"""Refs: named identities whose changes are coordinated by transactions.

A ref only holds its state (the newest committed version, a short history, its
validator and watches); every operation is handed to the current transaction.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar

from ._backend import Waiter
from ._engine import mypyc_attr
from ._errors import NotInTransactionError, RefDeleted, RefNotLoaded
from ._markers import COLD, Tombstone
from ._tx import _NO, Claimant, _current
from ._values import _IMMUTABLE_FAST

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["Ref"]

T = TypeVar("T")

Watch = Callable[[Any, "Ref[Any]", Any, Any], Any]


#: Ref's docstring again: compiled, the class keeps a filler instead (tests/test_engine.py checks they agree)
_DOC = """A named identity in a store whose value changes only inside transactions.

    Read it anywhere with ``get()``; inside a transaction change it with
    ``set``, ``alter`` and ``commute``, guard a read with ``ensure``. Create
    refs with ``store.ref(name, initial)``.
    """


# An ordinary class even when compiled (its methods are compiled): mypyc 2.4 would free a native
# class's instances without clearing their weak references, and stores hold refs weakly.
@mypyc_attr(native_class=False)
class Ref(Generic[T]):
    """A named identity in a store whose value changes only inside transactions.

    Read it anywhere with ``get()``; inside a transaction change it with
    ``set``, ``alter`` and ``commute``, guard a read with ``ensure``. Create
    refs with ``store.ref(name, initial)``.
    """

    __slots__ = (
        "__weakref__",
        "_claim",
        "_conflicts",
        "_cur",
        "_expire",
        "_heat",
        "_hist",
        "_keep",
        "_ord",
        "_queue",
        "_store",
        "_validator",
        "_waiters",
        "_watches",
        "_written",
        "name",
    )

    def __init__(
        self,
        store: Store,
        name: str,
        value: T,
        validator: Callable[[T], bool] | None,
        ordinal: int,
    ) -> None:
        self._store = store
        self.name = name
        #: newest committed version: (t, value); t 0 means "since creation"
        self._cur: tuple[int, T] = (0, value)
        #: older versions (oldest first) that some reader may still need
        self._hist: deque[tuple[int, T]] | None = None
        self._keep = 0
        self._validator = validator
        self._watches: dict[Any, Watch] | None = None
        self._waiters: set[Waiter] | None = None
        self._claim: Claimant | None = None
        #: contenders waiting for the claim: [transaction, waiter] pairs, FIFO
        self._queue: deque[list[Any]] | None = None
        self._heat = 0
        self._conflicts = 0
        self._ord = ordinal
        #: expire_after seconds, and when it was last written (wall clock), for refs that expire
        self._expire: float | None = None
        self._written = 0.0

    @property
    def store(self) -> Store:
        """The store this ref belongs to."""
        return self._store

    def get(self) -> T:
        """The in-transaction value inside a transaction (checked at commit), else the newest committed value."""
        tx = _current.get()
        if tx is None:
            cur = self._cur
            if cur[0] == COLD:
                self._missing(cur[1])
            return cur[1]
        # the common case inline (this is the hot path); the rest in the engine
        v = tx.vals.get(self, _NO)
        if v is not _NO:
            return v  # type: ignore[no-any-return]
        if self._store is not tx.store:
            tx._bind(self)
        cur = self._cur
        if cur[0] > tx.rp:
            return tx.get(self)  # type: ignore[no-any-return]
        tx.reads.add(self)
        return cur[1]

    def peek(self) -> T:
        """Read without making the transaction depend on it (not checked at commit).

        Inside a transaction this is a consistent snapshot read that another
        commit may overwrite without causing a retry, so a decision based on it
        can suffer write skew; outside, it equals ``get()``.
        """
        tx = _current.get()
        if tx is None:
            cur = self._cur
            if cur[0] == COLD:
                self._missing(cur[1])
            return cur[1]
        return tx.peek(self)  # type: ignore[no-any-return]

    def _missing(self, mark: Any) -> NoReturn:
        """A read of a ref that has no value here: deleted, or not loaded by this peer."""
        if type(mark) is Tombstone:
            raise RefDeleted(self.name, mark.t)
        raise RefNotLoaded(self.name)

    def set(self, value: T) -> T:
        """Set the in-transaction value (Clojure's ``ref-set``); conflicts with any other commit to this ref."""
        tx = _current.get()
        if tx is None:
            raise NotInTransactionError(f"ref {self.name!r}: set()")
        return tx.set(self, value)  # type: ignore[no-any-return]

    def alter(self, fn: Callable[..., T], *args: Any) -> T:
        """Set the in-transaction value to ``fn(value, *args)``; returns it."""
        tx = _current.get()
        if tx is None:
            raise NotInTransactionError(f"ref {self.name!r}: alter()")
        vals = tx.vals
        v = vals.get(self, _NO)
        if v is _NO:
            if self._store is not tx.store:
                tx._bind(self)
            cur = self._cur
            if cur[0] > tx.rp:
                return tx.alter(self, fn, args)  # type: ignore[no-any-return]
            tx.reads.add(self)
            base = cur[1]
            nv = fn(base, *args)
            if type(nv) not in _IMMUTABLE_FAST or tx.ops is not None:
                tx.note(self, fn, args, nv, base, True)
        else:
            if tx.commutes is not None:
                return tx.alter(self, fn, args)  # type: ignore[no-any-return]
            nv = fn(v, *args)
            if type(nv) not in _IMMUTABLE_FAST or tx.ops is not None:
                tx.note(self, fn, args, nv, v, False)
        vals[self] = nv
        return nv

    def commute(self, fn: Callable[..., T], *args: Any) -> T:
        """Apply an order-free update: ``fn`` is re-applied to the newest value at commit.

        Never a cause of retry. Use it only when the order of updates cannot
        matter (counters, adding to a set).
        """
        tx = _current.get()
        if tx is None:
            raise NotInTransactionError(f"ref {self.name!r}: commute()")
        return tx.commute(self, fn, args)  # type: ignore[no-any-return]

    def delete(self) -> None:
        """Remove the ref at this transaction's commit (a write: it conflicts like ``set``).

        Db values, ``as_of`` and reports see the removal at its ``t``; until
        commit the transaction reads ``astm.DELETED`` from it. Afterwards
        ``store.lookup(name)`` is None and ``store.ref(name, initial)`` creates
        a new ref; reads through this handle raise ``RefDeleted``.
        """
        tx = _current.get()
        if tx is None:
            raise NotInTransactionError(f"ref {self.name!r}: delete()")
        tx.delete(self)

    def ensure(self) -> T:
        """Read the ref and guarantee no other commit changes it before this one."""
        tx = _current.get()
        if tx is None:
            raise NotInTransactionError(f"ref {self.name!r}: ensure()")
        return tx.ensure(self)  # type: ignore[no-any-return]

    @property
    def validator(self) -> Callable[[T], bool] | None:
        return self._validator

    def add_watch(self, key: Any, fn: Callable[[Any, Ref[T], T, T], Any]) -> None:
        """Call ``fn(key, ref, old, new)`` after every commit that changes this ref.

        Watches run outside the transaction, in the committing task, after the
        commit; a failing watch is logged and does not undo anything.
        """
        if not callable(fn):
            raise TypeError(f"add_watch(key, fn): fn must be callable, got {fn!r}")
        if self._watches is None:
            self._watches = {}
        self._watches[key] = fn

    def remove_watch(self, key: Any) -> None:
        if self._watches is not None:
            self._watches.pop(key, None)
            if not self._watches:
                self._watches = None

    def __repr__(self) -> str:
        t, v = self._cur
        if t == COLD:
            return f"<astm.Ref {self.name!r} ({'deleted' if type(v) is Tombstone else 'not loaded'})>"
        return f"<astm.Ref {self.name!r} t={t} value={v!r}>"


setattr(Ref, "__doc__", _DOC)  # noqa: B010 (mypyc refuses an assignment to a class attribute)
