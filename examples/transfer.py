"""The bank transfer: money moves between accounts and is never lost.

The invariant (the total of all balances never changes, and no balance goes
below zero) is protected by one transaction per transfer. Hundreds of
concurrent transfers, each pausing between its debit and its credit, run
without a lock; conflicting ones are retried by astm.

Run it:  python examples/transfer.py
"""

from __future__ import annotations

import random
from decimal import Decimal

import anyio

import astm


class LowFunds(Exception):
    """The source account cannot cover the amount."""


@astm.transactional
async def transfer(frm: astm.Ref[Decimal], to: astm.Ref[Decimal], amount: Decimal) -> None:
    """Move ``amount`` from ``frm`` to ``to``, all or nothing."""
    if amount > frm.get():
        raise LowFunds(f"{frm.name} has {frm.get()}, cannot send {amount}")
    frm.alter(lambda balance: balance - amount)
    await anyio.sleep(0.001)  # e.g. a price lookup: other transfers run meanwhile
    to.alter(lambda balance: balance + amount)


@astm.transactional
def total(accounts: list[astm.Ref[Decimal]]) -> Decimal:
    """The sum of all balances, read at one consistent point."""
    return sum((a.get() for a in accounts), Decimal(0))


async def main() -> None:
    store = astm.Store()
    accounts = [store.ref(f"account-{i}", Decimal(1000), validator=lambda v: v >= 0) for i in range(20)]
    before = await total(accounts)
    rng = random.Random(7)
    refused = 0

    async def one_transfer() -> None:
        nonlocal refused
        frm, to = rng.sample(accounts, 2)
        try:
            await transfer(frm, to, Decimal(rng.randint(1, 100)))
        except LowFunds:
            refused += 1

    async with anyio.create_task_group() as tg:
        for _ in range(1000):
            tg.start_soon(one_transfer)

    after = await total(accounts)
    stats = store.stats()
    print(f"1000 concurrent transfers over {len(accounts)} accounts")
    print(f"  committed: {stats.commits}   refused for low funds: {refused}")
    print(f"  attempts per commit: {stats.attempts / max(stats.commits, 1):.2f}")
    print(f"  total before: {before}   total after: {after}   basis t: {store.t}")
    assert before == after, "money was created or destroyed"
    assert all(a.get() >= 0 for a in accounts)
    print("invariant holds: no money lost, no balance below zero")


if __name__ == "__main__":
    astm.run(main)
