"""Crash cycles on PostgreSQL: peers committing together, SIGKILLed; every acknowledged commit is accounted for.

Each cycle starts three peers of ``tests/fault_child.py`` on one database at
once, each with its own ids, so they commit concurrently to the same 12 refs
(conflicts between processes, retried) and enqueue outbox entries that any
peer may deliver. Then each peer, in random order a moment apart, is killed
with SIGKILL (most of the time) or stopped with SIGTERM and closed cleanly.
When all are gone a fresh peer opens, loads every ref the database holds and
dumps its state, which is checked id by id against everything acknowledged
so far (``tests/fault_ledger.py``): each acknowledged id in exactly its refs,
once; its own ref present; no half-applied commit; the log agreeing; every
delivery belonging to a committed transaction under one key. At the end the
leases of entries claimed by killed peers are let run out (as 30 seconds
would), a peer opens and closes cleanly, and every committed entry must have
been delivered.

Another test crashes the server itself (``pg_ctl stop -m immediate``: no
shutdown checkpoint, WAL recovery on restart) in the middle of every cycle,
restarts it and waits until every peer commits again; a transaction may then
raise only a ``StorageError``, and one that raised anything but
``CommitOutcomeUnknown`` (which may go either way) must not be committed.

A second variant has every transaction also append its id to one shared
pvector seeded with 2,000 entries: every commit conflicts with every other
peer's, each logs a delta against the value, and the store sends the value
whole again after every 125 deltas, so kills land in long and in fresh delta
chains; the ledger must hold its seed, then every committed id once, in
commit order.

A full disk, for real: the server's data directory sits on a small tmpfs of
its own, filled until the tables cannot grow (the server refuses commits and
keeps running); in the other case the WAL sits on a tmpfs of its own with 1 MB
segments, filled until it needs a segment there is no room for (the server
stops). Errors must be StorageErrors; after space is freed (and the server
started again if it stopped) a fresh peer checks the ledger, and the store
must commit again.

A dropped connection at any moment: a peer commits 60 transactions under
strace, which fails one of its event loop's socket reads (``recvfrom``) or
writes (``sendto``) with ECONNRESET, at points spread over a run (found by a dry run): while it opens,
awaits a commit's answer, follows the log, claims outbox entries. Errors must
be StorageErrors (a drop while opening too), and a fresh peer checks the
ledger and commits.

Each variant takes about 20 seconds (8 cycles, 24 peers, most of them
killed); ``ASTM_SOAK=1`` runs six times as many cycles.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from astm.testing import Cluster

from .disks import fill, mount_small_disk, unmount
from .fault_child import CYCLE_SPAN
from .fault_ledger import Child, Ledger, load_states, read_deliveries, run_child
from .strace import need_strace, strace_prefix

SOAK = bool(os.environ.get("ASTM_SOAK"))
PEERS = 3
CYCLES = 48 if SOAK else 8
#: cycles of the server-crash test
CRASHES = 24 if SOAK else 4
#: ids of one peer of a cycle start at ``cycle * CYCLE_SPAN + peer * PEER_SPAN``
PEER_SPAN = CYCLE_SPAN // PEERS


async def _expire_leases(dsn: str) -> int:
    """End the outbox leases killed peers left behind, as their expiry would (returns how many)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        status = await conn.execute("UPDATE astm_outbox SET locked_until = now() WHERE locked_until > now()")
        return int(status.split()[-1])
    finally:
        await conn.close()


def _a_storage_error(error: dict[str, Any]) -> bool:
    """An error a lost server may cause: a StorageError (not committed) or CommitOutcomeUnknown (a subclass)."""
    kinds = ("StorageError", "CommitOutcomeUnknown", "CommittedNotApplied")
    return bool(error["astm"]) and error["type"].rsplit(".", 1)[-1] in kinds


