"""The SQLite store: the conformance suite, restarts, the codec, locking, bad files, the CLI."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import sqlite3
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest
from pyrsistent import pmap, pset, pvector

import astm

from .conformance import DurableStoreConformance
from .test_codec import Money, Seat

Key = tuple[int, int]


class TestSqliteStore(DurableStoreConformance):
    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path: Path) -> None:
        self.path = tmp_path / "state.db"

    def make_store(self, **options: Any) -> astm.Store:
        return astm.Store(f"sqlite:///{self.path}", **options)

    def reopen(self, store: astm.Store, **options: Any) -> astm.Store:
        return astm.Store(store.url, **options)


class TestRestart:
    async def test_everything_comes_back(self, tmp_path: Path) -> None:
        """Refs of every supported type, t, the log (as_of, reports since) and undelivered entries survive."""
        url = f"sqlite:///{tmp_path / 's.db'}"
        value = pmap({"when": dt.datetime(2026, 1, 2, 3, 4, 5), "seats": pvector([Seat("B", 1)]), "cash": Money(5)})
        store = astm.Store(url)
        async with store:
            r = store.ref("r", value)
            n = store.ref("n", 0)

            @store.effect("later", max_attempts=1)
            async def later(payload: Any, *, key: Key) -> None:
                raise ConnectionError("not now")

            for i in range(1, 4):
                await store.atomically(lambda i: n.set(i), i)

            def pay() -> None:
                r.alter(lambda m: m.set("cash", Money(9)))
                later.enqueue("p")

            await store.atomically(pay)
            await store.outbox.drain()
            assert len(await store.outbox.dead_letters()) == 1
        delivered: list[tuple[Any, Key]] = []
        again = astm.Store(url)

        @again.effect("later")
        async def later2(payload: Any, *, key: Key) -> None:
            delivered.append((payload, key))

        async with again:
            r2: astm.Ref[Any] = again.ref("r", pmap())
            n2 = again.ref("n", -1)
            assert again.t == 4 and n2.get() == 3
            assert r2.get() == value.set("cash", Money(9))
            assert again.as_of(2)[n2] == 2 and again.as_of(0)[n2] == 0
            ts = []
            async for rep in again.reports(since=1):
                ts.append(rep.t)
                if rep.t == 4:
                    break
            assert ts == [2, 3, 4]
            [dead] = await again.outbox.dead_letters()
            assert dead.key == (4, 0) and "not now" in str(dead.error)
            (await again.outbox.requeue_letters())
            await again.outbox.drain()
            assert delivered == [("p", (4, 0))]
            await again.atomically(lambda: n2.set(10))
        async with astm.Store(url) as third:
            assert (
                third.t == 5 and (await third.outbox.pending_count()) == 0 and (await third.outbox.dead_letters()) == []
            )

    async def test_pending_entries_resume_after_restart(self, tmp_path: Path) -> None:
        """An entry committed but not delivered before close is delivered by the next process."""
        url = f"sqlite:///{tmp_path / 's.db'}"
        store = astm.Store(url)
        gate = anyio.Event()

        @store.effect("slow")
        async def slow(payload: Any, *, key: Key) -> None:
            await gate.wait()

        async with store:
            await store.atomically(lambda: slow.enqueue("x"))
            await store.aclose(timeout=0.01)  # the delivery is stuck: close anyway
        got: list[Key] = []
        again = astm.Store(url)

        @again.effect("slow")
        async def fast(payload: Any, *, key: Key) -> None:
            got.append(key)

        async with again:
            await again.outbox.drain()
        assert got == [(1, 0)]

    async def test_async_durability(self, tmp_path: Path) -> None:
        """durability='async' acknowledges at once; the commit is on disk after close."""
        url = f"sqlite:///{tmp_path / 's.db'}"
        async with astm.Store(url, durability="async") as store:
            r = store.ref("r", 0)
            for i in range(50):
                await store.atomically(lambda i: r.set(i), i)
        async with astm.Store(url) as again:
            assert again.ref("r", -1).get() == 49 and again.t == 50

    async def test_log_is_compacted(self, tmp_path: Path) -> None:
        """The log on disk keeps about `history` commits, not all of them."""
        path = tmp_path / "s.db"
        async with astm.Store(f"sqlite:///{path}", history=50, durability="async") as store:
            r = store.ref("r", 0)
            for i in range(2500):
                await store.atomically(lambda i: r.set(i), i)
        rows = sqlite3.connect(path).execute("SELECT COUNT(*) FROM log").fetchone()[0]
        assert rows < 1200


HOLD = "import astm, time; astm.Store('sqlite:///{path}'); print('ready', flush=True); time.sleep(60)"


class TestFiles:
    def test_second_process_is_refused_naming_the_holder(self, tmp_path: Path) -> None:
        """Opening a store held by another process fails at once with that process's id."""
        path = tmp_path / "s.db"
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD.format(path=path)],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
            with pytest.raises(astm.StorageError, match=f"another process \\(pid {holder.pid}\\)"):
                astm.Store(f"sqlite:///{path}")
        finally:
            holder.kill()
            holder.wait()
            assert holder.stdout is not None
            holder.stdout.close()
        anyio.run(astm.Store(f"sqlite:///{path}").aclose)  # free again once the holder is gone

    @pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign", "newer"])
    def test_bad_files_are_refused_unchanged(self, tmp_path: Path, damage: str) -> None:
        """Not-a-database, truncated, non-astm and newer-schema files give a clear error and are not modified."""
        path = tmp_path / "s.db"
        if damage == "garbage":
            path.write_bytes(b"this is not a database at all" * 100)
        elif damage in ("truncated", "newer"):

            async def make() -> None:
                async with astm.Store(f"sqlite:///{path}") as s:
                    r = s.ref("r", "x" * 5000)
                    for i in range(40):
                        await s.atomically(lambda i: r.set(str(i) * 3000), i)

            anyio.run(make)
            conn = sqlite3.connect(path)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if damage == "newer":
                conn.execute("UPDATE astm_meta SET value = '99' WHERE key = 'schema_version'")
                conn.commit()
            conn.close()
            if damage == "truncated":
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
        else:
            conn = sqlite3.connect(path)
            conn.execute("CREATE TABLE customers (id INTEGER)")
            conn.commit()
            conn.close()
        before = hashlib.sha256(path.read_bytes()).hexdigest()
        expected = {
            "garbage": "not a readable",
            "truncated": "corrupt|not a readable|damaged",
            "foreign": "not an astm store",
            "newer": "schema version 99",
        }
        with pytest.raises(astm.StorageError, match=expected[damage]):
            astm.Store(f"sqlite:///{path}")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before

    def test_unknown_url(self) -> None:
        """An unknown URL scheme is refused with the supported forms."""
        with pytest.raises(ValueError, match="sqlite:///"):
            astm.Store("redis://localhost")


