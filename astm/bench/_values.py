"""Value size: does a one-entry change cost the same in a 100,000-entry collection as in a 10-entry one?

On a given store, ``pmap`` and ``pvector`` values of each size (10, 1,000,
100,000 entries; 10, 100, 1,000 in a quick run) are built once when the group
starts, outside any timed region, and each row gets refs of its own holding
them (so one row's changes never reach another's). Each transaction changes
one entry, two ways:

* with astm's collection helpers, ``ref.alter(astm.assoc, k, v)`` on the map
  and ``ref.commute(astm.conj, x)`` on the vector: astm then knows the change
  is a delta (checks only the new entry, logs only the call), so it should
  cost what changed (target: the big collection at least half the rate of the
  10-entry one);
* with an arbitrary function, ``ref.alter(lambda m: m.set(k, v))``: astm
  cannot know what it changed and checks (and on a durable store, writes)
  the whole result.

Each row is one size against the 10-entry collection of the same store, kind
and method. The rows also show ``full gc ms``: how long the garbage
collector's full collection before each round took, a pause the rounds
themselves leave out (every round starts after one) but that a long-running
process takes every so often with the same values alive. What that pause
costs depends on the values the store still holds from the round before
(its history of recent commits), so the pause before a baseline round
(``baseline full gc ms``) shows what the big collection's round left behind.

The map's keys are replaced, never added, so it keeps its size; ``conj``
grows the vector by one entry per transaction, so the vector is put back to
its size before each round (outside the clock); the function variant on the
vector replaces an index (``v.set(i, x)``) and keeps its size.
"""

from __future__ import annotations

import gc
import time
import uuid
from collections.abc import Callable
from typing import Any

from pyrsistent import pmap, pvector

import astm

from ._harness import Case, Cases, Config, GcTimer, Sized, Timed

__all__ = ["value_size_names", "value_sizes"]


def _assoc(ref: astm.Ref[Any], k: int, v: int) -> None:
    ref.alter(astm.assoc, k, v)


def _set_map(ref: astm.Ref[Any], k: int, v: int) -> None:
    ref.alter(lambda m: m.set(k, v))


def _conj(ref: astm.Ref[Any], k: int, v: int) -> None:
    ref.commute(astm.conj, v)


def _set_vector(ref: astm.Ref[Any], k: int, v: int) -> None:
    ref.alter(lambda vec: vec.set(k, v))


def _reset(ref: astm.Ref[Any], value: Any) -> None:
    ref.set(value)


#: (collection, method label, transaction body, whether the body grows the collection)
_VARIANTS: list[tuple[str, str, Callable[[astm.Ref[Any], int, int], None], bool]] = [
    ("pmap", "alter(astm.assoc, k, v)", _assoc, False),
    ("pmap", "alter(lambda m: m.set(k, v))", _set_map, False),
    ("pvector", "commute(astm.conj, x)", _conj, True),
    ("pvector", "alter(lambda v: v.set(i, x))", _set_vector, False),
]


def _build(kind: str, size: int) -> Any:
    return pmap({i: i for i in range(size)}) if kind == "pmap" else pvector(range(size))


def _name(label: str, kind: str, size: int, small: int, method: str) -> str:
    return f"value size, {label}: {kind} of {size:,} vs {small}, {method}"


def value_size_names(label: str, cfg: Config) -> list[str]:
    """The names of the value-size rows on a store called ``label`` (to decide whether to set that store up)."""
    sizes: tuple[int, ...] = cfg.pick((1_000, 100_000), (100, 1_000))
    return [_name(label, kind, size, 10, method) for kind, method, _, _ in _VARIANTS for size in sizes]


async def value_sizes(store: astm.Store, label: str, cfg: Config) -> Cases:
    """The value-size cases on ``store`` (called ``label`` in the rows), for the wanted ones only."""
    small = 10
    sizes: tuple[int, ...] = cfg.pick((1_000, 100_000), (100, 1_000))
    wanted = [
        (kind, method, body, grows, size)
        for kind, method, body, grows in _VARIANTS
        for size in sizes
        if cfg.wants(_name(label, kind, size, small, method))
    ]
    if not wanted:
        return
    run = uuid.uuid4().hex[:8]  # a database given by DSN may hold refs of an earlier run
    values: dict[tuple[str, int], Any] = {}  # each value is built once, shared by the refs that start from it
    refs: dict[tuple[str, str, int], astm.Ref[Any]] = {}  # one ref per kind, method and size: rows do not interfere
    for kind, method, _, _, size in wanted:
        for sz in (small, size):
            if (kind, sz) not in values:
                values[kind, sz] = _build(kind, sz)
            if (kind, method, sz) not in refs:
                refs[kind, method, sz] = store.ref(f"bench-{kind}-{len(refs)}-{sz}-{run}", values[kind, sz])
    # a new ref's first commit stores its whole value: make it here, outside the clock (it was the first
    # warm-up call of a case, which then sized its rounds from one slow commit: one commit per round)
    for (kind, _, sz), ref in refs.items():
        await store.atomically(_reset, ref, values[kind, sz])

    def sized(kind: str, method: str, size: int, body: Callable[[astm.Ref[Any], int, int], None]) -> Sized:
        ref = refs[kind, method, size]
        original = values[kind, size]
        counter = 0

        async def one_round(n: int) -> Timed:
            nonlocal counter
            if len(await store.atomically(ref.get)) != size:  # conj grew it
                await store.atomically(_reset, ref, original)
                gc.collect()
            with GcTimer() as gct:
                t0 = time.perf_counter()
                for _ in range(n):
                    counter += 1
                    await store.atomically(body, ref, counter % size, counter)
                elapsed = time.perf_counter() - t0
            return Timed(n, elapsed, {"gc share": gct.seconds / elapsed})

        return Sized(one_round, cfg.seconds, start=1)

    for kind, method, body, grows, size in wanted:
        helper = "astm." in method
        yield Case(
            _name(label, kind, size, small, method),
            sized(kind, method, size, body),
            sized(kind, method, small, body),
            "tx/s",
            ">= 0.5" if helper else "",
            formats={"gc share": ".0%", "full gc ms": ".0f"},
            gc_pause=True,
            note=f"baseline: the {small}-entry {kind}, same store and method"
            + ("; conj grows it by one entry per transaction (reset each round)" if grows else ""),
        )
    for (kind, method, size), ref in refs.items():
        assert len(await store.atomically(ref.get)) >= size, (kind, method, size)
