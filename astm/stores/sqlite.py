"""The embedded durable store: one SQLite file, written by one thread with group commit.

``Store("sqlite:///path/state.db")``. Refs, the commit log and the outbox live
in the file (WAL mode, ``synchronous=FULL``). Commits are applied in memory
under the store's lock and queued, in ``t`` order, to a dedicated writer
thread; the writer takes everything queued, appends it to the log in one
SQLite transaction with one fsync, and then wakes the transactions waiting for
that durability. The event loop never touches the disk after open.

The file is log-structured. A commit appends one log row holding its
changes: a whole value, or, for a change made only with astm's collection
helpers (``astm.conj``, ``astm.assoc``, ...), a *delta*: those calls and the
version they apply to, so a commit costs what changed, not the size of the
value. The ``refs`` table is a checkpoint of every ref's value at
``checkpoint_t``. A checkpoint waits until the log written since the last
one holds as many bytes as that one wrote, so rewriting large values costs
at most what their deltas cost. Checkpoints lag behind history retention: a
checkpoint is written only at a ``t`` older than everything ``as_of`` and
``reports(since=...)`` may still ask for, so opening loads the checkpoint and
replays every log row after it forward, which rebuilds that history exactly
(whole values written again only at checkpoints, deltas applied to the very
version they were made on). Rows up to the checkpoint are deleted. Refs
replayed on open count as changed, so a later checkpoint writes them before
it moves past their rows. Changes are grouped in epochs of
``CHECKPOINT_EVERY`` commits; an epoch is checkpointed once retention no
longer needs its rows.

A new file is built under a temporary name and renamed into place once
complete, so a fault while creating it leaves no half-made store behind. A
lock file next to the database (``state.db.lock``) holds the owning process
id, so a second process fails at once with a clear error. An existing file is
checked read-only before anything writes to it: a file that is not an astm
store, is corrupt or was written by a newer version is refused unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from .. import codec
from .._backend import Waiter, fire_all
from .._commit import decode_row, row_text
from .._errors import AstmError, CommitOutcomeUnknown, StorageError
from .._markers import DELETED
from .._ops import apply_calls
from ..abc import CommitRecord, Key, OutboxEntry, Recovered
from .memory import MemoryOutbox

__all__ = ["CHECKPOINT_EVERY", "SCHEMA_VERSION", "SqliteOutbox", "SqliteStorage", "load", "read_only"]

SCHEMA_VERSION = 2
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
_OutboxOp = tuple[str, Key, int, str | None]


def _check_path(path: str) -> Path:
    """The store's path, refused clearly when it cannot be a store file."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise StorageError(
            path, f"the path is a symbolic link to {os.readlink(p)!r}, which does not exist", "fix or remove the link"
        )
    if p.is_dir():
        raise StorageError(path, "the path is a directory", "give the path of a file, e.g. .../state.db")
    return p


def read_only(path: str) -> sqlite3.Connection:
    """Open an existing astm file read-only after checking it is one this version reads."""
    p = _check_path(path)
    if not p.exists():
        raise StorageError(path, "no such file")
    try:
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StorageError(path, f"cannot open the file ({exc})", "check its permissions") from exc
    try:
        ok = conn.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            if _io_failure(ok):
                raise StorageError(path, f"reading the file failed with an I/O error ({ok})", _IO_FIX)
            raise StorageError(path, f"the file is corrupt ({ok})", "restore it from a backup")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "astm_meta" not in tables:
            raise StorageError(path, "this SQLite file is not an astm store", "point the store at another path")
        row = conn.execute("SELECT value FROM astm_meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row else -1
        if version not in (1, SCHEMA_VERSION):
            raise StorageError(
                path,
                f"schema version {version} is not the version {SCHEMA_VERSION} this astm reads",
                "open it with the astm version that wrote it",
            )
    except StorageError:
        conn.close()
        raise
    except (sqlite3.Error, ValueError) as exc:
        conn.close()
        if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", 0) & 0xFF == _SQLITE_IOERR:
            raise StorageError(path, f"reading the file failed with an I/O error ({exc})", _IO_FIX) from exc
        raise StorageError(path, f"not a readable SQLite database ({exc})", "restore it from a backup") from exc
    return conn


#: SQLite's primary result code of every I/O error (its extended codes keep it in the low byte)
_SQLITE_IOERR = 10
_IO_FIX = (
    "the file itself may well be intact: check the disk (dmesg, smartctl), then open the store again; "
    "if reading keeps failing, restore it from a backup"
)


def _io_failure(report: str) -> bool:
    """Whether an integrity check's report is of pages it could not read (an I/O error), not of bad pages."""
    codes = [int(c) for c in re.findall(r"error code=(\d+)", report)]
    return bool(codes) and all(code & 0xFF == _SQLITE_IOERR for code in codes)


def _wal(conn: sqlite3.Connection, path: str) -> None:
    """Put the file in WAL mode, or fail: SQLite answers with the mode it kept when it cannot switch."""
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"the file could not be put in WAL mode (it stayed in {mode!r} mode)")


