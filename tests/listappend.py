"""List-append workloads against astm through its public API, checked by the Elle-style checker in tests/elle.py.

Refs ``k0``, ``k1``, ... hold tuples (initially ``()``). Each transaction runs
1-4 micro-ops on random keys of the K active ones: an append
``ref.alter(_append, x)`` of a value unique in the whole run, or a read
``ref.get()`` (checked) or, in the peek variant, ``ref.peek()`` (an unchecked
snapshot read), with ``await anyio.sleep(0)`` and now and then a short sleep
between operations. The body records what each micro-op did; it may run
several times, so every attempt starts a fresh record and only the last
attempt's counts. As in Elle's generator, the K active keys are a window that
slides on as values are appended, so that each key gets about
``max_writes_per_key`` appends: lists (and the checker's work per read) stay
short however long the run.

A transaction that returned is ``ok``; one that raised (a deliberate
``Abort`` from some bodies, ``RetryLimitExceeded``, or any other error) is
``fail``; one cancelled by a ``move_on_after`` around it is ``info`` (it may
or may not have committed). Errors other than ``Abort`` and
``RetryLimitExceeded`` are also collected in ``History.errors``: the tests
treat them as crashes. After everything quiesced, the value of every ref the
run used, read outside transactions, is the checker's final state.

Sizes: the tests run a few hundred to a couple of thousand transactions per
variant (about 30 s for tests/test_listappend.py on a 2-core machine).
``ASTM_SOAK=N`` (N >= 1) multiplies every count by 20 * N for long soaks, and
raises the hang deadline and the per-test timeout to match (about 10 minutes
for the whole file at N = 1)::

    ASTM_SOAK=1 .venv/bin/pytest tests/test_listappend.py -v -s
"""

from __future__ import annotations

import itertools
import os
import random
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import anyio

import astm

from .elle import MicroOp, Result, Status, Txn, check

__all__ = [
    "SOAK",
    "Abort",
    "History",
    "Workload",
    "final_state",
    "run_threads",
    "run_workload",
    "scaled",
    "staggered",
    "summary",
]

#: the soak factor: 0 for the CI sizes
SOAK = int(os.environ.get("ASTM_SOAK", "0") or 0)


def scaled(n: int) -> int:
    """A CI-sized count, multiplied for soaks."""
    return n * 20 * SOAK if SOAK else n


class Abort(Exception):
    """Raised on purpose at the end of some bodies: the transaction is known not to have committed."""


@dataclass(frozen=True)
class Workload:
    """The shape of a run: how many keys, transactions and tasks, and how the bodies behave."""

    #: active keys at any time
    keys: int = 6
    #: about how many appends each key gets before it leaves the window (None: keys k0..k{keys-1} forever)
    max_writes_per_key: int | None = 64
    #: transactions per call of ``run_workload`` (split among ``tasks`` concurrent tasks)
    txns: int = 400
    tasks: int = 16
    read: Literal["get", "peek"] = "get"
    min_ops: int = 1
    max_ops: int = 4
    append_p: float = 0.5
    #: chance of a short sleep (up to ``sleep_max`` seconds) instead of sleep(0) after an op
    sleep_p: float = 0.1
    sleep_max: float = 0.001
    #: chance that a transaction runs inside ``move_on_after(uniform(0, cancel_max))``
    cancel_p: float = 0.0
    cancel_max: float = 0.003
    #: chance that the body raises ``Abort`` after its ops
    fail_p: float = 0.03
    seed: int = 0

    def key(self, rng: random.Random, appended: int) -> str:
        """A random active key, ``appended`` values having been handed out so far."""
        base = appended // self.max_writes_per_key if self.max_writes_per_key else 0
        return f"k{base + rng.randrange(self.keys)}"


@dataclass
class History:
    """The transactions of one run, from any number of tasks, loops and threads."""

    txns: list[Txn] = field(default_factory=list)
    #: unexpected exceptions: from transactions (besides Abort and RetryLimitExceeded) and from whole workers
    errors: list[tuple[str, BaseException]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _values: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    #: the last value handed out, and every key any plan used
    last_value: int = 0
    keys: set[str] = field(default_factory=set)

    def next_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def next_value(self) -> int:
        with self._lock:
            self.last_value = next(self._values)
            return self.last_value

    def touch(self, names: set[str]) -> None:
        with self._lock:
            self.keys |= names

    def add(self, txn: Txn) -> None:
        with self._lock:
            self.txns.append(txn)

    def error(self, where: str, exc: BaseException) -> None:
        with self._lock:
            self.errors.append((where, exc))

    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "fail": 0, "info": 0}
        for t in self.txns:
            out[t.status] += 1
        return out

    def check(self, final: dict[str, tuple[int, ...]], allow: frozenset[str] = frozenset()) -> Result:
        return check(self.txns, final, allow)

    def describe_errors(self) -> str:
        parts = []
        for where, exc in self.errors[:5]:
            tb = "".join(traceback.format_exception(exc))
            parts.append(f"--- {where}: {exc!r}\n{tb}")
        return f"{len(self.errors)} unexpected error(s)\n" + "\n".join(parts)


def _append(v: tuple[int, ...], x: int) -> tuple[int, ...]:
    return (*v, x)


@dataclass(frozen=True)
class _Plan:
    ops: tuple[tuple[str, str, int], ...]  # (f, key, value or 0)
    sleeps: tuple[float, ...]
    fail: bool
    cancel_after: float | None


