"""The PostgreSQL store with a read replica: a real hot standby of the test cluster (streaming replication).

The replica serves opens, cache misses and the following of the log; commits
go to the primary. What is checked here: a peer with a replica works and
actually reads the replica; a replica that lags (its replay paused) never
makes a read staler than the peer's basis; a stopped replica stops nothing;
and peers on a replica still pass the list-append checker.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import anyio.to_thread
import asyncpg
import pytest

import astm
from astm.stores import postgres
from astm.testing import Standby

from . import test_store_postgres as base
from .elle import REALTIME
from .listappend import History, Workload, final_state, run_workload, scaled
from .test_listappend import DEADLINE, verify


def _append(r: astm.Ref[tuple[int, ...]], x: int) -> None:
    r.alter(lambda v: (*v, x))


def _peer(store: astm.Store) -> postgres.PostgresStorage:
    assert store._peer is not None
    return store._peer


async def _replica_t(replica: str) -> int:
    conn = await asyncpg.connect(replica)
    try:
        return int(await conn.fetchval("SELECT value FROM astm_meta WHERE key = 't'"))
    finally:
        await conn.close()


def test_replica_is_for_postgresql_only() -> None:
    """replica= takes a postgresql:// URL, and only on a PostgreSQL store: a clear ValueError otherwise."""
    with pytest.raises(ValueError, match="PostgreSQL store only"):
        astm.Store(replica="postgresql://localhost/x")
    with pytest.raises(ValueError, match="PostgreSQL store only"):
        astm.Store("sqlite:///never-created.db", replica="postgresql://localhost/x")
    with pytest.raises(ValueError, match="replica="):
        astm.Store("postgresql://localhost/x", replica="sqlite:///x.db")
    assert astm.Store("postgresql://localhost/x", replica="postgresql://other/x")._peer is not None


async def test_peer_on_a_replica_opens_reads_commits_and_follows(pg_dsn: str, pg_replica: str) -> None:
    """A peer with a replica opens at its basis, reads refs there, commits on the primary and follows another peer."""
    async with astm.Store(pg_dsn) as w:
        empty: tuple[int, ...] = ()
        wa, wb = w.ref("a", 0), w.ref("b", empty)
        await w.atomically(lambda: (wa.set(1), wb.set((1,))))
        async with astm.Store(pg_dsn, replica=pg_replica) as p:
            peer = _peer(p)
            assert peer.replica_reads >= 1  # the open read its basis on the replica
            pa, pb = p.ref("a", 0), p.ref("b", empty)
            await p.sync(w.t, timeout=5)
            assert await p.atomically(lambda: (pa.get(), pb.get())) == (1, (1,))
            rep = await p.transact(lambda: pa.alter(lambda v: v + 1))
            assert pa.get() == 2 and p.t == rep.t  # read your own writes, at once
            assert (await w.sync(rep.t, timeout=5))[wa] == 2
            for i in range(2, 12):  # the other peer's commits, followed through the log
                last = await w.transact(_append, wb, i)
            db = await p.sync(last.t, timeout=5)
            assert db[pb] == tuple(range(1, 12)) and pb.get() == db[pb]
            await p.load(p.ref("never-written", "initial"))
            assert p.ref("never-written", "initial").get() == "initial"
            assert peer.replica_reads >= 3, "the replica served no read after the open"
            assert peer.replica_failures == 0
            stats = p.stats()
            assert (stats.replica_reads, stats.replica_fallbacks) == (peer.replica_reads, peer.replica_fallbacks)
        assert w.stats().replica_reads == 0  # no replica=


async def test_a_lagging_replica_never_gives_a_stale_read(pg_dsn: str, pg_replica: str, pg_standby: Standby) -> None:
    """With the replica's replay paused, the peer's reads at its basis show every commit up to it.

    The peer follows the primary's commits (the replica lacks them), so its
    basis runs ahead of the replica; refs it then reads for the first time
    must show their newest version up to that basis, in a read-only
    transaction and in ``store.db()``, never the older version the replica
    still holds. A ref no commit wrote since the replica's ``t`` is still
    read there: its version is the newest at the basis too.
    """
    names = ["x", "y", "z", "u"]
    async with astm.Store(pg_dsn) as w:
        refs = {n: w.ref(n, 0) for n in names}
        wv = w.ref("v", 0)
        first = await w.transact(lambda: [r.set(1) for r in [*refs.values(), wv]])
        await anyio.to_thread.run_sync(pg_standby.wait_caught_up)
        async with astm.Store(pg_dsn, replica=pg_replica) as p:
            await anyio.to_thread.run_sync(pg_standby.pause)
            try:
                second = await w.transact(lambda: [r.set(2) for r in refs.values()])
                # a peer opening now reads the replica's basis, but catches up with the primary's before
                # its open returns: it never opens behind a commit acknowledged before
                async with astm.Store(pg_dsn, replica=pg_replica) as late:
                    assert late.t >= second.t
                    lx = late.ref("x", 0)
                    assert await late.atomically(lx.get) == 2
                # the peer learns of the second commit (notification, sync) and reads it from the primary
                db = await p.sync(second.t, timeout=5)
                assert db.t >= second.t > await _replica_t(pg_replica) == first.t
                px, py, pz, pu = (p.ref(n, 0) for n in names)
                seen = {}
                # read-only transactions: the miss is fetched, and the body runs again
                seen["transaction x"] = await p.atomically(px.get)
                seen["transaction z"] = (await p.transact(pz.get)).result
                # store.db() once the ref is loaded, and a db value taken before the load
                await p.load(py)
                seen["store.db() y"], seen["earlier db y"], seen["get() y"] = p.db()[py], db[py], py.get()
                # more commits while the replica still lags: followed, and read, through the primary
                third = await w.transact(lambda: [r.set(3) for r in refs.values()])
                seen["sync x"] = (await p.sync(third.t, timeout=5))[px] - 1
                await p.load(pu)
                seen["store.db() u"] = p.db()[pu] - 1
                assert seen == dict.fromkeys(seen, 2), "a read older than the peer's basis"
                assert _peer(p).replica_fallbacks >= 3
                # v: written before the replica's t only, so the lagging replica serves it
                served, fallbacks = _peer(p).replica_reads, _peer(p).replica_fallbacks
                pv = p.ref("v", 0)
                assert await p.atomically(pv.get) == 1
                assert _peer(p).replica_reads > served and _peer(p).replica_fallbacks == fallbacks
                assert await _replica_t(pg_replica) == first.t, "the replica did not lag throughout"
            finally:
                await anyio.to_thread.run_sync(pg_standby.resume)
            # caught up again, the replica serves the peer once more
            await anyio.to_thread.run_sync(pg_standby.wait_caught_up)
            served = _peer(p).replica_reads
            await p.load(p.ref("fresh", 0))
            assert _peer(p).replica_reads > served