def _is_empty_database(path: Path) -> bool:
    """A SQLite file with no tables at all (what a creation cut short may leave): safe to build anew."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return bool(conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0)
        finally:
            conn.close()
    except sqlite3.Error:
        return False


def load(conn: sqlite3.Connection, path: str = "") -> tuple[Recovered, dict[str, tuple[int, Any]]]:
    """What an astm file holds: the checkpoint, and every later commit with its values worked out.

    Returns the recovery and every ref's (t, value) after the last commit.
    A delta applies only to the version it was made on; any other base means
    the file is inconsistent (a ``StorageError``).
    """
    try:
        version = int(conn.execute("SELECT value FROM astm_meta WHERE key = 'schema_version'").fetchone()[0])
        rec = Recovered()
        rec.checkpoint_t = int(conn.execute("SELECT value FROM astm_meta WHERE key = 'checkpoint_t'").fetchone()[0])
        current: dict[str, tuple[int, Any]] = {}
        for name, t, value in conn.execute("SELECT name, t, value FROM refs ORDER BY rowid"):
            decoded = codec.loads(value)
            rec.refs.append((name, t, decoded))
            current[name] = (t, decoded)
        for t, when, changes in conn.execute(
            "SELECT t, time, changes FROM log WHERE t > ? ORDER BY t", (rec.checkpoint_t,)
        ):
            items = json.loads(changes)
            if version == 1:  # [name, old, new]
                items = [[name, "v", new] for name, _old, new in items]
            row: list[tuple[str, tuple[Any, ...]]] = []
            for name, change in decode_row(items):
                if change[0] == "x":
                    current.pop(name, None)
                    row.append((name, change))
                    continue
                if change[0] == "v":
                    value = change[1]
                else:
                    _, base, calls = change
                    have = current.get(name)
                    if have is None or have[0] != base:
                        raise StorageError(
                            path,
                            f"log row t={t} changes ref {name!r} by a delta on its version t={base}, but the file "
                            f"holds {'no such ref' if have is None else f'version t={have[0]}'}; it is inconsistent",
                            "restore it from a backup",
                        )
                    value = apply_calls(have[1], calls)
                current[name] = (t, value)
                row.append((name, ("v", value, *change[2:])))
            rec.log.append((t, when, row))
        return rec, current
    except StorageError:
        raise
    except AstmError as exc:
        raise StorageError(path, f"cannot read a stored value ({exc})", "import the modules that define it") from exc
    except (sqlite3.Error, ValueError, KeyError, TypeError, IndexError) as exc:
        raise StorageError(path, f"the file is damaged ({exc!r})", "restore it from a backup") from exc


def load_outbox(conn: sqlite3.Connection, path: str = "") -> list[tuple[OutboxEntry, bool]]:
    """Every outbox entry in the file, oldest first: (entry, dead)."""
    out = []
    try:
        for t, seq, effect, payload, order_key, attempts, error in conn.execute(
            "SELECT t, seq, effect, payload, order_key, attempts, error FROM outbox ORDER BY t, seq"
        ):
            ok = None if order_key is None else codec.loads(order_key)
            entry = OutboxEntry((t, seq), effect, codec.loads(payload), ok, attempts)
            entry.error = error
            out.append((entry, error is not None))
    except AstmError as exc:
        raise StorageError(path, f"cannot read a stored outbox entry ({exc})", "import the modules it needs") from exc
    except (sqlite3.Error, ValueError) as exc:
        raise StorageError(path, f"the file is damaged ({exc!r})", "restore it from a backup") from exc
    return out


class SqliteOutbox(MemoryOutbox):
    """The SQLite store's outbox: entries in memory, every change also written to the file."""

    def __init__(self, storage: SqliteStorage) -> None:
        super().__init__()
        self._storage = storage

    def finish(self, entry: OutboxEntry, error: str | None) -> None:
        super().finish(entry, error)
        if error is None:
            self._storage.outbox_op(("done", entry.key, 0, None))
        else:
            safe = error.encode("utf-8", "backslashreplace").decode("utf-8")  # it may quote user data
            self._storage.outbox_op(("dead", entry.key, entry.attempts, safe))

    def requeue_now(self, key: Key | None) -> list[Key]:
        keys = super().requeue_now(key)
        for k in keys:
            self._storage.outbox_op(("requeue", k, 0, None))
        return keys


