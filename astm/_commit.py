"""Committers: whoever turns a frozen commit request into a ``t`` or a conflict.

The engine hands a :class:`CommitRequest` over whole once the body has
returned: the read point, the refs read (checked at commit), the in-transaction
values, the commutes to re-apply, the outbox entries. A committer validates it
and returns ``(t, changes, waiters to wake, whether any changed ref is
watched)``, or raises ``_Conflict`` to run the body again (``ValidationError``
or a commute function's error to abort). Nothing downstream reaches back into
the transaction.

:class:`LocalCommitter` serves the memory and SQLite stores: one synchronous
critical section under the timeline's lock, then ``Timeline.apply`` and the
record handed to the log storage. The PostgreSQL committer
(``astm.stores.postgres``) validates in the database and applies what comes
back through the same ``Timeline.apply``. The steps both need (re-applying
commutes, validators, encoding) live here, once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from time import monotonic as _monotonic
from time import time as _time
from typing import TYPE_CHECKING, Any, Protocol

from . import codec
from ._errors import StoreClosed, ValidationError, _Conflict
from ._ops import STRUCTURAL
from ._values import check_value
from .abc import CommitRecord, LogStorage

if TYPE_CHECKING:
    from ._backend import Waiter
    from ._ref import Ref
    from ._timeline import Timeline
    from ._tx import Claimant

__all__ = ["CommitRequest", "Committed", "Committer", "LocalCommitter", "encode_changes", "encode_outbox"]

#: (t, [(ref, old, new)], waiters to fire, whether any changed ref has watches)
Committed = tuple[int, list[tuple["Ref[Any]", Any, Any]], "list[Waiter] | None", bool]
#: an outbox entry of a transaction: (effect name, payload, order key)
OutboxItem = tuple[str, Any, Any]


class CommitRequest:
    """One attempt's changes, handed to a committer once its body has returned (never changed after)."""

    __slots__ = ("attempts", "claimant", "commutes", "outbox", "pin", "reads", "rp", "vals")

    def __init__(
        self,
        rp: int,
        reads: Collection[Ref[Any]],
        vals: dict[Ref[Any], Any],
        commutes: dict[Ref[Any], list[tuple[Callable[..., Any], tuple[Any, ...]]]] | None,
        outbox: list[OutboxItem] | None,
        claimant: Claimant | None,
        attempts: int,
        pin: bool,
    ) -> None:
        #: the read point: every checked read saw the versions at this t
        self.rp = rp
        #: refs checked at commit (every get/alter/set/ensure)
        self.reads = reads
        #: the in-transaction value of every ref written (commuted ones are recomputed by finish)
        self.vals = vals
        self.commutes = commutes
        self.outbox = outbox
        self.claimant = claimant
        #: body runs of the transaction so far (for the store's counters)
        self.attempts = attempts
        #: the caller wants a report: pin the db values before and after
        self.pin = pin

    def stale_reads(self) -> list[Ref[Any]]:
        """The checked refs that have a version after the read point (under the lock)."""
        rp = self.rp
        return [r for r in self.reads if r._cur[0] > rp]

    def finish(self) -> list[Ref[Any]]:
        """Re-apply commutes to the newest values and run validators (under the committer's lock).

        Returns the refs that were only commuted (not read): their values came
        from the newest versions, not from the read point.
        """
        vals = self.vals
        commuted = []
        if self.commutes:
            reads = self.reads
            for r, fns in self.commutes.items():
                if r in reads:
                    continue  # checked and unchanged: the in-transaction value stands
                v = r._cur[1]
                whole = False
                for f, a in fns:
                    v = f(v, *a)
                    whole = whole or f not in STRUCTURAL  # a helper's additions were checked by commute()
                if whole:
                    check_value(v, r.name)
                vals[r] = v
                commuted.append(r)
        for r, v in vals.items():
            validator = r._validator
            if validator is not None:
                validate_value(r.name, validator, v)
        return commuted


class Committer(Protocol):
    """Validates a commit request and makes it the next ``t``, or raises ``_Conflict``."""

    def commit(self, request: CommitRequest) -> Committed | Awaitable[Committed]: ...


class _Host(Protocol):
    """What a local committer needs of its store beyond the timeline and the log."""

    _closed: bool
    _nclaims: int
    _commits: int
    _attempts: int


class LocalCommitter:
    """The commit of the memory and SQLite stores: validate, apply and log under one lock."""

    __slots__ = ("_host", "_log", "_tl")

    def __init__(self, timeline: Timeline, log: LogStorage, host: _Host) -> None:
        self._tl = timeline
        self._log = log
        self._host = host

    def commit(self, request: CommitRequest) -> Committed:
        tl = self._tl
        log = self._log
        host = self._host
        vals = request.vals
        with tl.lock:
            if host._closed:
                raise StoreClosed()
            t = tl.t
            if t != request.rp:
                bad = request.stale_reads()
                if bad:
                    raise _Conflict(bad)
            if host._nclaims:
                _check_claims(request)
            request.finish()
            if log.failed is not None:
                raise log.refusal()
            if log.encodes:
                news = encode_changes(vals)
                entries = encode_outbox(request.outbox)
            # all values calculated, validated and encoded; no more client code runs below
            t += 1
            now = _time()
            changes, wake, watched = tl.apply(t, now, vals.items())
            if log.encodes:
                record = CommitRecord(t, now, _changes(vals, news), entries, t - tl.history)
                log.submit(t, record)
            else:
                log.submit(t, None)
            if request.pin:
                tl.pin(t - 1)
                tl.pin(t)
            host._commits += 1
            host._attempts += request.attempts
        return t, changes, wake, watched


def _check_claims(request: CommitRequest) -> None:
    """Refuse to overwrite a ref another starving transaction has claimed (under the lock)."""
    now = _monotonic()
    commutes = request.commutes
    mine = request.claimant
    for r in request.vals:
        c = r._claim
        if c is not None and c is not mine and c.deadline > now and (commutes is None or r not in commutes):
            raise _Conflict((r,))


def encode_changes(vals: dict[Ref[Any], Any]) -> list[str]:
    """Every written value encoded, in ``vals`` order (before anything is applied)."""
    return [codec.dumps(v, f"ref {r.name!r}") for r, v in vals.items()]


def encode_outbox(outbox: list[OutboxItem] | None) -> list[tuple[int, str, str, str | None]]:
    """A transaction's outbox entries encoded: (seq, effect, payload, order key)."""
    entries = []
    if outbox:
        for seq, (name, payload, order_key) in enumerate(outbox):
            where = f"outbox entry of effect {name!r}"
            entries.append(
                (seq, name, codec.dumps(payload, where), None if order_key is None else codec.dumps(order_key, where))
            )
    return entries


def _changes(vals: dict[Ref[Any], Any], news: list[str]) -> list[tuple[str, str, str]]:
    """(name, old encoded, new encoded) per write; remembers each ref's newest encoding (under the lock)."""
    out = []
    for r, enc in zip(vals, news, strict=True):
        out.append((r.name, r._enc, enc))
        r._enc = enc
    return out


def validate_value(name: str, validator: Callable[[Any], Any], value: Any) -> None:
    """Raise ``ValidationError`` unless ``validator(value)`` is true."""
    try:
        ok = validator(value)
    except Exception as exc:
        raise ValidationError(name, value, f"the validator raised {exc!r}") from exc
    if not ok:
        raise ValidationError(name, value)
