"""PostgreSQL scaling cases: a new peer's open, transfers over 1 to 8 peer processes, a long catch-up.

They use ``ASTM_BENCH_POSTGRES_DSN`` or a throwaway cluster (their own, not
the one of the other PostgreSQL cases) when PostgreSQL's programs are
installed, and are left out otherwise.

Open: databases of 2k, 200k (and, in a full run, 1M) small refs are filled
through the store's own schema (one ``INSERT ... SELECT`` into ``astm_refs``,
outside any timed region). Each round starts a fresh worker process, which
imports everything first and then times ``Store(dsn).open()`` and the growth
of its resident memory; the bigger database is the subject, the 2k one its
baseline, so the ratio says how much of the open grows with the table.

Transfers: up to 8 worker processes, started once; each round opens in the
workers it uses what it needs (an astm peer with its accounts loaded, or
asyncpg connections), runs them for a while at the same moment, sums their
rates and closes them again (an idle peer would follow the others' commits).
Each process runs 4 tasks (1 when quick). Disjoint: every task moves money
between accounts of its own (no two tasks ever touch the same account); hot:
every task of every process moves money among the same 4 accounts. The
baseline does the same transfers with asyncpg at SERIALIZABLE with a retry
loop, updating the two rows in id order (no deadlocks).

Catch-up: a worker peer holding the refs about to be written is stopped
(SIGSTOP) while this process commits 100k small transactions to them from
many tasks (outside the timed region), then resumed. A 1 ms ticker task on
the resumed peer's loop records its ticks; the figure is the longest gap
between ticks from the resume until the peer has applied the last commit. The
baseline is the same ticker on the same peer stopped and resumed with nothing
to catch up, over the same length of time.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio

import astm

from ._child import Child, command, reply, start_all
from ._harness import Case, Cases, Config, Derived, Result
from ._postgres import _add, _inc, _sub

__all__ = ["pg_scale", "pg_scale_worker"]

#: the most worker processes a transfer case uses
PROCS = 8
#: accounts of one task in the disjoint cases; the shared accounts of the hot case
OWN_ACCOUNTS = 4
HOT_ACCOUNTS = 4
#: refs the catch-up commits write (and the stopped peer holds)
CATCH_UP_REFS = 1000


def _transfer(a: astm.Ref[int], b: astm.Ref[int]) -> None:
    a.alter(_sub, 1)
    b.alter(_add, 1)


def _bump(r: astm.Ref[int]) -> None:
    r.alter(_inc)


def _rss() -> int:
    """This process's resident memory in bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        return 0


def _accounts(mode: str, worker: int, tasks: int) -> list[list[int]]:
    """The account ids each task of ``worker`` transfers between: its own (disjoint) or the shared ones (hot)."""
    if mode == "hot":
        return [list(range(HOT_ACCOUNTS)) for _ in range(tasks)]
    first = HOT_ACCOUNTS + worker * tasks * OWN_ACCOUNTS
    return [list(range(first + i * OWN_ACCOUNTS, first + (i + 1) * OWN_ACCOUNTS)) for i in range(tasks)]


