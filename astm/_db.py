"""Db values and commit reports: the store as a timeline of immutable values.

A :class:`Db` is the value of the whole store at one basis ``t``. It never
changes, whatever commits later: while it is alive it *pins* ``t`` so the
versions it needs are kept, and dropping it releases them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, Protocol, TypeVar, overload

from ._errors import HistoryUnavailable, RefDeleted, RefNotLoaded
from ._markers import COLD, Cold, Tombstone

if TYPE_CHECKING:
    from ._ref import Ref
    from ._timeline import Timeline

__all__ = ["Change", "Db", "TxReport"]

T = TypeVar("T")
D = TypeVar("D")
R = TypeVar("R")


class _Host(Protocol):
    """What a db value needs of its store."""

    _timeline: Timeline


class Db:
    """The immutable value of a store at basis ``t``: ``db[ref]``, ``db.get(ref)``, ``ref in db``.

    A ref has its initial value at every ``t`` before its first commit (creating
    a ref is not a commit), so every ref of the store is in every db value
    until a commit deletes it (``ref.delete()``).
    """

    __slots__ = ("_pinned", "_store", "t")

    def __init__(self, store: _Host, t: int, pinned: bool) -> None:
        self._store = store
        #: the basis: the last commit this value includes
        self.t = t
        self._pinned = pinned

    def __del__(self) -> None:
        # no lock here: __del__ may run inside a commit; the store drains this queue
        if self._pinned:
            self._store._timeline.unpins.append(self.t)

    def _version(self, ref: Ref[T]) -> tuple[int, T]:
        if ref._store is not self._store:
            raise ValueError(f"ref {ref.name!r} belongs to another store than this db value")
        t = self.t
        cur = ref._cur
        if cur[0] <= t:
            return cur
        tl = self._store._timeline
        v = tl.version_at(ref, t)
        if v is None:
            if cur[0] == COLD:
                mark: Any = cur[1]
                if type(mark) is Tombstone and mark.t <= t:
                    raise RefDeleted(ref.name, mark.t)
                if type(mark) is Cold:  # a ref a PostgreSQL peer has not loaded
                    raise RefNotLoaded(ref.name)
            raise HistoryUnavailable(t, tl.oldest, "db value")
        return v

    def __getitem__(self, ref: Ref[T]) -> T:
        return self._version(ref)[1]

    @overload
    def get(self, ref: Ref[T]) -> T | None: ...
    @overload
    def get(self, ref: Ref[T], default: D) -> T | D: ...
    def get(self, ref: Ref[T], default: Any = None) -> Any:
        """The ref's value at ``t``, or ``default`` when ``ref`` is not a ref of this store."""
        if not self._holds(ref):
            return default
        return self._version(ref)[1]

    def __contains__(self, ref: object) -> bool:
        return self._holds(ref)

    def _holds(self, ref: object) -> bool:
        """Whether ``ref`` is a ref of this store that exists at ``t`` (not deleted by then)."""
        from ._ref import Ref

        if not isinstance(ref, Ref) or ref._store is not self._store:
            return False
        cur = ref._cur
        mark = cur[1]
        return not (cur[0] == COLD and type(mark) is Tombstone and mark.t <= self.t)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Db) and other._store is self._store and other.t == self.t

    def __hash__(self) -> int:
        return hash((id(self._store), self.t))

    def __repr__(self) -> str:
        return f"<astm.Db t={self.t}>"


class Change(NamedTuple):
    """One ref changed by a commit."""

    ref: Ref[Any]
    old: Any
    new: Any


@dataclass(frozen=True, slots=True)
class TxReport(Generic[R]):
    """What one commit did: its ``t``, the body's result, the db before and after, the changes."""

    t: int
    result: R
    db_before: Db
    db_after: Db
    changes: tuple[Change, ...]
    #: wall-clock time of the commit (seconds since the epoch)
    time: float

    @classmethod
    def of_commit(
        cls, store: _Host, t: int, result: R, changes: Iterable[tuple[Ref[Any], Any, Any]], when: float, pinned: bool
    ) -> TxReport[R]:
        """The report of commit ``t`` (``pinned``: its db values keep their history alive)."""
        return cls(
            t,
            result,
            Db(store, t - 1, pinned),
            Db(store, t, pinned),
            tuple(Change(r, o, n) for r, o, n in changes),
            when,
        )