async def test_a_stopped_replica_stops_nothing(
    pg_dsn: str, pg_replica: str, pg_standby: Standby, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the replica down, commits, reads, following and even opening go on through the primary, warning rarely."""
    monkeypatch.setattr(postgres, "REPLICA_RETRY_SECONDS", 0.3)
    monkeypatch.setattr(postgres, "REPLICA_RETRY_MAX_SECONDS", 1.0)
    caplog.set_level(logging.WARNING, "astm")
    async with astm.Store(pg_dsn) as w, astm.Store(pg_dsn, replica=pg_replica) as p:
        wn = w.ref("n", 0)
        await w.atomically(lambda: wn.set(1))
        pn = p.ref("n", 0)
        await p.sync(w.t, timeout=5)
        assert await p.atomically(pn.get) == 1
        await anyio.to_thread.run_sync(pg_standby.stop)
        try:
            for i in range(20):
                await p.atomically(lambda: pn.alter(lambda v: v + 1))
                rep = await w.transact(lambda: wn.alter(lambda v: v + 1))
                assert (await p.sync(rep.t, timeout=5))[pn] == 2 * i + 3
                cold = p.ref(f"cold-{i}", i)
                assert await p.atomically(cold.get) == i
                await anyio.sleep(0.05)
            async with astm.Store(pg_dsn, replica=pg_replica) as late:
                ln = late.ref("n", 0)
                assert await late.atomically(ln.get) == 41
            assert _peer(p).replica_failures >= 2  # tried again after REPLICA_RETRY_SECONDS, and failed again
            warnings = [r for r in caplog.records if "replica" in r.getMessage()]
            assert 1 <= len(warnings) <= 3, [r.getMessage() for r in warnings]  # one per peer and 10 s
        finally:
            await anyio.to_thread.run_sync(pg_standby.start)
        await anyio.to_thread.run_sync(pg_standby.wait_caught_up)
        served = _peer(p).replica_reads
        with anyio.fail_after(10):
            while _peer(p).replica_reads == served:  # back in use once it answers again
                await anyio.sleep(0.1)
                await p.load(p.ref(f"later-{anyio.current_time()}", 0))


async def test_listappend_peers_on_a_replica(pg_dsn: str, pg_replica: str) -> None:
    """Three peers, two of them reading a replica: serializable, and strict serializable within each peer."""
    w = Workload(txns=scaled(600), cancel_p=0.1, seed=47)
    hist = History()
    with anyio.fail_after(DEADLINE):
        async with (
            astm.Store(pg_dsn) as a,
            astm.Store(pg_dsn, replica=pg_replica) as b,
            astm.Store(pg_dsn, replica=pg_replica, cache_refs=8) as c,  # evicts: many misses read the replica
        ):
            await run_workload(a, w, hist, "pg", stores=[a, b, c])
            await a.sync(max(p.t for p in (a, b, c)), timeout=10)
            await a.load(*[a.ref(name, ()) for name in hist.keys])
            final = final_state(a, hist)
            assert _peer(b).replica_reads > 0 and _peer(c).replica_reads > 0
    verify(hist, final, realtime="process")
    verify(hist, final, allow=REALTIME)


class TestConformanceOnAReplica(base.TestPostgresStore):
    """The conformance suite, every peer reading a replica."""

    @pytest.fixture(autouse=True)
    def _replica(self, pg_replica: str) -> None:
        self.replica = pg_replica

    def make_store(self, **options: Any) -> astm.Store:
        return astm.Store(self.dsn, replica=self.replica, **options)

    def reopen(self, store: astm.Store, **options: Any) -> astm.Store:
        return astm.Store(self.dsn, replica=self.replica, **options)


async def test_a_replica_of_another_database_is_refused(
    pg_dsn: str, pg_replica: str, astm_postgres_cluster: str, pg_standby: Standby
) -> None:
    """A "replica" ahead of the primary (a standby of another database) fails the open with a clear error."""
    async with astm.Store(pg_dsn) as w:
        r = w.ref("r", 0)
        for i in range(3):
            await w.atomically(r.set, i)
    await anyio.to_thread.run_sync(pg_standby.wait_caught_up)
    conn = await asyncpg.connect(astm_postgres_cluster)
    try:
        await conn.execute('CREATE DATABASE "t_replica_other"')
    finally:
        await conn.close()
    other = pg_dsn.rsplit("/", 1)[0] + "/t_replica_other"
    async with astm.Store(other):
        pass  # its schema, at t=0
    with pytest.raises(astm.StorageError, match="not a replica of this database"):
        await astm.Store(other, replica=pg_replica).open()
