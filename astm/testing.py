"""Helpers for testing code built on astm: a throwaway PostgreSQL cluster.

The cluster is started with PostgreSQL's own programs (used by astm's tests
and benchmarks, and usable by yours).

``ASTM_TEST_POSTGRES_DSN`` (a database the tests may fill) is used when set.
Otherwise ``initdb``/``pg_ctl`` (on PATH or in /usr/lib/postgresql/*/bin)
create a cluster in a temporary directory, listening on a free loopback port;
as root they run as the ``postgres`` OS user, which PostgreSQL requires.
:class:`Standby` adds a hot standby of such a cluster (a streaming replica,
for testing a store with ``replica=``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def available() -> bool:
    """Whether a cluster can be had: ASTM_TEST_POSTGRES_DSN is set or PostgreSQL's programs are installed."""
    return bool(os.environ.get("ASTM_TEST_POSTGRES_DSN")) or all(_bin(n) for n in ("initdb", "pg_ctl", "postgres"))


__all__ = ["Cluster", "Standby", "available"]


class Cluster:
    """A started cluster; ``dsn`` connects to its ``astm`` database. ``destroy()`` removes it."""

    def __init__(self, parent: Path | None = None, initdb: Sequence[str] = ()) -> None:
        """Create and start a cluster in a new temporary directory (inside ``parent`` when given);
        ``initdb``: more options for ``initdb`` (say ``--wal-segsize=1``)."""
        self._prepare("astm-pg-", parent)
        self._run([_bin("initdb"), "-D", str(self.data), "-U", "astm", "--auth=trust", "-E", "UTF8", *initdb])
        self.start()
        self._run([_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "astm", "astm"])
        self.dsn = f"postgresql://astm@127.0.0.1:{self.port}/astm"

    def _prepare(self, prefix: str, parent: Path | None = None) -> None:
        """A fresh directory (owned by the ``postgres`` OS user when run as root) and a free loopback port."""
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self.data = self.dir / "data"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")

    @classmethod
    def existing(cls, data: Path, port: int) -> Cluster:
        """A handle on a cluster already created at ``data``, listening on ``port`` (to stop or start it)."""
        self = cls.__new__(cls)
        self.data = data
        self.dir = data.parent
        self.port = port
        self.as_postgres = os.geteuid() == 0
        self.dsn = f"postgresql://astm@127.0.0.1:{port}/astm"
        return self

    def _run(self, argv: list[str | None], check: bool = True) -> int:
        """Run one of PostgreSQL's programs (as the ``postgres`` OS user when root); its exit status."""
        cmd = [str(a) for a in argv]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, timeout=120).returncode

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c max_connections=200 -c fsync=on"
        self._run([_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start"])

    def stop(self, mode: str = "fast") -> None:
        self._run([_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def running(self) -> bool:
        """Whether the server is up (``pg_ctl status``): it may have stopped by itself, say on a full disk."""
        return self._run([_bin("pg_ctl"), "-D", str(self.data), "status"], check=False) == 0

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class Standby(Cluster):
    """A hot standby of ``primary``: a streaming replica on a port of its own, read only.

    Made with ``pg_basebackup -R -X stream`` (the primary's defaults allow it:
    ``wal_level=replica``, and ``initdb --auth=trust`` lets local users
    replicate). ``dsn`` connects to its ``astm`` database; :meth:`dsn_of` to
    any database of the primary. :meth:`pause` and :meth:`resume` stop and
    restart the replay of the primary's WAL, to test a replica that lags.
    """

    def __init__(self, primary: Cluster) -> None:
        self.primary = primary
        self._prepare("astm-pg-standby-")
        self._run(
            [_bin("pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port), "-U", "astm",
             "-D", str(self.data), "-R", "-X", "stream", "-c", "fast"]
        )  # fmt: skip
        self.start()
        self.dsn = self.dsn_of(primary.dsn)

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c max_connections=200 -c hot_standby=on"
        self._run([_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start"])

    def dsn_of(self, primary_dsn: str) -> str:
        """The DSN of the same database on this standby (the primary's DSN with this standby's port)."""
        import urllib.parse

        parts = urllib.parse.urlsplit(primary_dsn)
        netloc = parts.netloc.rsplit(":", 1)[0] if parts.port else parts.netloc
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{netloc}:{self.port}"))

    def psql(self, sql: str, database: str = "astm") -> str:
        """Run ``sql`` on this standby; its output, unaligned."""
        cmd = [str(_bin("psql") or "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "astm",
               "-d", database, "-XAtqc", sql]  # fmt: skip
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout.strip()

    def pause(self) -> None:
        """Stop replaying the primary's WAL: from now on this standby lags (until :meth:`resume`)."""
        self.psql("SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + 10
        while self.psql("SELECT pg_get_wal_replay_pause_state()") != "paused":
            if time.monotonic() > deadline:  # pragma: no cover
                raise TimeoutError("the standby did not pause its replay")
            time.sleep(0.01)

    def resume(self) -> None:
        self.psql("SELECT pg_wal_replay_resume()")

    def wait_caught_up(self, timeout: float = 30.0) -> None:
        """Wait until this standby has replayed everything the primary has written so far."""
        target = self._primary_lsn()
        deadline = time.monotonic() + timeout
        while self.psql(f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn") != "t":
            if time.monotonic() > deadline:
                raise TimeoutError(f"the standby did not replay up to {target}")
            time.sleep(0.01)

    def _primary_lsn(self) -> str:
        cmd = [str(_bin("psql") or "psql"), "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "astm",
               "-d", "astm", "-XAtqc", "SELECT pg_current_wal_lsn()"]  # fmt: skip
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout.strip()
