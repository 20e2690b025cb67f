"""The store as a timeline: basis t, db values, reports, sync, as_of, blocking retry."""

from __future__ import annotations

import gc
import time
from typing import Any

import anyio
import pytest
from pyrsistent import PVector, pvector

import astm


async def bump(store: astm.Store, ref: astm.Ref[int], n: int = 1) -> int:
    return await store.atomically(lambda: ref.alter(lambda v: v + n))


class TestBasisT:
    async def test_t_grows_by_one_per_commit_under_concurrency(self, store: astm.Store) -> None:
        """500 concurrent commits get t = 1..500, each exactly once."""
        refs = [store.ref(f"r{i}", 0) for i in range(5)]
        ts: list[int] = []

        async def one(i: int) -> None:
            async def body() -> None:
                refs[i % 5].alter(lambda v: v + 1)
                await anyio.sleep(0)

            ts.append((await store.transact(body)).t)

        async with anyio.create_task_group() as tg:
            for i in range(500):
                tg.start_soon(one, i)
        assert sorted(ts) == list(range(1, 501))
        assert store.t == 500


class TestDbValues:
    async def test_db_value_never_changes(self, store: astm.Store) -> None:
        """A db value keeps reading its basis whatever commits later."""
        a, b = store.ref("a", 0), store.ref("b", 0)
        db = store.db()
        for i in range(1, 50):
            await store.atomically(lambda i: (a.set(i), b.set(-i)), i)
        assert db.t == 0 and db[a] == 0 and db[b] == 0
        now = store.db()
        assert now.t == 49 and now[a] == 49 and now.get(b) == -49

    async def test_membership_and_get(self, store: astm.Store) -> None:
        """Every ref of the store is in every db value, with its initial value before its first commit."""
        a = store.ref("a", 1)
        await bump(store, a)
        db = store.db()
        late = store.ref("late", 5)
        await store.atomically(lambda: late.set(6))
        assert a in db and late in db
        assert db[late] == 5 and store.db()[late] == 6
        other = astm.Store().ref("other", 0)
        assert other not in db
        assert db.get(other, "none") == "none"

    async def test_db_of_another_store(self, store: astm.Store) -> None:
        """Reading a ref of another store through a db value is an error."""
        other = astm.Store().ref("x", 0)
        with pytest.raises(ValueError, match="another store"):
            store.db()[other]

    async def test_holding_a_db_keeps_history_and_release_frees_it(self) -> None:
        """A held db value keeps its past readable beyond retention; dropping it lets the history go."""
        store = astm.Store(history=10)
        r = store.ref("r", 0)
        db = store.db()
        for _ in range(300):
            await bump(store, r)
        assert db[r] == 0
        assert len(store._timeline.log) >= 300
        del db
        gc.collect()
        for _ in range(30):
            await bump(store, r)
        assert len(store._timeline.log) <= 10 + 10
        with pytest.raises(astm.HistoryUnavailable, match="oldest t available"):
            store.as_of(5)


class TestAsOf:
    async def test_as_of_within_retention(self) -> None:
        """as_of(t) reads the store as it was at t."""
        store = astm.Store(history=100)
        r, s = store.ref("r", 0), store.ref("s", 0)
        for i in range(1, 21):
            await store.atomically(lambda i: r.set(i * 10), i)
            if i % 2:
                await store.atomically(lambda i: s.set(i), i)
        past = store.as_of(4)
        seen = [(store.as_of(t)[r], store.as_of(t)[s]) for t in range(store.t + 1)]
        assert past.t == 4
        assert seen[0] == (0, 0)
        # replay: the values at every t agree with the sequence of commits
        expected, rv, sv, t = [(0, 0)], 0, 0, 0
        for i in range(1, 21):
            rv, t = i * 10, t + 1
            expected.append((rv, sv))
            if i % 2:
                sv, t = i, t + 1
                expected.append((rv, sv))
        assert seen == expected

    async def test_as_of_beyond_retention(self) -> None:
        """as_of older than retention names the oldest t available; a future t says to use sync."""
        store = astm.Store(history=5)
        r = store.ref("r", 0)
        for _ in range(40):
            await bump(store, r)
        with pytest.raises(astm.HistoryUnavailable) as info:
            store.as_of(1)
        assert info.value.oldest >= 40 - 5 - 5
        assert f"oldest t available is {info.value.oldest}" in str(info.value)
        assert store.as_of(39)[r] == 39
        with pytest.raises(ValueError, match="sync"):
            store.as_of(41)

    async def test_history_seconds(self) -> None:
        """Commits younger than history_seconds stay readable even beyond the commit count."""
        store = astm.Store(history=2, history_seconds=60)
        r = store.ref("r", 0)
        for _ in range(50):
            await bump(store, r)
        assert store.as_of(1)[r] == 1

    def test_bad_history_options(self) -> None:
        """Negative retention settings are refused."""
        with pytest.raises(ValueError, match="history"):
            astm.Store(history=-1)
        with pytest.raises(ValueError, match="history_seconds"):
            astm.Store(history_seconds=-1)