class PeerCycles:
    def __init__(self, dsn: str, tmp_path: Path, ledger: int, server: Cluster | None = None) -> None:
        self.dsn = dsn
        #: the cluster to crash (``pg_ctl stop -m immediate``) and restart in the middle of every cycle
        self.server = server
        self.crashes = 0
        self.raised = 0
        self.extra = ["--ledger", str(ledger)] if ledger else []
        self.audit = tmp_path / "audit.txt"
        self.state = tmp_path / "state.json"
        self.ledger = Ledger(seed=ledger)
        self.kills = 0
        self.closes = 0
        self.cycle = 0

    def fail(self, what: str, problems: list[str]) -> None:
        pytest.fail(
            f"cycle {self.cycle} ({what}): {len(self.ledger.acked)} acknowledged so far, {self.kills} peers killed, "
            f"{self.closes} closed\n  - " + "\n  - ".join(problems),
            pytrace=False,
        )

    def run(self, rng: random.Random) -> None:
        """One cycle: three peers commit together, then each is killed or closed, a moment apart."""
        common = [self.dsn, "--audit", str(self.audit), "--tasks", "4", "--commits", "-1", "--pause", "0.01"]
        common += self.extra
        peers = [Child([*common, "--base", str(self.cycle * CYCLE_SPAN + p * PEER_SPAN)]) for p in range(PEERS)]
        for peer in peers:
            if not peer.wait_ready():
                for other in peers:
                    other.kill()
                    other.finish()
                self.fail("start", [f"a peer did not open: {peer.summary()}"])
        for peer in peers:
            peer.wait_first_ack()
        time.sleep(rng.uniform(0.05, 0.6))
        if self.server is not None:
            self.crash_server(peers, rng)
        killed = set()
        for i in rng.sample(range(PEERS), PEERS):
            if rng.random() < 0.75:
                peers[i].kill()
                killed.add(i)
            else:
                peers[i].terminate()
            time.sleep(rng.uniform(0, 0.15))
        for i, peer in enumerate(peers):
            rc = peer.finish()
            self.ledger.take(peer.out)
            unclear = [e for e in peer.out.errors.values() if not _a_storage_error(e)]
            if peer.out.fatal is not None or unclear or (peer.out.errors and self.server is None):
                detail = [f"{x}: {e['type']}: {e['message']}\n{e['traceback']}" for x, e in peer.out.errors.items()][:1]
                self.fail("commit", [f"peer {i} failed: {peer.summary()}", *detail])
            self.raised += len(peer.out.errors)
            if i in killed:
                if rc != -signal.SIGKILL:
                    self.fail("kill", [f"peer {i} was not killed: {peer.summary()}"])
                self.kills += 1
            else:
                if rc != 0 or not peer.out.closed:
                    self.fail("close", [f"peer {i} did not close cleanly: {peer.summary()}"])
                self.closes += 1
        if self.ledger.problems:
            self.fail("acknowledgements", self.ledger.problems)

    def crash_server(self, peers: list[Child], rng: random.Random) -> None:
        """Crash PostgreSQL under the committing peers, restart it, and wait until each peer commits again."""
        assert self.server is not None
        self.server.stop("immediate")
        self.crashes += 1
        time.sleep(rng.uniform(0.1, 0.8))
        self.server.start()
        before = [len(peer.out.acked) for peer in peers]
        deadline = time.monotonic() + 30
        while any(len(p.out.acked) <= n for p, n in zip(peers, before, strict=True)):
            if time.monotonic() > deadline:
                stuck = [i for i, (p, n) in enumerate(zip(peers, before, strict=True)) if len(p.out.acked) <= n]
                for peer in peers:
                    peer.kill()
                    peer.finish()
                self.fail(
                    "restart",
                    [
                        "peers did not commit again within 30 s of the restart",
                        *[f"peer {i}: {peers[i].summary()}" for i in stuck],
                    ],
                )
            time.sleep(0.05)

    def check(self, *extra: str) -> list[dict[str, object]]:
        """A fresh peer opens and dumps what it finds; each state is checked against the ledger."""
        self.state.unlink(missing_ok=True)
        child = run_child([self.dsn, "--audit", str(self.audit), "--state", str(self.state), *self.extra, *extra])
        states = load_states(self.state)
        if not states or child.out.fatal is not None or child.proc.returncode != 0:
            self.fail("check", [f"the checking peer failed: {child.summary()}"])
        for state in states:
            problems = self.ledger.check(state, read_deliveries(self.audit, state["audit_size"]))
            if problems:
                self.fail(f"check ({state['stage']})", problems)
        return states