def _plan(w: Workload, rng: random.Random, hist: History) -> _Plan:
    ops = []
    for _ in range(rng.randint(w.min_ops, w.max_ops)):
        k = w.key(rng, hist.last_value)
        if rng.random() < w.append_p:
            ops.append(("append", k, hist.next_value()))
        else:
            ops.append(("r", k, 0))
    hist.touch({k for _, k, _ in ops})
    sleeps = tuple(rng.uniform(0, w.sleep_max) if rng.random() < w.sleep_p else 0.0 for _ in ops)
    cancel = rng.uniform(0, w.cancel_max) if rng.random() < w.cancel_p else None
    return _Plan(tuple(ops), sleeps, rng.random() < w.fail_p, cancel)


async def _transaction(store: astm.Store, w: Workload, plan: _Plan, hist: History, process: str) -> None:
    empty: tuple[int, ...] = ()
    refs = {k: store.ref(k, empty) for _, k, _ in plan.ops}
    record: list[MicroOp] = []

    async def body() -> None:
        nonlocal record
        ops: list[MicroOp] = []
        record = ops  # a new attempt: only the last one counts
        for (f, k, x), pause in zip(plan.ops, plan.sleeps, strict=True):
            ref = refs[k]
            if f == "append":
                ref.alter(_append, x)
                ops.append(("append", ref.name, x))
            elif w.read == "get":
                ops.append(("r", ref.name, ref.get()))
            else:
                ops.append(("r", ref.name, ref.peek()))
            await anyio.sleep(pause)
        if plan.fail:
            raise Abort()

    tid = hist.next_id()
    status: Status = "info"
    start = time.monotonic()
    try:
        with anyio.move_on_after(plan.cancel_after):
            await store.atomically(body)
            status = "ok"
    except (Abort, astm.RetryLimitExceeded):
        status = "fail"
    except Exception as exc:
        status = "fail"
        hist.error(f"T{tid} on {process}", exc)
    end = time.monotonic()
    hist.add(Txn(tid, status, tuple(record), start, end, process))


async def run_workload(
    store: astm.Store, w: Workload, hist: History, process: str = "main", stores: Sequence[astm.Store] = ()
) -> None:
    """Run ``w.txns`` transactions on ``store`` (or spread over ``stores``, one task's transactions per store)."""
    peers = list(stores) or [store]
    rng = random.Random(w.seed)
    per_task = [w.txns // w.tasks + (1 if i < w.txns % w.tasks else 0) for i in range(w.tasks)]

    async def worker(i: int, n: int) -> None:
        wrng = random.Random(rng.random())
        p = i % len(peers)
        where = process if len(peers) == 1 else f"{process}/peer{p}"
        for _ in range(n):
            await _transaction(peers[p], w, _plan(w, wrng, hist), hist, where)

    async with anyio.create_task_group() as tg:
        for i, n in enumerate(per_task):
            tg.start_soon(worker, i, n)


def final_state(store: astm.Store, hist: History) -> dict[str, tuple[int, ...]]:
    """The value of every key the run used, read outside any transaction."""
    empty: tuple[int, ...] = ()
    return {name: store.ref(name, empty).get() for name in sorted(hist.keys)}


def run_threads(
    store: astm.Store,
    workers: Sequence[tuple[str, Workload]],
    hist: History,
    timeout: float,
    follower: str | None = None,
) -> list[str]:
    """Run one workload per thread, each thread with its own event loop (``(backend, workload)`` pairs), on one store.

    With ``follower`` (a backend) one more thread first waits for a commit
    with ``store.sync(t + 1)``, gives up after a moment and ends, so that its
    event loop is closed when the workers start committing. Returns a
    description of every thread still running after ``timeout`` seconds (a
    hang), with its stack; errors that end a thread go to ``hist.errors``.
    """

    def main(i: int, backend: str, w: Workload) -> None:
        async def go() -> None:
            await run_workload(store, w, hist, f"thread{i}-{backend}")

        try:
            anyio.run(go, backend=backend)
        except BaseException as exc:
            hist.error(f"thread{i}-{backend}", exc)

    def follow(backend: str) -> None:
        async def go() -> None:
            with anyio.move_on_after(0.01):
                await store.sync(store.t + 1)

        try:
            anyio.run(go, backend=backend)
        except BaseException as exc:
            hist.error(f"follower-{backend}", exc)

    deadline = time.monotonic() + timeout
    threads = [
        threading.Thread(target=main, args=(i, b, w), name=f"listappend-{i}-{b}", daemon=True)
        for i, (b, w) in enumerate(workers)
    ]
    if follower is not None:
        f = threading.Thread(target=follow, args=(follower,), name=f"follower-{follower}", daemon=True)
        f.start()
        f.join(timeout)
        threads.append(f)
    for t in threads:
        if not t.is_alive() and t.ident is None:
            t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = []
    frames = sys._current_frames()
    for t in threads:
        if t.is_alive() and t.ident is not None:
            stack = "".join(traceback.format_stack(frames[t.ident])) if t.ident in frames else "?"
            hung.append(f"{t.name} still running after {timeout} s:\n{stack}")
    return hung


def staggered(w: Workload, backends: Sequence[str], short_cancel_p: float = 0.5) -> list[tuple[str, Workload]]:
    """One workload per backend; the first runs a quarter as many transactions, cancelling many, and ends early."""
    out = [(b, replace(w, seed=w.seed * 1000 + i)) for i, b in enumerate(backends)]
    b0, w0 = out[0]
    out[0] = (b0, replace(w0, txns=max(1, w0.txns // 4), cancel_p=short_cancel_p))
    return out


def summary(hist: History, result: Result | None = None, store: astm.Store | None = None) -> str:
    """One paragraph for a failure message or a soak log: sizes, statuses, store stats, the checker's verdict."""
    parts = [f"{len(hist.txns)} txns {hist.counts()}"]
    if store is not None:
        parts.append(f"store t={store.t} {store.stats()}")
    if hist.errors:
        parts.append(hist.describe_errors())
    if result is not None:
        parts.append(str(result))
    return "\n".join(parts)