class TestReports:
    async def test_transact_report(self, store: astm.Store) -> None:
        """transact returns t, the result, db_before/db_after and the changes."""
        a = store.ref("a", 1)

        def body() -> str:
            a.set(2)
            return "done"

        rep = await store.transact(body)
        assert (rep.t, rep.result) == (1, "done")
        assert rep.db_before.t == 0 and rep.db_after.t == 1
        assert rep.db_before[a] == 1 and rep.db_after[a] == 2
        assert rep.changes == (astm.Change(a, 1, 2),)

    async def test_transact_inside_transaction_refused(self, store: astm.Store) -> None:
        """transact cannot be nested (it reports one commit)."""
        a = store.ref("a", 1)

        async def outer() -> None:
            await store.transact(lambda: a.set(3))

        with pytest.raises(RuntimeError, match="atomically"):
            await store.atomically(outer)

    async def test_every_commit_once_in_order_to_each_consumer(self, store: astm.Store) -> None:
        """Three concurrent consumers each see every one of 200 concurrent commits once, in t order."""
        r = store.ref("r", 0)
        got: list[list[int]] = [[], [], []]
        n = 200

        async def consume(i: int) -> None:
            async for rep in store.reports(since=0):
                got[i].append(rep.t)
                assert rep.changes[0].new == rep.db_after[r]
                if rep.t == n:
                    return

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(consume, i)
            for _ in range(n):
                tg.start_soon(bump, store, r)
        assert got == [list(range(1, n + 1))] * 3

    async def test_resume_from_since(self, store: astm.Store) -> None:
        """reports(since=t) resumes right after t, including commits made while nobody listened."""
        r = store.ref("r", 0)
        for _ in range(10):
            await bump(store, r)
        seen = []
        async for rep in store.reports(since=7):
            seen.append((rep.t, rep.changes[0].old, rep.changes[0].new))
            if rep.t == 10:
                break
        assert seen == [(8, 7, 8), (9, 8, 9), (10, 9, 10)]

    async def test_consumer_falling_behind_gets_an_error(self) -> None:
        """A consumer that falls behind retention gets HistoryUnavailable, never a gap; commits never wait for it."""
        store = astm.Store(history=20)
        r = store.ref("r", 0)
        await bump(store, r)
        it = store.reports(since=0)
        first = await it.__anext__()
        assert first.t == 1 and first.db_after[r] == 1
        for _ in range(200):
            await bump(store, r)  # the consumer holds a report and reads nothing: commits go on
        assert store.t == 201
        assert len(store._timeline.log) <= 20 + 20, "a stuck consumer must not hold the log"
        with pytest.raises(astm.HistoryUnavailable, match="no longer retained"):
            first.db_before[r]
        with pytest.raises(astm.HistoryUnavailable, match="fresh db value"):
            await it.__anext__()
        await it.aclose()

    async def test_consumer_waits_without_polling(self, store: astm.Store) -> None:
        """A live consumer parks until the next commit and then gets it."""
        r = store.ref("r", 0)
        got: list[int] = []

        async def consume() -> None:
            async for rep in store.reports():
                got.append(rep.t)
                return

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.sleep(0.05)
            assert got == []
            await bump(store, r)
        assert got == [1]


class TestSync:
    async def test_sync_returns_a_db_including_t(self, store: astm.Store) -> None:
        """sync(t) waits for t and returns a db value whose basis includes it."""
        r = store.ref("r", 0)
        result: list[astm.Db] = []

        async def waiter() -> None:
            result.append(await store.sync(3))

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            for _ in range(3):
                await anyio.sleep(0.01)
                assert not result
                await bump(store, r)
        assert result[0].t >= 3 and result[0][r] == 3
        assert (await store.sync(1)).t == 3

    async def test_sync_timeout_says_how_far_behind(self, store: astm.Store) -> None:
        """A sync that times out says how many commits the store is behind."""
        with pytest.raises(astm.SyncTimeout, match="2 commit") as info:
            await store.sync(2, timeout=0.05)
        assert isinstance(info.value, TimeoutError)


