"""The PostgreSQL store: the conformance suite, and peers in several processes sharing one state."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import anyio
import asyncpg
import pytest

import astm

from .conformance import DurableStoreConformance
from .pg_child import ACCOUNTS, START

CHILD = Path(__file__).with_name("pg_child.py")
Key = tuple[int, int]


class TestPostgresStore(DurableStoreConformance):
    restores_history = False  # a peer's history starts at its open: the log holds no old values

    @pytest.fixture(params=["asyncio"])  # asyncpg runs on asyncio only
    def backend(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    @pytest.fixture(autouse=True)
    def _db(self, pg_dsn: str) -> None:
        self.dsn = pg_dsn

    def make_store(self, **options: Any) -> astm.Store:
        return astm.Store(self.dsn, **options)

    def reopen(self, store: astm.Store, **options: Any) -> astm.Store:
        return astm.Store(self.dsn, **options)


async def _log_rows(dsn: str) -> list[tuple[int, list[Any]]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT t, changes FROM astm_log ORDER BY t")
    finally:
        await conn.close()
    return [(r["t"], json.loads(r["changes"])) for r in rows]


def _lose_the_log(store: astm.Store, monkeypatch: pytest.MonkeyPatch, failure: type[Exception]) -> Any:
    """Make ``store``'s peer fail to read the log up to a commit (raising ``failure``), for half a second
    at most before it gives up; returns the peer."""
    from astm.stores import postgres

    monkeypatch.setattr(postgres, "RESOLVE_SECONDS", 0.5)
    peer = store._peer
    assert peer is not None

    async def lost(t: int) -> None:
        raise failure("the server went away")

    monkeypatch.setattr(peer, "_await_announced", lost)
    return peer


class TestSchema:
    async def test_a_database_of_the_previous_schema_is_upgraded_in_place(self, pg_dsn: str) -> None:
        """A database at schema 6 (the commit functions wrote astm_meta even for a batch that committed nothing)
        opens as the current schema with its refs, log and commits intact, and commits go on from its t."""
        from astm.stores.postgres import SCHEMA_VERSION

        async with astm.Store(pg_dsn) as s:
            r = s.ref("r", 0)
            await s.atomically(lambda: r.set(41))
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute("UPDATE astm_meta SET value = '6' WHERE key = 'schema_version'")
        finally:
            await conn.close()
        async with astm.Store(pg_dsn) as s:
            r = s.ref("r", 0)
            await s.load(r)
            assert (s.t, r.get()) == (1, 41)
            assert (await s.transact(lambda: r.alter(lambda v: v + 1))).t == 2
        conn = await asyncpg.connect(pg_dsn)
        try:
            version = await conn.fetchval("SELECT value FROM astm_meta WHERE key = 'schema_version'")
        finally:
            await conn.close()
        assert int(version) == SCHEMA_VERSION == 8


class TestPeers:
    async def test_read_your_writes_across_peers(self, pg_dsn: str) -> None:
        """A write on one peer is visible on another after sync(t); the second peer follows by itself."""
        async with astm.Store(pg_dsn) as a, astm.Store(pg_dsn) as b:
            ra, rb = a.ref("r", 0), b.ref("r", 0)
            await b.load(rb)  # b holds r: it follows its changes
            rep = await a.transact(lambda: ra.set(42))
            db = await b.sync(rep.t, timeout=5)
            assert db.t >= rep.t and db[rb] == 42 and rb.get() == 42
            # b writes on top of a's commit: it had to catch up to validate
            await b.atomically(lambda: rb.alter(lambda v: v + 1))
            assert (await a.sync(b.t, timeout=5))[ra] == 43

    async def test_conflicts_between_peers_retry(self, pg_dsn: str) -> None:
        """Two peers incrementing one ref with alter lose no update."""
        async with astm.Store(pg_dsn) as a, astm.Store(pg_dsn) as b:

            async def bump(store: astm.Store) -> None:
                r = store.ref("n", 0)
                for _ in range(40):
                    await store.atomically(lambda: r.alter(lambda v: v + 1))

            async with anyio.create_task_group() as tg:
                tg.start_soon(bump, a)
                tg.start_soon(bump, b)
            assert (await a.sync(b.t, timeout=5))[a.ref("n", 0)] == 80

    async def test_commute_across_peers_never_reruns_the_body(self, pg_dsn: str) -> None:
        """Commutes from two peers end exact; a stale commute is re-applied without running the body again."""
        runs = 0
        async with astm.Store(pg_dsn) as a, astm.Store(pg_dsn) as b:

            async def hit(store: astm.Store) -> None:
                nonlocal runs
                r = store.ref("hits", 0)

                def body() -> None:
                    nonlocal runs
                    runs += 1
                    r.commute(lambda v: v + 1)

                await store.load(r)  # a first read would fetch it and run the body again
                for _ in range(50):
                    await store.atomically(body)

            async with anyio.create_task_group() as tg:
                tg.start_soon(hit, a)
                tg.start_soon(hit, b)
            assert (await a.sync(b.t, timeout=5))[a.ref("hits", 0)] == 100
        assert runs == 100

    async def test_outbox_two_peers_exactly_once_after_dedup(self, pg_dsn: str) -> None:
        """Two peers dispatch the shared outbox: every committed entry arrives, deduped by key exactly once."""
        got: list[tuple[str, Key]] = []
        b_delivered = anyio.Event()
        async with astm.Store(pg_dsn) as a, astm.Store(pg_dsn) as b:
            for peer, store in (("a", a), ("b", b)):

                @store.effect("mail", backoff=0.01, max_attempts=30)
                async def mail(payload: int, *, key: Key, peer: str = peer) -> None:
                    if peer == "a" and payload >= 30:  # a holds unordered entries until b has taken one
                        with anyio.move_on_after(5):
                            await b_delivered.wait()
                    if random.random() < 0.2:
                        raise ConnectionError("flaky")
                    got.append((peer, key))
                    if peer == "b":
                        b_delivered.set()

            ea = a.outbox._effects["mail"]

            def body(i: int) -> None:
                a.ref("n", 0).alter(lambda v: v + 1)
                ea.enqueue(i, order_key=i % 3 if i < 30 else None)

            for i in range(60):
                await a.atomically(body, i)
            with anyio.fail_after(30):
                await a.outbox.drain()
            assert await a.outbox.dead_letters() == []
        keys = {k for _, k in got}
        assert keys == {(t, 0) for t in range(1, 61)}
        for lane in range(3):  # entries sharing an order_key arrive in commit order
            ts = [k[0] for _, k in got if k[0] <= 30 and (k[0] - 1) % 3 == lane]
            assert ts == sorted(ts)
        assert {p for p, _ in got} == {"a", "b"}, "both peers should have delivered"

    async def test_the_outbox_dispatcher_outlives_claims_the_server_refuses(
        self, pg_dsn: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """While the server refuses the outbox's claims (here a lock timeout; a full disk alike), the
        dispatcher keeps polling: once claims work again the due entry is delivered, without a new commit."""
        attempts: list[float] = []
        delivered = anyio.Event()
        async with astm.Store(f"{pg_dsn}?lock_timeout=100") as store:

            @store.effect("mail", backoff=0.5)
            async def mail(payload: int, *, key: Key) -> None:
                attempts.append(time.monotonic())
                if len(attempts) == 1:
                    raise ConnectionError("the first attempt fails: the entry is due again in 0.5 s")
                delivered.set()

            def body() -> None:
                store.ref("n", 0).set(1)
                mail.enqueue(1)

            locker = await asyncpg.connect(pg_dsn)
            try:
                await store.atomically(body)
                with anyio.fail_after(10):
                    while not attempts:
                        await anyio.sleep(0.01)
                tr = locker.transaction()
                await tr.start()
                await locker.execute("LOCK TABLE astm_outbox IN ACCESS EXCLUSIVE MODE")  # claims time out
                await anyio.sleep(1.5)
                assert not delivered.is_set()
                await tr.rollback()
                with anyio.fail_after(10):
                    await delivered.wait()
            finally:
                await locker.close()
        assert len(attempts) == 2
        assert any("refused to claim" in r.getMessage() for r in caplog.records)

    async def test_missing_rights_are_explained(self, pg_dsn: str) -> None:
        """A database user that may not create the tables gets a clear StorageError."""
        admin = await asyncpg.connect(pg_dsn)
        try:
            await admin.execute("DROP ROLE IF EXISTS astm_weak; CREATE ROLE astm_weak LOGIN")
        finally:
            await admin.close()
        weak = pg_dsn.replace("astm@", "astm_weak@", 1)
        with pytest.raises(astm.StorageError, match="lacks a right"):
            async with astm.Store(weak):
                pass

    async def test_unopened_store_is_refused(self, pg_dsn: str) -> None:
        """Using a PostgreSQL store before `async with` gives a clear error."""
        store = astm.Store(pg_dsn)
        r = store.ref("r", 0)
        with pytest.raises(astm.StorageError, match="async with"):
            await store.atomically(lambda: r.set(1))


class TestCommitOutcomes:
    async def test_cancelling_one_caller_leaves_every_other_commit_alone(self, pg_dsn: str) -> None:
        """Callers cancelled while their batch is in flight change nothing for the others: each gets its own t."""
        async with astm.Store(pg_dsn) as store:
            refs = [store.ref(f"r{i}", 0) for i in range(40)]
            acked: dict[int, int] = {}
            cancelled: list[int] = []

            async def one(i: int, deadline: float | None) -> None:
                with anyio.move_on_after(deadline) as scope:
                    acked[i] = (await store.transact(lambda: refs[i].set(i + 1))).t
                if scope.cancelled_caught:
                    cancelled.append(i)

            for round_ in range(4):
                async with anyio.create_task_group() as tg:
                    for i in range(round_ * 10, round_ * 10 + 10):
                        # every third caller is cancelled a moment after it queued, often mid-flight
                        tg.start_soon(one, i, 0.0005 * (1 + round_) if i % 3 == 0 else None)
            assert cancelled, "no caller was cancelled; the test proves nothing"
            assert set(acked) | set(cancelled) == set(range(40)) and not set(acked) & set(cancelled)
            rows = {t: changes for t, changes in await _log_rows(pg_dsn)}
            for i, t in acked.items():  # every acknowledged commit is in the log, exactly as acknowledged
                assert rows[t] == [[f"r{i}", "n", i + 1, 0]], (i, t, rows.get(t))
            names = [changes[0][0] for changes in rows.values()]
            assert len(names) == len(set(names)), "a commit was applied twice"

    async def test_an_unresolved_commit_is_fenced_and_can_never_apply(self, pg_dsn: str) -> None:
        """Once a lost commit is answered "not committed", the orphaned request is refused if it arrives later."""
        import uuid

        from astm.stores.postgres import _COMMIT

        async with astm.Store(pg_dsn) as store:
            r = store.ref("r", 0)
            assert store._peer is not None
            orphan = uuid.uuid4()
            [answer] = await store._peer.committer.resolve([orphan], ConnectionResetError("dropped"))
            assert isinstance(answer, astm.StorageError) and "not committed" in str(answer)
            # a pooler (or a slow server) now runs the request that was sent before the connection dropped
            late = {
                "id": str(orphan), "time": 0.0, "reads": [], "commutes": [],
                "writes": [{"name": "r", "kind": "v", "value": "5"}], "changes": '[["r","v",5]]', "outbox": [],
            }  # fmt: skip
            conn = await asyncpg.connect(pg_dsn)
            try:
                [result] = json.loads(await conn.fetchval(_COMMIT, json.dumps([late])))
                assert result["status"] == "fenced"
                assert await conn.fetchval("SELECT count(*) FROM astm_log WHERE tx_id = $1", orphan) == 0
                assert await conn.fetchval("SELECT count(*) FROM astm_refs WHERE name = 'r'") == 0
            finally:
                await conn.close()
            await store.atomically(lambda: r.set(1))
            assert (await store.sync(1)).t == 1 and r.get() == 1

    @pytest.mark.parametrize("failure", [ConnectionResetError, RuntimeError], ids=["server-lost", "apply-failed"])
    async def test_a_commit_the_peer_cannot_apply_is_reported_as_committed(
        self, pg_dsn: str, monkeypatch: pytest.MonkeyPatch, failure: type[Exception]
    ) -> None:
        """The server is lost right after it acknowledged a commit, before the peer could read the log up to
        it (or applying the log fails): the caller gets ``CommittedNotApplied`` with the commit's t (an unknown
        outcome, never a plain "not committed" StorageError, which would invite running it again), and the
        commit is there."""
        async with astm.Store(pg_dsn) as store:
            _lose_the_log(store, monkeypatch, failure)
            r = store.ref("r", 0)
            with pytest.raises(astm.CommittedNotApplied) as caught:
                await store.atomically(lambda: r.set(1))
            assert isinstance(caught.value, astm.CommitOutcomeUnknown) and caught.value.t == 1
            assert "do not run the transaction again" in str(caught.value)
            assert isinstance(caught.value.__cause__, failure)
            monkeypatch.undo()
            await store.sync(caught.value.t)
            assert r.get() == 1
        rows = await _log_rows(pg_dsn)
        assert [t for t, _ in rows] == [1]

    async def test_a_conflict_the_peer_cannot_catch_up_on_is_not_committed(
        self, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """After the server refused a commit for a conflict, the peer catches up on the newer commits before
        the body runs again; if the server is lost meanwhile, that is a "not committed" StorageError, never
        ``CommittedNotApplied`` (which says the commit happened)."""
        async with astm.Store(pg_dsn) as store:
            peer = _lose_the_log(store, monkeypatch, ConnectionResetError)
            with pytest.raises(astm.StorageError) as caught:
                await peer.catch_up_after(7, committed=False)
            err = caught.value
            assert not isinstance(err, astm.CommitOutcomeUnknown), err
            assert "not committed" in str(err) and "conflicted" in str(err)
            with pytest.raises(astm.CommittedNotApplied):
                await peer.catch_up_after(7)

    async def test_a_peer_that_fails_to_apply_its_own_commits_still_answers_their_callers(
        self, pg_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The commits of a batch stand even when installing them fails: their callers get their t (each then
        reads its commit back), instead of waiting for ever."""
        async with astm.Store(pg_dsn) as store:
            peer = store._peer
            assert peer is not None
            real = peer.apply_own
            failures: list[Any] = []

            async def failing(commits: Any) -> None:
                if not failures:
                    failures.append(commits)
                    raise RuntimeError("installing failed")
                await real(commits)

            monkeypatch.setattr(peer, "apply_own", failing)
            r = store.ref("r", 0)
            with anyio.fail_after(10):
                rep = await store.transact(lambda: r.set(1))
                assert (await store.transact(lambda: r.set(r.get() + 1))).t == rep.t + 1
            assert failures and rep.t == 1 and r.get() == 2
            assert any("could not apply its own commits" in rec.getMessage() for rec in caplog.records)

    @pytest.mark.parametrize("taken_up", [True, False], ids=["committed-by-another-peer", "never-taken-up"])
    async def test_a_queued_commit_whose_wait_the_server_cancels_is_looked_up(
        self, pg_dsn: str, taken_up: bool
    ) -> None:
        """A commit queued behind another peer's, whose wait the server cancels (``statement_timeout``),
        is looked up rather than reported as the server's error: taken up and committed by the other peer,
        it succeeds with that t; never taken up, it is fenced and raises "not committed"."""
        async with astm.Store(f"{pg_dsn}?statement_timeout=300") as store:
            r = store.ref("r", 0)
            holder = await asyncpg.connect(pg_dsn)  # another peer, in the middle of its commit call
            watcher = await asyncpg.connect(pg_dsn)
            try:
                tr = holder.transaction()
                await tr.start()
                await holder.execute("SELECT pg_advisory_xact_lock(7272727)")
                outcome: list[Any] = []

                async def commit() -> None:
                    try:
                        outcome.append(await store.transact(lambda: r.set(1)))
                    except astm.AstmError as exc:
                        outcome.append(exc)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(commit)
                    with anyio.fail_after(10):
                        while not await watcher.fetchval("SELECT count(*) FROM astm_pending"):
                            await anyio.sleep(0.02)
                    await anyio.sleep(1.0)  # the queued commit's wait has been cancelled by now
                    if taken_up:
                        await holder.fetchval("SELECT astm_commit_pending('{}'::uuid[])")
                        await tr.commit()
                    else:
                        await tr.rollback()
                logged = await watcher.fetchval("SELECT count(*) FROM astm_log")
                [result] = outcome
                if taken_up:
                    assert isinstance(result, astm.TxReport), result
                    assert logged == 1 and result.t == 1 and r.get() == 1
                else:
                    assert isinstance(result, astm.StorageError) and "not committed" in str(result), result
                    assert not isinstance(result, astm.CommitOutcomeUnknown)
                    assert logged == 0 and r.get() == 0
                    assert await watcher.fetchval("SELECT count(*) FROM astm_pending") == 0
                    assert (await store.transact(lambda: r.set(2))).t == 1
            finally:
                await holder.close()
                await watcher.close()


