"""Benchmarks: ``python -m astm.bench`` prints each case against a baseline run in the same process.

Figures are ratios to the baseline measured in the same run, because the
machines these run on are shared and noisy. ``--quick`` runs every case small
(a smoke test, used by the test suite); ``--json`` prints the rows as JSON.
The PostgreSQL cases use ``ASTM_BENCH_POSTGRES_DSN`` or a throwaway cluster
when PostgreSQL's programs are installed, and are left out otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import anyio
import anyio.lowlevel
from pyrsistent import pmap

import astm

__all__ = ["Row", "main", "run_all"]


@dataclass
class Row:
    """One line of the table: a case, astm's figure, the baseline's, and their ratio."""

    case: str
    astm: float
    baseline: float
    unit: str
    ratio: float
    target: str
    extra: str = ""


def _sub(v: int, n: int) -> int:
    return v - n


def _add(v: int, n: int) -> int:
    return v + n


async def _uncontended(n: int) -> Row:
    """1. One task, transfers between 2 of 1000 refs: astm vs dicts under one asyncio.Lock."""
    store = astm.Store()
    refs = [store.ref(f"acct-{i}", 1_000_000) for i in range(1000)]
    rng = random.Random(1)
    pairs = [rng.sample(range(1000), 2) for _ in range(1024)]

    @astm.transactional
    async def transfer(a: astm.Ref[int], b: astm.Ref[int], amount: int) -> None:
        a.alter(_sub, amount)
        b.alter(_add, amount)

    t0 = time.perf_counter()
    for i in range(n):
        x, y = pairs[i & 1023]
        await transfer(refs[x], refs[y], 1)
    astm_rate = n / (time.perf_counter() - t0)

    balances = {i: 1_000_000 for i in range(1000)}
    lock = asyncio.Lock()

    async def lock_transfer(a: int, b: int, amount: int) -> None:
        async with lock:
            balances[a] -= amount
            balances[b] += amount

    t0 = time.perf_counter()
    for i in range(n):
        x, y = pairs[i & 1023]
        await lock_transfer(x, y, 1)
    lock_rate = n / (time.perf_counter() - t0)
    assert sum(r.get() for r in refs) == sum(balances.values()) == 1000 * 1_000_000
    return Row("uncontended transfer, 1 task", astm_rate, lock_rate, "tx/s", astm_rate / lock_rate, ">= 0.40")


async def _concurrent(tasks: int, seconds: float) -> Row:
    """2. 1000 tasks, 2 random refs of 10,000, sleep(1 ms) in the body: astm vs one global lock."""
    store = astm.Store()
    nrefs = 10_000
    refs = [store.ref(f"acct-{i}", 1000) for i in range(nrefs)]

    async def body(a: astm.Ref[int], b: astm.Ref[int]) -> None:
        a.alter(_sub, 1)
        await anyio.sleep(0.001)
        b.alter(_add, 1)

    async def run(worker: Callable[[random.Random], Awaitable[None]]) -> float:
        count = 0
        deadline = time.perf_counter() + seconds

        async def loop(seed: int) -> None:
            nonlocal count
            rng = random.Random(seed)
            while time.perf_counter() < deadline:
                await worker(rng)
                count += 1

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(tasks):
                tg.start_soon(loop, i)
        return count / (time.perf_counter() - t0)

    async def astm_worker(rng: random.Random) -> None:
        x, y = rng.sample(range(nrefs), 2)
        await store.atomically(body, refs[x], refs[y])

    balances = [1000] * nrefs
    lock = asyncio.Lock()

    async def lock_worker(rng: random.Random) -> None:
        x, y = rng.sample(range(nrefs), 2)
        async with lock:
            balances[x] -= 1
            await anyio.sleep(0.001)
            balances[y] += 1

    astm_rate = await run(astm_worker)
    lock_rate = await run(lock_worker)
    assert sum(r.get() for r in refs) == nrefs * 1000, "invariant broken"
    stats = store.stats()
    return Row(
        f"{tasks} tasks, 2 of {nrefs} refs, 1 ms await in body",
        astm_rate,
        lock_rate,
        "tx/s",
        astm_rate / lock_rate,
        ">= 50",
        f"attempts/commit {stats.attempts / max(stats.commits, 1):.3f}",
    )


async def _hot_counter(tasks: int, per_task: int) -> Row:
    """3. Hot counter, 100 tasks with an await in the body: alter vs commute."""

    async def run(use_commute: bool) -> tuple[float, float]:
        store = astm.Store()
        hits = store.ref("hits", 0)

        async def body() -> None:
            if use_commute:
                hits.commute(_add, 1)
            else:
                hits.alter(_add, 1)
            await anyio.lowlevel.checkpoint()

        async def loop() -> None:
            for _ in range(per_task):
                await store.atomically(body)

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(loop)
        elapsed = time.perf_counter() - t0
        assert hits.get() == tasks * per_task
        stats = store.stats()
        return stats.commits / elapsed, stats.attempts / stats.commits

    alter_rate, alter_apc = await run(False)
    commute_rate, commute_apc = await run(True)
    return Row(
        f"hot counter, {tasks} tasks: commute vs alter",
        commute_rate,
        alter_rate,
        "tx/s",
        commute_rate / alter_rate,
        "commute 1.0 attempts/commit",
        f"attempts/commit: commute {commute_apc:.3f}, alter {alter_apc:.3f}",
    )


async def _flash_crowd(tasks: int) -> Row:
    """4. Flash crowd: thousands of tasks reserve from one seats map, an await in the body."""
    store = astm.Store()
    seats = store.ref("seats", pmap({i: -1 for i in range(tasks)}))
    free = store.ref("free", tuple(range(tasks)))

    async def reserve(customer: int) -> None:
        async def body() -> None:
            available = free.get()
            await anyio.lowlevel.checkpoint()
            seat = available[0]
            free.set(available[1:])
            seats.alter(lambda m: m.set(seat, customer))

        await store.atomically(body)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for c in range(tasks):
            tg.start_soon(reserve, c)
    astm_rate = tasks / (time.perf_counter() - t0)
    assert sorted(seats.get().values()) == list(range(tasks)), "a seat was sold twice"
    stats = store.stats()

    lock = asyncio.Lock()
    lseats = pmap({i: -1 for i in range(tasks)})
    lfree = tuple(range(tasks))

    async def lock_reserve(customer: int) -> None:
        nonlocal lseats, lfree
        async with lock:
            available = lfree
            await anyio.lowlevel.checkpoint()
            lfree = available[1:]
            lseats = lseats.set(available[0], customer)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for c in range(tasks):
            tg.start_soon(lock_reserve, c)
    lock_rate = tasks / (time.perf_counter() - t0)
    return Row(
        f"flash crowd, {tasks} tasks on one seats map",
        astm_rate,
        lock_rate,
        "tx/s",
        astm_rate / lock_rate,
        "<= 3 attempts/commit",
        f"attempts/commit {stats.attempts / stats.commits:.3f}",
    )


async def _retry_wakeup(rounds: int) -> Row:
    """Wake-up latency of an astm.retry() waiter after the commit it waits for."""
    store = astm.Store()
    box = store.ref("box", 0)
    latencies: list[float] = []
    committed_at = 0.0

    async def consumer() -> None:
        for i in range(1, rounds + 1):

            def take(i: int = i) -> None:
                astm.check(box.get() >= i)

            await store.atomically(take)
            latencies.append(time.perf_counter() - committed_at)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        for _ in range(rounds):
            await anyio.sleep(0.0005)
            committed_at = time.perf_counter()
            await store.atomically(lambda: box.alter(_add, 1))
    # baseline: the same hand-off through an anyio.Event
    base: list[float] = []
    for _ in range(rounds):
        ev = anyio.Event()
        set_at = [0.0]

        async def waiter(ev: anyio.Event = ev, set_at: list[float] = set_at) -> None:
            await ev.wait()
            base.append(time.perf_counter() - set_at[0])

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.sleep(0.0005)
            set_at[0] = time.perf_counter()
            ev.set()
    med = statistics.median(latencies) * 1e6
    p99 = sorted(latencies)[int(len(latencies) * 0.99) - 1] * 1e6
    bmed = statistics.median(base) * 1e6
    return Row(
        "retry() wake-up after commit (median)",
        med,
        bmed,
        "µs",
        med / bmed,
        "no polling",
        f"p99 {p99:.0f} µs; baseline is an anyio.Event hand-off",
    )


async def _db_reads(n: int) -> Row:
    """store.db() + 10 reads vs a transaction doing the same 10 reads."""
    store = astm.Store()
    refs = [store.ref(f"r{i}", i) for i in range(10)]

    def read_all() -> int:
        return sum(r.get() for r in refs)

    t0 = time.perf_counter()
    for _ in range(n):
        db = store.db()
        s = 0
        for r in refs:
            s += db[r]
    db_rate = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(n):
        await store.atomically(read_all)
    tx_rate = n / (time.perf_counter() - t0)
    return Row("db() + 10 reads vs read-only tx", db_rate, tx_rate, "ops/s", db_rate / tx_rate, "")


async def _agents(n: int) -> list[Row]:
    """Agent actions per second through one agent and a family of 10,000, vs a plain queue + worker task."""
    store = astm.Store()
    one = store.agent("one", 0)
    t0 = time.perf_counter()
    for _ in range(n):
        one.send(_add, 1)
    await one.wait()
    one_rate = n / (time.perf_counter() - t0)
    assert one.state == n

    family = store.agents("many", 0)
    keys = 10_000
    t0 = time.perf_counter()
    for i in range(n):
        family[i % keys].send(_add, 1)
    for k in range(min(keys, n)):
        await family[k].wait()
    family_rate = n / (time.perf_counter() - t0)

    # baseline: a memory object stream drained by one worker task
    send, receive = anyio.create_memory_object_stream[int](n)
    total = 0

    async def worker() -> None:
        nonlocal total
        async with receive:
            async for x in receive:
                total = _add(total, x)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker)
        async with send:
            for _ in range(n):
                send.send_nowait(1)
    base_rate = n / (time.perf_counter() - t0)
    return [
        Row("agent actions, one agent", one_rate, base_rate, "actions/s", one_rate / base_rate, "",
            "baseline: a memory stream drained by one task"),
        Row("agent actions, family of 10,000", family_rate, base_rate, "actions/s", family_rate / base_rate, ""),
    ]  # fmt: skip


async def _outbox(n: int) -> Row:
    """Outbox deliveries per second (a no-op handler), vs calling the handler directly."""
    store = astm.Store()
    delivered = 0

    @store.effect("noop")
    async def noop(payload: int, *, key: tuple[int, int]) -> None:
        nonlocal delivered
        delivered += 1

    def body(lo: int) -> None:
        for i in range(lo, lo + 100):
            noop.enqueue(i)

    t0 = time.perf_counter()
    for lo in range(0, n, 100):
        await store.atomically(body, lo)
    await store.outbox.drain()
    rate = n / (time.perf_counter() - t0)
    assert delivered == n
    t0 = time.perf_counter()
    for i in range(n):
        await noop.handler(i, key=(0, i))
    direct = n / (time.perf_counter() - t0)
    return Row("outbox deliveries", rate, direct, "entries/s", rate / direct, "",
               "100 entries per transaction; baseline calls the handler directly")  # fmt: skip


async def _send_overhead(n: int) -> Row:
    """What one agent send plus one outbox enqueue add to a small transaction."""
    store = astm.Store()
    r = store.ref("r", 0)
    a = store.agent("a", 0)

    @store.effect("e")
    async def e(payload: int, *, key: tuple[int, int]) -> None:
        pass

    def plain() -> None:
        r.alter(_add, 1)

    def with_effects() -> None:
        r.alter(_add, 1)
        a.send(_add, 1)
        e.enqueue(1)

    t0 = time.perf_counter()
    for _ in range(n):
        await store.atomically(plain)
    plain_rate = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(n):
        await store.atomically(with_effects)
    await a.wait()
    await store.outbox.drain()
    eff_rate = n / (time.perf_counter() - t0)
    return Row("tx + send + enqueue vs tx alone", eff_rate, plain_rate, "tx/s", eff_rate / plain_rate, "",
               "includes running the action and delivering the entry")  # fmt: skip


async def _sqlite(n: int, tasks: int) -> list[Row]:
    """The SQLite store vs sqlite3 used directly: one writer, and many tasks sharing fsyncs."""
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(f"{tmp}/direct.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE acct (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)")
        conn.executemany("INSERT INTO acct VALUES (?, 1000000)", [(i,) for i in range(100)])
        rng = random.Random(2)
        t0 = time.perf_counter()
        for _ in range(n):
            a, b = rng.sample(range(100), 2)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE acct SET balance = balance - 1 WHERE id = ?", (a,))
            conn.execute("UPDATE acct SET balance = balance + 1 WHERE id = ?", (b,))
            conn.execute("COMMIT")
        direct = n / (time.perf_counter() - t0)
        conn.close()

        store = astm.Store(f"sqlite:///{tmp}/astm.db")
        async with store:
            refs = [store.ref(f"acct-{i}", 1_000_000) for i in range(100)]

            def transfer(a: astm.Ref[int], b: astm.Ref[int]) -> None:
                a.alter(_sub, 1)
                b.alter(_add, 1)

            t0 = time.perf_counter()
            for _ in range(n):
                x, y = rng.sample(refs, 2)
                await store.atomically(transfer, x, y)
            one = n / (time.perf_counter() - t0)

            total = n * 5

            async def worker(seed: int) -> None:
                wrng = random.Random(seed)
                for _ in range(total // tasks):
                    x, y = wrng.sample(refs, 2)
                    await store.atomically(transfer, x, y)

            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(tasks):
                    tg.start_soon(worker, i)
            many = (total // tasks * tasks) / (time.perf_counter() - t0)
            assert sum(r.get() for r in refs) == 100 * 1_000_000
    return [
        Row("sqlite store, 1 task, durable commits", one, direct, "tx/s", one / direct, ">= 0.8",
            "baseline: sqlite3 BEGIN IMMEDIATE..COMMIT, synchronous=FULL"),
        Row(f"sqlite store, {tasks} tasks (group commit)", many, direct, "tx/s", many / direct, ">= 10",
            "baseline: the same direct single writer"),
    ]  # fmt: skip


async def _pg_worker(kind: str, dsn: str, tasks: int, seconds: float) -> int:
    """One process of the PostgreSQL throughput case; returns its committed transfers."""
    import asyncpg

    rng = random.Random()
    count = 0
    stop = time.perf_counter() + seconds
    if kind == "astm":
        async with astm.Store(dsn) as store:
            refs = [store.ref(f"acct-{i}", 1_000_000) for i in range(100)]

            def transfer(a: astm.Ref[int], b: astm.Ref[int]) -> None:
                a.alter(_sub, 1)
                b.alter(_add, 1)

            async def run() -> None:
                nonlocal count
                while time.perf_counter() < stop:
                    x, y = rng.sample(refs, 2)
                    await store.atomically(transfer, x, y)
                    count += 1

            async with anyio.create_task_group() as tg:
                for _ in range(tasks):
                    tg.start_soon(run)
        return count

    async def direct() -> None:
        nonlocal count
        conn = await asyncpg.connect(dsn)
        try:
            while time.perf_counter() < stop:
                a, b = rng.sample(range(100), 2)
                while True:
                    try:
                        async with conn.transaction(isolation="serializable"):
                            await conn.execute("UPDATE bench_acct SET balance = balance - 1 WHERE id = $1", a)
                            await conn.execute("UPDATE bench_acct SET balance = balance + 1 WHERE id = $1", b)
                        break
                    except (asyncpg.SerializationError, asyncpg.DeadlockDetectedError):
                        continue
                count += 1
        finally:
            await conn.close()

    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(direct)
    return count


async def _postgres(seconds: float, dsn: str | None = None) -> list[Row]:
    """The PostgreSQL store vs asyncpg at SERIALIZABLE with a retry loop: 1, 8, 32 tasks over 4 processes."""
    import subprocess
    import sys

    import asyncpg

    from .testing import Cluster, available

    cluster = None
    if dsn is None:
        if not available():
            return []
        cluster = Cluster()
        dsn = cluster.dsn
    try:
        conn = await asyncpg.connect(dsn)
        await conn.execute("DROP TABLE IF EXISTS bench_acct")
        await conn.execute("CREATE TABLE bench_acct (id int PRIMARY KEY, balance bigint NOT NULL)")
        await conn.execute("INSERT INTO bench_acct SELECT g, 1000000 FROM generate_series(0, 99) g")
        await conn.close()
        async with astm.Store(dsn):
            pass  # create the schema once

        async def measure(kind: str, tasks: int) -> float:
            procs = min(4, tasks)
            per = [tasks // procs + (1 if i < tasks % procs else 0) for i in range(procs)]
            argv = [sys.executable, "-m", "astm.bench", "--pg-worker", kind, dsn, str(seconds)]
            children = [await anyio.open_process([*argv, str(n)], stdout=subprocess.PIPE) for n in per]
            total = 0
            for c in children:
                assert c.stdout is not None
                out = b""
                async for chunk in c.stdout:
                    out += chunk
                await c.wait()
                total += int(out.split()[-1])
            return total / seconds

        rows = []
        for tasks in (1, 8, 32):
            a = await measure("astm", tasks)
            d = await measure("direct", tasks)
            name = f"postgres store, {tasks} tasks over {min(4, tasks)} processes"
            target = ">= 1 at 32" if tasks == 32 else ""
            rows.append(Row(name, a, d, "tx/s", a / d, target, "baseline: asyncpg SERIALIZABLE + retry loop"))
        rows.append(await _sync_lag(dsn))
        return rows
    finally:
        if cluster is not None:
            cluster.destroy()


async def _sync_lag(dsn: str, rounds: int = 200) -> Row:
    """How long after one process commits another has it through sync(t); baseline: the pipe itself."""
    import subprocess
    import sys

    code = (
        "import sys, time, anyio, astm\n"
        "async def main():\n"
        "    async with astm.Store(sys.argv[1]) as s:\n"
        "        r = s.ref('lag', 0)\n"
        "        for i in range(int(sys.argv[2])):\n"
        "            rep = await s.transact(lambda: r.alter(lambda v: v + 1))\n"
        "            print(rep.t, time.time(), flush=True)\n"
        "            await anyio.sleep(0.005)\n"
        "anyio.run(main)\n"
    )
    lags: list[float] = []
    pipe: list[float] = []
    async with astm.Store(dsn) as store:
        proc = await anyio.open_process([sys.executable, "-c", code, dsn, str(rounds)], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        buf = b""
        async for chunk in proc.stdout:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                t_text, sent = line.split()
                got = time.time()
                pipe.append(got - float(sent))
                await store.sync(int(t_text), timeout=10)
                lags.append(time.time() - float(sent))
        await proc.wait()
    med = statistics.median(lags) * 1000
    p99 = sorted(lags)[max(0, int(len(lags) * 0.99) - 1)] * 1000
    base = statistics.median(pipe) * 1000
    return Row("sync(t) lag between two processes (median)", med, base, "ms", med / base, "",
               f"p99 {p99:.2f} ms; baseline: the pipe that carried t")  # fmt: skip


def run_all(quick: bool = False) -> list[Row]:
    """Run every case and return the rows."""

    async def main() -> list[Row]:
        rows = [await _uncontended(2_000 if quick else 100_000)]
        rows.append(await _concurrent(100 if quick else 1000, 0.2 if quick else 2.0))
        rows.append(await _hot_counter(100, 2 if quick else 20))
        rows.append(await _flash_crowd(300 if quick else 5000))
        rows.append(await _retry_wakeup(20 if quick else 300))
        rows.append(await _db_reads(1_000 if quick else 50_000))
        rows.extend(await _agents(2_000 if quick else 100_000))
        rows.append(await _outbox(1_000 if quick else 50_000))
        rows.append(await _send_overhead(1_000 if quick else 20_000))
        rows.extend(await _sqlite(100 if quick else 2_000, 100))
        rows.extend(await _postgres(0.5 if quick else 3.0, os.environ.get("ASTM_BENCH_POSTGRES_DSN")))
        return rows

    return astm.run(main)


def plot(rows: list[Row], path: str) -> None:
    """Draw each case's ratio to its same-run baseline (log scale) as a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    labels = [r.case for r in rows][::-1]
    ratios = [r.ratio for r in rows][::-1]
    colors = ["#4a7fc1" if r.unit != "µs" else "#c1844a" for r in rows][::-1]
    ax.barh(labels, ratios, color=colors)
    ax.axvline(1.0, color="#444", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("astm / baseline measured in the same run (log scale; for µs rows lower is better)")
    for y, v in enumerate(ratios):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    ax.set_title("python -m astm.bench")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--pg-worker"]:  # one process of the PostgreSQL case
        kind, dsn, seconds, tasks = argv[1], argv[2], float(argv[3]), int(argv[4])
        print(astm.run(_pg_worker, kind, dsn, tasks, seconds))
        return 0
    parser = argparse.ArgumentParser(prog="python -m astm.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small runs (a smoke test)")
    parser.add_argument("--json", action="store_true", help="print rows as JSON")
    parser.add_argument(
        "--plot", nargs="?", const="docs/performance.png", metavar="PNG", help="also draw the ratios as a chart"
    )
    args = parser.parse_args(argv)
    rows = run_all(args.quick)
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    header = ("case", "astm", "baseline", "unit", "ratio", "target", "notes")
    table = [header] + [
        (r.case, _fmt(r.astm), _fmt(r.baseline), r.unit, f"{r.ratio:.2f}", r.target, r.extra) for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
