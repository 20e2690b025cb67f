"""Cases of the PostgreSQL store: throughput against asyncpg, ``sync(t)`` lag between processes, value sizes.

They use ``ASTM_BENCH_POSTGRES_DSN`` or a throwaway cluster when PostgreSQL's
programs are installed, and are left out otherwise.

Four worker processes are started once for all these cases; each case
opens in the workers it uses what it needs (an astm peer, asyncpg
connections) and closes it afterwards, so an idle worker does not follow the
commits of the next case.

Throughput: 1, 8 and 32 tasks spread over up to 4 workers, each doing
transfers between 2 of 100 accounts, through astm peers, or through asyncpg
at SERIALIZABLE with a retry loop on the same kind of table. Each round tells
the workers to run for a while at the same moment and sums their rates.

Lag: one worker commits and prints each commit's ``t``; this process reads it
from the pipe and waits in ``sync(t)`` until its own peer has that commit.
The baseline is the same pipe carrying a timestamp and no commit. This
process opens its own peer only after the throughput cases, which it would
otherwise follow.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from contextlib import aclosing
from typing import Any

import anyio

import astm

from ._child import Child, command, reply, start_all
from ._harness import Case, Cases, Config, Result
from ._values import value_size_names, value_sizes

__all__ = ["pg_worker", "postgres"]


def _sub(v: int, n: int) -> int:
    return v - n


def _add(v: int, n: int) -> int:
    return v + n


def _inc(v: int) -> int:
    return v + 1


def _bump(r: astm.Ref[int]) -> None:
    r.alter(_inc)


def _transfer(a: astm.Ref[int], b: astm.Ref[int]) -> None:
    a.alter(_sub, 1)
    b.alter(_add, 1)


async def pg_worker(dsn: str) -> None:
    """A worker process of the PostgreSQL cases, driven by commands on stdin.

    ``open N``: open an astm peer (100 account refs) and N asyncpg connections.
    ``run astm S`` / ``run direct S``: N tasks do transfers for S seconds
    through the peer, or through the connections at SERIALIZABLE with a retry
    loop; the answer is ``count elapsed``. ``close``: close them (a closed
    worker no longer follows the others' commits). ``lag astm N`` / ``lag pipe
    N``: N commits (or none), 5 ms apart, each printed as ``t time``, then
    ``end``. The process is started once for all cases and opened per case.
    """
    import asyncpg

    rng = random.Random()
    store: astm.Store | None = None
    refs: list[astm.Ref[int]] = []
    conns: list[Any] = []

    async def astm_task(i: int) -> None:
        x, y = rng.sample(refs, 2)
        assert store is not None
        await store.atomically(_transfer, x, y)

    async def direct_task(i: int) -> None:
        conn = conns[i]
        a, b = rng.sample(range(100), 2)
        while True:
            try:
                async with conn.transaction(isolation="serializable"):
                    await conn.execute("UPDATE bench_acct SET balance = balance - 1 WHERE id = $1", a)
                    await conn.execute("UPDATE bench_acct SET balance = balance + 1 WHERE id = $1", b)
                return
            except (asyncpg.SerializationError, asyncpg.DeadlockDetectedError):
                continue

    async def run(task: Any, i: int, stop: float, counts: list[int]) -> None:
        while time.perf_counter() < stop:
            await task(i)
            counts[i] += 1

    async def close() -> None:
        nonlocal store
        if store is not None:
            await store.aclose()
            store = None
        for c in conns:
            await c.close()
        conns.clear()

    reply("ready")
    try:
        while cmd := await command():
            op, *args = cmd.split()
            if op == "open":
                await close()
                store = await astm.Store(dsn).open()
                refs = [store.ref(f"acct-{i}", 1_000_000) for i in range(100)]
                conns.extend([await asyncpg.connect(dsn) for _ in range(int(args[0]))])
                reply("ok")
            elif op == "run":
                task = astm_task if args[0] == "astm" else direct_task
                tasks = len(conns)
                counts = [0] * tasks
                t0 = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for i in range(tasks):
                        tg.start_soon(run, task, i, t0 + float(args[1]), counts)
                reply(sum(counts), time.perf_counter() - t0)
            elif op == "lag":
                assert store is not None
                lag = store.ref("lag", 0)
                for _ in range(int(args[1])):
                    t = (await store.transact(_bump, lag)).t if args[0] == "astm" else 0
                    reply(t, time.time())
                    await anyio.sleep(0.005)
                reply("end")
            elif op == "close":
                await close()
                reply("ok")
    finally:
        await close()


def _p99(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.99) - 1)]


def _throughput_name(tasks: int) -> str:
    procs = min(4, tasks)
    return f"postgres store, {tasks} task{'s' * (tasks > 1)} over {procs} process{'es' * (procs > 1)}"


async def _throughput(pool: list[Child], tasks: int, seconds: float) -> Cases:
    procs = min(len(pool), tasks)
    used = pool[:procs]
    per = [tasks // procs + (1 if i < tasks % procs else 0) for i in range(procs)]
    try:
        for c, n in zip(used, per, strict=True):  # all open at once
            await c.send(f"open {n}")
        for c in used:
            assert await c.line() == "ok"

        async def measure(kind: str) -> float:
            for c in used:  # all start together
                await c.send(f"run {kind} {seconds}")
            rate = 0.0
            for c in used:
                count, elapsed = (await c.line()).split()
                rate += int(count) / float(elapsed)
            return rate

        async def subject() -> Result:
            return await measure("astm")

        async def baseline() -> Result:
            return await measure("direct")

        yield Case(
            _throughput_name(tasks),
            subject,
            baseline,
            "tx/s",
            ">= 1 at 32" if tasks == 32 else "",
            note="baseline: asyncpg SERIALIZABLE + retry loop",
        )
    finally:
        for c in used:
            await c.send("close")
        for c in used:
            await c.line()


async def _sync_lag(child: Child, store: astm.Store, handoffs: int) -> Cases:
    assert await child.ask("open 0") == "ok"
    try:

        async def one_round(kind: str) -> Result:
            await child.send(f"lag {kind} {handoffs}")
            lags: list[float] = []
            while (line := await child.line()) != "end":
                t_text, sent = line.split()
                if kind == "astm":
                    await store.sync(int(t_text), timeout=10)
                lags.append(time.time() - float(sent))
            ms = [x * 1000 for x in lags]
            return statistics.median(ms), {"p99 ms": _p99(ms)}

        async def subject() -> Result:
            return await one_round("astm")

        async def baseline() -> Result:
            return await one_round("pipe")

        yield Case(
            "postgres store: sync(t) lag between two processes (median)",
            subject,
            baseline,
            "ms",
            "",
            lower_is_better=True,
            note="baseline: the pipe that carries t, alone",
            formats={"p99 ms": ".2f"},
        )
    finally:
        await child.ask("close")


async def postgres(cfg: Config) -> Cases:
    """Every PostgreSQL case, on ``ASTM_BENCH_POSTGRES_DSN`` or a throwaway cluster (none if neither can be had)."""
    import os

    from ..testing import Cluster, available

    counts = (1, 8, 32)
    names = [_throughput_name(n) for n in counts]
    names.append("postgres store: sync(t) lag between two processes (median)")
    if not any(cfg.wants(n) for n in [*names, *value_size_names("postgres", cfg)]):
        return
    dsn = os.environ.get("ASTM_BENCH_POSTGRES_DSN")
    cluster = None
    if dsn is None:
        if not available():
            print("postgres cases left out: no ASTM_BENCH_POSTGRES_DSN and no PostgreSQL programs", file=sys.stderr)
            return
        cluster = Cluster()
        dsn = cluster.dsn
    try:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("DROP TABLE IF EXISTS bench_acct")
            await conn.execute("CREATE TABLE bench_acct (id int PRIMARY KEY, balance bigint NOT NULL)")
            await conn.execute("INSERT INTO bench_acct SELECT g, 1000000 FROM generate_series(0, 99) g")
        finally:
            await conn.close()
        async with astm.Store(dsn):  # creates the schema
            pass
        seconds: float = cfg.pick(max(1.0, 3 * cfg.seconds), cfg.seconds)
        pool = await start_all([("--pg-worker", dsn)] * 4) if any(cfg.wants(n) for n in names) else []
        try:
            for tasks, name in zip(counts, names, strict=False):
                if cfg.wants(name):
                    async with aclosing(_throughput(pool, tasks, seconds)) as gen:
                        async for case in gen:
                            yield case
            # this process's own peer, opened only now: it would follow every commit of the cases above
            async with astm.Store(dsn) as store:
                if cfg.wants(names[3]):
                    async with aclosing(_sync_lag(pool[0], store, cfg.pick(200, 10))) as gen:
                        async for case in gen:
                            yield case
                async with aclosing(value_sizes(store, "postgres", cfg)) as gen:
                    async for case in gen:
                        yield case
        finally:
            for c in pool:
                await c.close()
    finally:
        if cluster is not None:
            cluster.destroy()