class TestDeltas:
    async def test_peers_follow_and_reopen_deltas(self, pg_dsn: str) -> None:
        """Helper changes travel as deltas: another peer follows them and a new peer loads value plus deltas."""
        from astm.stores.postgres import MAX_DELTAS

        async with astm.Store(pg_dsn) as a, astm.Store(pg_dsn) as b:
            ledger: astm.Ref[Any] = a.ref("ledger", ())
            await a.atomically(lambda: ledger.set(tuple(range(1000))))
            for i in range(MAX_DELTAS + 10):
                await a.atomically(lambda i: ledger.commute(astm.conj, i), i)
            db = await b.sync(a.t, timeout=10)
            theirs = b.ref("ledger", ())
            await b.load(theirs)
            assert db[theirs] == ledger.get()
        conn = await asyncpg.connect(pg_dsn)
        try:
            deltas = await conn.fetchval("SELECT count(*) FROM astm_ref_deltas WHERE name = 'ledger'")
            sizes = [len(r["changes"]) for r in await conn.fetch("SELECT changes FROM astm_log ORDER BY t")]
        finally:
            await conn.close()
        assert 0 < deltas <= MAX_DELTAS, "the delta chain is bounded by a whole value now and then"
        assert sizes[0] > 3000 and sorted(sizes)[len(sizes) // 2] < 200, "the log carries deltas, not the ledger"
        async with astm.Store(pg_dsn) as c:
            fresh = c.ref("ledger", ())
            await c.load(fresh)  # one query: the whole value at its base and the deltas after it
            assert fresh.get() == (*range(1000), *range(MAX_DELTAS + 10))

    async def test_a_large_value_chains_more_deltas_before_it_is_sent_whole(self, pg_dsn: str) -> None:
        """A 3,200-entry ledger chains 200 deltas (n // 16), not 64, before it is sent whole; reads stay right."""
        from astm.stores.postgres import MAX_DELTAS, _chain_bound

        assert _chain_bound(tuple(range(3200))) == 200 > MAX_DELTAS and _chain_bound(5) == MAX_DELTAS
        async with astm.Store(pg_dsn) as a:
            ledger: astm.Ref[Any] = a.ref("ledger", ())
            await a.atomically(lambda: ledger.set(tuple(range(3200))))
            for i in range(150):
                await a.atomically(lambda i: ledger.commute(astm.conj, i), i)
        conn = await asyncpg.connect(pg_dsn)
        try:
            deltas = await conn.fetchval("SELECT count(*) FROM astm_ref_deltas WHERE name = 'ledger'")
        finally:
            await conn.close()
        assert deltas == 150, "the ledger was sent whole again before its chain reached its bound"
        async with astm.Store(pg_dsn) as c:
            fresh = c.ref("ledger", ())
            await c.load(fresh)
            assert fresh.get() == (*range(3200), *range(150))

    async def test_a_delta_on_the_wrong_version_never_applies(self, pg_dsn: str) -> None:
        """The database refuses a delta whose base is not the ref's version; the commit runs again instead."""
        import uuid

        from astm.stores.postgres import _COMMIT

        async with astm.Store(pg_dsn) as store:
            r: astm.Ref[Any] = store.ref("r", ())
            await store.atomically(lambda: r.set((1,)))
            await store.atomically(lambda: r.alter(astm.conj, 2))
            late = {
                "id": str(uuid.uuid4()), "time": 0.0, "reads": [], "commutes": [],
                "writes": [{"name": "r", "kind": "d", "base": 1, "calls": '[["conj",[3]]]'}],
                "changes": '[["r","d",1,[["conj",[3]]]]]', "outbox": [],
            }  # fmt: skip
            conn = await asyncpg.connect(pg_dsn)
            try:
                [result] = json.loads(await conn.fetchval(_COMMIT, json.dumps([late])))
                assert result["status"] == "conflict" and result["names"] == ["r"]
            finally:
                await conn.close()
            await store.atomically(lambda: r.alter(astm.conj, 3))
            assert r.get() == (1, 2, 3) and store.t == 3

    async def test_a_peer_holding_another_version_reads_the_ref_again(self, pg_dsn: str) -> None:
        """A log row whose delta does not fit the version a peer holds: the peer drops its copy and reads it
        anew (counted, logged) and goes on following; it neither applies the delta nor stops."""
        import uuid

        async with astm.Store(pg_dsn) as a, astm.Store(pg_dsn) as b:
            ra: astm.Ref[Any] = a.ref("r", ())
            await a.atomically(lambda: ra.set((1,)))
            rb: astm.Ref[Any] = b.ref("r", ())
            await b.sync(1, timeout=10)
            await b.load(rb)
            assert rb.get() == (1,)
            conn = await asyncpg.connect(pg_dsn)
            try:  # a row out of line with the refs table: a delta on t=7, which never existed
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO astm_log (t, tx_id, time, changes) VALUES (2, $1, 0, $2)",
                        uuid.uuid4(),
                        '[["r","d",7,[["conj",[2]]]]]',
                    )
                    await conn.execute(
                        "UPDATE astm_refs SET t = 2, base_t = 2, value = $1 WHERE name = 'r'", astm.codec.dumps((1, 9))
                    )
                    await conn.execute("UPDATE astm_meta SET value = '2' WHERE key = 't'")
                    await conn.execute("SELECT pg_notify('astm_commits', '2')")
            finally:
                await conn.close()
            await b.sync(2, timeout=10)
            assert b.stats().reread == 1
            with pytest.raises(astm.RefNotLoaded):
                rb.get()
            assert await b.atomically(rb.get) == (1, 9), "read anew from the refs table, the delta not guessed at"
            await a.atomically(lambda: ra.alter(astm.conj, 3))  # the follower still follows
            await b.sync(3, timeout=10)
            assert rb.get() == (1, 9, 3)


