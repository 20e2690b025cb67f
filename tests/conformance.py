"""The store conformance suite: every storage backend subclasses this and passes it unchanged."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import anyio
import pytest
from pyrsistent import PVector, pmap, pvector

import astm

Key = tuple[int, int]


class StoreConformance:
    """Behaviour every store must have, whatever keeps its state."""

    def make_store(self, **options: Any) -> astm.Store:
        raise NotImplementedError

    async def test_transfers_keep_the_total(self) -> None:
        """200 concurrent transfers with awaits in the body keep the bank total."""
        async with self.make_store() as store:
            accounts = [store.ref(f"acct-{i}", Decimal(100)) for i in range(8)]
            rng = random.Random(5)

            @astm.transactional
            async def transfer(a: astm.Ref[Decimal], b: astm.Ref[Decimal], n: Decimal) -> None:
                if a.get() >= n:
                    a.alter(lambda v: v - n)
                    await anyio.sleep(0)
                    b.alter(lambda v: v + n)

            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    x, y = rng.sample(accounts, 2)
                    tg.start_soon(transfer, x, y, Decimal(rng.randint(1, 30)))
            assert sum(a.get() for a in accounts) == Decimal(800)
            assert store.stats().commits == store.t

    async def test_validator_failure_commits_nothing(self) -> None:
        """A refused value aborts the transaction; every ref stays as it was."""
        async with self.make_store() as store:
            a = store.ref("a", 10, validator=lambda v: v >= 0)
            b = store.ref("b", 0)

            def overdraw() -> None:
                b.set(50)
                a.set(-40)

            with pytest.raises(astm.ValidationError):
                await store.atomically(overdraw)
            assert (a.get(), b.get(), store.t) == (10, 0, 0)

    async def test_timeline(self) -> None:
        """Db values, as_of and reports agree on the history."""
        async with self.make_store() as store:
            r: astm.Ref[PVector[int]] = store.ref("r", pvector())
            for i in range(5):
                await store.atomically(lambda i=i: r.alter(lambda v: v.append(i)))
            assert store.t == 5
            at3: PVector[int] = store.as_of(3)[r]
            assert list(at3) == [0, 1, 2]
            seen = []
            async for rep in store.reports(since=2):
                seen.append((rep.t, list(rep.changes[0].new)))
                if rep.t == 5:
                    break
            assert seen == [(3, [0, 1, 2]), (4, [0, 1, 2, 3]), (5, [0, 1, 2, 3, 4])]
            assert (await store.sync(5)).t == 5

    async def test_outbox_delivers_committed_entries(self) -> None:
        """Committed entries are delivered with their (t, seq) key; aborted ones never."""
        async with self.make_store() as store:
            got: list[tuple[Any, Key]] = []

            @store.effect("note", backoff=0.001)
            async def note(payload: Any, *, key: Key) -> None:
                got.append((payload, key))

            r = store.ref("r", 0)

            def ok() -> None:
                r.set(1)
                note.enqueue(pmap({"n": 1}))

            def bad() -> None:
                note.enqueue("never")
                raise KeyError

            await store.atomically(ok)
            with pytest.raises(KeyError):
                await store.atomically(bad)
            await store.outbox.drain()
            assert got == [(pmap({"n": 1}), (1, 0))]

    async def test_blocking_retry(self) -> None:
        """A retry() waiter wakes on the commit it waits for."""
        async with self.make_store() as store:
            box = store.ref("box", 0)
            got: list[int] = []

            def take() -> int:
                v = box.get()
                astm.check(v > 0)
                box.set(0)
                return v

            async def consumer() -> None:
                got.append(await store.atomically(take))

            async with anyio.create_task_group() as tg:
                tg.start_soon(consumer)
                await anyio.sleep(0.02)
                await store.atomically(lambda: box.set(7))
            assert got == [7] and box.get() == 0


class DurableStoreConformance(StoreConformance):
    """What every durable store adds: state survives a restart."""

    def reopen(self, store: astm.Store, **options: Any) -> astm.Store:
        """A new store over the same state as ``store`` (closed first)."""
        raise NotImplementedError

    async def test_reopen_restores_state(self) -> None:
        """After a restart refs, t, history and pending outbox entries are back."""
        store = self.make_store()
        async with store:
            a = store.ref("a", Decimal(1))
            for _ in range(3):
                await store.atomically(lambda: a.alter(lambda v: v * 2))
        async with self.reopen(store) as again:
            assert again.t == 3
            assert again.ref("a", Decimal(0)).get() == Decimal(8)
            assert again.as_of(1)[again.ref("a", Decimal(0))] == Decimal(2)