async def pg_scale_worker(dsn: str) -> None:
    """A worker process of the scaling cases, driven by commands on stdin (one answer line each).

    ``open astm|direct MODE TASKS W``: open a peer with the accounts of its
    TASKS tasks loaded (worker W; MODE disjoint or hot), or TASKS asyncpg
    connections. ``run S``: the tasks transfer for S seconds; the answer is
    ``count elapsed retries``. ``close``: close what is open. ``peer N``: time
    the open of a new peer on a database of N refs, then one cold read; the
    answer is ``seconds rss_growth_bytes read_seconds``.
    ``lagger K``: open a peer holding refs cu-0..cu-K-1 and start a 1 ms
    ticker. ``stall T TARGET WINDOW``: wait until the peer has commit TARGET
    (and at least until T + WINDOW); the answer is the longest gap between
    ticks after monotonic time T in ms, the seconds from T to TARGET applied,
    and the sum of the refs' values.
    """
    import asyncpg

    rng = random.Random()
    store: astm.Store | None = None
    conns: list[Any] = []
    accounts: list[list[int]] = []
    refs: dict[int, astm.Ref[int]] = {}
    ticks: list[float] = []
    ticking = 0  # the running ticker's generation (0: none)

    async def astm_task(i: int) -> int:
        assert store is not None
        a, b = rng.sample(accounts[i], 2)
        await store.atomically(_transfer, refs[a], refs[b])
        return 0

    async def direct_task(i: int) -> int:
        conn = conns[i]
        a, b = rng.sample(accounts[i], 2)
        retries = 0
        while True:
            try:
                async with conn.transaction(isolation="serializable"):
                    # rows in id order: two transfers never wait on each other in a cycle (a deadlock costs
                    # deadlock_timeout, 1 s, before PostgreSQL breaks it)
                    for row, delta in sorted([(a, -1), (b, 1)]):
                        await conn.execute("UPDATE bench_scale SET balance = balance + $2 WHERE id = $1", row, delta)
                return retries
            except (asyncpg.SerializationError, asyncpg.DeadlockDetectedError):
                retries += 1

    async def ticker(generation: int) -> None:
        while ticking == generation:
            ticks.append(time.monotonic())
            await anyio.sleep(0.001)

    async def close() -> None:
        nonlocal store, ticking
        ticking = 0
        if store is not None:
            await store.aclose()
            store = None
        for c in conns:
            await c.close()
        conns.clear()
        refs.clear()

    generation = 0
    reply("ready")
    try:
        async with anyio.create_task_group() as tg:
            while cmd := await command():
                op, *args = cmd.split()
                if op == "open":
                    await close()
                    kind, mode, tasks, worker = args[0], args[1], int(args[2]), int(args[3])
                    accounts = _accounts(mode, worker, tasks)
                    if kind == "astm":
                        store = await astm.Store(dsn).open()
                        ids = sorted({a for acc in accounts for a in acc})
                        refs.update({a: store.ref(f"sk-{a}", 1_000_000) for a in ids})
                        await store.load(*refs.values())
                    else:
                        conns.extend([await asyncpg.connect(dsn) for _ in range(tasks)])
                    reply("ok")
                elif op == "run":
                    before = store.stats().retries if store is not None else 0
                    count, elapsed, retried = await _run_tasks(
                        astm_task if store is not None else direct_task, len(accounts), float(args[0])
                    )
                    retried += store.stats().retries - before if store is not None else 0
                    reply(count, elapsed, retried)
                elif op == "peer":
                    await close()
                    rss = _rss()
                    t0 = time.perf_counter()
                    store = await astm.Store(dsn).open()
                    seconds = time.perf_counter() - t0
                    grown = _rss() - rss
                    # then one cold read of a ref in the middle of the table (ref-k holds k)
                    k = int(args[0]) // 2 + 1
                    t0 = time.perf_counter()
                    one = store.ref(f"ref-{k}", 0)
                    await store.load(one)
                    read = time.perf_counter() - t0
                    assert one.get() == k, f"ref-{k} holds {one.get()}"
                    reply(seconds, grown, read)
                elif op == "lagger":
                    await close()
                    store = await astm.Store(dsn).open()
                    held = [store.ref(f"cu-{i}", 0) for i in range(int(args[0]))]
                    await store.load(*held)
                    refs.update(enumerate(held))
                    ticks.clear()
                    generation += 1
                    ticking = generation
                    tg.start_soon(ticker, generation)
                    reply("ok")
                elif op == "stall":
                    assert store is not None
                    mark, target, window = float(args[0]), int(args[1]), float(args[2])
                    await store.sync(target, timeout=600)
                    caught_up = time.monotonic() - mark
                    await anyio.sleep(max(0.0, mark + window - time.monotonic()))
                    after = [x for x in ticks if x >= mark]
                    gaps = [b - a for a, b in zip([mark, *after], after, strict=False)]
                    total = sum(r.get() for r in refs.values())
                    reply(max(gaps, default=0.0) * 1000, caught_up, total)
                elif op == "close":
                    await close()
                    reply("ok")
            await close()
    finally:
        await close()


async def _run_tasks(task: Callable[[int], Awaitable[int]], n: int, seconds: float) -> tuple[int, float, int]:
    """``n`` tasks call ``task(i)`` over and over for ``seconds``: (calls, elapsed seconds, retries they reported)."""
    counts = [0] * n
    retries = [0] * n
    t0 = time.perf_counter()
    stop = t0 + seconds

    async def run(i: int) -> None:
        while time.perf_counter() < stop:
            retries[i] += await task(i)
            counts[i] += 1

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(run, i)
    return sum(counts), time.perf_counter() - t0, sum(retries)