class TestLazyRefs:
    async def test_a_peer_opens_holding_nothing_and_reads_through(self, pg_dsn: str) -> None:
        """Opening reads no ref; a read in a transaction fetches it (a miss, counted) and runs the body again."""
        async with astm.Store(pg_dsn) as writer:
            refs = [writer.ref(f"r{i}", 0) for i in range(500)]
            await writer.atomically(lambda: [r.set(i) for i, r in enumerate(refs)])
        async with astm.Store(pg_dsn) as peer:
            assert peer.stats().cached == 0 and peer.t == 1
            r7 = peer.ref("r7", -1)
            with pytest.raises(astm.RefNotLoaded, match=r"store\.load"):
                r7.get()
            assert await peer.atomically(r7.get) == 7
            stats = peer.stats()
            assert (stats.misses, stats.cached) == (1, 1)
            assert r7.get() == 7  # held now
            others = [peer.ref(f"r{i}", -1) for i in range(10, 20)]
            await peer.load(*others)  # warming: one query for many
            assert [r.get() for r in others] == list(range(10, 20)) and peer.stats().misses == 1
            new = peer.ref("never-stored", "initial")
            assert await peer.atomically(new.get) == "initial"

    async def test_a_ref_fetched_while_another_peer_commits_to_it(self, pg_dsn: str) -> None:
        """A peer loading a ref under a stream of commits to it sees a consistent prefix, then follows exactly."""
        async with astm.Store(pg_dsn) as a, astm.Store(pg_dsn) as b:
            log_a: astm.Ref[Any] = a.ref("log", ())
            await a.atomically(lambda: log_a.set((0,)))
            done = False
            seen: list[tuple[int, ...]] = []

            async def append() -> None:
                for i in range(1, 150):
                    await a.atomically(lambda i: log_a.commute(astm.conj, i), i)
                nonlocal done
                done = True

            async def read() -> None:
                while not done:
                    fresh = astm.Store(pg_dsn)  # a new peer each time: the fetch races the commits
                    async with fresh:
                        r: astm.Ref[Any] = fresh.ref("log", ())
                        seen.append(await fresh.atomically(r.get))
                        await anyio.sleep(0)
                        seen.append(await fresh.atomically(r.get))

            async with anyio.create_task_group() as tg:
                tg.start_soon(append)
                tg.start_soon(read)
            lb: astm.Ref[Any] = b.ref("log", ())
            await b.load(lb)
            final = log_a.get()
            assert final == tuple(range(150))
            assert seen and all(v == final[: len(v)] for v in seen), "a read is not a prefix of the history"
            assert (await b.sync(a.t, timeout=10))[lb] == final

    async def test_eviction_bounds_the_cache_and_refetches_fresh(self, pg_dsn: str) -> None:
        """Past cache_refs the least recently used refs are dropped; an evicted ref is read fresh, not stale."""
        async with astm.Store(pg_dsn) as writer, astm.Store(pg_dsn, cache_refs=10) as peer:
            refs = [writer.ref(f"k{i}", 0) for i in range(40)]
            await writer.atomically(lambda: [r.set(1) for r in refs])
            mine = [peer.ref(f"k{i}", 0) for i in range(40)]
            await peer.sync(writer.t)
            for r in mine:
                assert await peer.atomically(r.get) == 1
            stats = peer.stats()
            assert stats.cached <= 10 and stats.evicted >= 30
            with pytest.raises(astm.RefNotLoaded):
                mine[0].get()  # evicted
            await writer.atomically(lambda: refs[0].set(2))  # changed while this peer did not hold it
            await peer.sync(writer.t)
            assert await peer.atomically(mine[0].get) == 2
            await peer.atomically(lambda: mine[0].alter(lambda v: v + 1))
            assert (await writer.sync(peer.t))[refs[0]] == 3


