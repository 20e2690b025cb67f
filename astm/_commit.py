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

import json
from collections.abc import Awaitable, Callable, Collection, Iterable
from time import monotonic as _monotonic
from time import time as _time
from typing import TYPE_CHECKING, Any, Protocol

from . import codec
from ._errors import StoreClosed, ValidationError, _Conflict
from ._markers import DELETED
from ._ops import STRUCTURAL, Call, decode_calls, encode_calls
from ._values import check_changed_value
from .abc import CommitRecord, LogStorage

if TYPE_CHECKING:
    from ._backend import Waiter
    from ._ref import Ref
    from ._timeline import Timeline
    from ._tx import Claimant

__all__ = [
    "Counts",
    "CommitRequest",
    "Committed",
    "Committer",
    "LocalCommitter",
    "decode_row",
    "encode_changes",
    "encode_outbox",
    "row_text",
]

#: (t, [(ref, old, new)], waiters to fire, whether any changed ref has watches)
Committed = tuple[int, list[tuple["Ref[Any]", Any, Any]], "list[Waiter] | None", bool]
#: an outbox entry of a transaction: (effect name, payload, order key)
OutboxItem = tuple[str, Any, Any]


class CommitRequest:
    """One attempt's changes, handed to a committer once its body has returned (never changed after)."""

    __slots__ = ("attempts", "claimant", "commutes", "ops", "outbox", "pin", "reads", "rp", "vals")

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
        ops: dict[Ref[Any], list[Call] | None] | None = None,
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
        #: refs changed only by structural helper calls on their committed value: those calls
        self.ops = ops

    def versions(self, refs: Iterable[Ref[Any]]) -> list[tuple[str, int]]:
        """(name, version t) of each ref now (under the lock): what a remote committer validates."""
        return [(r.name, r._cur[0]) for r in refs]

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
                base = v = r._cur[1]
                whole = False
                for f, a in fns:
                    v = f(v, *a)
                    whole = whole or f not in STRUCTURAL  # a helper's additions were checked by commute()
                if whole:
                    check_changed_value(v, base, r.name)
                vals[r] = v
                commuted.append(r)
        for r, v in vals.items():
            validator = r._validator
            if validator is not None and v is not DELETED:
                validate_value(r.name, validator, v)
        return commuted


class Committer(Protocol):
    """Validates a commit request and makes it the next ``t``, or raises ``_Conflict``."""

    def commit(self, request: CommitRequest) -> Committed | Awaitable[Committed]: ...


class Counts:
    """A store's commit and attempt counters (``store.stats()``), where the compiled engine counts them.

    A store is an ordinary class: counting on it would cost an attribute
    lookup by name per counter and commit; these are native fields.
    """

    __slots__ = ("attempts", "commits")

    def __init__(self) -> None:
        self.commits = 0
        self.attempts = 0


class _Host(Protocol):
    """What a local committer needs of its store beyond the timeline and the log."""

    _closed: bool
    _nclaims: int
    _counts: Counts


class LocalCommitter:
    """The commit of the memory and SQLite stores: validate, apply and log under one lock."""

    __slots__ = ("_counts", "_encodes", "_host", "_log", "_tl")

    def __init__(self, timeline: Timeline, log: LogStorage, host: _Host) -> None:
        self._tl = timeline
        self._log = log
        self._host = host
        self._counts = host._counts
        #: whether the log takes encoded records (a constant of its class)
        self._encodes = log.encodes

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
            encodes = self._encodes
            if encodes:
                changes_out = encode_changes(request)
                entries = encode_outbox(request.outbox)
            # all values calculated, validated and encoded; no more client code runs below
            t += 1
            now = _time()
            changes, wake, watched = tl.apply(t, now, vals.items())
            if encodes:
                log.submit(t, CommitRecord(t, now, changes_out, entries))
            if request.pin:
                tl.pin(t - 1)
                tl.pin(t)
            counts = self._counts
            counts.commits += 1
            counts.attempts += request.attempts
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


def encode_changes(request: CommitRequest) -> list[tuple[str, str, str, Any]]:
    """Every write encoded (under the lock, before anything is applied): (name, kind, text, value).

    Kind ``"d"``: a delta, ``text`` is ``[base t, helper calls]``, when the
    ref's change is only structural helper calls on its committed version (its
    cost is the size of the change). Kind ``"n"``: a ref's first commit,
    ``text`` is ``[value, initial value]`` (a reopened store knows what the ref
    held before). Kind ``"v"``: ``text`` is the whole value.
    """
    commutes = request.commutes
    ops = request.ops
    out = []
    for r, v in request.vals.items():
        where = f"ref {r.name!r}"
        if v is DELETED:
            out.append((r.name, "x", "null", v))
            continue
        base, before = r._cur
        if base == 0:
            out.append((r.name, "n", codec.text([codec.encode(v, where), codec.encode(before, where)]), v))
            continue
        calls: list[Call] | None = None
        if commutes is not None and r in commutes:
            fns = commutes[r]
            if all(f in STRUCTURAL for f, _ in fns):
                calls = fns
        elif ops is not None:
            calls = ops.get(r)
        if calls is not None:
            out.append((r.name, "d", codec.text([base, encode_calls(calls, where)]), v))
        else:
            out.append((r.name, "v", codec.dumps(v, where), v))
    return out


def row_text(changes: list[tuple[str, str, str, Any]]) -> str:
    """A commit's changes as one log row.

    ``[[name, "v", value], [name, "n", value, initial], [name, "d", base t, calls], [name, "x", null]]``
    (``"x"``: the ref was deleted).
    """
    parts = []
    for name, kind, text, _ in changes:
        body = text[1:-1] if kind in ("n", "d") else text  # their text is a JSON list of their fields
        parts.append(f'[{json.dumps(name)},"{kind}",{body}]')
    return f"[{','.join(parts)}]"


def decode_row(items: list[Any]) -> list[tuple[str, tuple[Any, ...]]]:
    """A log row's changes decoded: (name, ("v", value[, initial])) or (name, ("d", base t, calls))."""
    out: list[tuple[str, tuple[Any, ...]]] = []
    for item in items:
        kind = item[1]
        if kind == "v":
            out.append((item[0], ("v", codec.decode(item[2]))))
        elif kind == "n":
            out.append((item[0], ("v", codec.decode(item[2]), codec.decode(item[3]))))
        elif kind == "x":
            out.append((item[0], ("x",)))
        else:
            out.append((item[0], ("d", item[2], decode_calls(item[3]))))
    return out


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


def validate_value(name: str, validator: Callable[[Any], Any], value: Any) -> None:
    """Raise ``ValidationError`` unless ``validator(value)`` is true."""
    try:
        ok = validator(value)
    except Exception as exc:
        err = ValidationError(name, value, f"the validator raised {exc!r}")
        err.__cause__ = exc  # as ``raise ... from exc``, which compiled (mypyc 2.4) sets no cause
        raise err from exc
    if not ok:
        raise ValidationError(name, value)