@pytest.mark.timeout(1800 if SOAK else 300)
def test_a_crashed_server_loses_no_acknowledged_commit(pg_dsn: str, tmp_path: Path) -> None:
    """PostgreSQL crashed (immediate shutdown) under committing peers, restarted: nothing acknowledged is lost,
    and no transaction that raised "not committed" is there."""
    data = os.environ.get("ASTM_TEST_PG_DATA")
    if not data:
        pytest.skip("needs the throwaway cluster (not ASTM_TEST_POSTGRES_DSN) to crash the server")
    port = urllib.parse.urlsplit(pg_dsn).port
    assert port is not None
    rng = random.Random(f"pg-server-crash-{SOAK}")
    cycles = PeerCycles(pg_dsn, tmp_path, 0, server=Cluster.existing(Path(data), port))
    for cycle in range(CRASHES):
        cycles.cycle = cycle
        cycles.run(rng)
        cycles.check()
    print(
        f"{CRASHES} server crashes: {cycles.kills} peers killed, {len(cycles.ledger.acked)} acknowledged commits, "
        f"{cycles.raised} transactions raised a StorageError"
    )
    assert cycles.crashes == CRASHES and len(cycles.ledger.acked) > 20 * CRASHES


@pytest.mark.timeout(1800 if SOAK else 300)
@pytest.mark.parametrize("ledger", [0, 2_000], ids=["refs", "shared-ledger"])
def test_sigkilled_peers_lose_no_acknowledged_commit(pg_dsn: str, tmp_path: Path, ledger: int) -> None:
    """Concurrent peers killed at random: after each cycle every acknowledged commit is there, whole and once."""
    rng = random.Random(f"pg-cycles-{ledger}-{SOAK}")
    cycles = PeerCycles(pg_dsn, tmp_path, ledger)
    for cycle in range(CYCLES):
        cycles.cycle = cycle
        cycles.run(rng)
        cycles.check()
    leases = anyio.run(_expire_leases, pg_dsn)
    states = cycles.check("--drain", "--reopen")  # a peer's close leaves entries to the others: deliver them first
    problems = cycles.ledger.check_all_delivered(states[-1], read_deliveries(cycles.audit))
    if len(states) != 2 or problems:
        cycles.fail("final", problems or ["the final reopening failed"])
    print(
        f"{CYCLES} cycles: {cycles.kills} peers killed, {cycles.closes} closed cleanly, "
        f"{len(cycles.ledger.acked)} acknowledged commits, {leases} outbox leases left by killed peers"
    )
    assert cycles.kills >= CYCLES and len(cycles.ledger.acked) > 20 * CYCLES