class TestFollowing:
    async def test_a_silently_deaf_listener_is_replaced(self, pg_dsn: str) -> None:
        """Notifications that stop while the connection looks open are noticed; sync(t) never waits on them."""
        from astm.stores.postgres import CHANNEL

        async with astm.Store(pg_dsn) as a, astm.Store(pg_dsn) as b:
            ra, rb = a.ref("r", 0), b.ref("r", 0)
            await b.load(rb)
            peer = b._peer
            assert peer is not None and peer._listener is not None
            await peer._listener.remove_listener(CHANNEL, peer._notified)  # deaf, and still open
            for i in range(1, 4):
                rep = await a.transact(lambda i: ra.set(i), i)
                assert (await b.sync(rep.t, timeout=5))[rb] == i  # sync fetches by itself
            with anyio.fail_after(10):
                while peer.silent_losses == 0:
                    await a.atomically(lambda: ra.alter(lambda v: v + 1))
                    await anyio.sleep(0.3)
            before = peer._listener
            with anyio.fail_after(10):
                while peer._listener is None or peer._listener is before:
                    await anyio.sleep(0.05)
            rep = await a.transact(lambda: ra.set(100))
            assert (await b.sync(rep.t, timeout=5))[rb] == 100

    async def test_followers_apply_the_rows_notifications_carry(
        self, pg_dsn: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Another peer's commits arrive with their log rows in the notification: a follower applies them, in
        order and none skipped, without reading the log; a value too large for a notification, or a
        notification that went missing, is read from the log instead."""
        from astm.stores.postgres import CHANNEL

        async with astm.Store(pg_dsn) as a, astm.Store(pg_dsn) as b:
            ra, rb = a.ref("pushed", cast(Any, 0)), b.ref("pushed", cast(Any, 0))
            await b.load(rb)
            peer = b._peer
            assert peer is not None
            seen: list[int] = []
            rb.add_watch("w", lambda key, ref, old, new: seen.append(new))
            reads, applied = b.stats().log_reads, b.stats().announced
            for i in range(1, 31):
                await a.atomically(lambda i: ra.set(i), i)
            with anyio.fail_after(10):
                while rb.get() != 30:  # the follower alone: no sync(t), which may read the log itself
                    await anyio.sleep(0.01)
            assert seen == list(range(1, 31)), "every commit applied once, in order"
            stats = b.stats()
            assert stats.announced > applied
            assert stats.log_reads - reads < 10, f"{stats.log_reads - reads} log reads for 30 announced commits"

            big = "x" * 9000  # more than a notification carries
            reads = b.stats().log_reads
            await a.atomically(lambda: ra.set(big))
            with anyio.fail_after(10):
                while rb.get() != big:
                    await anyio.sleep(0.01)
            assert b.stats().log_reads > reads

            # a notification lost on the way (not listening while -1 commits): the rows of the next one do not
            # follow on, so the log fills the gap
            listener = peer._listener
            assert listener is not None
            await listener.remove_listener(CHANNEL, peer._notified)
            await a.atomically(lambda: ra.set(-1))
            await listener.add_listener(CHANNEL, peer._notified)
            await a.atomically(lambda: ra.set(-2))
            with anyio.fail_after(10):
                while rb.get() != -2:
                    await anyio.sleep(0.01)
            assert seen[-2:] == [-1, -2], "the commit whose notification was lost is applied, before the next"
            peer._notified(None, 0, CHANNEL, f"{b.t + 1} [[{b.t + 1}, no json")  # garbled: the log serves instead
            await a.atomically(lambda: ra.set(-3))
            with anyio.fail_after(10):
                while rb.get() != -3:
                    await anyio.sleep(0.01)
            assert seen[-3:] == [-1, -2, -3]
            warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(warned) == 1 and warned[0].startswith("astm peer: a notification's rows could not be read")
            caplog.clear()
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "no error on the way"

    async def test_a_follower_keeping_up_applies_notifications_as_they_arrive(
        self, pg_dsn: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A peer whose basis is the notification's first row applies its rows at once, in the callback,
        without waking its follower task (which cost twice the CPU per followed commit); every commit once
        and in order. A notification it cannot read is left to the follower, which reads the log."""
        from astm.stores.postgres import CHANNEL

        async with astm.Store(pg_dsn) as a, astm.Store(pg_dsn) as b:
            ra, rb = a.ref("kept-up", 0), b.ref("kept-up", 0)
            await b.load(rb)
            peer = b._peer
            assert peer is not None
            woken = 0
            apply_announced = peer._apply_announced

            async def counted() -> bool:
                nonlocal woken
                woken += 1
                return await apply_announced()

            peer._apply_announced = counted  # type: ignore[method-assign]
            ts = []
            for i in range(1, 31):
                ts.append((await a.transact(lambda i: ra.set(i), i)).t)
            with anyio.fail_after(10):
                while rb.get() != 30:  # the follower alone: no sync(t), which may read the log itself
                    await anyio.sleep(0.01)
            assert [b.as_of(t)[rb] for t in ts] == list(range(1, 31)), "every commit applied once, in order"
            assert woken <= 5, f"the follower task woke {woken} times for 30 commits"

            peer._notified(None, 0, CHANNEL, f"{b.t + 1} [[{b.t + 1}, no json")  # garbled: the log serves instead
            await a.atomically(lambda: ra.set(-1))
            with anyio.fail_after(10):
                while rb.get() != -1:
                    await anyio.sleep(0.01)
            warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(warned) == 1 and warned[0].startswith("astm peer: a notification's rows could not be read")

    async def test_a_lost_server_is_logged_once_not_at_every_attempt(
        self, pg_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """While the server is lost the follower retries every fraction of a second, but says so in one line
        (then at most once per LOST_LOG_SECONDS, with a count), and once more when it reaches it again."""
        from astm.stores import postgres

        async with astm.Store(pg_dsn) as store:
            peer = store._peer
            assert peer is not None
            real = peer.catch_up
            failing = [True]

            async def catch_up(upto: int | None = None) -> None:
                if failing[0]:
                    raise ConnectionRefusedError(111, "Connect call failed")
                await real(upto)

            monkeypatch.setattr(peer, "catch_up", catch_up)
            monkeypatch.setattr(postgres, "POLL_SECONDS", 0.02)
            with caplog.at_level(logging.WARNING, logger="astm"):
                await anyio.sleep(1.5)
                failing[0] = False
                await anyio.sleep(0.5)
            lines = [r.getMessage() for r in caplog.records]
            assert sum("lost PostgreSQL" in line for line in lines) == 1, lines
            assert sum("reached PostgreSQL again" in line for line in lines) == 1, lines

    async def test_without_listen_the_peer_polls(self, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Where LISTEN is refused (a pooler in transaction mode), a peer still follows, by polling."""

        async def refuse(self: Any, channel: str, callback: Any) -> None:
            raise asyncpg.FeatureNotSupportedError("LISTEN is not supported here")

        async with astm.Store(pg_dsn) as a:
            monkeypatch.setattr(asyncpg.Connection, "add_listener", refuse)
            async with astm.Store(pg_dsn) as b:
                assert b._peer is not None and not b._peer._can_listen
                rb = b.ref("r", 0)
                await b.load(rb)
                ra = a.ref("r", 0)
                await a.atomically(lambda: ra.set(7))
                with anyio.fail_after(5):
                    while rb.get() != 7:  # no sync(t): the follower finds it alone
                        await anyio.sleep(0.02)

    async def test_a_peer_behind_the_trimmed_log_starts_again(
        self, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The log is trimmed past retention; a peer further behind re-reads its refs and loses only history."""
        from astm.stores import postgres

        monkeypatch.setattr(postgres, "LOG_KEEP_MIN", 5)
        monkeypatch.setattr(postgres, "LOG_KEEP_SECONDS", 0.0)
        async with astm.Store(pg_dsn, history=5) as a, astm.Store(pg_dsn, history=5) as b:
            ra, rb = a.ref("r", 0), b.ref("r", 0)
            await b.load(rb)
            start = b.t
            assert b._peer is not None and a._peer is not None
            async with b._peer._catching_up:  # b stops following for a while
                for i in range(1, 40):
                    await a.atomically(lambda i: ra.set(i), i)
                await a._peer._trim()
                conn = await asyncpg.connect(pg_dsn)
                try:
                    oldest = await conn.fetchval("SELECT min(t) FROM astm_log")
                finally:
                    await conn.close()
                assert oldest > start + 1, "the log was not trimmed past b"
            await b.sync(a.t, timeout=10)
            assert await b.atomically(rb.get) == 39
            with pytest.raises(astm.HistoryUnavailable):
                async for _ in b.reports(since=start):
                    pass


class TestProcesses:
    async def test_read_your_writes_across_processes(self, pg_dsn: str) -> None:
        """A t committed by another process is readable here after sync(t)."""
        code = (
            "import sys, anyio, astm\n"
            "async def main():\n"
            "    async with astm.Store(sys.argv[1]) as s:\n"
            "        r = s.ref('note', '')\n"
            "        print((await s.transact(lambda: r.set('from the other process'))).t, flush=True)\n"
            "anyio.run(main)\n"
        )
        async with astm.Store(pg_dsn) as store:
            note = store.ref("note", "")
            result = await anyio.run_process([sys.executable, "-c", code, pg_dsn])
            t = int(result.stdout.split()[-1])
            db = await store.sync(t, timeout=10)
            await store.load(note)
            assert db.t >= t and db[note] == "from the other process"

    def test_four_processes_keep_the_total(self, pg_dsn: str) -> None:
        """4 peer processes doing concurrent transfers keep the total; every acknowledged t is in the log."""
        children = [
            subprocess.Popen([sys.executable, str(CHILD), pg_dsn, str(seed), "60"], stdout=subprocess.PIPE, text=True)
            for seed in range(4)
        ]
        acked: list[int] = []
        for c in children:
            out, _ = c.communicate(timeout=120)
            assert c.returncode == 0
            acked += [int(x) for x in out.split()]
        assert len(acked) == 4 * 60 and len(set(acked)) == len(acked)
        rows = anyio.run(_log_rows, pg_dsn)
        assert [t for t, _ in rows] == list(range(1, len(rows) + 1))
        assert set(acked) <= {t for t, _ in rows}
        self._check_total(pg_dsn)

    def test_sigkill_mid_commit_leaves_no_half_commit(self, pg_dsn: str) -> None:
        """Peers killed with SIGKILL at random moments leave every commit whole and the total intact."""
        rng = random.Random(4)
        acked: list[int] = []
        for i in range(6):
            child = subprocess.Popen(
                [sys.executable, str(CHILD), pg_dsn, str(i), "0"], stdout=subprocess.PIPE, text=True
            )
            assert child.stdout is not None
            first = child.stdout.readline()
            assert first
            time.sleep(rng.uniform(0.05, 0.4))
            child.send_signal(signal.SIGKILL)
            rest, _ = child.communicate(timeout=30)
            acked += [int(x) for x in [first, *rest.split()] if str(x).strip()]
        rows = anyio.run(_log_rows, pg_dsn)
        for t, changes in rows:
            assert len(changes) == 2, f"t={t} is not a whole transfer"
        assert set(acked) <= {t for t, _ in rows}
        self._check_total(pg_dsn)

    def _check_total(self, dsn: str) -> None:
        async def total() -> int:
            async with astm.Store(dsn) as s:
                accounts = [s.ref(f"acct-{i}", START) for i in range(ACCOUNTS)]
                await s.load(*accounts)
                return sum(a.get() for a in accounts)

        assert anyio.run(total) == START * ACCOUNTS


class TestServerRestart:
    async def test_restart_under_load(self, pg_dsn: str) -> None:
        """PostgreSQL restarted under load: clear errors, the peer reconnects, nothing acknowledged is lost."""
        data = os.environ.get("ASTM_TEST_PG_DATA")
        if not data:
            pytest.skip("needs the throwaway cluster (not ASTM_TEST_POSTGRES_DSN) to restart the server")
        from astm.testing import Cluster

        acked: list[int] = []
        errors: list[str] = []
        async with astm.Store(pg_dsn) as store:
            accounts = [store.ref(f"acct-{i}", START) for i in range(ACCOUNTS)]

            def transfer(a: astm.Ref[int], b: astm.Ref[int]) -> None:
                a.alter(lambda v: v - 1)
                b.alter(lambda v: v + 1)

            stop = False

            async def client(seed: int) -> None:
                rng = random.Random(seed)
                while not stop:
                    x, y = rng.sample(accounts, 2)
                    try:
                        acked.append((await store.transact(transfer, x, y)).t)
                    except astm.StorageError as exc:  # the only error a lost server may cause
                        errors.append(str(exc))
                        await anyio.sleep(0.05)

            cluster = Cluster.existing(Path(data), int(pg_dsn.rsplit(":", 1)[1].split("/")[0]))
            async with anyio.create_task_group() as tg:
                for seed in range(4):
                    tg.start_soon(client, seed)
                await anyio.sleep(0.5)
                await anyio.to_thread.run_sync(lambda: cluster.stop("fast"))
                await anyio.sleep(1.5)
                await anyio.to_thread.run_sync(cluster.start)
                before = len(acked)
                await anyio.sleep(2)
                stop = True
            # a commit in flight is resolved through the log, others wait for the server: any error
            # a client saw is a clear StorageError (anything else would have failed the task group)
            assert all("not committed" in e or "unknown" in e for e in errors), errors[:3]
            assert store._peer is not None and store._peer.reconnects >= 1, "the outage went unnoticed"
            assert len(acked) > before, "the peer did not reconnect"
        log_ts = {t for t, _ in await _log_rows(pg_dsn)}
        assert set(acked) <= log_ts
        async with astm.Store(pg_dsn) as s:
            accounts = [s.ref(f"acct-{i}", START) for i in range(ACCOUNTS)]
            await s.load(*accounts)
            assert sum(a.get() for a in accounts) == START * ACCOUNTS

    async def test_an_outbox_delivery_across_a_restart_is_delivered_again(
        self, pg_dsn: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The server lost while a handler runs: the outcome cannot be recorded, nothing crashes, the outbox's
        reads raise a StorageError meanwhile, and once the claim ends the entry is delivered again."""
        data = os.environ.get("ASTM_TEST_PG_DATA")
        if not data:
            pytest.skip("needs the throwaway cluster (not ASTM_TEST_POSTGRES_DSN) to restart the server")
        from astm.testing import Cluster

        cluster = Cluster.existing(Path(data), int(pg_dsn.rsplit(":", 1)[1].split("/")[0]))
        calls: list[Key] = []
        entered, release = anyio.Event(), anyio.Event()
        async with astm.Store(pg_dsn) as store:

            @store.effect("restart-mail", backoff=0.01, max_attempts=30)
            async def mail(payload: str, *, key: Key) -> None:
                calls.append(key)
                if len(calls) == 1:
                    entered.set()
                    await release.wait()

            n = store.ref("restart-outbox", 0)

            def body() -> None:
                n.alter(lambda v: v + 1)
                mail.enqueue("hello")

            await store.atomically(body)
            with anyio.fail_after(10):
                await entered.wait()
            await anyio.to_thread.run_sync(lambda: cluster.stop("fast"))
            try:
                with pytest.raises(astm.StorageError, match="lost while counting the pending outbox entries"):
                    await store.outbox.pending_count()
                with pytest.raises(astm.StorageError, match="lost while reading the outbox's dead letters"):
                    await store.outbox.dead_letters()
                with caplog.at_level("WARNING", logger="astm"):
                    release.set()  # the delivery ends while the server is down: done() cannot be recorded
                    with anyio.fail_after(10):
                        while not any("delivered again" in r.getMessage() for r in caplog.records):
                            await anyio.sleep(0.02)
            finally:
                await anyio.to_thread.run_sync(cluster.start)
            conn = await asyncpg.connect(pg_dsn)
            try:  # end the claim now, as its expiry would
                await conn.execute("UPDATE astm_outbox SET locked_until = now() WHERE locked_until > now()")
            finally:
                await conn.close()
            with anyio.fail_after(30):
                await store.outbox.drain()
            assert calls == [calls[0], calls[0]], "delivered again under the same key, once"
            assert await store.outbox.pending_count() == 0
            assert await store.outbox.dead_letters() == []


class TestSeatService:
    def test_four_workers_share_the_seats(self, pg_dsn: str, tmp_path: Path) -> None:
        """The seat service under uvicorn --workers 4 on PostgreSQL: the load driver's checks pass."""
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        root = Path(__file__).resolve().parent.parent
        mail = tmp_path / "mail.log"
        server = subprocess.Popen(
            [sys.executable, "-m", "examples.seats", "--store", pg_dsn, "--workers", "4",
             "--mail-log", str(mail), "--port", str(port)],
            cwd=root,
        )  # fmt: skip
        try:
            out = subprocess.run(
                [sys.executable, "-m", "examples.seats.load", "--clients", "40", "--seconds", "4",
                 "--url", f"http://127.0.0.1:{port}", "--mail-log", str(mail)],
                cwd=root, capture_output=True, text=True, timeout=180,
            )  # fmt: skip
        finally:
            server.terminate()
            server.wait(30)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "checks passed" in out.stdout