def _database_dsn(dsn: str, database: str) -> str:
    """``dsn`` with its database replaced by ``database``."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


async def _fill_database(dsn: str, database: str, refs: int) -> str:
    """A fresh database on ``dsn``'s server with the astm schema and ``refs`` small refs; its DSN."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}"')
        await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()
    target = _database_dsn(dsn, database)
    async with astm.Store(target):  # creates the schema
        pass
    conn = await asyncpg.connect(target)
    try:
        async with conn.transaction():
            # one commit at t=1 wrote every ref (its log row is not needed: a new peer never reads the log)
            await conn.execute(
                "INSERT INTO astm_refs (name, t, value, base_t) SELECT 'ref-' || g, 1, g::text, 1 "
                "FROM generate_series(1, $1) g",
                refs,
            )
            await conn.execute("UPDATE astm_meta SET value = '1' WHERE key = 't'")
        await conn.execute("VACUUM ANALYZE astm_refs")
    finally:
        await conn.close()
    return target


def _count(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k" if n >= 1000 else str(n)


def _open_name(big: int, small: int) -> str:
    return f"postgres scale: open a new peer, {_count(big)} refs vs {_count(small)}"


def _open_sizes(cfg: Config) -> tuple[int, list[int]]:
    """The baseline's ref count and the subjects'."""
    small: int = cfg.pick(2000, 20)
    big: list[int] = cfg.pick([200_000, 1_000_000], [2000])
    return small, big


async def _open_cases(dsn: str, cfg: Config) -> Cases:
    small, bigs = _open_sizes(cfg)
    wanted = [b for b in bigs if cfg.wants(_open_name(b, small)) or cfg.wants(_open_name(b, small) + ": memory")]
    if not wanted:
        return
    import asyncpg

    dsns: dict[int, str] = {}
    try:
        for n in sorted({small, *wanted}):
            dsns[n] = await _fill_database(dsn, f"astm_bench_open_{n}", n)
    except asyncpg.InsufficientPrivilegeError:
        print("postgres scale open cases left out: the role may not create databases", file=sys.stderr)
        return
    try:

        async def fresh_open(refs: int) -> Result:
            child = await Child.start("--pg-scale-worker", dsns[refs])
            try:
                seconds, grown, read = (await child.ask(f"peer {refs}")).split()
            finally:
                await child.close()
            return float(seconds) * 1000, {"rss MB": int(grown) / 1e6, "first read ms": float(read) * 1000}

        async def baseline() -> Result:
            return await fresh_open(small)

        for big in wanted:
            name = _open_name(big, small)

            async def subject(big: int = big) -> Result:
                return await fresh_open(big)

            yield Case(
                name,
                subject,
                baseline,
                "ms",
                "<= 3" + (f"; {_count(big)} under 1,000 ms" if big >= 1_000_000 else ""),
                lower_is_better=True,
                note=f"a fresh process times Store(dsn).open() (then one cold read of a ref: first read ms); "
                f"baseline: the same at {_count(small)} refs",
                formats={"rss MB": ".1f", "first read ms": ".2f"},
                also=(
                    Derived(
                        name + ": memory",
                        "rss MB",
                        "rss MB",
                        "MB",
                        "<= 3",
                        lower_is_better=True,
                        note="growth of the fresh process's resident memory over the open",
                    ),
                ),
            )
    finally:  # the filled databases (1M refs take about 100 MB) go once the cases are done
        conn = await asyncpg.connect(dsn)
        try:
            for n in dsns:
                await conn.execute(f'DROP DATABASE IF EXISTS "astm_bench_open_{n}"')
        finally:
            await conn.close()


def _transfer_name(mode: str, procs: int) -> str:
    what = "disjoint-key" if mode == "disjoint" else "hot-key"
    return f"postgres scale: {what} transfers, {procs} peer process{'es' * (procs > 1)}"


_PEERS_NAME = "postgres scale: disjoint-key transfers, astm 8 peer processes vs astm 1"
_STALL_NAME = "postgres scale: longest event-loop stall during a 100k-commit catch-up"


async def _open_workers(pool: list[Child], kind: str, mode: str, procs: int, tasks: int) -> None:
    used = pool[:procs]
    for w, c in enumerate(used):  # all open at once
        await c.send(f"open {kind} {mode} {tasks} {w}")
    for c in used:
        assert await c.line() == "ok"


async def _rate(pool: list[Child], kind: str, mode: str, procs: int, tasks: int, seconds: float) -> Result:
    """One round: ``procs`` workers open ``kind``, run ``seconds`` together and close; summed tx/s, retries/tx."""
    used = pool[:procs]
    await _open_workers(pool, kind, mode, procs, tasks)
    try:
        for c in used:  # all start together
            await c.send(f"run {seconds}")
        rate = 0.0
        done = retried = 0
        for c in used:
            count, elapsed, retries = (await c.line()).split()
            rate += int(count) / float(elapsed)
            done += int(count)
            retried += int(retries)
    finally:
        for c in used:
            await c.send("close")
        for c in used:
            await c.line()
    return rate, {"retries/tx": retried / max(1, done)}


async def _transfer_cases(pool: list[Child], cfg: Config, tasks: int, seconds: float) -> Cases:
    counts: list[int] = cfg.pick([1, 4, 8], [1, 2])
    note = (
        f"{tasks} task{'s' * (tasks > 1)} per process, each on {OWN_ACCOUNTS} accounts of its own; "
        "baseline: asyncpg SERIALIZABLE + retry loop"
    )
    for procs in counts:

        async def subject(procs: int = procs) -> Result:
            return await _rate(pool, "astm", "disjoint", procs, tasks, seconds)

        async def baseline(procs: int = procs) -> Result:
            return await _rate(pool, "direct", "disjoint", procs, tasks, seconds)

        yield Case(
            _transfer_name("disjoint", procs),
            subject,
            baseline,
            "tx/s",
            ">= 2 at 8" if procs == 8 else "",
            note=note,
            formats={"retries/tx": ".3f"},
        )
    top = counts[-1]

    async def many() -> Result:
        return await _rate(pool, "astm", "disjoint", top, tasks, seconds)

    async def one() -> Result:
        return await _rate(pool, "astm", "disjoint", 1, tasks, seconds)

    yield Case(
        _PEERS_NAME,
        many,
        one,
        "tx/s",
        ">= 1",
        note=f"{tasks} task{'s' * (tasks > 1)} per process; baseline: astm with 1 peer process (the others closed)"
        + ("" if top == 8 else f"; quick: {top} processes"),
        formats={"retries/tx": ".3f"},
    )

    async def hot() -> Result:
        return await _rate(pool, "astm", "hot", top, tasks, seconds)

    async def hot_direct() -> Result:
        return await _rate(pool, "direct", "hot", top, tasks, seconds)

    yield Case(
        _transfer_name("hot", top),
        hot,
        hot_direct,
        "tx/s",
        ">= 5",
        note=f"{tasks} task{'s' * (tasks > 1)} per process, all among {HOT_ACCOUNTS} shared accounts; "
        "baseline: asyncpg SERIALIZABLE + retry loop, rows updated in id order",
        formats={"retries/tx": ".2f"},
    )


async def _commit_many(store: astm.Store, refs: list[astm.Ref[int]], commits: int, tasks: int) -> int:
    """``commits`` small commits (one ref each, spread over ``refs``) from ``tasks`` tasks; the last ``t``."""
    last = 0
    per = [commits // tasks + (1 if i < commits % tasks else 0) for i in range(tasks)]

    async def run(i: int) -> None:
        nonlocal last
        for k in range(per[i]):
            report = await store.transact(_bump, refs[(i + k * tasks) % len(refs)])
            last = max(last, report.t)

    async with anyio.create_task_group() as tg:
        for i in range(tasks):
            tg.start_soon(run, i)
    return last


async def _stall_case(dsn: str, cfg: Config) -> Cases:
    commits: int = cfg.pick(100_000, 300)
    held: int = cfg.pick(CATCH_UP_REFS, 20)
    lagger = await Child.start("--pg-scale-worker", dsn)
    try:
        async with astm.Store(dsn) as store:
            refs = [store.ref(f"cu-{i}", 0) for i in range(held)]
            await store.load(*refs)
            total = sum(r.get() for r in refs)
            window = 0.5
            calls = 0

            async def one_round(n: int) -> Result:
                nonlocal total, window
                assert await lagger.ask(f"lagger {held}") == "ok"
                lagger.proc.send_signal(signal.SIGSTOP)
                try:
                    t0 = time.perf_counter()
                    target = await _commit_many(store, refs, n, 64) if n else store.t
                    made = time.perf_counter() - t0
                    if not n:
                        await anyio.sleep(0.1)
                finally:
                    mark = time.monotonic()
                    lagger.proc.send_signal(signal.SIGCONT)
                gap_ms, caught_up, seen = (await lagger.ask(f"stall {mark} {target} {0.0 if n else window}")).split()
                total += n
                assert int(seen) == total, f"the caught-up peer holds {seen}, expected {total}"
                assert await lagger.ask("close") == "ok"
                figures = {"catch-up s": float(caught_up)}
                if n:
                    window = float(caught_up)
                    figures["commits/s made"] = n / made
                return float(gap_ms), figures

            async def subject() -> Result:
                nonlocal calls
                calls += 1
                # the warm-up is a tenth as long (it only warms caches)
                return await one_round(commits if calls > 1 else max(1, commits // 10))

            async def baseline() -> Result:
                return await one_round(0)

            yield Case(
                _STALL_NAME if commits == 100_000 else _STALL_NAME.replace("100k", str(commits)),
                subject,
                baseline,
                "ms",
                "astm < 50 ms",
                lower_is_better=True,
                note=f"a 1 ms ticker on a peer holding the {held} refs written, stopped while 64 tasks of another "
                "peer commit; baseline: the same ticker over as long with nothing to catch up",
                formats={"catch-up s": ".2f", "commits/s made": ",.0f"},
                max_rounds=3,
            )
    finally:
        await lagger.close()


def _names(cfg: Config) -> list[str]:
    small, bigs = _open_sizes(cfg)
    top = cfg.pick(8, 2)
    names = [_open_name(b, small) + s for b in bigs for s in ("", ": memory")]
    names += [_transfer_name("disjoint", n) for n in cfg.pick([1, 4, 8], [1, 2])]
    names += [_PEERS_NAME, _transfer_name("hot", top), _STALL_NAME, _STALL_NAME.replace("100k", "300")]
    return names


async def pg_scale(cfg: Config) -> Cases:
    """The scaling cases, on ``ASTM_BENCH_POSTGRES_DSN`` or a throwaway cluster (none if neither can be had)."""
    from ..testing import Cluster, available

    names = _names(cfg)
    if not any(cfg.wants(n) for n in names):
        return
    dsn = os.environ.get("ASTM_BENCH_POSTGRES_DSN")
    cluster = None
    if dsn is None:
        if not available():
            print(
                "postgres scale cases left out: no ASTM_BENCH_POSTGRES_DSN and no PostgreSQL programs", file=sys.stderr
            )
            return
        cluster = Cluster()
        dsn = cluster.dsn
    try:
        import asyncpg

        tasks: int = cfg.pick(4, 1)
        accounts = HOT_ACCOUNTS + PROCS * tasks * OWN_ACCOUNTS
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("DROP TABLE IF EXISTS bench_scale")
            await conn.execute("CREATE TABLE bench_scale (id int PRIMARY KEY, balance bigint NOT NULL)")
            await conn.execute("INSERT INTO bench_scale SELECT g, 1000000 FROM generate_series(0, $1) g", accounts - 1)
        finally:
            await conn.close()
        async with astm.Store(dsn):  # creates the schema
            pass
        async with aclosing(_open_cases(dsn, cfg)) as gen:
            async for case in gen:
                yield case
        transfers = [n for n in names if n.startswith("postgres scale: ") and "transfers" in n]
        if any(cfg.wants(n) for n in transfers):
            seconds: float = cfg.pick(max(1.0, 3 * cfg.seconds), cfg.seconds)
            pool = await start_all([("--pg-scale-worker", dsn)] * cfg.pick(PROCS, 2))
            try:
                async with aclosing(_transfer_cases(pool, cfg, tasks, seconds)) as gen:
                    async for case in gen:
                        yield case
            finally:
                for c in pool:
                    await c.close()
        if cfg.wants(names[-1]) or cfg.wants(names[-2]):
            async with aclosing(_stall_case(dsn, cfg)) as gen:
                async for case in gen:
                    yield case
    finally:
        if cluster is not None:
            cluster.destroy()
