"""Transactions under concurrency: retries, isolation, contention, cancellation, threads."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import threading
import time
from decimal import Decimal
from typing import Any

import anyio
import pytest
from pyrsistent import PMap, PVector, pmap, pvector

import astm


class LowFunds(Exception):
    pass


@astm.transactional
async def transfer(frm: astm.Ref[Decimal], to: astm.Ref[Decimal], amount: Decimal) -> None:
    """The seed's transfer!: refuse on low funds, else debit and credit."""
    if amount > frm.get():
        raise LowFunds(amount)
    frm.alter(lambda v: v - amount)
    await anyio.sleep(0)
    to.alter(lambda v: v + amount)


class TestSeeds:
    async def test_transfer(self, store: astm.Store) -> None:
        """transfer! moves money atomically and refuses on low funds, leaving both refs."""
        checking = store.ref("checking", Decimal(500))
        savings = store.ref("savings", Decimal(1000))
        await transfer(checking, savings, Decimal(100))
        assert (checking.get(), savings.get()) == (Decimal(400), Decimal(1100))
        with pytest.raises(LowFunds):
            await transfer(checking, savings, Decimal(1000))
        assert (checking.get(), savings.get()) == (Decimal(400), Decimal(1100))

    async def test_reserve_seat(self, store: astm.Store) -> None:
        """reserve-seat!: of many concurrent customers exactly as many as seats succeed, sales agree."""
        seats: astm.Ref[PMap[str, int]] = store.ref("seats", pmap({"show-1": 2}))
        sales: astm.Ref[PVector[Any]] = store.ref("sales", pvector())

        @astm.transactional
        async def reserve_seat(show: str, customer: str) -> bool:
            available = seats.get().get(show, 0)
            await anyio.sleep(0)
            if available > 0:
                seats.alter(lambda m: m.set(show, m[show] - 1))
                sales.alter(lambda s: s.append(pmap({"show": show, "customer": customer})))
                return True
            return False

        results: list[bool] = []

        async def customer(i: int) -> None:
            results.append(await reserve_seat("show-1", f"c-{i}"))

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(customer, i)
        assert results.count(True) == 2
        assert seats.get()["show-1"] == 0
        assert len(sales.get()) == 2
        assert len({s["customer"] for s in sales.get()}) == 2


