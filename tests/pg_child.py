"""A peer process for the PostgreSQL tests: transfers until done (or killed), printing each acknowledged t.

Usage: python pg_child.py DSN SEED COUNT
"""

from __future__ import annotations

import random
import sys

import anyio

import astm

ACCOUNTS = 8
START = 1000


async def main(dsn: str, seed: int, count: int) -> None:
    async with astm.Store(dsn) as store:
        accounts = [store.ref(f"acct-{i}", START) for i in range(ACCOUNTS)]
        rng = random.Random(seed)
        done = 0

        def transfer(a: astm.Ref[int], b: astm.Ref[int], n: int) -> None:
            n = min(n, a.get())
            a.alter(lambda v: v - n)
            b.alter(lambda v: v + n)

        async def worker() -> None:
            nonlocal done
            while count == 0 or done < count:
                done += 1
                x, y = rng.sample(accounts, 2)
                rep = await store.transact(transfer, x, y, rng.randint(1, 20))
                print(rep.t, flush=True)

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(worker)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
