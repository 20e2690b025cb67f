"""The outbox: at-least-once delivery after commit, retries, dead letters, ordering, shutdown."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import astm

Key = tuple[int, int]


class TestDelivery:
    async def test_delivered_after_commit_with_key(self, store: astm.Store) -> None:
        """An entry is delivered after its transaction commits, keyed (t, seq)."""
        r = store.ref("r", 0)
        got: list[tuple[Any, Key, int]] = []

        @store.effect("mail")
        async def mail(payload: str, *, key: Key) -> None:
            got.append((payload, key, store.t))

        def body() -> None:
            r.set(1)
            mail.enqueue("hello")
            mail.enqueue("again")

        await store.atomically(body)
        await store.outbox.drain()
        assert got == [("hello", (1, 0), 1), ("again", (1, 1), 1)]
        assert store.outbox.delivered == 2 and (await store.outbox.pending_count()) == 0

    async def test_aborted_transaction_enqueues_nothing(self, store: astm.Store) -> None:
        """An aborted transaction's entries are never delivered."""
        got: list[Any] = []

        @store.effect("mail")
        async def mail(payload: str, *, key: Key) -> None:
            got.append(payload)

        def body() -> None:
            mail.enqueue("never")
            raise RuntimeError("abort")

        with pytest.raises(RuntimeError):
            await store.atomically(body)
        await anyio.sleep(0.01)
        assert got == [] and store.t == 0

    async def test_enqueue_only_transaction_commits(self, store: astm.Store) -> None:
        """A transaction that only enqueues still commits (its entries need a t)."""
        got: list[Key] = []

        @store.effect("ping")
        async def ping(payload: None, *, key: Key) -> None:
            got.append(key)

        await store.atomically(lambda: ping.enqueue(None))
        await store.outbox.drain()
        assert got == [(1, 0)] and store.t == 1

    async def test_enqueue_outside_transaction(self, store: astm.Store) -> None:
        """enqueue outside a transaction is refused with a clear error."""

        @store.effect("x")
        async def x(payload: None, *, key: Key) -> None:
            pass

        with pytest.raises(astm.NotInTransactionError, match="enqueue"):
            x.enqueue(None)

    def test_registration_errors(self, store: astm.Store) -> None:
        """A sync handler or a duplicate name is refused."""
        with pytest.raises(TypeError, match="async def"):
            store.effect("sync")(lambda payload, *, key: None)  # type: ignore[arg-type,return-value]

        async def h(payload: None, *, key: Key) -> None:
            pass

        store.effect("dup")(h)
        with pytest.raises(ValueError, match="already registered"):
            store.effect("dup")(h)


class TestRetries:
    async def test_fails_twice_then_succeeds_with_the_same_key(self, store: astm.Store) -> None:
        """Redeliveries after failures carry the same idempotency key."""
        keys: list[Key] = []

        @store.effect("flaky", max_attempts=5, backoff=0.001)
        async def flaky(payload: str, *, key: Key) -> None:
            keys.append(key)
            if len(keys) < 3:
                raise ConnectionError("smtp down")

        await store.atomically(lambda: flaky.enqueue("x"))
        await store.outbox.drain()
        assert keys == [(1, 0)] * 3
        assert (await store.outbox.dead_letters()) == []

    async def test_dead_letters_and_requeue(self, store: astm.Store) -> None:
        """After the last attempt an entry is a dead letter with its error; requeue delivers it again."""
        healthy = False
        delivered: list[str] = []

        @store.effect("hook", max_attempts=2, backoff=0.001)
        async def hook(payload: str, *, key: Key) -> None:
            if not healthy:
                raise ConnectionRefusedError("down")
            delivered.append(payload)

        await store.atomically(lambda: hook.enqueue("a"))
        await store.outbox.drain()
        [dead] = await store.outbox.dead_letters()
        assert (dead.key, dead.effect, dead.payload, dead.attempts) == ((1, 0), "hook", "a", 2)
        assert isinstance(dead.error, ConnectionRefusedError)
        healthy = True
        assert (await store.outbox.requeue_letters()) == 1
        await store.outbox.drain()
        assert delivered == ["a"] and (await store.outbox.dead_letters()) == []
        with pytest.raises(KeyError):
            (await store.outbox.requeue_letters((9, 9)))


class TestOrdering:
    async def test_order_key_keeps_commit_order(self, store: astm.Store) -> None:
        """Entries sharing an order_key are delivered one at a time in commit order, even with slow handlers."""
        seen: list[tuple[str, int]] = []
        active: dict[str, int] = {}
        overlap = False

        @store.effect("ship")
        async def ship(payload: tuple[str, int], *, key: Key) -> None:
            nonlocal overlap
            who, n = payload
            active[who] = active.get(who, 0) + 1
            overlap |= active[who] > 1
            await anyio.sleep(0.002 if n % 2 else 0)
            seen.append(payload)
            active[who] -= 1

        for n in range(10):
            for who in ("ann", "bob"):
                await store.atomically(lambda who, n: ship.enqueue((who, n), order_key=who), who, n)
        await store.outbox.drain()
        assert not overlap
        for who in ("ann", "bob"):
            assert [n for w, n in seen if w == who] == list(range(10))

    async def test_concurrency_limit(self) -> None:
        """No more deliveries run at once than the store's outbox_concurrency."""
        store = astm.Store(outbox_concurrency=3)
        running = peak = 0

        @store.effect("slow")
        async def slow(payload: int, *, key: Key) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await anyio.sleep(0.005)
            running -= 1

        def body() -> None:
            for i in range(20):
                slow.enqueue(i)

        await store.atomically(body)
        await store.outbox.drain()
        assert peak == 3


class TestShutdown:
    async def test_close_drains_agents_and_outbox(self) -> None:
        """aclose waits for queued actions and pending entries, then refuses new work."""
        store = astm.Store()
        done: list[str] = []
        a = store.agent("a", 0)

        async def slow(state: int) -> int:
            await anyio.sleep(0.02)
            done.append("action")
            return state + 1

        @store.effect("e")
        async def e(payload: None, *, key: Key) -> None:
            await anyio.sleep(0.02)
            done.append("effect")

        async with store:
            a.send(slow)
            await store.atomically(lambda: e.enqueue(None))
        assert sorted(done) == ["action", "effect"] and a.state == 1
        with pytest.raises(astm.StoreClosed):
            a.send(slow)
        with pytest.raises(astm.StoreClosed):
            await store.atomically(lambda: e.enqueue(None))

    async def test_close_wakes_sync_waiters_and_ends_reports(self) -> None:
        """Closing ends report streams; sync waiters get StoreClosed."""
        store = astm.Store()
        ended: list[str] = []

        async def consume() -> None:
            async for _ in store.reports():
                pass
            ended.append("reports")

        async def syncer() -> None:
            with pytest.raises(astm.StoreClosed):
                await store.sync(10)
            ended.append("sync")

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            tg.start_soon(syncer)
            await anyio.sleep(0.01)
            await store.aclose()
        assert sorted(ended) == ["reports", "sync"]
