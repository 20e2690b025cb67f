"""A child process for the crash test: transfers on a SQLite store until it is killed.

Usage: python crash_child.py STORE_PATH DELIVERIES_FILE

Every acknowledged commit is printed as "t id" (flushed) on stdout; every
outbox delivery is appended to DELIVERIES_FILE as "t,seq,id".
"""

from __future__ import annotations

import os
import random
import sys
import uuid
from decimal import Decimal
from typing import Any

import anyio

import astm

ACCOUNTS = 10
START = Decimal(1000)


def open_store(path: str, deliveries: str) -> astm.Store:
    """The store with the audit effect registered (shared with the test)."""
    store = astm.Store(f"sqlite:///{path}", history=10**9)
    fd = os.open(deliveries, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @store.effect("audit", backoff=0.001)
    async def audit(transfer_id: str, *, key: tuple[int, int]) -> None:
        os.write(fd, f"{key[0]},{key[1]},{transfer_id}\n".encode())

    return store


async def main(path: str, deliveries: str) -> None:
    store = open_store(path, deliveries)
    audit: Any = store.outbox._effects["audit"]
    async with store:
        accounts = [store.ref(f"acct-{i}", START) for i in range(ACCOUNTS)]
        last = store.ref("last", "")

        async def transfer(a: astm.Ref[Decimal], b: astm.Ref[Decimal], n: Decimal, tid: str) -> None:
            if a.get() < n:
                n = a.get()
            a.alter(lambda v: v - n)
            await anyio.sleep(0)
            b.alter(lambda v: v + n)
            last.set(tid)
            audit.enqueue(tid)

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while True:
                x, y = rng.sample(accounts, 2)
                tid = uuid.uuid4().hex
                rep = await store.transact(transfer, x, y, Decimal(rng.randint(1, 50)), tid)
                sys.stdout.write(f"{rep.t} {tid}\n")
                sys.stdout.flush()

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(worker, i)


if __name__ == "__main__":
    astm.run(main, sys.argv[1], sys.argv[2])
