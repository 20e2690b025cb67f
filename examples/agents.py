"""Per-customer agents and the outbox: effects that happen once, after commit.

An order transaction moves stock and records the order. Two kinds of work must
follow it, and neither may happen for an attempt that is retried or aborted:

* each customer's loyalty points are kept by that customer's agent (a family of
  agents: one serial queue per customer, no task while idle);
* a confirmation e-mail goes through the outbox: delivered after commit, at
  least once, retried on failure, with an idempotency key so the mail service
  can drop duplicates.

Run it:  python examples/agents.py
"""

from __future__ import annotations

import random

import anyio
from pyrsistent import PVector, pvector

import astm

Key = tuple[int, int]


async def main() -> None:
    async with astm.Store() as store:
        stock = store.ref("stock", 50)
        orders: astm.Ref[PVector[tuple[str, int]]] = store.ref("orders", pvector())
        points = store.agents("loyalty-points", 0)
        sent_mail: dict[Key, str] = {}  # the "mail service": it dedups on the key
        flaky = random.Random(3)

        @store.effect("send-confirmation", max_attempts=5, backoff=0.001)
        async def send_confirmation(customer: str, *, key: Key) -> None:
            if flaky.random() < 0.3:
                raise ConnectionError("mail server busy")  # retried with backoff, same key
            sent_mail[key] = customer

        class SoldOut(Exception):
            pass

        @astm.transactional
        async def order(customer: str, qty: int) -> None:
            left = stock.get()
            await anyio.sleep(0)  # other orders run meanwhile; conflicts retry this body
            if qty > left:
                raise SoldOut(customer)
            stock.set(left - qty)
            orders.alter(lambda o: o.append((customer, qty)))
            points[customer].send(lambda p: p + 10 * qty)  # held until commit
            send_confirmation.enqueue(customer)  # delivered after commit

        customers = [f"customer-{i}" for i in range(12)]
        refused = 0

        async def shopper(i: int) -> None:
            nonlocal refused
            try:
                await order(customers[i % len(customers)], 1 + i % 3)
            except SoldOut:
                refused += 1

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(shopper, i)
        # leaving `async with store` drains the agents and the outbox

    placed = list(orders.get())
    stats = store.stats()
    print(f"orders placed: {len(placed)}, refused (sold out): {refused}, stock left: {stock.get()}")
    print(f"transaction attempts: {stats.attempts} for {stats.commits} commits")
    print(f"confirmations delivered: {len(sent_mail)} (one per order, despite retries)")
    expected: dict[str, int] = {}
    for customer, qty in placed:
        expected[customer] = expected.get(customer, 0) + 10 * qty
    assert {c: points[c].state for c in expected} == expected
    assert sorted(sent_mail.values()) == sorted(c for c, _ in placed)
    assert stock.get() + sum(q for _, q in placed) == 50
    print("every committed order got its points and exactly one confirmation; aborted ones got none")


if __name__ == "__main__":
    astm.run(main)
