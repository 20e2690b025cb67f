"""Cases of agents and the outbox on the in-memory store.

Agent actions per second (one agent, a family of 10,000) against a memory
stream drained by one task; outbox deliveries against calling the handler
directly; what a send and an enqueue add to a small transaction; and the
memory an agent family takes per identity, with one send in flight and idle,
against a plain dict of the same states.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from contextlib import aclosing

import anyio

import astm

from ._harness import Case, Cases, Config, Derived, Result, Sized

__all__ = ["effects"]


def _add(v: int, n: int) -> int:
    return v + n


def _inc(v: int) -> int:
    return v + 1


async def _agents(cfg: Config) -> Cases:
    """Agent actions per second through one agent and a family of 10,000, vs a memory stream + one worker task."""
    store = astm.Store()
    one = store.agent("one", 0)
    family = store.agents("many", 0)
    keys: int = cfg.pick(10_000, 1_000)

    async def one_round(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            one.send(_add, 1)
        await one.wait()
        return time.perf_counter() - t0

    async def family_round(n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            family[i % keys].send(_add, 1)
        for k in range(min(keys, n)):
            await family[k].wait()
        return time.perf_counter() - t0

    async def stream_round(n: int) -> float:
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
        elapsed = time.perf_counter() - t0
        assert total == n
        return elapsed

    note = "baseline: a memory stream drained by one task"
    yield Case("agent actions, one agent", Sized(one_round, cfg.seconds, start=1000),
               Sized(stream_round, cfg.seconds, start=1000), "actions/s", "", note=note)  # fmt: skip
    yield Case(f"agent actions, family of {keys:,}", Sized(family_round, cfg.seconds, start=10_000, granule=keys),
               Sized(stream_round, cfg.seconds, start=1000), "actions/s", "", note=note)  # fmt: skip


async def _outbox(cfg: Config) -> Cases:
    """Outbox deliveries per second (a no-op handler, 100 entries per transaction), vs calling the handler directly."""
    store = astm.Store()
    delivered = 0

    @store.effect("noop")
    async def noop(payload: int, *, key: tuple[int, int]) -> None:
        nonlocal delivered
        delivered += 1

    def body(lo: int) -> None:
        for i in range(lo, lo + 100):
            noop.enqueue(i)

    async def outbox_round(n: int) -> float:
        start = delivered
        t0 = time.perf_counter()
        for lo in range(0, n, 100):
            await store.atomically(body, lo)
        await store.outbox.drain()
        elapsed = time.perf_counter() - t0
        assert delivered - start == n
        return elapsed

    async def direct_round(n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            await noop.handler(i, key=(0, i))
        return time.perf_counter() - t0

    yield Case("outbox deliveries", Sized(outbox_round, cfg.seconds, start=1000, granule=100),
               Sized(direct_round, cfg.seconds, start=1000), "entries/s", "",
               note="100 entries per transaction; baseline calls the handler directly")  # fmt: skip


async def _send_overhead(cfg: Config) -> Cases:
    """What one agent send plus one outbox enqueue add to a small transaction (running and delivering them included)."""
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

    async def plain_round(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await store.atomically(plain)
        return time.perf_counter() - t0

    async def effects_round(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await store.atomically(with_effects)
        await a.wait()
        await store.outbox.drain()
        return time.perf_counter() - t0

    yield Case("tx + send + enqueue vs tx alone", Sized(effects_round, cfg.seconds, start=1000),
               Sized(plain_round, cfg.seconds, start=1000), "tx/s", "",
               note="includes running the action and delivering the entry")  # fmt: skip


def _traced() -> int:
    return tracemalloc.get_traced_memory()[0]


async def _family_memory(cfg: Config) -> Cases:
    """Bytes per identity of an agent family: each identity with one send in flight, then idle after they drain.

    Half the identities get their send outside any transaction, half inside
    transactions of 1,000 sends each (held until the commit, then dispatched).
    Memory is what ``tracemalloc`` sees allocated and still live, per
    identity; the baseline is a dict of as many entries holding the same
    states. The warm-up round is small (1,000 identities) and uncounted.
    Every round uses a fresh store, so nothing of the previous round remains.

    The garbage collector is paused while the sends are made and drained, and
    a full collection runs before each reading: the figures are live memory,
    which pausing does not change, and with a million tasks alive the
    collector's repeated passes over them would make a round take minutes
    (their cost in time is what the 1000-task case's ``gc share`` shows).

    A full run makes one counted round: a million identities take about a
    hundred seconds under ``tracemalloc`` (freeing traced blocks is what is
    slow), and a size, unlike a rate, does not drift with the machine's load.
    The idle figure of the first big round includes what keeps its peak size
    after the drain (dicts and sets do not shrink): it is what a process keeps
    after such a burst.
    """
    n: int = cfg.pick(1_000_000, 2_000)
    name = f"agent family, {n:,} identities, one send each in flight: bytes per identity"
    idle_name = f"agent family, {n:,} identities, idle after they drain: bytes per identity"
    if not (cfg.wants(name) or cfg.wants(idle_name)):
        return
    batch = 1000
    calls = {"subject": 0, "baseline": 0}

    def size_of(side: str) -> int:
        calls[side] += 1
        return batch if calls[side] == 1 else n

    def send_batch(family: astm.AgentFamily[int], lo: int, hi: int) -> None:
        for i in range(lo, hi):
            family[i].send(_inc)

    async def subject() -> Result:
        size = size_of("subject")
        store = astm.Store()
        family = store.agents("family", 0)
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            before = _traced()
            half = size // 2
            for i in range(half):
                family[i].send(_inc)
            for lo in range(half, size, batch):
                await store.atomically(send_batch, family, lo, min(size, lo + batch))
            gc.collect()
            in_flight = _traced()
            assert family.busy == size, f"{size - family.busy} actions ran before the measurement"
            await family[size - 1].wait()  # the loop runs tasks in order: the others ran before it
            for i in range(size):
                if not family.busy:
                    break
                await family[i].wait()
            gc.collect()
            idle = _traced()
        finally:
            tracemalloc.stop()
            gc.enable()
        assert len(family) == size
        assert family[0].state == 1
        await store.aclose()
        return (in_flight - before) / size, {"idle": (idle - before) / size}

    async def baseline() -> Result:
        size = size_of("baseline")
        gc.collect()
        tracemalloc.start()
        try:
            before = _traced()
            states = {i: _inc(0) for i in range(size)}
            after = _traced()
        finally:
            tracemalloc.stop()
        assert len(states) == size
        per = (after - before) / size
        return per, {"dict": per}

    yield Case(
        name,
        subject,
        baseline,
        "B",
        "< 300 B in flight",
        lower_is_better=True,
        note="baseline: a dict of the same states; half the sends inside transactions"
        + ("" if cfg.quick else "; one round (memory does not drift)"),
        formats={"idle": ".0f"},
        also=(Derived(idle_name, "idle", "dict", "B", lower_is_better=True, note="baseline: the same dict"),),
        max_rounds=cfg.pick(1, 3),
    )


async def effects(cfg: Config) -> Cases:
    """Every case of this module, in table order."""
    for group in (_agents, _outbox, _send_overhead, _family_memory):
        async with aclosing(group(cfg)) as gen:
            async for case in gen:
                yield case
