"""Cases of the durable SQLite store against sqlite3 used directly, and the value-size cases on it.

The direct baseline is what a careful program does without astm: one
connection, ``journal_mode=WAL``, ``synchronous=FULL``, and each transfer in
its own ``BEGIN IMMEDIATE ... COMMIT`` (one fsync per transfer). The astm
store with 100 tasks shares fsyncs between the commits that queue up (group
commit), so it is also compared with the ceiling of that idea: the direct
writer putting 100 transfers in each COMMIT.
"""

from __future__ import annotations

import random
import sqlite3
import tempfile
import time
from contextlib import aclosing

import anyio

import astm

from ._harness import Case, Cases, Config, Sized, Timed
from ._values import value_sizes

__all__ = ["sqlite"]


def _sub(v: int, n: int) -> int:
    return v - n


def _add(v: int, n: int) -> int:
    return v + n


def _transfer(a: astm.Ref[int], b: astm.Ref[int]) -> None:
    a.alter(_sub, 1)
    b.alter(_add, 1)


async def sqlite(cfg: Config) -> Cases:
    """The SQLite store, 1 task and 100 tasks, vs the direct writer; then value sizes on a SQLite store."""
    tasks = 100
    one_name = "sqlite store, 1 task, durable commits"
    many_name = f"sqlite store, {tasks} tasks (group commit)"
    ceiling_name = f"sqlite store, {tasks} tasks vs the direct writer batching {tasks} per COMMIT"
    with tempfile.TemporaryDirectory() as tmp:
        if any(cfg.wants(n) for n in (one_name, many_name, ceiling_name)):
            conn = sqlite3.connect(f"{tmp}/direct.db", isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("CREATE TABLE acct (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)")
                conn.executemany("INSERT INTO acct VALUES (?, 1000000)", [(i,) for i in range(100)])
                rng = random.Random(2)

                async def direct_round(n: int) -> float:
                    t0 = time.perf_counter()
                    for _ in range(n):
                        a, b = rng.sample(range(100), 2)
                        conn.execute("BEGIN IMMEDIATE")
                        conn.execute("UPDATE acct SET balance = balance - 1 WHERE id = ?", (a,))
                        conn.execute("UPDATE acct SET balance = balance + 1 WHERE id = ?", (b,))
                        conn.execute("COMMIT")
                    return time.perf_counter() - t0

                async def batched_round(n: int) -> float:
                    t0 = time.perf_counter()
                    for _ in range(n // tasks):
                        conn.execute("BEGIN IMMEDIATE")
                        for _ in range(tasks):
                            a, b = rng.sample(range(100), 2)
                            conn.execute("UPDATE acct SET balance = balance - 1 WHERE id = ?", (a,))
                            conn.execute("UPDATE acct SET balance = balance + 1 WHERE id = ?", (b,))
                        conn.execute("COMMIT")
                    return time.perf_counter() - t0

                async with astm.Store(f"sqlite:///{tmp}/astm.db") as store:
                    refs = [store.ref(f"acct-{i}", 1_000_000) for i in range(100)]

                    async def one_round(n: int) -> float:
                        t0 = time.perf_counter()
                        for _ in range(n):
                            x, y = rng.sample(refs, 2)
                            await store.atomically(_transfer, x, y)
                        return time.perf_counter() - t0

                    def many_sized() -> Sized:
                        async def many_round(n: int) -> Timed:
                            per = n // tasks

                            async def worker(seed: int) -> None:
                                wrng = random.Random(seed)
                                for _ in range(per):
                                    x, y = wrng.sample(refs, 2)
                                    await store.atomically(_transfer, x, y)

                            t0 = time.perf_counter()
                            async with anyio.create_task_group() as tg:
                                for i in range(tasks):
                                    tg.start_soon(worker, i)
                            return Timed(per * tasks, time.perf_counter() - t0)

                        return Sized(many_round, cfg.seconds, start=tasks, granule=tasks)

                    direct = Sized(direct_round, cfg.seconds, start=10)
                    yield Case(one_name, Sized(one_round, cfg.seconds, start=10), direct, "tx/s", ">= 0.8",
                               note="baseline: sqlite3 BEGIN IMMEDIATE..COMMIT, WAL, synchronous=FULL")  # fmt: skip
                    yield Case(many_name, many_sized(), direct, "tx/s", ">= 10",
                               note="baseline: the same direct single writer")  # fmt: skip
                    yield Case(ceiling_name, many_sized(), Sized(batched_round, cfg.seconds, start=tasks,
                               granule=tasks), "tx/s", "", note="baseline: the ceiling of group commit")  # fmt: skip
                    assert sum(r.get() for r in refs) == 100 * 1_000_000
                total = conn.execute("SELECT sum(balance) FROM acct").fetchone()[0]
                assert total == 100 * 1_000_000
            finally:
                conn.close()
        async with (
            astm.Store(f"sqlite:///{tmp}/values.db") as vstore,
            aclosing(value_sizes(vstore, "sqlite", cfg)) as gen,
        ):
            async for case in gen:
                yield case