class TestIsolation:
    async def test_random_transfers_keep_total(self, store: astm.Store) -> None:
        """300 concurrent random transfers with awaits between read and write keep the total."""
        accounts = [store.ref(f"a{i}", Decimal(100), validator=lambda v: v >= 0) for i in range(10)]
        rng = random.Random(1)

        async def one() -> None:
            frm, to = rng.sample(accounts, 2)
            amount = Decimal(rng.randint(1, 60))
            with contextlib.suppress(LowFunds):
                await transfer(frm, to, amount)

        async with anyio.create_task_group() as tg:
            for _ in range(300):
                tg.start_soon(one)
        assert sum(a.get() for a in accounts) == Decimal(1000)
        assert all(a.get() >= 0 for a in accounts)
        stats = store.stats()
        assert stats.retries > 0, "the test should have produced conflicts"
        assert stats.commits == store.t

    async def test_write_skew_impossible_by_default(self, store: astm.Store) -> None:
        """Two tasks each read x and y and set their own when x + y == 0: the constraint x + y <= 1 holds."""
        x, y = store.ref("x", 0), store.ref("y", 0)

        async def claim(mine: astm.Ref[int]) -> None:
            if x.get() + y.get() == 0:
                await anyio.sleep(0.01)
                mine.set(1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(store.atomically, claim, x)
            tg.start_soon(store.atomically, claim, y)
        assert x.get() + y.get() == 1

    async def test_write_skew_possible_with_peek(self, store: astm.Store) -> None:
        """With peek() the reads are not checked, so both tasks commit: the documented write skew."""
        x, y = store.ref("x", 0), store.ref("y", 0)

        async def claim(mine: astm.Ref[int]) -> None:
            if x.peek() + y.peek() == 0:
                await anyio.sleep(0.01)
                mine.set(1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(store.atomically, claim, x)
            tg.start_soon(store.atomically, claim, y)
        assert x.get() + y.get() == 2

    @pytest.mark.parametrize("history", [0, 1000])
    @pytest.mark.parametrize("read", ["get", "peek"])
    async def test_opacity(self, read: str, history: int) -> None:
        """No attempt ever sees a state no commit produced, even across awaits and in attempts that retry."""
        store = astm.Store(history=history)
        pair = [store.ref("x", 0), store.ref("y", 0)]
        seen: list[tuple[int, int]] = []
        stop = False

        async def writer() -> None:
            while not stop:

                def bump() -> None:
                    for r in pair:
                        r.alter(lambda v: v + 1)

                await store.atomically(bump)
                await anyio.sleep(0)

        async def reader() -> None:
            for _ in range(200):

                async def body() -> None:
                    a = getattr(pair[0], read)()
                    await anyio.sleep(0)
                    await anyio.sleep(0)
                    b = getattr(pair[1], read)()
                    seen.append((a, b))

                await store.atomically(body)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(writer)
            await reader()
            stop = True
        assert store.t > 100
        assert all(a == b for a, b in seen), [p for p in seen if p[0] != p[1]][:5]

    async def test_commute_never_retries(self, store: astm.Store) -> None:
        """A hot counter under commute from 100 tasks with awaits ends exact with zero retries."""
        hits = store.ref("hits", 0)

        async def bump() -> None:
            hits.commute(lambda v: v + 1)
            await anyio.sleep(0.001)

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(store.atomically, bump)
        stats = store.stats()
        assert hits.get() == 100
        assert stats.retries == 0
        assert stats.attempts == stats.commits == 100

    async def test_alter_counter_is_exact_with_retries(self, store: astm.Store) -> None:
        """The same counter under alter is exact too, paying retries."""
        hits = store.ref("hits", 0)

        async def bump() -> None:
            hits.alter(lambda v: v + 1)
            await anyio.sleep(0.001)

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(store.atomically, bump)
        assert hits.get() == 100
        assert store.stats().retries > 0

    async def test_ensure_protects_a_read(self, store: astm.Store) -> None:
        """ensure() makes a commit to the ensured ref force a retry, even when only peeked before."""
        limit, used = store.ref("limit", 10), store.ref("used", 0)
        attempts = 0
        go, changed = anyio.Event(), anyio.Event()

        async def body() -> None:
            nonlocal attempts
            attempts += 1
            cap = limit.ensure()
            if attempts == 1:
                go.set()
                await changed.wait()
            used.set(cap)

        async def lower() -> None:
            await go.wait()
            await store.atomically(lambda: limit.set(5))
            changed.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(lower)
            await store.atomically(body)
        assert attempts == 2
        assert used.get() == 5


class TestRetryLimit:
    @staticmethod
    async def _interferer(store: astm.Store, x: astm.Ref[int], requests: Any, done: Any) -> None:
        """An independent task (its own transaction) that bumps x whenever asked."""
        async for _ in requests:
            await store.atomically(lambda: x.alter(lambda v: v + 1))
            await done.send(None)

    async def test_limit_names_the_hot_ref(self, store: astm.Store) -> None:
        """A transaction conflicting on every attempt raises RetryLimitExceeded naming the ref; it commits nothing."""
        x, other = store.ref("x", 0), store.ref("other", 0)
        ask_tx, ask_rx = anyio.create_memory_object_stream[None]()
        done_tx, done_rx = anyio.create_memory_object_stream[None]()

        async def body() -> None:
            v = x.get()
            other.set(v)
            await ask_tx.send(None)
            await done_rx.receive()
            x.set(v + 100)

        with ask_tx, ask_rx, done_tx, done_rx:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._interferer, store, x, ask_rx, done_tx)
                with pytest.raises(astm.RetryLimitExceeded, match="'x'") as info:
                    await store.atomically(body, retry_limit=3)
                tg.cancel_scope.cancel()
        assert info.value.attempts == 3
        assert info.value.conflicts == {"x": 3}
        assert x.get() == 3
        assert other.get() == 0

    async def test_store_default_limit(self) -> None:
        """The store's retry_limit applies when a call gives none."""
        store = astm.Store(retry_limit=2)
        x = store.ref("x", 0)
        ask_tx, ask_rx = anyio.create_memory_object_stream[None]()
        done_tx, done_rx = anyio.create_memory_object_stream[None]()

        async def body() -> None:
            v = x.get()
            await ask_tx.send(None)
            await done_rx.receive()
            x.set(v)

        with ask_tx, ask_rx, done_tx, done_rx:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._interferer, store, x, ask_rx, done_tx)
                with pytest.raises(astm.RetryLimitExceeded):
                    await store.atomically(body)
                tg.cancel_scope.cancel()
        assert x.get() == 2

    def test_bad_limit(self) -> None:
        """retry_limit must be positive."""
        with pytest.raises(ValueError, match="retry_limit"):
            astm.Store(retry_limit=0)