class SqliteStorage:
    """The SQLite log and outbox storage of a store (see the module docstring)."""

    encodes = True

    def __init__(self, path: str, *, history: int, history_seconds: float | None) -> None:
        self.path = str(Path(path))
        self.durable_t = 0
        self.failed: BaseException | None = None
        #: commits up to this t may or may not be in the file after a failed write
        self._unknown_upto = 0
        self._history = history
        self._history_seconds = history_seconds
        #: the t of the refs table's checkpoint
        self._checkpoint_t = 0
        #: refs changed in the current epoch: name -> (t, value encoded or None, value), and where it began
        self._epoch: dict[str, tuple[int, str | None, Any]] = {}
        self._epoch_start = 0
        #: bytes of log rows written since the last checkpoint, and bytes of ref values that checkpoint wrote
        self._log_bytes = 0
        self._checkpoint_bytes = 0
        #: closed epochs not yet checkpointed, oldest first: (their last t, their changes)
        self._epochs: deque[tuple[int, dict[str, tuple[int, str | None, Any]]]] = deque()
        #: the writer is waiting for work (so a submit must wake it)
        self._idle = False
        self._queue: deque[CommitRecord | _OutboxOp] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._waiters: list[tuple[int, Waiter]] = []
        self.outbox = SqliteOutbox(self)
        _check_path(self.path)
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
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(self.path, f"cannot create the lock file ({exc})", "check the directory") from exc
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
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise StorageError(self.path, f"cannot write the lock file ({exc})", "check the disk") from exc
        return fd

    def _release_lock(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._lockfile)

    def _open(self) -> Recovered:
        p = Path(self.path)
        if not p.exists() or p.stat().st_size == 0 or _is_empty_database(p):
            self._create(p)
            return Recovered()
        conn = read_only(self.path)
        try:
            version = int(conn.execute("SELECT value FROM astm_meta WHERE key = 'schema_version'").fetchone()[0])
            rec, current = load(conn, self.path)
            for entry, dead in load_outbox(conn, self.path):
                self.outbox.recovered(entry, dead)
        finally:
            conn.close()
        if version != SCHEMA_VERSION:
            self._migrate(version)
        self._checkpoint_t = self._epoch_start = rec.checkpoint_t
        self.durable_t = rec.log[-1][0] if rec.log else rec.checkpoint_t
        if rec.log:
            # replayed on open: the refs table does not hold these values yet
            changed = {name for _, _, changes in rec.log for name, _ in changes}
            epoch: dict[str, tuple[int, str | None, Any]] = {}
            for name in changed:
                t, value = current.get(name, (self.durable_t, DELETED))
                epoch[name] = (t, None, value)
            self._epochs.append((self.durable_t, epoch))
            self._epoch_start = self.durable_t
        return rec

    def _migrate(self, version: int) -> None:
        """Bring a file of schema version 1 (rows of [name, old, new]) to this version's rows."""
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            checkpoint = int(conn.execute("SELECT value FROM astm_meta WHERE key = 'checkpoint_t'").fetchone()[0])
            conn.execute("DELETE FROM log WHERE t <= ?", (checkpoint,))  # the old rows before it held history only
            rows = conn.execute("SELECT t, changes FROM log").fetchall()
            for t, changes in rows:
                items = [[name, "v", new] for name, _old, new in json.loads(changes)]
                conn.execute("UPDATE log SET changes = ? WHERE t = ?", (codec.text(items), t))
            conn.execute("UPDATE astm_meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
            conn.execute("COMMIT")
        except (sqlite3.Error, ValueError) as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise StorageError(self.path, f"upgrading the file from schema {version} failed ({exc})", "") from exc
        finally:
            conn.close()

    def _create(self, p: Path) -> None:
        """Build a new, empty store file under a temporary name, then move it into place."""
        tmp = p.with_name(f".{p.name}.new-{os.getpid()}")
        for stale in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                _wal(conn, self.path)
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("BEGIN")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "INSERT INTO astm_meta VALUES ('schema_version', ?), ('checkpoint_t', '0')", (str(SCHEMA_VERSION),)
                )
                conn.execute("COMMIT")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            for side in ("-wal", "-shm"):  # what a WAL file left would belong to the old name
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{tmp}{side}").unlink()
            os.replace(tmp, p)
            dfd = os.open(p.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except (sqlite3.Error, OSError) as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StorageError(
                self.path, f"creating the store file failed ({exc})", "check the disk (space, permissions) and retry"
            ) from exc

    def recover(self) -> Recovered:
        rec, self._recovered = self._recovered, Recovered()
        return rec

    # -- the writer ----------------------------------------------------------------

    def submit(self, t: int, record: CommitRecord | None) -> None:
        assert record is not None
        self._queue.append(record)  # deque.append is atomic; wake the writer only if it sleeps
        if self._idle:
            # once: the woken writer runs only when the loop lets go of the interpreter, after the loop's
            # other commits of this round (each of them notified it again: 89% of submits, 1 us each)
            self._idle = False
            with self._cv:
                self._cv.notify()

    def outbox_op(self, op: _OutboxOp) -> None:
        with self._cv:
            self._queue.append(op)
            self._cv.notify()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except BaseException as exc:
            self._fail(exc, 0)
            return
        top = 0
        try:
            _wal(conn, self.path)
            conn.execute("PRAGMA synchronous=FULL")
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
                top = max((item.t for item in batch if isinstance(item, CommitRecord)), default=0)
                self._write(conn, batch)
                if top:
                    self._durable(top)
                    if self._due(top):
                        top = 0
                        self._checkpoint(conn)
            top = 0
            if self._epoch:
                self._close_epoch(self.durable_t)
            self._checkpoint(conn)
        except BaseException as exc:
            self._fail(exc, top)
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _due(self, top: int) -> bool:
        """Whether to checkpoint now: an epoch is past retention, and the log since the last one outweighs it.

        A checkpoint writes every ref changed since the last one whole, so for
        a large value changed by small deltas (a growing ledger) it costs the
        size of the value, not of the changes. Waiting until the log written
        since then holds as many bytes as that checkpoint did keeps the
        checkpoints' share of the writing at most about half, whatever the
        values' size, and bounds what opening replays by what a checkpoint
        holds.
        """
        return (
            bool(self._epochs)
            and self._epochs[0][0] <= top - self._history
            and self._log_bytes >= self._checkpoint_bytes
        )

    def _write(self, conn: sqlite3.Connection, batch: list[CommitRecord | _OutboxOp]) -> None:
        """Append a batch to the log in one transaction (one fsync)."""
        log_rows = []
        outbox_rows = []
        ops: list[_OutboxOp] = []
        for item in batch:
            if isinstance(item, CommitRecord):
                if item.t > self._epoch_start + CHECKPOINT_EVERY:
                    self._close_epoch(item.t - 1)
                epoch = self._epoch
                for name, kind, text, value in item.changes:
                    epoch[name] = (item.t, text if kind == "v" else None, value)
                row = row_text(item.changes)
                self._log_bytes += len(row)
                log_rows.append((item.t, item.time, row))
                for seq, name, payload, ok in item.outbox:
                    outbox_rows.append((item.t, seq, name, payload, ok))
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
            done = [key for kind, key, _, _ in ops if kind == "done"]
            if done:
                conn.executemany("DELETE FROM outbox WHERE t = ? AND seq = ?", done)
            for kind, (t, seq), attempts, error in ops:
                if kind == "done":
                    continue
                if kind == "dead":
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

    def _close_epoch(self, top: int) -> None:
        if self._epoch:
            self._epochs.append((top, self._epoch))
            self._epoch = {}
        self._epoch_start = top

    def _floor(self, conn: sqlite3.Connection) -> int:
        """The newest t whose log rows history retention no longer needs."""
        floor = self.durable_t - self._history
        if self._history_seconds is not None:
            row = conn.execute(
                "SELECT MIN(t) FROM log WHERE time >= ?", (time.time() - self._history_seconds,)
            ).fetchone()
            floor = min(floor, self.durable_t if row[0] is None else row[0] - 1)
        return floor

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """Write the epochs retention no longer needs into the refs table, and drop their log rows.

        The checkpoint moves only to a ``t`` older than every ``t`` history may
        still be asked for, so the rows after it always rebuild that history.
        """
        floor = self._floor(conn)
        merged: dict[str, tuple[int, str | None, Any]] = {}
        top = 0
        epochs = self._epochs
        while epochs and epochs[0][0] <= floor:
            top, changes = epochs.popleft()
            merged.update(changes)
        if not top:
            return
        rows = []
        gone = []
        for name, (t, text, value) in merged.items():
            if value is DELETED:
                gone.append((name,))
            else:
                rows.append((name, t, text if text is not None else codec.dumps(value, f"ref {name!r}")))
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO refs (name, t, value) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET t = excluded.t, value = excluded.value",
                rows,
            )
            conn.executemany("DELETE FROM refs WHERE name = ?", gone)
            conn.execute("UPDATE astm_meta SET value = ? WHERE key = 'checkpoint_t'", (str(top),))
            conn.execute("DELETE FROM log WHERE t <= ?", (top,))
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            epochs.appendleft((top, merged))  # not written: keep it for the next try
            raise
        self._checkpoint_t = top
        self._checkpoint_bytes = sum(len(text) for _, _, text in rows)
        self._log_bytes = 0

    def _durable(self, t: int) -> None:
        with self._cv:
            self.durable_t = t
            ready = [w for wt, w in self._waiters if wt <= t]
            self._waiters = [(wt, w) for wt, w in self._waiters if wt > t]
        fire_all(ready)

    def _fail(self, exc: BaseException, upto: int) -> None:
        """The writer stops: commits up to ``upto`` may or may not be in the file, later ones are not."""
        with self._cv:
            self.failed = exc
            self._unknown_upto = max(upto, self.durable_t)
            waiters, self._waiters = self._waiters, []
        fire_all(w for _, w in waiters)

    def refusal(self) -> StorageError:
        return StorageError(
            self.path,
            f"writing to the file failed earlier ({self.failed!r}), so the store accepts no more commits; "
            "this transaction was not committed",
            "fix the cause (disk space, permissions, a failing disk) and open the store again; "
            "acknowledged commits are safe",
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
        try:
            if self.failed is None:
                await w.wait()
        finally:
            if not w.fired:  # cancelled: leave no waiter behind for the writer to fire
                with self._cv, contextlib.suppress(ValueError):
                    self._waiters.remove((t, w))
        if self.durable_t >= t:
            return
        if t <= self._unknown_upto:
            raise CommitOutcomeUnknown(
                self.path,
                f"writing commit t={t} to the file failed ({self.failed!r}): its outcome is unknown, it may or may "
                "not be there after the store is reopened",
                "the store accepts no more commits; fix the cause (disk space, permissions, a failing disk), "
                "reopen it and read the state before running the transaction again",
            )
        raise StorageError(
            self.path,
            f"commit t={t} was not written: writing an earlier commit failed ({self.failed!r}); "
            "it was not committed and will not be there after the store is reopened",
            "fix the cause (disk space, permissions, a failing disk) and reopen the store",
        )

    def close(self) -> None:
        """Write what is queued and a final checkpoint, then release the file."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join()
        self._release_lock()
