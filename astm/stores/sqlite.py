"""The embedded durable store: one SQLite file, written by one thread with group commit.

``Store("sqlite:///path/state.db")``. Refs, the commit log and the outbox live
in the file (WAL mode, ``synchronous=FULL``). Commits are applied in memory
under the store lock and queued, in ``t`` order, to a dedicated writer thread;
the writer takes everything queued, appends it to the log in one SQLite
transaction with one fsync, and then wakes the transactions waiting for that
durability. The event loop never touches the disk after open.

The file is log-structured: a commit appends one log row (its changes); the
``refs`` table is a checkpoint of every ref's value, rewritten every
``CHECKPOINT_EVERY`` commits and on close. Opening loads the checkpoint and
replays the log rows after it. Log rows older than both the checkpoint and the
store's history retention are deleted at checkpoints.

A lock file next to the database (``state.db.lock``) holds the owning process
id, so a second process fails at once with a clear error. The file is checked
read-only before anything writes to it: a file that is not an astm store, is
corrupt or was written by a newer version is refused unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path

from .. import codec
from .._backend import Waiter, fire_all
from .._errors import StorageError
from ..abc import CommitRecord, Recovered

__all__ = ["SCHEMA_VERSION", "SqliteStorage", "read_only"]

SCHEMA_VERSION = 1
CHECKPOINT_EVERY = 1000

_SCHEMA = """
CREATE TABLE astm_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE refs (name TEXT PRIMARY KEY, t INTEGER NOT NULL, value TEXT NOT NULL);
CREATE TABLE log (t INTEGER PRIMARY KEY, time REAL NOT NULL, changes TEXT NOT NULL);
CREATE TABLE outbox (
    t INTEGER NOT NULL, seq INTEGER NOT NULL, effect TEXT NOT NULL, payload TEXT NOT NULL,
    order_key TEXT, attempts INTEGER NOT NULL DEFAULT 0, error TEXT,
    PRIMARY KEY (t, seq)
);
"""

#: an outbox operation for the writer: (kind, key, attempts, error)
_OutboxOp = tuple[str, tuple[int, int], int, str | None]


def read_only(path: str) -> sqlite3.Connection:
    """Open an existing astm file read-only after checking it is one this version reads."""
    p = Path(path)
    if not p.exists():
        raise StorageError(path, "no such file")
    try:
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        ok = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise StorageError(path, f"not a readable SQLite database ({exc})", "restore it from a backup") from exc
    if ok != "ok":
        conn.close()
        raise StorageError(path, f"the file is corrupt ({ok})", "restore it from a backup")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "astm_meta" not in tables:
        conn.close()
        raise StorageError(path, "this SQLite file is not an astm store", "point the store at another path")
    row = conn.execute("SELECT value FROM astm_meta WHERE key = 'schema_version'").fetchone()
    version = int(row[0]) if row else -1
    if version != SCHEMA_VERSION:
        conn.close()
        raise StorageError(
            path,
            f"schema version {version} is not the version {SCHEMA_VERSION} this astm reads",
            "open it with the astm version that wrote it",
        )
    return conn


def load(conn: sqlite3.Connection) -> Recovered:
    """Everything an astm file holds: the checkpoint with the log replayed over it, and the outbox."""
    rec = Recovered()
    checkpoint = int(conn.execute("SELECT value FROM astm_meta WHERE key = 'checkpoint_t'").fetchone()[0])
    refs: dict[str, tuple[int, str]] = {
        name: (t, value) for name, t, value in conn.execute("SELECT name, t, value FROM refs ORDER BY rowid")
    }
    rec.t = checkpoint
    for t, when, changes in conn.execute("SELECT t, time, changes FROM log ORDER BY t"):
        decoded = json.loads(changes)
        rec.log.append((t, when, [(n, codec.decode(o), codec.decode(v)) for n, o, v in decoded]))
        if t > checkpoint:
            for n, _, v in decoded:
                refs[n] = (t, json.dumps(v, separators=(",", ":"), ensure_ascii=False))
            rec.t = t
    rec.refs = [(name, t, codec.loads(enc), enc) for name, (t, enc) in refs.items()]
    for t, seq, effect, payload, order_key, attempts, error in conn.execute(
        "SELECT t, seq, effect, payload, order_key, attempts, error FROM outbox ORDER BY t, seq"
    ):
        ok = None if order_key is None else codec.loads(order_key)
        rec.outbox.append(((t, seq), effect, codec.loads(payload), ok, attempts, error))
    return rec


class SqliteStorage:
    """The SQLite backend of a store (see the module docstring)."""

    def __init__(self, path: str, *, history: int, history_seconds: float | None) -> None:
        self.path = str(Path(path))
        self.durable_t = 0
        self.failed: BaseException | None = None
        self._history = history
        self._history_seconds = history_seconds
        #: the retention floor the newest written commit reported
        self._floor = 0
        #: the t of the refs table's checkpoint, and every ref's newest (t, value) since
        self._checkpoint_t = 0
        self._latest: dict[str, tuple[int, str]] = {}
        self._dirty: set[str] = set()
        #: the writer is waiting for work (so a submit must wake it)
        self._idle = False
        self._queue: deque[CommitRecord | _OutboxOp] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._waiters: list[tuple[int, Waiter]] = []
        self._lockfile = self._take_lock()
        try:
            self._recovered = self._open()
        except BaseException:
            self._release_lock()
            raise
        self._thread = threading.Thread(target=self._run, name=f"astm-writer {self.path}", daemon=True)
        self._thread.start()

    # -- opening -------------------------------------------------------------------

    def _take_lock(self) -> int:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if holder == str(os.getpid()):
                raise StorageError(
                    self.path, "this process already has the store open", "use that Store, or aclose() it first"
                ) from None
            raise StorageError(
                self.path,
                f"the store is open in another process (pid {holder})",
                "one process owns an embedded store; share state between processes with the PostgreSQL store",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def _release_lock(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._lockfile)

    def _open(self) -> Recovered:
        p = Path(self.path)
        if not p.exists() or p.stat().st_size == 0:
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("BEGIN")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "INSERT INTO astm_meta VALUES ('schema_version', ?), ('checkpoint_t', '0')", (str(SCHEMA_VERSION),)
                )
                conn.execute("COMMIT")
            finally:
                conn.close()
            return Recovered()
        conn = read_only(self.path)
        try:
            return self._read(conn)
        except (sqlite3.DatabaseError, ValueError, KeyError, TypeError) as exc:
            raise StorageError(self.path, f"the file is damaged ({exc})", "restore it from a backup") from exc
        finally:
            conn.close()

    def _read(self, conn: sqlite3.Connection) -> Recovered:
        rec = load(conn)
        self.durable_t = rec.t
        self._checkpoint_t = int(conn.execute("SELECT value FROM astm_meta WHERE key = 'checkpoint_t'").fetchone()[0])
        self._latest = {name: (t, enc) for name, t, _, enc in rec.refs}
        return rec

    def recover(self) -> Recovered:
        rec, self._recovered = self._recovered, Recovered()
        return rec

    # -- the writer ----------------------------------------------------------------

    def submit(self, record: CommitRecord) -> None:
        self._queue.append(record)  # deque.append is atomic; wake the writer only if it sleeps
        if self._idle:
            with self._cv:
                self._cv.notify()

    def _op(self, op: _OutboxOp) -> None:
        with self._cv:
            self._queue.append(op)
            self._cv.notify()

    def outbox_done(self, key: tuple[int, int]) -> None:
        self._op(("done", key, 0, None))

    def outbox_dead(self, key: tuple[int, int], attempts: int, error: str) -> None:
        self._op(("dead", key, attempts, error))

    def outbox_requeued(self, key: tuple[int, int]) -> None:
        self._op(("requeue", key, 0, None))

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        except BaseException as exc:  # pragma: no cover - the file was checked on open
            self._fail(exc)
            return
        try:
            while True:
                with self._cv:
                    # idle first, then look: a submit that appends after the look sees idle and notifies
                    self._idle = True
                    while not self._queue and not self._closing:
                        self._cv.wait()
                    self._idle = False
                batch = []
                while self._queue:
                    batch.append(self._queue.popleft())
                if not batch:
                    break  # closing, and everything is written
                top = self._write(conn, batch)
                if top:
                    self._durable(top)
                if top > self._checkpoint_t + CHECKPOINT_EVERY:
                    self._checkpoint(conn, top)
            if self.durable_t > self._checkpoint_t:
                self._checkpoint(conn, self.durable_t)
        except BaseException as exc:
            self._fail(exc)
        finally:
            conn.close()

    def _write(self, conn: sqlite3.Connection, batch: list[CommitRecord | _OutboxOp]) -> int:
        """Append a batch to the log in one transaction (one fsync); returns the newest t in it."""
        top = 0
        log_rows = []
        outbox_rows = []
        ops: list[_OutboxOp] = []
        latest = self._latest
        dirty = self._dirty
        for item in batch:
            if isinstance(item, CommitRecord):
                top = item.t
                parts = []
                for name, old, new in item.changes:
                    latest[name] = (item.t, new)
                    dirty.add(name)
                    parts.append(f"[{json.dumps(name)},{old},{new}]")
                log_rows.append((item.t, item.time, f"[{','.join(parts)}]"))
                for seq, name, payload, ok in item.outbox:
                    outbox_rows.append((item.t, seq, name, payload, ok))
                self._floor = item.floor
            else:
                ops.append(item)
        conn.execute("BEGIN IMMEDIATE")
        try:
            if log_rows:
                conn.executemany("INSERT INTO log (t, time, changes) VALUES (?, ?, ?)", log_rows)
            if outbox_rows:
                conn.executemany(
                    "INSERT INTO outbox (t, seq, effect, payload, order_key) VALUES (?, ?, ?, ?, ?)", outbox_rows
                )
            for kind, (t, seq), attempts, error in ops:
                if kind == "done":
                    conn.execute("DELETE FROM outbox WHERE t = ? AND seq = ?", (t, seq))
                elif kind == "dead":
                    conn.execute(
                        "UPDATE outbox SET attempts = ?, error = ? WHERE t = ? AND seq = ?", (attempts, error, t, seq)
                    )
                else:
                    conn.execute("UPDATE outbox SET attempts = 0, error = NULL WHERE t = ? AND seq = ?", (t, seq))
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return top

    def _checkpoint(self, conn: sqlite3.Connection, top: int) -> None:
        """Write every ref changed since the last checkpoint; drop log rows nobody needs.

        A log row is kept while it is after the checkpoint (recovery replays it)
        or within history retention (``as_of``, ``reports`` after a restart).
        """
        floor = min(self._floor, top - self._history, top)
        if self._history_seconds is not None:
            row = conn.execute(
                "SELECT MIN(t) FROM log WHERE time >= ?", (time.time() - self._history_seconds,)
            ).fetchone()
            if row[0] is not None:
                floor = min(floor, row[0] - 1)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO refs (name, t, value) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET t = excluded.t, value = excluded.value",
                [(name, *self._latest[name]) for name in self._dirty],
            )
            conn.execute("UPDATE astm_meta SET value = ? WHERE key = 'checkpoint_t'", (str(top),))
            conn.execute("DELETE FROM log WHERE t <= ?", (floor,))
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        self._dirty.clear()
        self._checkpoint_t = top

    def _durable(self, t: int) -> None:
        with self._cv:
            self.durable_t = t
            ready = [w for wt, w in self._waiters if wt <= t]
            self._waiters = [(wt, w) for wt, w in self._waiters if wt > t]
        fire_all(ready)

    def _fail(self, exc: BaseException) -> None:
        with self._cv:
            self.failed = exc
            waiters, self._waiters = self._waiters, []
        for _, w in waiters:
            w.fire()

    def refusal(self) -> StorageError:
        return StorageError(
            self.path,
            f"writing to the file failed ({self.failed!r}) and the store accepts no more commits",
            "fix the cause (disk space, permissions) and open the store again; acknowledged commits are safe",
        )

    async def wait_durable(self, t: int) -> None:
        if self.durable_t >= t:
            return
        w = Waiter()
        with self._cv:
            if self.durable_t >= t:
                return
            if self.failed is None:
                self._waiters.append((t, w))
        if self.failed is None:
            await w.wait()
        if self.durable_t < t:
            raise StorageError(
                self.path,
                f"commit t={t} could not be made durable ({self.failed!r})",
                "the store stopped accepting commits; fix the cause and reopen it",
            )

    def close(self) -> None:
        """Write what is queued and a final checkpoint, then release the file."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join()
        self._release_lock()
