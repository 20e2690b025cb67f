"""``astm.tune_gc``: keep the cyclic garbage collector out of a busy transactional service's way.

CPython runs a young-generation collection every 700 net container
allocations. Every transaction in flight holds a few young containers (its
attempt, read and write sets, coroutine frames), so with a thousand in flight
the collector runs every few transactions and walks all of them each time: a
fifth to a third of the wall time in ``python -m astm.bench``'s 1000-task
case. A larger first threshold makes collections rarer; each one walks more
objects, but the work per allocation falls, because most objects die young
and are freed by reference counting long before a collection would see them.

The trade-off: cyclic garbage (objects that only refer to each other) lives
longer, up to about ``threshold`` containers (a few megabytes) before it is
collected, and a single young collection takes longer (around a millisecond
at 50,000 rather than tens of microseconds). ``freeze`` moves everything alive
at the call (imported modules, the application's startup state) out of the
collector's sight for good, so full collections stop walking it.
"""

from __future__ import annotations

import gc

__all__ = ["DEFAULT_THRESHOLD", "tune_gc"]

#: the young-generation threshold ``astm.run`` sets (CPython's default is 700)
DEFAULT_THRESHOLD = 50_000


def tune_gc(threshold: int = DEFAULT_THRESHOLD, *, freeze: bool = True) -> tuple[int, int, int]:
    """Raise the collector's young-generation threshold (and freeze what is alive now); return the old thresholds.

    ``astm.run`` calls this for you. Call it yourself once at startup (for
    example at the start of a FastAPI lifespan, or before ``uvicorn.run``)
    when your own loop or server runs the transactions; restore the old
    behaviour with ``gc.set_threshold(*old)``. The older generations are
    collected every 20 collections of the one below (CPython: 10).
    """
    if threshold < 1:
        raise ValueError(f"tune_gc(threshold={threshold!r}): the threshold must be a positive number of allocations")
    old = gc.get_threshold()
    if freeze:
        gc.collect()  # what is garbage now is freed, not frozen
        gc.freeze()
    gc.set_threshold(threshold, 20, 20)
    return old