@contextlib.contextmanager
def _small_disk(megabytes: int) -> Iterator[tuple[Path, str]]:
    """A tmpfs (or loop-mounted ext4) of ``megabytes`` the server's OS user can reach (not in tmp_path)."""
    disk = Path(tempfile.mkdtemp(prefix="astm-pg-disk-"))
    disk.chmod(0o755)
    kind, tried = mount_small_disk(disk, megabytes)
    if kind is None:
        disk.rmdir()
        pytest.skip("no small file system for the server's files could be mounted (needs root): " + "; ".join(tried))
    try:
        yield disk, kind
    finally:
        unmount(disk)
        shutil.rmtree(disk, ignore_errors=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("full", ["tables", "wal"])
def test_a_full_disk_on_the_server_loses_no_acknowledged_commit(tmp_path: Path, full: str) -> None:
    """The server's disk fills up under a committing peer: its commits fail with a StorageError; once there is
    space again (and the server runs again, if it stopped) nothing acknowledged is lost, no transaction that
    raised "not committed" is there, and the store commits again.

    ``tables``: the data directory's file system has 1 MB left, so the tables soon cannot grow (the server
    refuses each commit and keeps running). ``wal``: the WAL is on a file system of its own with 512 KB
    left and 1 MB segments, so it soon needs a segment there is no room for (the server stops).
    """
    if os.environ.get("ASTM_TEST_POSTGRES_DSN"):
        pytest.skip("needs a throwaway cluster of its own, on small file systems")
    with contextlib.ExitStack() as stack:
        data, kind = stack.enter_context(_small_disk(160))
        if full == "wal":
            wal, _ = stack.enter_context(_small_disk(24))
            initdb: tuple[str, ...] = ("--wal-segsize=1", f"--waldir={wal / 'pg_wal'}")
            filled, left = wal, 512 * 1024
        else:
            initdb, filled, left = (), data, 1024 * 1024
        cluster = Cluster(parent=data, initdb=initdb)
        stack.callback(cluster.destroy)
        _fill_the_servers_disk(cluster, filled, f"{full} ({kind})", left, tmp_path)


def _fill_the_servers_disk(cluster: Cluster, disk: Path, kind: str, left: int, tmp_path: Path) -> None:
    dsn, audit, state_file = cluster.dsn, tmp_path / "audit.txt", tmp_path / "state.json"
    ledger = Ledger()
    first = run_child([dsn, "--audit", str(audit), "--base", "1", "--commits", "20", "--tasks", "4"])
    assert first.proc.returncode == 0 and len(first.out.acked) == 20, first.summary()
    ledger.take(first.out)
    fillers = fill(disk, left)
    # two peers at once, so that commits also queue behind the other's when the server refuses one
    peers = [Child([dsn, "--audit", str(audit), "--base", str(base), "--commits", "5000", "--tasks", "4",
                    "--payload", "8000", "--stop-on-error"]) for base in (100_000, 150_000)]  # fmt: skip
    for peer in peers:
        peer.finish(180)
        ledger.take(peer.out)
    problems = []
    errors = {x: e for peer in peers for x, e in peer.out.errors.items()}
    if not errors:
        problems.append(f"10000 commits of 8 KB fit in the {left} bytes left: {[p.summary() for p in peers]}")
    unclear = [f"{x}: {e['type']}: {e['message']}" for x, e in errors.items() if not _a_storage_error(e)]
    if unclear:
        problems.append(f"errors that are not a StorageError: {unclear[:3]}")
    problems += [f"a peer failed: {p.summary()}" for p in peers if p.out.fatal is not None]
    for filler in fillers:
        filler.unlink()
    stopped = not cluster.running()
    if stopped:
        cluster.start()
    checker = run_child([dsn, "--audit", str(audit), "--state", str(state_file)])
    states = load_states(state_file)
    if not states or checker.out.fatal is not None:
        problems.append(f"the checking peer failed: {checker.summary()}")
    for state in states:
        problems += ledger.check(state, read_deliveries(audit, state["audit_size"]))
    after = run_child([dsn, "--audit", str(audit), "--base", "200000", "--commits", "10", "--tasks", "2"])
    if after.proc.returncode != 0 or len(after.out.acked) != 10:
        problems.append(f"the store did not commit again once there was space: {after.summary()}")
    kinds = sorted({e["type"].rsplit(".", 1)[-1] for e in errors.values()})
    first_error = errors[min(errors)] if errors else None
    print(
        f"full {kind}: {sum(len(p.out.acked) for p in peers)} acknowledged, {len(errors)} raised {kinds}"
        + (f" (first: {first_error['message'][:300]})" if first_error else "")
        + f"; the server {'had stopped' if stopped else 'kept running'}"
    )
    assert not problems, "\n  - ".join(["", *problems])


#: where in a peer's run its connection drops: fractions of the socket reads a run without faults makes
DROP_AT = [0.01, 0.03, 0.06, 0.1, 0.25, 0.4, 0.55, 0.7, 0.8, 0.9]
DROP_ARGS = ["--commits", "60", "--tasks", "4"]


@pytest.fixture(scope="module")
def socket_calls(astm_postgres_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """How many socket reads (recvfrom) and writes (sendto) the peer's event loop thread makes in a run of
    DROP_ARGS."""
    import asyncpg

    strace = need_strace()
    where = tmp_path_factory.mktemp("dry-run")
    log = where / "strace"

    async def create() -> None:
        conn = await asyncpg.connect(astm_postgres_cluster)
        try:
            await conn.execute("DROP DATABASE IF EXISTS astm_dry_run")
            await conn.execute("CREATE DATABASE astm_dry_run")
        finally:
            await conn.close()

    anyio.run(create)
    dsn = urllib.parse.urlunsplit(urllib.parse.urlsplit(astm_postgres_cluster)._replace(path="/astm_dry_run"))
    child = Child([dsn, "--audit", str(where / "audit"), "--base", "900000", *DROP_ARGS],
                  prefix=strace_prefix(strace, "recvfrom,sendto", "", log))  # fmt: skip
    child.finish(120)
    assert child.proc.returncode == 0, child.summary()
    counts = {}
    for syscall in ("recvfrom", "sendto"):
        calls: dict[str, int] = {}
        for line in log.read_text().splitlines():
            if f"{syscall}(" in line:
                tid = line.split()[0]
                calls[tid] = calls.get(tid, 0) + 1
        counts[syscall] = max(calls.values())
    return counts


@pytest.mark.timeout(300)
@pytest.mark.parametrize("syscall", ["recvfrom", "sendto"])
@pytest.mark.parametrize("at", DROP_AT)
def test_a_connection_dropped_at_any_moment_loses_no_acknowledged_commit(
    pg_dsn: str, tmp_path: Path, socket_calls: dict[str, int], syscall: str, at: float
) -> None:
    """One of a committing peer's connections drops (a socket read or write fails with ECONNRESET, injected
    with strace) at a point spread over its run: while it opens, sends a commit or awaits its answer, follows
    the log, claims outbox entries. Every error is a StorageError (or an unknown outcome); a fresh peer finds
    every acknowledged commit, none that raised "not committed", and the store commits again."""
    strace = need_strace()
    socket_reads = socket_calls[syscall]
    when = max(1, int(socket_reads * at))
    audit, state_file = tmp_path / "audit.txt", tmp_path / "state.json"
    base = 300_000 + int(at * 100) * 1000
    inject = strace_prefix(strace, syscall, f"error=ECONNRESET:when={when}", tmp_path / "strace")
    child = Child([pg_dsn, "--audit", str(audit), "--base", str(base), *DROP_ARGS], prefix=inject)
    child.finish(120)
    injected = "(INJECTED)" in (tmp_path / "strace").read_text()
    ledger = Ledger()
    ledger.take(child.out)
    problems = []
    unclear = [f"{x}: {e['type']}: {e['message']}" for x, e in child.out.errors.items() if not _a_storage_error(e)]
    if unclear:
        problems.append(f"errors that are not a StorageError: {unclear[:3]}")
    if child.out.fatal is not None and not _a_storage_error(child.out.fatal):
        problems.append(f"the peer failed: {child.summary()}")
    checker = run_child([pg_dsn, "--audit", str(audit), "--state", str(state_file), "--base", str(base + 500),
                         "--commits", "5", "--tasks", "1"])  # fmt: skip
    states = load_states(state_file)
    if not states or checker.out.fatal is not None or len(checker.out.acked) != 5:
        problems.append(f"the checking peer failed: {checker.summary()}")
    for state in states:
        problems += ledger.check(state, read_deliveries(audit, state["audit_size"]))
    print(f"{syscall} {when} of {socket_reads}: {child.summary()}")
    if not injected and not problems:  # this run made fewer calls than the dry run: it proves nothing
        pytest.skip(f"the peer made fewer than {when} {syscall} calls this time: strace injected nothing")
    if child.out.fatal is not None:
        print(child.out.fatal["traceback"])
    assert not problems, "\n  - ".join(["", *problems])