class TestCli:
    def test_inspect_and_dump(self, tmp_path: Path) -> None:
        """inspect prints basis t, refs, log range and outbox counts; dump prints refs as JSON lines."""
        path = tmp_path / "s.db"

        async def make() -> None:
            async with astm.Store(f"sqlite:///{path}") as s:
                seats = s.ref("seats", pmap({"A1": "free"}))
                cash = s.ref("cash", Decimal("10.50"))
                await s.atomically(lambda: (seats.alter(lambda m: m.set("A1", "ann")), cash.set(Decimal("12.00"))))

        anyio.run(make)
        out = subprocess.run([sys.executable, "-m", "astm", "inspect", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "basis t     1" in out.stdout and "refs        2" in out.stdout and "0 pending, 0 dead" in out.stdout
        out = subprocess.run([sys.executable, "-m", "astm", "dump", str(path)], capture_output=True, text=True)
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        assert rows == [
            {"ref": "cash", "t": 1, "value": "12.00"},
            {"ref": "seats", "t": 1, "value": {"A1": "ann"}},
        ]
        missing = subprocess.run(
            [sys.executable, "-m", "astm", "inspect", str(tmp_path / "nope.db")], capture_output=True, text=True
        )
        assert missing.returncode == 1 and "no such file" in missing.stderr


class TestWriterFailure:
    async def test_a_failed_writer_refuses_further_commits(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """When writing fails (disk full), the waiting commit's outcome is unknown and later commits are refused."""
        from astm.stores.sqlite import SqliteStorage

        async with astm.Store(f"sqlite:///{tmp_path / 's.db'}") as store:
            r = store.ref("r", 0)
            await store.atomically(lambda: r.set(1))

            def full(self: SqliteStorage, conn: Any, batch: Any) -> int:
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(SqliteStorage, "_write", full)
            with pytest.raises(astm.CommitOutcomeUnknown, match="outcome is unknown"):
                await store.atomically(lambda: r.set(2))
            with pytest.raises(astm.StorageError, match=r"accepts no more commits.*was not committed") as refused:
                await store.atomically(lambda: r.set(3))
            assert not isinstance(refused.value, astm.CommitOutcomeUnknown)
            assert r.get() == 2  # applied in memory, never acknowledged; 3 was refused before any change
        monkeypatch.undo()
        async with astm.Store(f"sqlite:///{tmp_path / 's.db'}") as again:
            assert again.ref("r", 0).get() == 1 and again.t == 1  # only what was acknowledged


@pytest.fixture
def slow_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write batch of the SQLite writer takes 0.2 s more: commits wait for durability that long."""
    import time as _time

    from astm.stores.sqlite import SqliteStorage

    write = SqliteStorage._write

    def slow(self: SqliteStorage, conn: Any, batch: Any) -> None:
        _time.sleep(0.2)
        write(self, conn, batch)

    monkeypatch.setattr(SqliteStorage, "_write", slow)


def _in_own_loop(backend: str, fn: Any) -> Any:
    """Run ``fn()`` to completion in a new thread with its own event loop, which then ends."""
    import threading

    out: list[Any] = []

    def main() -> None:
        try:
            out.append(anyio.run(fn, backend=backend))
        except BaseException as exc:
            out.append(exc)

    th = threading.Thread(target=main)
    th.start()
    th.join()
    return out[0]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
class TestWaitersOfEndedLoops:
    def test_a_cancelled_durability_wait_leaves_the_writer_working(
        self, tmp_path: Path, slow_writer: None, backend: str
    ) -> None:
        """A commit cancelled while waiting for the disk, in a thread whose loop then ends, harms no later commit."""
        url = f"sqlite:///{tmp_path / 's.db'}"
        store = astm.Store(url)
        r = store.ref("r", 0)

        async def cancelled() -> None:
            with anyio.move_on_after(0.05):
                await store.atomically(lambda: r.set(1))

        assert _in_own_loop(backend, cancelled) is None
        import time as _time

        _time.sleep(0.3)  # the writer finishes that batch now, and fires what it has

        async def more() -> None:
            for i in range(2, 5):
                await store.atomically(lambda i: r.set(i), i)
            await store.aclose()

        anyio.run(more)

        async def reopen() -> tuple[int, int]:
            async with astm.Store(url) as again:
                return again.t, again.ref("r", 0).get()

        assert anyio.run(reopen) == (4, 4)

    def test_a_timed_out_sync_in_an_ended_loop_makes_no_commit_raise(self, tmp_path: Path, backend: str) -> None:
        """sync(t, timeout) that timed out in a finished loop leaves nothing for the next commit to trip on."""
        store = astm.Store(f"sqlite:///{tmp_path / 's.db'}")
        r = store.ref("r", 0)

        async def behind() -> None:
            await store.sync(store.t + 5, timeout=0.02)

        assert isinstance(_in_own_loop(backend, behind), astm.SyncTimeout)

        async def commit() -> int:
            rep = await store.transact(lambda: r.set(1))
            await store.aclose()
            return rep.t

        assert anyio.run(commit) == 1


class TestCancelledReports:
    async def test_cancelled_transact_releases_its_history_pins(self, tmp_path: Path, slow_writer: None) -> None:
        """transact() cancelled during the durability wait keeps no pin: the in-memory log shrinks again."""
        import gc

        async with astm.Store(f"sqlite:///{tmp_path / 's.db'}", history=4) as store:
            r = store.ref("r", 0)
            for i in range(6):
                with anyio.move_on_after(0.02):
                    await store.transact(lambda i: r.set(i), i)
            await anyio.sleep(0.3)  # the writer catches up; nothing of the cancelled calls is running
            gc.collect()
            with store._lock:
                assert store._timeline.pinned_count() == 0
            for i in range(20):  # trimming goes on past the cancelled commits
                await store.atomically(lambda i=i: r.set(i), retry_limit=5)
            assert len(store._timeline.log) <= 4 + 4


class TestCreation:
    def test_a_fault_while_creating_leaves_no_half_made_store(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A failure while the new file is built is a StorageError, leaves no file, and the next open works."""
        import os

        path = tmp_path / "s.db"

        def full(src: Any, dst: Any) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "replace", full)
        with pytest.raises(astm.StorageError, match=r"creating the store file failed.*No space left"):
            astm.Store(f"sqlite:///{path}")
        monkeypatch.undo()
        assert not path.exists() and [p.name for p in tmp_path.iterdir()] == ["s.db.lock"]
        anyio.run(astm.Store(f"sqlite:///{path}").aclose)
        assert path.exists()

    def test_an_empty_database_left_by_an_old_creation_is_built_anew(self, tmp_path: Path) -> None:
        """A SQLite file with no tables at all (a creation cut short) is made a store, not refused as foreign."""
        path = tmp_path / "s.db"
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.close()

        async def use() -> int:
            async with astm.Store(f"sqlite:///{path}") as store:
                return (await store.transact(lambda: store.ref("r", 0).set(1))).t

        assert anyio.run(use) == 1

    def test_paths_that_cannot_be_a_store(self, tmp_path: Path) -> None:
        """A dangling symlink or a directory as the path gives a StorageError saying so."""
        link = tmp_path / "link.db"
        link.symlink_to(tmp_path / "missing" / "target.db")
        with pytest.raises(astm.StorageError, match="symbolic link"):
            astm.Store(f"sqlite:///{link}")
        with pytest.raises(astm.StorageError, match="is a directory"):
            astm.Store(f"sqlite:///{tmp_path}")


class TestCliOnDamagedFiles:
    @pytest.mark.parametrize("damage", ["log-row", "value", "meta"])
    def test_damage_is_an_error_line_not_a_traceback(self, tmp_path: Path, damage: str) -> None:
        """inspect and dump on a damaged file print one error line and exit 1."""
        path = tmp_path / "s.db"

        async def make() -> None:
            async with astm.Store(f"sqlite:///{path}") as s:
                r = s.ref("r", 0)
                await s.atomically(lambda: r.set(1))

        anyio.run(make)
        conn = sqlite3.connect(path)
        if damage == "log-row":
            conn.execute("UPDATE log SET changes = '[[\"r\", 0'")
        elif damage == "value":
            conn.execute("""UPDATE refs SET value = '{"zz": 1}'""")
            conn.execute("INSERT INTO refs VALUES ('q', 1, '{\"zz\": 1}')")
        else:
            conn.execute("DELETE FROM astm_meta WHERE key = 'checkpoint_t'")
        conn.commit()
        conn.close()
        for command in ("inspect", "dump"):
            out = subprocess.run([sys.executable, "-m", "astm", command, str(path)], capture_output=True, text=True)
            assert out.returncode == 1, out
            assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr, out.stderr
        with pytest.raises(astm.StorageError):
            astm.Store(f"sqlite:///{path}")


class TestDeltas:
    @pytest.mark.parametrize(("history", "checkpoint_every"), [(10_000, None), (40, 7)])
    async def test_history_after_a_restart_is_the_same_with_deltas(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, history: int, checkpoint_every: int | None
    ) -> None:
        """Commits logged as deltas (helpers) and whole values rebuild, after a restart, every retained db exactly."""
        import random

        from astm.stores import sqlite as backend

        if checkpoint_every is not None:
            monkeypatch.setattr(backend, "CHECKPOINT_EVERY", checkpoint_every)
        url = f"sqlite:///{tmp_path / 's.db'}"
        rng = random.Random(3)
        before: dict[int, tuple[Any, ...]] = {}
        async with astm.Store(url, history=history) as store:
            ledger: astm.Ref[Any] = store.ref("ledger", pvector())
            seats: astm.Ref[Any] = store.ref("seats", pmap())
            tags: astm.Ref[Any] = store.ref("tags", pset())
            for i in range(300):

                def body(i: int = i) -> None:
                    choice = rng.randrange(6)
                    if choice == 0:
                        ledger.commute(astm.conj, pmap({"n": i}))
                    elif choice == 1:
                        seats.alter(astm.assoc, f"s{i % 17}", i)
                    elif choice == 2:
                        seats.alter(astm.dissoc, f"s{(i * 7) % 17}")
                    elif choice == 3:
                        tags.alter(astm.conj, i % 5)
                        tags.alter(astm.disj, (i + 2) % 5)
                    elif choice == 4:
                        ledger.alter(lambda v: v.append(("whole", i)))  # an arbitrary function: whole value
                    elif len(ledger.get()):
                        ledger.alter(astm.assoc, 0, i)
                    else:
                        ledger.alter(astm.conj, i)

                await store.atomically(body)
            for t in range(max(0, store.t - history), store.t + 1):
                db = store.as_of(t)
                before[t] = (db[ledger], db[seats], db[tags])
        rows = sqlite3.connect(tmp_path / "s.db").execute("SELECT changes FROM log").fetchall()
        kinds = {item[1] for (changes,) in rows for item in json.loads(changes)}
        assert {"d", "v"} <= kinds, kinds  # deltas and whole values both in the log
        checkpoint = int(
            sqlite3.connect(tmp_path / "s.db")
            .execute("SELECT value FROM astm_meta WHERE key = 'checkpoint_t'")
            .fetchone()[0]
        )
        assert (checkpoint > 0) == (checkpoint_every is not None)
        async with astm.Store(url, history=history) as again:
            refs = [again.ref(n, None) for n in ("ledger", "seats", "tags")]
            assert again.t == 300
            for t, values in before.items():
                db = again.as_of(t)
                assert tuple(db[r] for r in refs) == values, t

    async def test_checkpoints_of_a_large_value_wait_for_the_log_to_outweigh_them(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """One-entry appends to a large ledger do not rewrite it every epoch; the log is still trimmed; all is kept.

        A checkpoint writes a changed ref whole: at every epoch, a growing
        ledger would cost its whole size again and again.
        """
        from astm.stores import sqlite as backend

        monkeypatch.setattr(backend, "CHECKPOINT_EVERY", 20)
        path = tmp_path / "s.db"
        url = f"sqlite:///{path}"

        def checkpoint_t() -> int:
            with contextlib.closing(sqlite3.connect(path)) as conn:
                return int(conn.execute("SELECT value FROM astm_meta WHERE key = 'checkpoint_t'").fetchone()[0])

        big: Any = pvector(range(30_000))  # about 180 kB encoded
        async with astm.Store(url, history=5) as store:
            ledger: astm.Ref[Any] = store.ref("ledger", big)
            small: astm.Ref[int] = store.ref("small", 0)
            for i in range(300):
                await store.atomically(lambda i: ledger.alter(astm.conj, i), i)
            first = checkpoint_t()
            assert 0 < first <= 60, first  # the first epoch past retention is checkpointed...
            for i in range(300):
                await store.atomically(lambda i: ledger.alter(astm.conj, i), i)
            assert checkpoint_t() == first  # ...and then not again: 600 small rows weigh less than the ledger
            for i in range(200):
                await store.atomically(lambda i: ledger.alter(astm.conj, "x" * 1000 + str(i)), i)
            later = checkpoint_t()
            assert later > first  # 200 kB of log outweighs it: checkpointed, and the log trimmed up to it
            with contextlib.closing(sqlite3.connect(path)) as conn:
                assert conn.execute("SELECT MIN(t) FROM log").fetchone()[0] > later
            for _ in range(100):
                await store.atomically(lambda: small.alter(lambda v: v + 1))
        want = big.extend(range(300)).extend(range(300)).extend("x" * 1000 + str(i) for i in range(200))
        async with astm.Store(url, history=5) as again:
            assert again.ref("ledger", None).get() == want and again.ref("small", None).get() == 100
            assert again.t == 900

    def test_a_delta_on_the_wrong_version_is_refused(self, tmp_path: Path) -> None:
        """A log row whose delta names a base version the ref does not have makes opening fail, not guess."""
        path = tmp_path / "s.db"

        async def make() -> None:
            async with astm.Store(f"sqlite:///{path}") as s:
                r: astm.Ref[Any] = s.ref("r", ())
                for i in range(3):
                    await s.atomically(lambda i: r.alter(astm.conj, i), i)

        anyio.run(make)
        conn = sqlite3.connect(path)
        [(changes,)] = conn.execute("SELECT changes FROM log WHERE t = 3").fetchall()
        items = json.loads(changes)
        assert items[0][1] == "d" and items[0][2] == 2
        items[0][2] = 1  # the delta now claims to apply to t=1
        conn.execute("UPDATE log SET changes = ? WHERE t = 3", (json.dumps(items),))
        conn.commit()
        conn.close()
        with pytest.raises(astm.StorageError, match=r"delta on its version t=1.*t=2"):
            astm.Store(f"sqlite:///{path}")