class TestContention:
    async def test_flash_crowd_is_linear(self, store: astm.Store) -> None:
        """2000 tasks reserving from one seats map with an await inside: at most 3 attempts per commit."""
        seats: astm.Ref[PMap[str, int]] = store.ref("seats", pmap({f"s{i}": -1 for i in range(2000)}))

        async def reserve(customer: int) -> None:
            async def body() -> None:
                m = seats.get()
                free = next(k for k, v in m.items() if v < 0)
                await anyio.sleep(0)
                seats.set(m.set(free, customer))

            await store.atomically(body)

        async with anyio.create_task_group() as tg:
            for c in range(2000):
                tg.start_soon(reserve, c)
        owners = list(seats.get().values())
        assert None not in owners
        assert sorted(owners) == list(range(2000))
        stats = store.stats()
        assert stats.commits == 2000
        assert stats.attempts / stats.commits <= 3.0, stats

    async def test_long_transaction_not_starved(self, store: astm.Store) -> None:
        """A long transaction over 20 refs commits in a bounded number of attempts under a stream of short writers."""
        refs = [store.ref(f"r{i}", 0) for i in range(20)]
        total = store.ref("total", 0)
        attempts = 0
        done = False

        async def long_body() -> None:
            nonlocal attempts
            attempts += 1
            s = 0
            for r in refs:
                s += r.get()
                await anyio.sleep(0.001)
            total.set(s)

        async def short_writer(seed: int) -> None:
            rng = random.Random(seed)
            while not done:
                r = rng.choice(refs)
                await store.atomically(lambda r: r.alter(lambda v: v + 1), r)
                await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(short_writer, i)
            await anyio.sleep(0.01)
            await store.atomically(long_body)
            done = True
        assert attempts <= 5, attempts

    async def test_backoff_and_claims_leave_no_state(self, store: astm.Store) -> None:
        """After heavy contention every claim is released."""
        hot = store.ref("hot", 0)

        async def bump() -> None:
            v = hot.get()
            await anyio.sleep(0)
            hot.set(v + 1)

        async with anyio.create_task_group() as tg:
            for _ in range(300):
                tg.start_soon(store.atomically, bump)
        assert hot.get() == 300
        assert store._nclaims == 0
        assert hot._claim is None
        assert not hot._queue

    async def test_claims_held_past_their_deadline_warn_once_with_a_count(
        self, store: astm.Store, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A claimant whose body turns slow is passed by its waiters; the log says so once, not once each."""
        hot = store.ref("hot", 0)
        runs: dict[int, int] = {}

        async def bump(i: int) -> None:
            runs[i] = runs.get(i, 0) + 1
            v = hot.get()
            await anyio.sleep(0)
            if runs[i] > 1:
                await anyio.sleep(0.08)  # past a claim's budget, which fast attempts made short
            hot.set(v + 1)

        with caplog.at_level(logging.WARNING, logger="astm"):
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(store.atomically, bump, i)
        assert hot.get() == 20, "every increment committed exactly once"
        overruns = [r for r in caplog.records if "past its deadline" in r.getMessage()]
        assert len(overruns) == 1, [r.getMessage() for r in overruns]
        assert store._nclaims == 0 and hot._claim is None

    async def test_a_claimant_that_overran_once_wins_its_next_attempt(self, store: astm.Store) -> None:
        """One attempt that overruns its claims (the loop stalled) does not cost the transaction its priority.

        A shared machine can stall the loop past a claim's deadline; writers then
        pass the claims and the attempt conflicts. The next attempt, fast again,
        must be yielded to, not passed for good until the retry limit.
        """
        x, y = store.ref("x", 0), store.ref("y", 0)
        stop = stalled = False
        runs = 0

        async def writer() -> None:
            while not stop:
                await store.atomically(lambda: [r.alter(lambda v: v + 1) for r in (x, y)])
                await anyio.sleep(0)

        async def reader() -> tuple[int, int]:
            nonlocal runs, stalled
            runs += 1
            a = x.get()
            await anyio.sleep(0)
            if x._claim is not None and not stalled:
                stalled = True
                time.sleep(0.06)  # noqa: ASYNC251 (a stalled loop, once: past the claim's 50 ms budget)
            for _ in range(5):
                await anyio.sleep(0)
            return a, y.get()

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(writer)
            a, b = await store.atomically(reader, retry_limit=100)
            stop = True
        assert stalled and a == b
        assert runs < 20, runs

    async def test_a_claimant_passed_by_commutes_stops_holding_its_queue(self, store: astm.Store) -> None:
        """A transaction that keeps failing under its claims stops renewing them: its queue goes ahead.

        A body that reads a ref other tasks commute conflicts with each of their
        commits (commutes pass claims). From its third failure it claims what
        it read, and a writer of those refs queues behind it. Each attempt
        renews the claims only CLAIM_RENEWALS times, so the writer commits while
        the reader is still retrying, not once it gives up at its retry limit.
        """
        counter, y = store.ref("counter", 0), store.ref("y", 0)
        stop = False
        order: list[str] = []

        def bump() -> None:
            counter.commute(lambda v: v + 1)

        async def commuter() -> None:
            while not stop:
                await store.atomically(bump)
                await anyio.sleep(0)

        async def reader() -> None:
            counter.get()
            await anyio.sleep(0.002)  # the commuter commits meanwhile: every attempt conflicts
            y.alter(lambda v: v + 1)

        async def writer() -> None:
            while y._claim is None:  # until the reader claims y
                await anyio.sleep(0.001)
            await store.atomically(lambda: y.alter(lambda v: v + 10))
            order.append("writer committed")

        async with anyio.create_task_group() as tg:
            tg.start_soon(commuter)
            tg.start_soon(writer)
            with pytest.raises(astm.RetryLimitExceeded):
                await store.atomically(reader, retry_limit=300)
            order.append("reader gave up")
            stop = True
        assert order == ["writer committed", "reader gave up"]
        assert y.get() == 10


class TestCancellation:
    async def test_cancel_mid_body_commits_nothing(self, store: astm.Store) -> None:
        """A task cancelled during its body leaves every ref as it was."""
        a, b = store.ref("a", 0), store.ref("b", 0)
        entered = anyio.Event()

        async def body() -> None:
            a.set(1)
            entered.set()
            await anyio.sleep(10)
            b.set(1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(store.atomically, body)
            await entered.wait()
            tg.cancel_scope.cancel()
        assert (a.get(), b.get(), store.t) == (0, 0, 0)
        await store.atomically(lambda: a.set(2))
        assert a.get() == 2

    async def test_cancel_while_queued_for_a_claim(self, store: astm.Store) -> None:
        """Cancelling tasks queued behind a hot ref releases their place; the rest finish."""
        hot = store.ref("hot", 0)

        async def bump() -> None:
            v = hot.get()
            await anyio.sleep(0.001)
            hot.set(v + 1)

        with anyio.move_on_after(0.05):
            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    tg.start_soon(store.atomically, bump)
        committed = hot.get()
        assert committed == store.t
        assert store._nclaims == 0
        assert not hot._queue
        await store.atomically(bump)
        assert hot.get() == committed + 1


class TestEndedAttempts:
    async def test_a_task_that_outlives_the_body_cannot_write(self, store: astm.Store) -> None:
        """A task spawned in a body writing after the commit gets TransactionEndedError: nothing vanishes silently."""
        r = store.ref("r", 0)
        errors: list[BaseException] = []

        async def late() -> None:
            await anyio.sleep(0.02)
            ops: list[Any] = [lambda: r.set(99), lambda: r.alter(lambda v: v + 1), lambda: r.commute(lambda v: v + 1)]
            for op in ops:
                try:
                    op()
                except astm.TransactionEndedError as exc:
                    errors.append(exc)
            try:
                astm.after_commit(print, "never")
            except astm.TransactionEndedError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:

            def body() -> None:
                r.set(1)
                tg.start_soon(late)

            await store.atomically(body)
        assert len(errors) == 4 and "must finish before the body returns" in str(errors[0])
        assert r.get() == 1 and store.t == 1
        assert not astm.in_transaction()

    async def test_a_task_from_a_retried_attempt_cannot_write_into_the_next(self, store: astm.Store) -> None:
        """A write from a task of attempt 1, made while attempt 2 runs, raises instead of joining attempt 2's commit."""
        r, s = store.ref("r", 0), store.ref("s", 0)
        attempts = 0
        errors: list[BaseException] = []

        async def late() -> None:
            await anyio.sleep(0.03)
            try:
                s.set(99)
            except astm.TransactionEndedError as exc:
                errors.append(exc)

        go = anyio.Event()

        async def other_writer() -> None:  # started outside the transaction: a separate commit
            await go.wait()
            await store.atomically(lambda: r.set(5))

        async with anyio.create_task_group() as tg:
            tg.start_soon(other_writer)

            async def body() -> None:
                nonlocal attempts
                attempts += 1
                r.get()
                if attempts == 1:
                    tg.start_soon(late)
                    go.set()
                    await anyio.sleep(0.01)  # that commit lands: this attempt will conflict
                else:
                    await anyio.sleep(0.05)  # the late task writes while this attempt runs
                r.alter(lambda v: v + 1)

            await store.atomically(body)
        assert attempts == 2 and len(errors) == 1
        assert (r.get(), s.get()) == (6, 0)


class TestThreads:
    def test_two_threads_two_loops_keep_total(self) -> None:
        """Two threads, each with its own event loop, transfer on one store; the total holds."""
        store = astm.Store()
        accounts = [store.ref(f"a{i}", Decimal(1000)) for i in range(4)]
        errors: list[BaseException] = []

        async def worker(seed: int) -> None:
            rng = random.Random(seed)

            async def one() -> None:
                frm, to = rng.sample(accounts, 2)
                with contextlib.suppress(LowFunds):
                    await transfer(frm, to, Decimal(rng.randint(1, 50)))

            async with anyio.create_task_group() as tg:
                for _ in range(300):
                    tg.start_soon(one)

        def thread_main(seed: int) -> None:
            try:
                asyncio.run(worker(seed))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=thread_main, args=(s,)) for s in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert sum(a.get() for a in accounts) == Decimal(4000)
        assert store.stats().commits == store.t > 0

    def test_trio_backend(self) -> None:
        """The same transfers run on trio through anyio."""
        store = astm.Store()
        accounts = [store.ref(f"a{i}", Decimal(100)) for i in range(5)]

        async def main() -> None:
            rng = random.Random(3)

            async def one() -> None:
                frm, to = rng.sample(accounts, 2)
                with contextlib.suppress(LowFunds):
                    await transfer(frm, to, Decimal(rng.randint(1, 30)))

            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    tg.start_soon(one)

        anyio.run(main, backend="trio")
        assert sum(a.get() for a in accounts) == Decimal(500)
        assert store.stats().retries > 0

    def test_astm_run(self) -> None:
        """astm.run runs a coroutine function and returns its result."""

        async def main(x: int) -> int:
            await anyio.sleep(0)
            return x * 2

        assert astm.run(main, 21) == 42

    def test_astm_run_tunes_the_collector_while_main_runs(self) -> None:
        """Inside astm.run the young generation is collected far less often; afterwards as before."""
        before = gc.get_threshold()
        seen: list[tuple[int, int, int]] = []

        async def main() -> None:
            seen.append(gc.get_threshold())

        try:
            astm.run(main)
            assert seen == [(astm._gc.DEFAULT_THRESHOLD, 20, 20)] and gc.get_threshold() == before
            astm.run(main, tune_gc=False)
            assert seen[1] == before
        finally:
            gc.unfreeze()

    def test_tune_gc_for_a_server_of_your_own(self) -> None:
        """tune_gc returns the thresholds it replaced, freezes what is alive, and refuses nonsense clearly."""
        before = gc.get_threshold()
        try:
            assert astm.tune_gc(10_000) == before
            assert gc.get_threshold() == (10_000, 20, 20) and gc.get_freeze_count() > 0
            with pytest.raises(ValueError, match="positive number"):
                astm.tune_gc(0)
            assert gc.get_threshold() == (10_000, 20, 20), "a refused call changes nothing"
        finally:
            gc.set_threshold(*before)
            gc.unfreeze()
