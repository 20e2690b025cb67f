"""Cases of the transaction engine on the in-memory store, each against the plain-asyncio way of doing the same.

Uncontended transfers against dicts under one ``asyncio.Lock``; 1000 tasks
with a 1 ms await in the body against one global lock (with the share of
wall time the garbage collector takes); a hot counter with ``commute`` against
``alter``; a flash crowd on one seats map; ``retry()`` wake-up against an
``anyio.Event``; ``store.db()`` reads against a read-only transaction.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

import anyio
import anyio.lowlevel
from pyrsistent import pmap

import astm

from ._harness import Case, Cases, Config, GcTimer, Result, Sized, Timed

__all__ = ["Uncontended", "core"]


def _sub(v: int, n: int) -> int:
    return v - n


def _add(v: int, n: int) -> int:
    return v + n


@dataclass
class Uncontended:
    """One task, transfers between 2 of 1000 refs: astm, and dicts under one ``asyncio.Lock``.

    Also run alone in a child process by the compiled-vs-pure engine case.
    """

    store: astm.Store
    refs: list[astm.Ref[int]]
    balances: dict[int, int]
    subject: Sized
    baseline: Sized

    @classmethod
    def make(cls, seconds: float) -> Uncontended:
        """Create the refs, the dicts and the two sized rounds."""
        store = astm.Store()
        refs = [store.ref(f"acct-{i}", 1_000_000) for i in range(1000)]
        rng = random.Random(1)
        pairs = [rng.sample(range(1000), 2) for _ in range(1024)]

        @astm.transactional
        async def transfer(a: astm.Ref[int], b: astm.Ref[int], amount: int) -> None:
            a.alter(_sub, amount)
            b.alter(_add, amount)

        async def astm_round(n: int) -> float:
            t0 = time.perf_counter()
            for i in range(n):
                x, y = pairs[i & 1023]
                await transfer(refs[x], refs[y], 1)
            return time.perf_counter() - t0

        balances = {i: 1_000_000 for i in range(1000)}
        lock = asyncio.Lock()

        async def lock_transfer(a: int, b: int, amount: int) -> None:
            async with lock:
                balances[a] -= amount
                balances[b] += amount

        async def lock_round(n: int) -> float:
            t0 = time.perf_counter()
            for i in range(n):
                x, y = pairs[i & 1023]
                await lock_transfer(x, y, 1)
            return time.perf_counter() - t0

        return cls(
            store,
            refs,
            balances,
            Sized(astm_round, seconds, start=1000),
            Sized(lock_round, seconds, start=1000),
        )

    def check(self) -> None:
        """Money is neither created nor lost on either side."""
        assert sum(r.get() for r in self.refs) == sum(self.balances.values()) == 1000 * 1_000_000


async def _uncontended(cfg: Config) -> Cases:
    u = Uncontended.make(cfg.seconds)
    yield Case("uncontended transfer, 1 task", u.subject, u.baseline, "tx/s", ">= 0.40",
               note="baseline: dicts under one asyncio.Lock")  # fmt: skip
    u.check()


async def _concurrent(cfg: Config) -> Cases:
    """1000 tasks, 2 random refs of 10,000, sleep(1 ms) in the body: astm vs one global lock; gc's share of time."""
    tasks: int = cfg.pick(1000, 100)
    seconds: float = cfg.pick(max(1.0, 3 * cfg.seconds), max(0.03, cfg.seconds))
    nrefs = 10_000
    store = astm.Store()
    refs = [store.ref(f"acct-{i}", 1000) for i in range(nrefs)]

    async def body(a: astm.Ref[int], b: astm.Ref[int]) -> None:
        a.alter(_sub, 1)
        await anyio.sleep(0.001)
        b.alter(_add, 1)

    async def run(worker: Callable[[random.Random], Awaitable[None]]) -> tuple[float, float]:
        """Transfers per second over ``seconds`` with ``tasks`` tasks, and the share of that time spent in gc."""
        count = 0
        deadline = time.perf_counter() + seconds

        async def loop(seed: int) -> None:
            nonlocal count
            rng = random.Random(seed)
            while time.perf_counter() < deadline:
                await worker(rng)
                count += 1

        with GcTimer() as gct:
            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(tasks):
                    tg.start_soon(loop, i)
            elapsed = time.perf_counter() - t0
        return count / elapsed, gct.seconds / elapsed

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

    async def subject() -> Result:
        before = store.stats()
        rate, gc_share = await run(astm_worker)
        after = store.stats()
        apc = (after.attempts - before.attempts) / max(after.commits - before.commits, 1)
        return rate, {"gc share": gc_share, "attempts/commit": apc}

    async def baseline() -> Result:
        rate, gc_share = await run(lock_worker)
        return rate, {"gc share": gc_share}

    yield Case(
        f"{tasks} tasks, 2 of {nrefs:,} refs, 1 ms await in body",
        subject,
        baseline,
        "tx/s",
        ">= 50",
        note="baseline: one global asyncio.Lock",
        formats={"gc share": ".1%", "attempts/commit": ".3f"},
    )
    assert sum(r.get() for r in refs) == nrefs * 1000, "invariant broken"
    assert sum(balances) == nrefs * 1000