class TestBlockingRetry:
    async def test_bounded_queue_wakes_on_commit_not_before(self, store: astm.Store) -> None:
        """Consumers of a bounded queue built on refs sleep until a producer commits: no busy loop."""
        queue: astm.Ref[PVector[int]] = store.ref("queue", pvector())
        attempts = 0
        taken: list[int] = []

        async def take() -> int:
            nonlocal attempts
            attempts += 1
            q = queue.get()
            astm.check(len(q) > 0)
            queue.set(q[1:])
            return q[0]

        async def put(x: int) -> None:
            q = queue.get()
            astm.check(len(q) < 3)  # bounded: producers wait too
            queue.set(q.append(x))

        async def consumer() -> None:
            for _ in range(5):
                taken.append(await store.atomically(take))

        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer)
            await anyio.sleep(0.05)
            assert attempts == 1, "the waiting consumer must not re-run before a commit"
            for x in range(5):
                await store.atomically(put, x)
                await anyio.sleep(0.01)
        assert taken == [0, 1, 2, 3, 4]
        assert attempts <= 10
        assert store.stats().blocked >= 1

    async def test_retry_with_fail_after_timeout(self, store: astm.Store) -> None:
        """anyio.fail_after bounds a retry() wait; nothing is left behind."""
        flag = store.ref("flag", False)

        def wait_flag() -> None:
            astm.check(flag.get())

        with pytest.raises(TimeoutError), anyio.fail_after(0.05):
            await store.atomically(wait_flag)
        assert not flag._waiters
        await store.atomically(lambda: flag.set(True))
        await store.atomically(wait_flag)

    async def test_cancel_waiting_transaction(self, store: astm.Store) -> None:
        """Cancelling a transaction waiting in retry() commits nothing and unregisters it."""
        gate, out = store.ref("gate", 0), store.ref("out", 0)

        async def body() -> None:
            out.set(1)
            astm.check(gate.get() > 0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(store.atomically, body)
            await anyio.sleep(0.02)
            assert gate._waiters
            tg.cancel_scope.cancel()
        assert out.get() == 0 and not gate._waiters

    async def test_retry_without_reads_is_an_error(self, store: astm.Store) -> None:
        """retry() before reading anything could never wake, so it raises."""

        @astm.transactional
        def body() -> None:
            astm.retry()

        with pytest.raises(RuntimeError, match="read"):
            await store.atomically(body)

    async def test_or_else(self, store: astm.Store) -> None:
        """or_else runs the next alternative when one retries, rolling back the writes of the first."""
        a, b, log = store.ref("a", 0), store.ref("b", 5), store.ref("log", ())

        def take_a() -> str:
            log.alter(lambda v: (*v, "tried a"))
            astm.check(a.get() > 0)
            a.alter(lambda v: v - 1)
            return "a"

        def take_b() -> str:
            astm.check(b.get() > 0)
            b.alter(lambda v: v - 1)
            return "b"

        async def body() -> Any:
            return await astm.or_else(take_a, take_b)

        assert await store.atomically(body) == "b"
        assert (a.get(), b.get(), log.get()) == (0, 4, ())

    async def test_or_else_all_retry_waits_for_any(self, store: astm.Store) -> None:
        """When every alternative retries, the transaction waits for a change to anything they read."""
        a, b = store.ref("a", 0), store.ref("b", 0)

        def take(r: astm.Ref[int], name: str) -> str:
            astm.check(r.get() > 0)
            r.alter(lambda v: v - 1)
            return name

        result: list[str] = []

        async def body() -> Any:
            return await astm.or_else(lambda: take(a, "a"), lambda: take(b, "b"))

        async def runner() -> None:
            result.append(await store.atomically(body))

        async with anyio.create_task_group() as tg:
            tg.start_soon(runner)
            await anyio.sleep(0.02)
            assert result == []
            await store.atomically(lambda: b.set(1))
        assert result == ["b"] and b.get() == 0


class TestStats:
    async def test_stats_is_a_frozen_snapshot(self, store: astm.Store) -> None:
        """stats() returns a frozen record of counters."""
        r = store.ref("r", 0)
        await bump(store, r)
        s = store.stats()
        assert (s.commits, s.attempts, s.retries) == (1, 1, 0)
        with pytest.raises(AttributeError):
            s.commits = 5  # type: ignore[misc]


class TestHistoryFaults:
    async def test_fault_grows_history_then_decays(self) -> None:
        """With no log, a peek that needs an old version faults once; the ref then keeps history, later dropped."""
        store = astm.Store(history=0)
        x, y = store.ref("x", 0), store.ref("y", 0)
        attempts = 0
        go, moved = anyio.Event(), anyio.Event()

        async def reader() -> tuple[int, int]:
            nonlocal attempts
            attempts += 1
            a = x.peek()
            if attempts == 1:
                go.set()
                await moved.wait()
            return a, y.peek() + x.peek()

        async def writer() -> None:
            await go.wait()
            await store.atomically(lambda: (x.set(1), y.set(1)))
            moved.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            assert await store.atomically(reader) == (1, 2)
        assert attempts == 2 and store.stats().faults == 1
        assert x._keep + y._keep >= 1, "the faulting ref keeps history now"
        z = store.ref("z", 0)
        await store.atomically(lambda: (x.alter(lambda v: v + 1), y.alter(lambda v: v + 1)))
        assert x._hist or y._hist
        start = time.monotonic()
        while (x._keep or y._keep) and time.monotonic() - start < 10:
            await bump(store, z)
        assert x._keep == y._keep == 0 and x._hist is None and y._hist is None
