"""The store conformance suite: every store subclasses this and passes it unchanged, on asyncio and on trio.

``make_store`` gives a fresh store; durable stores add ``reopen`` (a new store
over the same state). A subclass lists the event loops its store supports in
the ``backend`` fixture (the PostgreSQL store needs asyncpg, which is asyncio
only).
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable, Coroutine
from decimal import Decimal
from typing import Any

import anyio
import pytest
from pyrsistent import PVector, pmap, pvector

import astm

Key = tuple[int, int]
Test = Callable[..., Coroutine[Any, Any, None]]


def on_each_backend(fn: Test) -> Callable[..., None]:
    """Run the async test ``fn(self)`` under ``anyio.run`` on the backend the ``backend`` fixture names."""

    def test(self: Any, backend: str) -> None:
        anyio.run(fn, self, backend=backend)

    test.__name__ = fn.__name__
    test.__qualname__ = fn.__qualname__
    test.__doc__ = fn.__doc__
    return test


class StoreConformance:
    """Behaviour every store must have, whatever keeps its state."""

    @pytest.fixture(params=["asyncio", "trio"])
    def backend(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    def make_store(self, **options: Any) -> astm.Store:
        raise NotImplementedError

    @on_each_backend
    async def test_transfers_account_for_every_commit(self) -> None:
        """200 concurrent transfers with awaits in the body: each acknowledged one is in the history, once."""
        async with self.make_store(history=10_000) as store:
            accounts = [store.ref(f"acct-{i}", Decimal(100)) for i in range(8)]
            moves: astm.Ref[tuple[Any, ...]] = store.ref("moves", ())
            rng = random.Random(5)
            acked: dict[int, tuple[int, int, Decimal]] = {}

            async def transfer(a: int, b: int, n: Decimal) -> None:
                def body() -> None:
                    if accounts[a].get() >= n:
                        accounts[a].alter(lambda v: v - n)
                        accounts[b].alter(lambda v: v + n)
                        moves.alter(lambda m: (*m, (a, b, str(n))))

                rep = await store.transact(body)
                if rep.changes:
                    acked[rep.t] = (a, b, n)

            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    x, y = rng.sample(range(8), 2)
                    tg.start_soon(transfer, x, y, Decimal(rng.randint(1, 30)))
            balances = [Decimal(100)] * 8
            for t in range(1, store.t + 1):  # replay the history in t order: every acknowledged move, in place
                a, b, n = acked[t]
                assert store.as_of(t)[moves][-1] == (a, b, str(n)), t
                balances[a] -= n
                balances[b] += n
                assert [store.as_of(t)[acc] for acc in accounts] == balances, t
            assert sorted(acked) == list(range(1, store.t + 1)) and len(moves.get()) == store.t
            assert store.stats().commits == store.t

    @on_each_backend
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

    @on_each_backend
    async def test_refused_values_commit_nothing(self) -> None:
        """A mutable or unknown value is refused the same way on every store, before anything is applied."""
        async with self.make_store() as store:
            a: astm.Ref[Any] = store.ref("a", 1)
            b: astm.Ref[Any] = store.ref("b", (2,))
            await store.load(a, b)  # a PostgreSQL peer reads refs when first used; this reads them now
            with pytest.raises(astm.MutableValueError, match="ref 'b'"):
                await store.atomically(lambda: (a.set(5), b.set((1, [2]))))
            with pytest.raises(astm.CodecError, match="ref 'b'"):
                await store.atomically(lambda: (a.set(5), b.set(object())))
            assert (a.get(), b.get(), store.t) == (1, (2,), 0)

    @on_each_backend
    async def test_commute_counts_exactly(self) -> None:
        """100 tasks commuting one counter (with awaits in the body) end exact, each body run once."""
        async with self.make_store() as store:
            hits = store.ref("hits", 0)
            await store.load(hits)
            runs = 0

            async def body() -> None:
                nonlocal runs
                runs += 1
                hits.commute(lambda v: v + 1)
                await anyio.sleep(0)

            async with anyio.create_task_group() as tg:
                for _ in range(100):
                    tg.start_soon(store.atomically, body)
            assert hits.get() == 100 and runs == 100

    @on_each_backend
    async def test_timeline(self) -> None:
        """Db values, as_of and reports agree on the history."""
        async with self.make_store() as store:
            r: astm.Ref[PVector[int]] = store.ref("r", pvector())
            for i in range(5):
                await store.atomically(lambda i: r.alter(astm.conj, i), i)
            assert store.t == 5
            at3: PVector[int] = store.as_of(3)[r]
            assert list(at3) == [0, 1, 2]
            seen = []
            async with contextlib.aclosing(store.reports(since=2)) as reports:
                async for rep in reports:
                    seen.append((rep.t, list(rep.changes[0].new)))
                    if rep.t == 5:
                        break
            assert seen == [(3, [0, 1, 2]), (4, [0, 1, 2, 3]), (5, [0, 1, 2, 3, 4])]
            assert (await store.sync(5)).t == 5

    @on_each_backend
    async def test_history_beyond_retention_is_unavailable(self) -> None:
        """as_of and reports(since) further back than the history give HistoryUnavailable, not a wrong value."""
        async with self.make_store(history=3) as store:
            r = store.ref("r", 0)
            for i in range(1, 30):
                await store.atomically(lambda i: r.set(i), i)
            with pytest.raises(astm.HistoryUnavailable):
                store.as_of(1)
            with pytest.raises(astm.HistoryUnavailable):
                async for _ in store.reports(since=1):
                    pass
            assert store.as_of(store.t - 2)[r] == store.t - 2

    @on_each_backend
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
            assert await store.outbox.pending_count() == 0

    @on_each_backend
    async def test_dead_letters_and_requeue(self) -> None:
        """An entry failing every attempt is a dead letter with its error; requeue delivers it again."""
        async with self.make_store() as store:
            fail = True
            got: list[Key] = []

            @store.effect("flaky", max_attempts=2, backoff=0.001)
            async def flaky(payload: str, *, key: Key) -> None:
                if fail:
                    raise ConnectionRefusedError("down")
                got.append(key)

            await store.atomically(lambda: flaky.enqueue("x"))
            await store.outbox.drain()
            [dead] = await store.outbox.dead_letters()
            assert (dead.key, dead.effect, dead.payload, dead.attempts) == ((1, 0), "flaky", "x", 2)
            assert "down" in str(dead.error)
            fail = False
            assert await store.outbox.requeue_letters() == 1
            await store.outbox.drain()
            assert got == [(1, 0)] and await store.outbox.dead_letters() == []
            with pytest.raises(KeyError):
                await store.outbox.requeue_letters((9, 9))

    @on_each_backend
    async def test_ordered_entries_arrive_in_commit_order(self) -> None:
        """Entries sharing an order key are delivered one at a time, in commit order, through retries."""
        async with self.make_store() as store:
            got: list[int] = []
            failed: set[int] = set()

            @store.effect("ordered", backoff=0.001)
            async def ordered(n: int, *, key: Key) -> None:
                if n % 4 == 0 and n not in failed:
                    failed.add(n)
                    raise ConnectionError("once")
                got.append(n)

            for n in range(12):
                await store.atomically(lambda n: ordered.enqueue(n, order_key="lane"), n)
            await store.outbox.drain()
            assert got == list(range(12))

    @on_each_backend
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

    @on_each_backend
    async def test_agent_sends_go_out_on_commit_only(self) -> None:
        """An agent send in a transaction runs once if it commits, never if it aborts."""
        async with self.make_store() as store:
            log: astm.Agent[tuple[str, ...]] = store.agent("log", ())
            r = store.ref("r", 0)

            def ok() -> None:
                r.set(1)
                log.send(lambda s: (*s, "ok"))

            def bad() -> None:
                log.send(lambda s: (*s, "bad"))
                raise KeyError

            await store.atomically(ok)
            with pytest.raises(KeyError):
                await store.atomically(bad)
            await log.wait()
            assert log.state == ("ok",)

    @on_each_backend
    async def test_a_closed_store_refuses_work(self) -> None:
        """After aclose, transactions, enqueues and sends raise StoreClosed; reads still work."""
        store = self.make_store()
        async with store:
            r = store.ref("r", 0)
            await store.atomically(lambda: r.set(1))

            @store.effect("e")
            async def e(payload: Any, *, key: Key) -> None:
                pass

        with pytest.raises(astm.StoreClosed):
            await store.atomically(lambda: r.set(2))
        assert r.get() == 1 and store.closed

    @on_each_backend
    async def test_delete_removes_a_ref_at_its_t(self) -> None:
        """A deleted ref is gone from its commit on (db values, lookup, reads), still there before; reusable."""
        async with self.make_store() as store:
            r: astm.Ref[Any] = store.ref("cart", (1,))
            await store.load(r)
            await store.atomically(lambda: r.set((1, 2)))
            before = store.db()
            rep = await store.transact(r.delete)
            assert [(c.old, c.new) for c in rep.changes] == [((1, 2), astm.DELETED)]
            assert store.lookup("cart") is None and r not in store.db() and r in before
            assert before[r] == (1, 2) and store.as_of(rep.t - 1)[r] == (1, 2)
            with pytest.raises(astm.RefDeleted):
                r.get()
            with pytest.raises(astm.RefDeleted):
                await store.atomically(r.get)
            again: astm.Ref[Any] = store.ref("cart", ())
            await store.load(again)
            assert again is not r and again.get() == ()
            await store.atomically(lambda: again.set((3,)))
            assert again.get() == (3,)

    @on_each_backend
    async def test_refs_expire_when_not_written(self) -> None:
        """A ref not written for expire_after seconds is deleted by a commit; one written meanwhile stays."""
        async with self.make_store() as store:
            idle: astm.Ref[Any] = store.ref("idem:idle", None, expire_after=0.3)
            busy: astm.Ref[Any] = store.ref("idem:busy", None, expire_after=0.3)
            await store.atomically(lambda: (idle.set(1), busy.set(1)))
            for i in range(8):
                await anyio.sleep(0.1)
                await store.atomically(lambda i: busy.set(i), i)
            with anyio.fail_after(5):
                while store.lookup("idem:idle") is not None:
                    await anyio.sleep(0.05)
            assert store.lookup("idem:busy") is busy and busy.get() == 7


class DurableStoreConformance(StoreConformance):
    """What every durable store adds: state survives a restart."""

    #: whether a reopened store reads the history from before it opened (a PostgreSQL peer's starts at its open)
    restores_history = True

    def reopen(self, store: astm.Store, **options: Any) -> astm.Store:
        """A new store over the same state as ``store`` (closed first)."""
        raise NotImplementedError

    @on_each_backend
    async def test_reopen_restores_state(self) -> None:
        """After a restart refs, t and history are back, values exactly as written."""
        odd = json.loads('"caf\\u00e9 \\ud800"')
        store = self.make_store()
        async with store:
            a = store.ref("a", Decimal(1))
            s = store.ref("s", "")
            for _ in range(3):
                await store.atomically(lambda: a.alter(lambda v: v * 2))
            later: astm.Ref[Any] = store.ref("born-later", ())
            await store.atomically(lambda: (s.set(odd), later.set((1, 2**70))))
        async with self.reopen(store) as again:
            assert again.t == 4
            refs = again.ref("a", Decimal(0)), again.ref("s", ""), again.ref("born-later", None)
            await again.load(*refs)
            assert [r.get() for r in refs] == [Decimal(8), odd, (1, 2**70)]
            if self.restores_history:
                assert again.as_of(1)[again.ref("a", Decimal(0))] == Decimal(2)
            else:
                with pytest.raises(astm.HistoryUnavailable):
                    again.as_of(1)

    @on_each_backend
    async def test_effects_and_dead_letters_survive_a_restart(self) -> None:
        """Committed undelivered entries are delivered after a restart; dead letters stay dead until requeued."""
        store = self.make_store()
        gate = anyio.Event()
        async with store:

            @store.effect("slow")
            async def slow(payload: Any, *, key: Key) -> None:
                await gate.wait()

            @store.effect("broken", max_attempts=1)
            async def broken(payload: Any, *, key: Key) -> None:
                raise ConnectionError("no")

            def both() -> None:
                slow.enqueue("later")
                broken.enqueue("dead")

            await store.atomically(both)
            with anyio.move_on_after(2):
                while not await store.outbox.dead_letters():
                    await anyio.sleep(0.01)
            await store.aclose(timeout=0.05)  # "later" is stuck in delivery: close anyway
        got: list[tuple[Any, Key]] = []
        again = self.reopen(store)

        @again.effect("slow")
        async def fast(payload: Any, *, key: Key) -> None:
            got.append((payload, key))

        @again.effect("broken")
        async def fixed(payload: Any, *, key: Key) -> None:
            got.append((payload, key))

        async with again:
            with anyio.fail_after(10):
                await again.outbox.drain()
            [dead] = await again.outbox.dead_letters()
            assert dead.key == (1, 1) and "no" in str(dead.error)
            await again.outbox.requeue_letters()
            with anyio.fail_after(10):
                await again.outbox.drain()
            assert sorted(got) == [("dead", (1, 1)), ("later", (1, 0))]
            assert await again.outbox.pending_count() == 0

    @on_each_backend
    async def test_deletion_and_expiry_survive_a_restart(self) -> None:
        """A deleted ref stays deleted after a restart; store.expire(prefix) expires refs nobody names again."""
        store = self.make_store()
        async with store:
            gone: astm.Ref[Any] = store.ref("gone", "x")
            keep: astm.Ref[Any] = store.ref("idem:old", "response", expire_after=3600)
            await store.atomically(lambda: (gone.set("y"), keep.set("response")))
            await store.atomically(gone.delete)
        async with self.reopen(store) as again:
            fresh: astm.Ref[Any] = again.ref("gone", "initial")
            await again.load(fresh)
            assert fresh.get() == "initial"  # the deletion survived: a new ref
            assert await again.expire("idem:", after=0.2) == 1
            with anyio.fail_after(5):
                while True:
                    probe: astm.Ref[Any] = again.ref("idem:old", "expired")
                    await again.load(probe)
                    if probe.get() == "expired":
                        break
                    await anyio.sleep(0.05)