async def _hot_counter(cfg: Config) -> Cases:
    """Hot counter, 100 tasks with an await in the body: commute (no conflicts) vs alter."""
    tasks = 100

    def sized(use_commute: bool) -> Sized:
        store = astm.Store()
        hits = store.ref("hits", 0)

        async def body() -> None:
            if use_commute:
                hits.commute(_add, 1)
            else:
                hits.alter(_add, 1)
            await anyio.lowlevel.checkpoint()

        async def one_round(per_task: int) -> Timed:
            async def loop() -> None:
                for _ in range(per_task):
                    await store.atomically(body)

            before = store.stats()
            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(tasks):
                    tg.start_soon(loop)
            elapsed = time.perf_counter() - t0
            after = store.stats()
            commits = after.commits - before.commits
            assert commits == tasks * per_task
            return Timed(commits, elapsed, {"attempts/commit": (after.attempts - before.attempts) / commits})

        return Sized(one_round, cfg.seconds, start=2)

    commute = sized(True)
    alter = sized(False)
    yield Case(
        f"hot counter, {tasks} tasks: commute vs alter",
        commute,
        alter,
        "tx/s",
        "commute 1.0 attempts/commit",
        formats={"attempts/commit": ".3f"},
    )


async def _flash_crowd(cfg: Config) -> Cases:
    """Flash crowd: thousands of tasks reserve from one seats map, an await in the body, vs one asyncio.Lock.

    Every round sells a fresh map (made before the clock starts). The
    warm-up (the first call of each side) is a crowd of 300, and the case
    stops after 3 rounds once it has taken a minute: a round of astm's side
    can take that long (the whole seats map is checked at every attempt).
    """
    tasks: int = cfg.pick(5000, 300)
    store = astm.Store()
    made = 0
    lock_calls = 0

    async def subject() -> Result:
        nonlocal made
        made += 1
        size = min(tasks, 300) if made == 1 else tasks
        seats = store.ref(f"seats-{made}", pmap({i: -1 for i in range(size)}))
        free = store.ref(f"free-{made}", tuple(range(size)))

        async def reserve(customer: int) -> None:
            async def body() -> None:
                available = free.get()
                await anyio.lowlevel.checkpoint()
                seat = available[0]
                free.set(available[1:])
                seats.alter(lambda m: m.set(seat, customer))

            await store.atomically(body)

        before = store.stats()
        with GcTimer() as gct:
            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for c in range(size):
                    tg.start_soon(reserve, c)
            elapsed = time.perf_counter() - t0
        after = store.stats()
        assert sorted(seats.get().values()) == list(range(size)), "a seat was sold twice"
        apc = (after.attempts - before.attempts) / (after.commits - before.commits)
        return size / elapsed, {"attempts/commit": apc, "gc share": gct.seconds / elapsed}

    async def baseline() -> Result:
        nonlocal lock_calls
        lock_calls += 1
        size = min(tasks, 300) if lock_calls == 1 else tasks
        lock = asyncio.Lock()
        lseats = pmap({i: -1 for i in range(size)})
        lfree = tuple(range(size))

        async def lock_reserve(customer: int) -> None:
            nonlocal lseats, lfree
            async with lock:
                available = lfree
                await anyio.lowlevel.checkpoint()
                lfree = available[1:]
                lseats = lseats.set(available[0], customer)

        with GcTimer() as gct:
            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for c in range(size):
                    tg.start_soon(lock_reserve, c)
            elapsed = time.perf_counter() - t0
        assert sorted(lseats.values()) == list(range(size))
        return size / elapsed, {"gc share": gct.seconds / elapsed}

    yield Case(
        f"flash crowd, {tasks} tasks on one seats map",
        subject,
        baseline,
        "tx/s",
        "<= 3 attempts/commit",
        note="baseline: one asyncio.Lock",
        formats={"attempts/commit": ".3f", "gc share": ".1%"},
        budget=60.0,
    )


def _p99(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.99) - 1)]


async def _retry_wakeup(cfg: Config) -> Cases:
    """Wake-up latency of an astm.retry() waiter after the commit it waits for, vs an anyio.Event hand-off."""
    handoffs: int = cfg.pick(300, 20)
    store = astm.Store()
    box = store.ref("box", 0)

    async def subject() -> Result:
        latencies: list[float] = []
        committed_at = 0.0
        start = box.get()

        async def consumer() -> None:
            for i in range(start + 1, start + handoffs + 1):

                def take(i: int = i) -> None:
                    astm.check(box.get() >= i)

                await store.atomically(take)
                latencies.append(time.perf_counter() - committed_at)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer)
            for _ in range(handoffs):
                await anyio.sleep(0.0005)
                committed_at = time.perf_counter()
                await store.atomically(lambda: box.alter(_add, 1))
        return statistics.median(latencies) * 1e6, {"p99 µs": _p99(latencies) * 1e6}

    async def baseline() -> Result:
        base: list[float] = []
        for _ in range(handoffs):
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
        return statistics.median(base) * 1e6, {"p99 µs": _p99(base) * 1e6}

    yield Case(
        "retry() wake-up after commit (median)",
        subject,
        baseline,
        "µs",
        "no polling",
        lower_is_better=True,
        note="baseline: an anyio.Event hand-off",
        formats={"p99 µs": ".0f"},
    )


async def _db_reads(cfg: Config) -> Cases:
    """store.db() + 10 reads vs a read-only transaction doing the same 10 reads."""
    store = astm.Store()
    refs = [store.ref(f"r{i}", i) for i in range(10)]

    def read_all() -> int:
        return sum(r.get() for r in refs)

    async def db_round(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            db = store.db()
            s = 0
            for r in refs:
                s += db[r]
        return time.perf_counter() - t0

    async def tx_round(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await store.atomically(read_all)
        return time.perf_counter() - t0

    yield Case("db() + 10 reads vs read-only tx", Sized(db_round, cfg.seconds, start=1000),
               Sized(tx_round, cfg.seconds, start=1000), "ops/s", "")  # fmt: skip


async def core(cfg: Config) -> Cases:
    """Every case of this module, in table order."""
    for group in (_uncontended, _concurrent, _hot_counter, _flash_crowd, _retry_wakeup, _db_reads):
        async with aclosing(group(cfg)) as gen:
            async for case in gen:
                yield case
