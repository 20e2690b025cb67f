"""A list-append serializability checker in the style of Elle (Kingsbury & Alvaro, VLDB 2020).

A *history* is a list of completed transactions (:class:`Txn`). Each has a
status: ``"ok"`` (acknowledged committed), ``"fail"`` (known not committed) or
``"info"`` (indeterminate: it may or may not have committed, but if any of its
writes happened all of them did, once), and micro-ops ``("append", key,
value)`` or ``("r", key, values)`` where ``values`` is the tuple the read saw,
or ``None`` when unknown. Appended values must be unique per key (use unique
ints across the whole history).

Because every append adds a unique element to the end of a list, every read
reveals the whole order of the appends before it. So the longest read of a key
(the final state, when given, is a read by a final observer) is its *version
order*, and every other read must be a prefix of it. From the version orders
the checker derives the dependency graph of Adya's isolation theory between
the committed transactions (``"ok"`` ones, and ``"info"`` ones whose writes
were observed):

* ``ww``: T2 appended the element right after T1's in a key's version order;
* ``wr``: T2 read a state whose last element T1 appended;
* ``rw``: T1 read a state and T2 appended the element that follows it;
* ``rt`` (optional): T1 completed before T2 started (``Txn.end < Txn.start``).

and reports, with the transactions involved:

* ``G0`` (cycle of ww), ``G1c`` (ww and wr, at least one wr), ``G-single``
  (exactly one rw), ``G2`` (two or more rw), and the same four with real-time
  edges, ``G0-realtime`` ... ``G2-realtime``, for cycles that exist only
  because of the real-time order (strict-serializability violations);
* ``G1a`` aborted read (an element only a failed transaction appended),
  ``G1b`` intermediate read (the last element a read saw is one that its
  writer appended to that key before appending again);
* ``incompatible-order`` (a read that is not a prefix of the longest),
  ``duplicate-elements``, ``garbage-read`` (an element nobody appended to that
  key), ``internal`` (a read that disagrees with the transaction's own earlier
  reads and appends, or shows an element it appends only later),
  ``lost-append`` (a committed append missing from the final state, or from a
  read by a transaction that observed the appending transaction's other
  writes or started after it completed).

Cycles are found per strongly connected component (iterative Tarjan); G-single
versus G2 is decided exactly with reachability bitsets, so a history that has
a G-single is never reported as only G2. Real-time edges go through a chain of
virtual nodes (one per completion), so they cost O(n) edges, not O(n^2).

    result = check(history, final={"k0": (1, 2, 3)})
    assert result.ok, str(result)
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ALL_CYCLES",
    "REALTIME",
    "Edge",
    "Explanation",
    "Result",
    "Txn",
    "check",
]

Status = Literal["ok", "fail", "info"]
TxnId = Hashable
Key = Hashable
Elem = Hashable
MicroOp = tuple[str, Key, Any]

#: the real-time variants of the cycle anomalies (strict-serializability violations only)
REALTIME = frozenset({"G0-realtime", "G1c-realtime", "G-single-realtime", "G2-realtime"})
#: every cycle anomaly this checker reports
ALL_CYCLES = frozenset({"G0", "G1c", "G-single", "G2"}) | REALTIME

# edge kinds, as bits; an edge between two nodes carries the union of its kinds
WW, WR, RW, RT = 1, 2, 4, 8
_KIND_NAMES = {WW: "ww", WR: "wr", RW: "rw", RT: "rt"}
_INIT: Any = object()  # the initial (empty) state of a key, as "the element before the first"
_MAX_EXAMPLES = 8


@dataclass(frozen=True, slots=True)
class Txn:
    """One completed transaction of a history.

    ``start``/``end`` are optional timestamps (any one clock) of when the
    client invoked it and saw it complete; with them the checker also checks
    the real-time order. An ``info`` transaction's ``end`` is ignored.
    """

    id: TxnId
    status: Status
    ops: Sequence[MicroOp]
    start: float | None = None
    end: float | None = None
    process: Hashable = None

    def describe(self) -> str:
        ops = ", ".join(_fmt_op(op) for op in self.ops)
        where = "" if self.process is None else f" on {self.process}"
        return f"T{self.id} ({self.status}{where}): [{ops}]"


def _fmt_seq(values: Sequence[Any] | None, limit: int = 8) -> str:
    if values is None:
        return "?"
    if len(values) <= limit:
        return "[" + " ".join(repr(v) for v in values) + "]"
    tail = " ".join(repr(v) for v in values[-(limit - 2) :])
    return f"[{values[0]!r} ... {tail}] ({len(values)} elements)"


def _common_prefix(a: tuple[Any, ...], b: tuple[Any, ...]) -> int:
    """The length of the longest common prefix of two tuples (binary search over C-speed slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _fmt_op(op: MicroOp) -> str:
    f, k, v = op
    if f == "r":
        return f"r {k!r} {_fmt_seq(v)}"
    return f"{f} {k!r} {v!r}"


def _fmt_elem(v: Any) -> str:
    return "the initial empty state" if v is _INIT else repr(v)


@dataclass(frozen=True, slots=True)
class Edge:
    """One dependency of a cycle: ``a`` precedes ``b`` because of ``kind`` (ww/wr/rw/rt)."""

    a: TxnId
    b: TxnId
    kind: str
    why: str

    def __str__(self) -> str:
        return f"T{self.a} -{self.kind}-> T{self.b}: {self.why}"


@dataclass(frozen=True, slots=True)
class Explanation:
    """One instance of an anomaly: what happened, the transactions involved, and for cycles the edges."""

    kind: str
    text: str
    txns: tuple[Txn, ...] = ()
    cycle: tuple[Edge, ...] = ()

    def __str__(self) -> str:
        lines = [self.text]
        if self.txns:
            lines.append("  where")
            lines.extend(f"    {t.describe()}" for t in self.txns)
        if self.cycle:
            lines.append("  cycle")
            lines.extend(f"    {e}" for e in self.cycle)
        return "\n".join(lines)


@dataclass(slots=True)
class Result:
    """What :func:`check` found: ``anomalies`` by class, and whether all of them are in ``allow``."""

    anomalies: dict[str, list[Explanation]]
    allow: frozenset[str]
    #: how many instances each class had (the lists keep only a few examples)
    counts: dict[str, int] = field(default_factory=dict)
    #: sizes: transactions, graph nodes, edges per kind, keys, non-trivial SCCs
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No anomaly outside ``allow``."""
        return not self.unexpected

    @property
    def unexpected(self) -> set[str]:
        """The anomaly classes found that ``allow`` does not permit."""
        return {k for k in self.anomalies if k not in self.allow}

    def __str__(self) -> str:
        head = ", ".join(f"{k}={v}" for k, v in self.stats.items())
        if not self.anomalies:
            return f"valid ({head})"
        verdict = "valid except allowed anomalies" if self.ok else "INVALID"
        out = [f"{verdict}: {', '.join(sorted(self.anomalies))} ({head})"]
        for kind in sorted(self.anomalies):
            allowed = " (allowed)" if kind in self.allow else ""
            out.append(f"== {kind}{allowed}: {self.counts.get(kind, len(self.anomalies[kind]))} found")
            for e in self.anomalies[kind]:
                out.append(str(e))
        return "\n".join(out)


class _Collector:
    """Anomalies by class: every instance counted, the first few kept."""

    def __init__(self) -> None:
        self.found: dict[str, list[Explanation]] = {}
        self.counts: dict[str, int] = {}

    def add(self, e: Explanation) -> None:
        self.counts[e.kind] = self.counts.get(e.kind, 0) + 1
        lst = self.found.setdefault(e.kind, [])
        if len(lst) < _MAX_EXAMPLES:
            lst.append(e)


@dataclass(slots=True)
class _Read:
    #: index into the history, or -1 for the final observer
    txn: int
    key: Key
    value: tuple[Any, ...]
    #: a prefix of its key's version order
    prefix: bool = True


def check(
    history: Iterable[Txn],
    final: Mapping[Any, Sequence[Any]] | None = None,
    allow: Iterable[str] = frozenset(),
    *,
    realtime: bool | Literal["process"] = True,
) -> Result:
    """Check a list-append history; ``final`` is the state of (some) keys after everything quiesced.

    ``allow`` names anomaly classes that do not make the result fail (they
    are still reported). ``realtime=False`` ignores ``start``/``end``;
    ``realtime="process"`` orders by real time only transactions of one
    ``Txn.process`` (each client strict serializable on its own: sessions that
    may read a lagging replica).
    """
    c = _Checker(list(history), final or {}, realtime)
    c.run()
    return Result(c.out.found, frozenset(allow), c.out.counts, c.stats)


class _Checker:
    def __init__(
        self, txns: list[Txn], final: Mapping[Any, Sequence[Any]], realtime: bool | Literal["process"]
    ) -> None:
        self.txns = txns
        self.final = {k: tuple(v) for k, v in final.items()}
        self.realtime = realtime
        self.out = _Collector()
        self.stats: dict[str, int] = {}
        #: (key, element) -> index of the transaction that appended it
        self.writer: dict[tuple[Key, Elem], int] = {}
        #: (key, element) -> index of its writer, for appends that writer followed with another to that key
        self.intermediate: dict[tuple[Key, Elem], int] = {}
        self.reads: list[_Read] = []
        self.loose: list[_Read] = []
        self.by_key: dict[Key, list[_Read]] = {}
        #: key -> its version order (distinct elements), and each element's position in it
        self.order: dict[Key, tuple[Any, ...]] = {}
        self.pos: dict[Key, dict[Elem, int]] = {}
        #: key -> its longest read as read (duplicates included), and (index, element) of its failed or garbage ones
        self.longest: dict[Key, tuple[Any, ...]] = {}
        self.bad: dict[Key, list[tuple[int, Any]]] = {}
        self.observed: set[tuple[Key, Elem]] = set()
        self.committed: list[bool] = []
        self.lost: set[tuple[Key, Elem]] = set()

    def run(self) -> None:
        self.index_appends()
        self.committed = [t.status == "ok" for t in self.txns]
        if any(self.txns[i].status == "info" for i in self.writer.values()):
            # which info transactions committed: those whose appends others saw (a first, silent pass)
            real, self.out = self.out, _Collector()
            self.collect_reads()
            self.version_orders()
            self.which_committed()
            self.out = real
        self.collect_reads()
        self.version_orders()
        self.which_committed()
        self.uncommitted_reads()
        self.intermediate_reads()
        for t in self.txns:
            if t.status != "fail":
                self.internal(t)
        self.lost_in_final()
        self.lost_in_reads()
        g = self.graph()
        self.stats["sccs"] = g.find_cycles(self.out)

    # -- helpers ---------------------------------------------------------------------------

    def who(self, i: int) -> str:
        return "the final state" if i < 0 else f"T{self.txns[i].id}"

    def involved(self, *idx: int) -> tuple[Txn, ...]:
        return tuple(self.txns[i] for i in dict.fromkeys(idx) if i >= 0)

    # -- indexes -----------------------------------------------------------------------------

    def index_appends(self) -> None:
        writer, intermediate = self.writer, self.intermediate
        for i, t in enumerate(self.txns):
            if t.status not in ("ok", "fail", "info"):
                raise ValueError(f"T{t.id}: status must be 'ok', 'fail' or 'info', got {t.status!r}")
            last: dict[Key, Elem] = {}
            for f, k, v in t.ops:
                if f == "append":
                    if (k, v) in writer:
                        other = self.txns[writer[(k, v)]]
                        raise ValueError(
                            f"{v!r} appended to {k!r} twice (T{other.id}, T{t.id}): appends must be unique"
                        )
                    writer[(k, v)] = i
                    if k in last:
                        intermediate[(k, last[k])] = i
                    last[k] = v
                elif f != "r":
                    raise ValueError(f"T{t.id}: unknown micro-op {f!r} (only 'append' and 'r')")

    def collect_reads(self) -> None:
        """Reads of committed transactions (ok, and info ones known to have committed) and the final observer.

        A failed transaction's reads, or those of an info one that may not have
        committed, may show its own uncommitted appends: they say nothing about
        the version order (``uncommitted_reads`` checks them for dirty reads).
        """
        self.reads = []
        self.by_key = {}
        self.loose = []
        for i, t in enumerate(self.txns):
            if t.status == "fail":
                continue
            for f, k, v in t.ops:
                if f == "r" and v is not None:
                    (self.reads if self.committed[i] else self.loose).append(_Read(i, k, tuple(v)))
        for k, v in self.final.items():
            self.reads.append(_Read(-1, k, v))
        for r in self.reads:
            self.by_key.setdefault(r.key, []).append(r)
        self.order = {}
        self.pos = {}
        self.longest = {}
        self.bad = {}

    # -- version orders and the per-read checks -------------------------------------------------

    def version_orders(self) -> None:
        """The longest read of each key is its order; every other read must be a prefix of it."""
        for k, rs in self.by_key.items():
            longest_read = next((r for r in rs if r.txn < 0), rs[0])
            for r in rs:
                if len(r.value) > len(longest_read.value):
                    longest_read = r
            longest = self.longest[k] = longest_read.value
            p: dict[Elem, int] = {}
            first_dup = -1
            for j, e in enumerate(longest):
                if e in p:
                    if first_dup < 0:
                        first_dup = j
                    continue
                p[e] = len(p)
            self.order[k] = tuple(p)
            self.pos[k] = p
            cache: dict[int, bool] = {}  # id(read value) -> prefix? (reads of one version share a tuple)
            for r in rs:
                v = r.value
                ok = cache.get(id(v))
                if ok is None:
                    ok = cache[id(v)] = longest[: len(v)] == v
                r.prefix = ok
                if not ok:
                    j = next(j for j, (a, b) in enumerate(zip(v, longest, strict=False)) if a != b)
                    self.out.add(
                        Explanation(
                            "incompatible-order",
                            f"{self.who(r.txn)} read {k!r} = {_fmt_seq(v)}, not a prefix of {_fmt_seq(longest)} "
                            f"read by {self.who(longest_read.txn)}: they differ at index {j} ({v[j]!r} vs "
                            f"{longest[j]!r})",
                            self.involved(r.txn, longest_read.txn),
                        )
                    )
                    self.duplicates(r)
                    for e in dict.fromkeys(v):
                        self.element(r, e)
                elif 0 <= first_dup < len(v):
                    self.duplicates(r)
            # elements of the order a failed transaction (or nobody) appended: every prefix read reaching them
            bad = self.bad[k] = []
            for e in p:
                w = self.writer.get((k, e))
                if w is not None and self.txns[w].status != "fail":
                    continue
                cut = longest.index(e)
                bad.append((cut, e))
                for r in rs:
                    if r.prefix and len(r.value) > cut:
                        self.element(r, e)

    def duplicates(self, r: _Read) -> None:
        seen: set[Any] = set()
        dups: list[Any] = []
        for e in r.value:
            if e in seen and e not in dups:
                dups.append(e)
            seen.add(e)
        if dups:
            self.out.add(
                Explanation(
                    "duplicate-elements",
                    f"{self.who(r.txn)} read {r.key!r} = {_fmt_seq(r.value)}, with {', '.join(map(repr, dups))} "
                    "more than once",
                    self.involved(r.txn),
                )
            )

    def element(self, r: _Read, e: Any) -> None:
        """G1a or garbage, if ``e`` (in read ``r``) was appended only by a failed transaction, or by nobody."""
        w = self.writer.get((r.key, e))
        if w is None:
            self.out.add(
                Explanation(
                    "garbage-read",
                    f"{self.who(r.txn)} read {r.key!r} = {_fmt_seq(r.value)}, containing {e!r}, which no "
                    f"transaction appended to {r.key!r}",
                    self.involved(r.txn),
                )
            )
        elif self.txns[w].status == "fail":
            self.out.add(
                Explanation(
                    "G1a",
                    f"{self.who(r.txn)} read {r.key!r} = {_fmt_seq(r.value)}, containing {e!r}, appended by "
                    f"T{self.txns[w].id}, which failed",
                    self.involved(r.txn, w),
                )
            )

    def which_committed(self) -> None:
        """ok transactions, and info ones with an append that another transaction's read (or the final state) shows."""
        for k, p in self.pos.items():
            self.observed.update((k, e) for e in p)
        for r in self.reads:
            if not r.prefix:
                self.observed.update((r.key, e) for e in r.value)
        info = {kv for kv, i in self.writer.items() if self.txns[i].status == "info"}
        if info:
            for r in self.loose:
                for e in r.value[_common_prefix(r.value, self.longest.get(r.key, ())) :]:
                    w = self.writer.get((r.key, e))
                    if w is not None and w != r.txn and (r.key, e) in info:
                        self.observed.add((r.key, e))
        for kv, i in self.writer.items():
            if kv in self.observed and self.txns[i].status == "info":
                self.committed[i] = True

    def uncommitted_reads(self) -> None:
        """Reads of info transactions that may not have committed: no element of a failed one, nor garbage."""
        for r in self.loose:
            j = _common_prefix(r.value, self.longest.get(r.key, ()))
            for cut, e in self.bad.get(r.key, ()):
                if cut < j:
                    self.element(r, e)
            for e in dict.fromkeys(r.value[j:]):
                if self.writer.get((r.key, e)) != r.txn:
                    self.element(r, e)

    def intermediate_reads(self) -> None:
        for r in self.reads:
            if not r.value:
                continue
            e = r.value[-1]
            w = self.intermediate.get((r.key, e))
            if w is not None and w != r.txn:
                self.out.add(
                    Explanation(
                        "G1b",
                        f"{self.who(r.txn)} read {r.key!r} = {_fmt_seq(r.value)}, ending in {e!r}: an intermediate "
                        f"append of T{self.txns[w].id}, which appended to {r.key!r} again later",
                        self.involved(r.txn, w),
                    )
                )

    def internal(self, t: Txn) -> None:
        """A read must agree with the transaction's own earlier reads and appends, and show none of its later ones."""
        full: dict[Key, tuple[Any, ...]] = {}  # the state a read established, with own appends since
        since: dict[Key, list[Any]] = {}  # own appends to a key not read yet (unknown prefix)
        later: dict[Key, list[Any]] = {}
        for f, k, v in t.ops:
            if f == "append":
                later.setdefault(k, []).append(v)
        for m, (f, k, v) in enumerate(t.ops):
            if f == "append":
                later[k].remove(v)
                if k in full:
                    full[k] = (*full[k], v)
                else:
                    since.setdefault(k, []).append(v)
                continue
            if v is None:
                continue
            v = tuple(v)
            expected: str | None = None
            if k in full:
                if v != full[k]:
                    expected = _fmt_seq(full[k])
            else:
                own = since.get(k, [])
                if own and (len(v) < len(own) or list(v[len(v) - len(own) :]) != own):
                    expected = "[... " + " ".join(map(repr, own)) + "]"
            if expected is not None:
                self.out.add(
                    Explanation(
                        "internal",
                        f"T{t.id} op {m} read {k!r} = {_fmt_seq(v)}, but its own earlier ops imply {expected}",
                        (t,),
                    )
                )
            else:
                future = [e for e in later.get(k, ()) if e in v]
                if future:
                    self.out.add(
                        Explanation(
                            "internal",
                            f"T{t.id} op {m} read {k!r} = {_fmt_seq(v)}, showing {future[0]!r}, which it appends "
                            "only later",
                            (t,),
                        )
                    )
            full[k] = v
            since.pop(k, None)

    # -- lost appends ----------------------------------------------------------------------------

    def lost_in_final(self) -> None:
        """Every committed append (ok, or info with a write observed) must be in the final state of its key."""
        final_sets = {k: set(v) for k, v in self.final.items()}
        for (k, v), i in self.writer.items():
            if not self.committed[i] or k not in final_sets or v in final_sets[k]:
                continue
            self.lost.add((k, v))
            t = self.txns[i]
            self.out.add(
                Explanation(
                    "lost-append",
                    f"T{t.id} ({t.status}) appended {v!r} to {k!r}, but the final state {_fmt_seq(self.final[k])} "
                    "lacks it",
                    (t,),
                )
            )

    def lost_in_reads(self) -> None:
        """An ok append no read shows, missing from a read by a transaction that must have seen it.

        T2 must see T1's append when T2 observed another append of T1 (on any
        key), or started after T1 completed. An append in the version order that
        a later read misses makes a cycle instead, so only unobserved ones are
        examined here (the final state, when given, settles them already).
        """
        appends_of: dict[int, list[tuple[Key, Elem]]] = {}
        for kv, i in self.writer.items():
            appends_of.setdefault(i, []).append(kv)
        by_len: dict[Key, tuple[list[int], list[_Read]]] = {}
        for k, rs in self.by_key.items():
            srt = sorted((r for r in rs if r.txn >= 0 and r.prefix), key=lambda r: len(r.value))
            by_len[k] = ([len(r.value) for r in srt], srt)
        for (k, v), i in self.writer.items():
            t = self.txns[i]
            if t.status != "ok" or (k, v) in self.observed or k in self.final:
                continue
            witnesses: list[tuple[int, str]] = []
            for k2, u in appends_of[i]:
                p = self.pos.get(k2, {}).get(u)
                if p is None:
                    continue
                lens, rs = by_len[k2]
                lo = bisect.bisect_right(lens, p)
                witnesses.extend((r.txn, f"it read T{t.id}'s {u!r} in {k2!r}") for r in rs[lo : lo + 64])
            if self.realtime and t.end is not None:
                for r in self.by_key.get(k, ()):
                    s = self.txns[r.txn].start if r.txn >= 0 else None
                    if s is not None and s > t.end and (self.realtime is True or self.txns[r.txn].process == t.process):
                        witnesses.append((r.txn, f"it started after T{t.id} completed"))
            for x, reason in witnesses:
                if x == i or not self.committed[x]:
                    continue
                miss = next((val for f, k3, val in self.txns[x].ops if f == "r" and k3 == k and val is not None), None)
                if miss is not None and v not in miss:
                    self.out.add(
                        Explanation(
                            "lost-append",
                            f"T{t.id} appended {v!r} to {k!r} (ok), but T{self.txns[x].id} read {k!r} = "
                            f"{_fmt_seq(miss)} without it, although {reason}",
                            self.involved(i, x),
                        )
                    )
                    break

    # -- the dependency graph ----------------------------------------------------------------------

    def graph(self) -> _Graph:
        txns, writer, committed = self.txns, self.writer, self.committed
        node_of: dict[int, int] = {}
        txn_of: list[int] = []
        for i in range(len(txns)):
            if committed[i]:
                node_of[i] = len(txn_of)
                txn_of.append(i)
        n = len(txn_of)
        g = _Graph(n, txns, txn_of)
        link = g.link
        # committed appends no read shows (and not known lost): they follow the last one read
        unobserved: dict[Key, list[tuple[int, Elem]]] = {}
        for kv, i in writer.items():
            if committed[i] and kv not in self.observed and kv not in self.lost:
                unobserved.setdefault(kv[0], []).append((node_of[i], kv[1]))
        for k, seq in self.order.items():
            prev = -1
            for j, e in enumerate(seq):
                w = writer.get((k, e))
                node = node_of.get(w, -1) if w is not None else -1
                if prev >= 0 and node >= 0:
                    link(prev, node, WW, (0, k, e, seq[j - 1]))
                prev = node
            if prev >= 0 and k in unobserved:
                for node, v in unobserved[k]:
                    link(prev, node, WW, (1, k, v, seq[-1]))
        for r in self.reads:
            if r.txn < 0 or not committed[r.txn]:
                continue
            x = node_of[r.txn]
            k, v = r.key, r.value
            seq = self.order[k]
            if v:
                w = writer.get((k, v[-1]))
                if w is not None and committed[w]:
                    link(node_of[w], x, WR, (2, k, v, None))
                jp = self.pos[k].get(v[-1])
                if jp is None:
                    continue
                j = jp + 1
            else:
                j = 0
            at = v[-1] if v else _INIT
            if j < len(seq):
                w = writer.get((k, seq[j]))
                if w is not None and committed[w]:
                    link(x, node_of[w], RW, (3, k, at, seq[j]))
            elif k in unobserved:
                for node, e in unobserved[k]:
                    link(x, node, RW, (4, k, at, e))
        if self.realtime:
            for node, i in enumerate(txn_of):
                t = txns[i]
                if t.start is not None:
                    g.start_of[node] = t.start
                if t.end is not None and t.status == "ok":
                    g.end_of[node] = t.end
            if self.realtime == "process":
                groups: dict[Hashable, list[int]] = {}
                for node, i in enumerate(txn_of):
                    groups.setdefault(txns[i].process, []).append(node)
                for nodes in groups.values():
                    g.chain(nodes)
            else:
                g.chain(range(n))
        self.stats.update(
            txns=len(txns),
            committed=n,
            info_committed=sum(1 for i in txn_of if txns[i].status == "info"),
            keys=len(self.order),
            ww=g.counts[WW],
            wr=g.counts[WR],
            rw=g.counts[RW],
            rt=g.counts[RT],
        )
        return g


#: why an edge a -> b exists: (template, key, x, y), rendered only for the cycles reported
_Why = tuple[int, Key, Any, Any]


def _render(why: _Why, a: str, b: str) -> str:
    form, k, x, y = why
    if form == 0:
        return f"{b} appended {x!r} to {k!r} right after {a}'s {y!r}"
    if form == 1:
        return f"{b} appended {x!r} to {k!r} (never read) after {a}'s {y!r}, the last one read"
    if form == 2:
        return f"{b} read {k!r} = {_fmt_seq(x)}, ending in {a}'s {x[-1]!r}"
    if form == 3:
        return f"{a} read {k!r} at {_fmt_elem(x)}, and {b} appended {y!r} next"
    return f"{a} read {k!r} at {_fmt_elem(x)}, the last state read, before {b} appended {y!r} (never read)"


_CHUNK = 4096  # reachability bitsets cover this many target components per pass


class _Graph:
    """The dependency graph: nodes 0..n-1 are transactions, n.. the real-time chain."""

    def __init__(self, n: int, txns: list[Txn], txn_of: list[int]) -> None:
        self.n = n
        self.succ: list[dict[int, int]] = [{} for _ in range(n)]
        self.why: dict[tuple[int, int, int], _Why] = {}
        self.txns = txns
        self.txn_of = txn_of
        self.start_of: dict[int, float] = {}
        self.end_of: dict[int, float] = {}
        self.counts = {WW: 0, WR: 0, RW: 0, RT: 0}
        self._by_id: dict[TxnId, Txn] | None = None

    def link(self, a: int, b: int, kind: int, why: _Why) -> None:
        if a == b:
            return
        d = self.succ[a]
        old = d.get(b, 0)
        if not old & kind:
            d[b] = old | kind
            self.why[(a, b, kind)] = why
            self.counts[kind] += 1

    def chain(self, nodes: Iterable[int]) -> None:
        """Real-time edges among ``nodes``: T1 -> c[i] -> c[i+1] ... -> T2 when T1 completed (c[i]) before T2 began."""
        nodes = list(nodes)
        ends = sorted((self.end_of[v], v) for v in nodes if v in self.end_of)
        if not ends:
            return
        succ = self.succ
        base = len(succ)
        end_times = [e for e, _ in ends]
        for ci, (_, node) in enumerate(ends):
            succ.append({})
            succ[node][base + ci] = RT
            if ci:
                succ[base + ci - 1][base + ci] = RT
        for node in nodes:
            s = self.start_of.get(node)
            if s is None:
                continue
            ci = bisect.bisect_left(end_times, s) - 1
            if ci >= 0:
                succ[base + ci][node] = RT
                self.counts[RT] += 1

    # -- graph algorithms -------------------------------------------------------------------------

    def nbrs(self, v: int, mask: int, member: set[int] | None) -> Iterator[int]:
        for w, kind in self.succ[v].items():
            if kind & mask and (member is None or w in member):
                yield w

    def sccs(self, nodes: Iterable[int], mask: int, member: set[int] | None) -> list[list[int]]:
        """Tarjan's algorithm without recursion; components come out sinks first (reverse topological)."""
        index: dict[int, int] = {}
        low: dict[int, int] = {}
        on_stack: set[int] = set()
        stack: list[int] = []
        comps: list[list[int]] = []
        for root in nodes:
            if root in index:
                continue
            index[root] = low[root] = len(index)
            stack.append(root)
            on_stack.add(root)
            work: list[tuple[int, Iterator[int]]] = [(root, self.nbrs(root, mask, member))]
            while work:
                v, it = work[-1]
                for w in it:
                    if w not in index:
                        index[w] = low[w] = len(index)
                        stack.append(w)
                        on_stack.add(w)
                        work.append((w, self.nbrs(w, mask, member)))
                        break
                    if w in on_stack and index[w] < low[v]:
                        low[v] = index[w]
                else:
                    work.pop()
                    if work:
                        u = work[-1][0]
                        if low[v] < low[u]:
                            low[u] = low[v]
                    if low[v] == index[v]:
                        comp: list[int] = []
                        while True:
                            w = stack.pop()
                            on_stack.discard(w)
                            comp.append(w)
                            if w == v:
                                break
                        comps.append(comp)
        return comps

    def reaches(self, nodes: list[int], mask: int, member: set[int], queries: list[tuple[int, int]]) -> list[bool]:
        """For each (src, dst): does a path src -> ... -> dst along ``mask`` edges inside ``member`` exist?

        Bitsets over the condensation, computed sinks first, for at most
        _CHUNK destination components per pass (so memory stays bounded).
        """
        comps = self.sccs(nodes, mask, member)
        comp_of: dict[int, int] = {}
        for ci, comp in enumerate(comps):
            for v in comp:
                comp_of[v] = ci
        succ_comps: list[set[int]] = []
        for ci, comp in enumerate(comps):
            s: set[int] = set()
            for v in comp:
                s.update(comp_of[w] for w in self.nbrs(v, mask, member))
            s.discard(ci)
            succ_comps.append(s)
        answers = [False] * len(queries)
        targets = sorted({comp_of[d] for _, d in queries})
        for lo in range(0, len(targets), _CHUNK):
            bit_of = {c: 1 << j for j, c in enumerate(targets[lo : lo + _CHUNK])}
            bits = [0] * len(comps)
            for ci in range(len(comps)):
                b = bit_of.get(ci, 0)
                for cw in succ_comps[ci]:
                    b |= bits[cw]
                bits[ci] = b
            for qi, (src, dst) in enumerate(queries):
                bd = bit_of.get(comp_of[dst])
                if bd is not None and bits[comp_of[src]] & bd:
                    answers[qi] = True
        return answers

    def path(self, src: int, dst: int, mask: int, member: set[int]) -> list[int] | None:
        """A shortest path src -> ... -> dst along ``mask`` edges inside ``member`` (BFS)."""
        parent: dict[int, int] = {src: src}
        q = deque([src])
        while q:
            v = q.popleft()
            if v == dst:
                out = [v]
                while v != src:
                    v = parent[v]
                    out.append(v)
                out.reverse()
                return out
            for w in self.nbrs(v, mask, member):
                if w not in parent:
                    parent[w] = v
                    q.append(w)
        return None

    # -- cycle search -------------------------------------------------------------------------------

    def find_cycles(self, out: _Collector) -> int:
        """Report one cycle per anomaly class per strongly connected component; returns how many SCCs."""
        n = self.n
        total = 0
        data = WW | WR | RW
        data_comp: dict[int, int] = {}
        for ci, scc in enumerate(self.sccs(range(n), data, None)):
            for v in scc:
                data_comp[v] = ci
            if len(scc) < 2:
                continue
            total += 1
            member = set(scc)
            self.no_rw(out, scc, member, WW, WW, "G0")
            self.no_rw(out, scc, member, WW | WR, WR, "G1c")
            self.with_rw(out, scc, member, False, data_comp)
        if len(self.succ) == n:
            return total
        for scc in self.sccs(range(len(self.succ)), data | RT, None):
            if len(scc) < 2 or all(v < n for v in scc):
                continue
            total += 1
            member = set(scc)
            self.no_rw(out, scc, member, WW | RT, RT, "G0-realtime")
            self.no_rw(out, scc, member, WW | WR | RT, RT, "G1c-realtime")
            self.with_rw(out, scc, member, True, data_comp)
        return total

    def no_rw(self, out: _Collector, scc: list[int], member: set[int], mask: int, need: int, name: str) -> None:
        """One cycle along ``mask`` edges through an edge of kind ``need``, if there is one."""
        for sub in self.sccs(scc, mask, member):
            if len(sub) < 2:
                continue
            subset = set(sub)
            for a in sub:
                b = next((b for b in self.nbrs(a, need, subset)), None)
                if b is None:
                    continue
                p = self.path(b, a, mask, subset)
                assert p is not None  # same component
                edges = self.edges([a, *p], mask, (a, b, need))
                if name == "G1c-realtime" and not any(e.kind == "wr" for e in edges):
                    return  # no wr in it: the G0-realtime search covers it
                out.add(self.explain(name, edges))
                return

    def with_rw(self, out: _Collector, scc: list[int], member: set[int], rt: bool, data_comp: dict[int, int]) -> None:
        """G-single (exactly one rw edge: the way back has only ww/wr) and G2 (more than one rw edge).

        In the real-time pass only cycles that need a real-time edge are
        reported, as the -realtime classes.
        """
        n = self.n
        rw = [(a, b) for a in scc if a < n for b, k in self.succ[a].items() if k == RW and b in member]
        if not rw:
            return
        back = WW | WR | RT if rt else WW | WR
        single = self.reaches(scc, back, member, [(b, a) for a, b in rw])
        plain = [False] * len(rw)
        if rt:  # G-single without real time was reported by the data pass
            txn_nodes = [v for v in scc if v < n]
            cand = [q for q, s in enumerate(single) if s]
            got = self.reaches(txn_nodes, WW | WR, set(txn_nodes), [(rw[q][1], rw[q][0]) for q in cand])
            for q, g in zip(cand, got, strict=True):
                plain[q] = g
        q1 = next((q for q in range(len(rw)) if single[q] and not plain[q]), None)
        if q1 is not None:
            a, b = rw[q1]
            p = self.path(b, a, back, member)
            assert p is not None
            out.add(self.explain("G-single-realtime" if rt else "G-single", self.edges([a, *p], back, (a, b, RW))))
        # a cycle through a -rw-> b whose way back needs another rw edge: G2 (in the data pass, any such
        # edge; in the real-time pass, only when a and b are not in one data component)
        q2 = next(
            (q for q in range(len(rw)) if not single[q] and not (rt and data_comp[rw[q][0]] == data_comp[rw[q][1]])),
            None,
        )
        if q2 is not None:
            a, b = rw[q2]
            full = WW | WR | RW | (RT if rt else 0)
            p = self.path(b, a, full, member)
            assert p is not None
            out.add(self.explain("G2-realtime" if rt else "G2", self.edges([a, *p], full, (a, b, RW))))

    # -- explanations ---------------------------------------------------------------------------------

    def edges(self, cycle: list[int], mask: int, forced: tuple[int, int, int]) -> list[Edge]:
        """The edges of a node cycle (first == last), runs of chain nodes folded into one rt edge."""
        n = self.n
        if cycle[0] >= n:  # start at a transaction
            j = next(j for j, v in enumerate(cycle) if v < n)
            cycle = [*cycle[j:-1], *cycle[:j], cycle[j]]
        edges: list[Edge] = []
        i = 0
        while i < len(cycle) - 1:
            a, b = cycle[i], cycle[i + 1]
            ta = self.txns[self.txn_of[a]]
            if b >= n:
                j = i + 1
                while cycle[j] >= n:
                    j += 1
                tb = self.txns[self.txn_of[cycle[j]]]
                text = (
                    f"T{ta.id} completed at {self.end_of[a]:.6f}, before T{tb.id} started at "
                    f"{self.start_of[cycle[j]]:.6f}"
                )
                edges.append(Edge(ta.id, tb.id, "rt", text))
                i = j
                continue
            tb = self.txns[self.txn_of[b]]
            kinds = self.succ[a][b] & mask
            kind = forced[2] if (a, b) == forced[:2] else next(k for k in (WW, WR, RW) if kinds & k)
            text = _render(self.why[(a, b, kind)], f"T{ta.id}", f"T{tb.id}")
            edges.append(Edge(ta.id, tb.id, _KIND_NAMES[kind], text))
            i += 1
        return edges

    def explain(self, kind: str, edges: list[Edge]) -> Explanation:
        nrw = sum(e.kind == "rw" for e in edges)
        nrt = sum(e.kind == "rt" for e in edges)
        text = f"a cycle of {len(edges)} transactions with {nrw} rw and {nrt} real-time edge(s)"
        if self._by_id is None:
            self._by_id = {self.txns[i].id: self.txns[i] for i in self.txn_of}
        return Explanation(kind, text, tuple(self._by_id[e.a] for e in edges), tuple(edges))
