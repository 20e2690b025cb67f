"""A child program for the crash-cycle and fault-injection tests: commits on a SQLite store and reports.

Usage: python fault_child.py STORE --audit FILE [--state FILE] [--base ID] [--tasks N]
[--commits N] [--pause S] [--history N] [--payload BYTES] [--ledger N] [--stop-on-error] [--drain]
[--reopen] [--abandon]

``STORE`` is a SQLite file's path or a PostgreSQL DSN (``postgresql://...``:
then several children may commit at once, as peers, and a state dump reads
every ref the database holds). Every transaction has a unique int id ``x`` (``--base``, ``--base + 1``, ...); its
plan (:func:`plan`, a pure function of ``x``) names the 2 of the 12 refs of
its epoch it appends ``x`` to (one with ``ref.alter(lambda v: v + (x,))``, logged as a whole
value, the other with ``ref.alter(astm.conj, x)``, logged as a delta) and, for
some ids, a brand new ref ``n<x>`` set to ``x``; it also enqueues ``x`` on the
``audit`` effect, whose handler appends ``t,seq,x`` to the audit file.
With ``--ledger N`` every transaction also appends ``x`` to one shared
``ledger`` ref, a pvector seeded with ``-N .. -1`` before the first commit
(``alter(astm.conj, x)``: one small delta per commit against a large value,
so the SQLite store's checkpoints wait for many commits).

On stdout, one line each (written straight to fd 1, so nothing is buffered):

* ``READY`` once the store is open and its state is in the state file;
* ``x t`` once ``await store.transact(...)`` returned (acknowledged);
* ``TXERR x {json}`` when a transaction raised (``applied`` says whether the
  store's memory shows the commit);
* ``CLOSED t`` after a clean close; ``FATAL {json}`` when opening, closing
  or anything else outside a transaction raised (exit status 3).

``--commits -1`` commits until SIGTERM, which stops new transactions, lets
those in flight finish and closes the store cleanly; ``--commits 0`` only
opens (and closes). ``--reopen`` opens the store a second time after the
clean close and dumps its state again; ``--drain`` first waits (up to 60 s)
until no outbox entry is pending, as a PostgreSQL peer's close does not (it
leaves them to the other peers). ``--abandon`` ends the process without
closing the store (like a crash). The state file holds a JSON list with one
state per opening (see :func:`dump`).

The environment variable ASTM_TEST_CHECKPOINT_EVERY overrides the SQLite
store's ``CHECKPOINT_EVERY`` to make checkpoints frequent.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import sqlite3
import sys
import traceback
from dataclasses import dataclass
from typing import Any

import anyio
from pyrsistent import pvector

import astm

#: refs per epoch that transactions append their ids to
K = 12
#: ids of one cycle of the crash test are ``cycle * CYCLE_SPAN + n``
CYCLE_SPAN = 100_000
#: ids of one epoch (10 cycles) share one set of K refs, so that values stay small
EPOCH_SPAN = 1_000_000
#: the share of transactions that also create a ref of their own
NEW_REF_SHARE = 0.25
#: the ref the padding of ``--payload`` goes to (the accounting ignores it)
PAD = "pad"
#: the shared ref of ``--ledger``: the seed ``-N .. -1``, then every committed id in commit order
LEDGER = "ledger"


@dataclass(frozen=True)
class Plan:
    """What transaction ``x`` writes: ``x`` appended to ``refs``, and ``new_ref`` set to ``x`` if named."""

    refs: tuple[str, str]
    new_ref: str | None


def plan(x: int) -> Plan:
    """The writes of transaction ``x`` (the same in the child and in the test that checks them)."""
    rng = random.Random(x)
    epoch = x // EPOCH_SPAN
    a, b = sorted(rng.sample(range(K), 2))
    new_ref = f"n{x}" if rng.random() < NEW_REF_SHARE else None
    return Plan((f"k{epoch}.{a}", f"k{epoch}.{b}"), new_ref)


def is_k_ref(name: str) -> bool:
    """Whether ``name`` is one of the K refs of an epoch (``k<epoch>.<j>``)."""
    head, _, tail = name.partition(".")
    return name.startswith("k") and head[1:].isdigit() and tail.isdigit()


def is_new_ref(name: str) -> bool:
    """Whether ``name`` is a ref created by one transaction (``n<id>``)."""
    return name.startswith("n") and name[1:].isdigit()


def emit(line: str) -> None:
    """Write one line to stdout with writev (not write: the fault tests inject errors into write)."""
    data = (line + "\n").encode()
    while data:
        data = data[os.writev(1, [data]) :]


def describe(exc: BaseException) -> dict[str, Any]:
    """An error as the tests read it: type, whether it is an AstmError, message, causes and traceback."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    chain: list[str] = []
    cause = exc.__cause__ or exc.__context__
    while cause is not None and len(chain) < 5:
        chain.append(f"{type(cause).__module__}.{type(cause).__qualname__}: {cause}")
        cause = cause.__cause__ or cause.__context__
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "astm": isinstance(exc, astm.AstmError),
        "unknown": isinstance(exc, astm.CommitOutcomeUnknown),
        "message": str(exc),
        "chain": chain,
        "traceback": "".join(traceback.format_exception(exc))[-4000:],
    }


def configure() -> None:
    """Apply ASTM_TEST_CHECKPOINT_EVERY to the SQLite store (it must still have the constant)."""
    every = os.environ.get("ASTM_TEST_CHECKPOINT_EVERY")
    if every:
        from astm.stores import sqlite

        if not hasattr(sqlite, "CHECKPOINT_EVERY"):
            raise SystemExit("astm.stores.sqlite has no CHECKPOINT_EVERY any more: update tests/fault_child.py")
        setattr(sqlite, "CHECKPOINT_EVERY", int(every))  # noqa: B010 - robust to the constant becoming Final


def is_postgres(path: str) -> bool:
    """Whether the child's STORE is a PostgreSQL DSN (else a SQLite file's path)."""
    return path.startswith(("postgresql://", "postgres://"))


def open_store(path: str, audit_file: str, history: int) -> tuple[astm.Store, astm.Effect]:
    """The store with the audit effect registered."""
    store = astm.Store(path if is_postgres(path) else f"sqlite:///{path}", history=history)
    fd = os.open(audit_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @store.effect("audit", backoff=0.001)
    async def audit(x: int, *, key: tuple[int, int]) -> None:
        os.writev(fd, [f"{key[0]},{key[1]},{x}\n".encode()])

    return store, audit


async def committed_log(store: astm.Store) -> tuple[int, list[tuple[int, list[int]]]]:
    """The retained log: its oldest t, and for each commit after it the ids it added."""
    since = 0
    while True:
        try:
            return since, await _read_log(store, since)
        except astm.HistoryUnavailable as exc:
            if exc.oldest <= since:
                raise
            since = exc.oldest


async def _read_log(store: astm.Store, since: int) -> list[tuple[int, list[int]]]:
    out: list[tuple[int, list[int]]] = []
    if since >= store.t:
        return out
    async for rep in store.reports(since=since):
        if all(change.ref.name == LEDGER for change in rep.changes):  # the ledger's seed
            if rep.t >= store.t:
                break
            continue
        ids: set[int] = set()
        for change in rep.changes:
            name = change.ref.name
            if is_k_ref(name):
                old = set(change.old or ())
                ids.update(x for x in change.new if x not in old)
            elif is_new_ref(name):
                ids.add(int(name[1:]))
        out.append((rep.t, sorted(ids)))
        if rep.t >= store.t:
            break
    return out


def size_of(path: str) -> int:
    """A file's size, 0 if it does not exist."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


async def pending_entries(store: astm.Store) -> int:
    """Outbox entries committed and not yet delivered (``pending_count()``, or the older ``pending``)."""
    count = getattr(store.outbox, "pending_count", None)
    if count is not None:
        return int(await count())
    return int(store.outbox.pending)


async def dump(store: astm.Store, stage: str, audit_file: str, path: str | None = None) -> dict[str, Any]:
    """The state of a freshly opened store: t, the K refs and new refs, the log's ids, the outbox.

    ``audit_size`` is the audit file's size before the dump: the deliveries it
    holds were made before this state was read, so the state must account for them.
    With ``path``, ``checkpoint_t`` is the t of the checkpoint the file held.
    """
    audit_size = size_of(audit_file)
    if is_postgres(store.url):
        await load_every_ref(store)
    refs: dict[str, Any] = {}
    others: list[str] = []
    for name, ref in store.refs().items():
        value = ref.get()
        if is_k_ref(name) or is_new_ref(name):
            refs[name] = list(value) if isinstance(value, tuple) else value
        else:
            others.append(name)
    oldest, log = await committed_log(store)
    ledger = store.refs().get(LEDGER)
    return {
        "audit_size": audit_size,
        "stage": stage,
        "t": store.t,
        "checkpoint_t": checkpoint_t(path) if path else None,
        "refs": refs,
        "ledger": None if ledger is None else list(ledger.get()),
        "other_refs": others,
        "log_oldest": oldest,
        "log": log,
        "pending": await pending_entries(store),
        "dead": len(await store.outbox.dead_letters()),
    }


async def load_every_ref(store: astm.Store) -> None:
    """Have a PostgreSQL peer hold every ref of the test that the database holds (names read from its table)."""
    import asyncpg

    conn = await asyncpg.connect(store.url)
    try:
        names = [r["name"] for r in await conn.fetch("SELECT name FROM astm_refs")]
    finally:
        await conn.close()
    wanted = [n for n in names if is_k_ref(n) or is_new_ref(n) or n == LEDGER]
    await store.load(*(store.ref(n, None) for n in wanted))


def checkpoint_t(path: str) -> int:
    """The t of the checkpoint in a store's file, on a read-only connection of its own (no checkpoint on close)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT value FROM astm_meta WHERE key = 'checkpoint_t'").fetchone()[0])
    finally:
        conn.close()


def save(states: list[dict[str, Any]], state_file: str | None) -> None:
    """Write the states with writev (the fault tests inject errors into write and pwrite64)."""
    if state_file:
        tmp = state_file + ".tmp"
        data = json.dumps(states).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while data:
                data = data[os.writev(fd, [data]) :]
        finally:
            os.close(fd)
        os.replace(tmp, state_file)


async def commit_all(store: astm.Store, audit: astm.Effect, args: argparse.Namespace) -> None:
    """Run ``--tasks`` committers until ``--commits`` ids are used up, SIGTERM, or (with --stop-on-error) an error."""
    stop = anyio.Event()
    ids = itertools.count(args.base)
    limit = None if args.commits < 0 else args.base + args.commits
    blob = "x" * args.payload

    async def body(x: int) -> None:
        p = plan(x)
        first, second = (store.ref(name, ()) for name in p.refs)
        first.alter(lambda v: (*v, x))  # a whole new value in the log
        await anyio.sleep(0)
        second.alter(astm.conj, x)  # a delta in the log (a collection helper)
        if p.new_ref is not None:
            own: astm.Ref[int | None] = store.ref(p.new_ref, None)
            own.set(x)
        if blob:
            store.ref(PAD, "").commute(lambda _: f"{x}:{blob}")
        if args.ledger:
            store.ref(LEDGER, None).alter(astm.conj, x)
        audit.enqueue(x)

    def applied(x: int) -> bool:
        ref = store.refs().get(plan(x).refs[0])
        if ref is None:
            return False
        try:
            return x in ref.get()
        except astm.RefNotLoaded:  # a PostgreSQL peer that does not hold the ref: its memory shows no commit
            return False

    async def worker(seed: int) -> None:
        rng = random.Random(seed * 7919 + args.base)
        while not stop.is_set():
            x = next(ids)
            if limit is not None and x >= limit:
                return
            try:
                rep = await store.transact(body, x)
            except Exception as exc:
                emit(f"TXERR {x} " + json.dumps({**describe(exc), "applied": applied(x)}))
                if args.stop_on_error:
                    stop.set()
                continue
            emit(f"{x} {rep.t}")
            if args.pause:
                await anyio.sleep(rng.uniform(0, args.pause))

    async def on_sigterm(scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM) as signals, scope:
            async for _ in signals:
                stop.set()
                return

    async with anyio.create_task_group() as outer:
        watcher = anyio.CancelScope()
        outer.start_soon(on_sigterm, watcher)
        async with anyio.create_task_group() as tg:
            for i in range(args.tasks):
                tg.start_soon(worker, i)
        watcher.cancel()


async def seed_ledger(store: astm.Store, n: int) -> None:
    """Set the ledger ref to ``-n .. -1`` unless it exists (one commit, not an acknowledged id)."""

    def seed() -> None:
        ledger: astm.Ref[Any] = store.ref(LEDGER, None)
        if ledger.get() is None:
            ledger.set(pvector(range(-n, 0)))

    if LEDGER not in store.refs():
        await store.transact(seed)


async def run(args: argparse.Namespace) -> None:
    states: list[dict[str, Any]] = []
    sqlite_file = args.path if args.ledger and not is_postgres(args.path) else None  # for checkpoint_t
    store, audit = open_store(args.path, args.audit, args.history)
    async with store:
        if args.state or not is_postgres(args.path):
            # (a PostgreSQL dump reads every ref, over a connection of its own: only when it is asked for)
            states.append(await dump(store, "open", args.audit, sqlite_file))
            save(states, args.state)
        if args.ledger and args.commits:
            await seed_ledger(store, args.ledger)
        emit("READY")
        if args.commits:
            await commit_all(store, audit, args)
        if args.drain:
            with anyio.fail_after(60):
                await store.outbox.drain()
        if args.abandon:
            os._exit(0)
    emit(f"CLOSED {store.t}")
    if args.reopen:
        again, _ = open_store(args.path, args.audit, args.history)
        async with again:
            states.append(await dump(again, "reopen", args.audit, sqlite_file))
            save(states, args.state)
        emit(f"CLOSED {again.t}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--audit", required=True)
    parser.add_argument("--state")
    parser.add_argument("--base", type=int, default=0)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--commits", type=int, default=0)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--history", type=int, default=1000)
    parser.add_argument("--payload", type=int, default=0)
    parser.add_argument("--ledger", type=int, default=0)
    parser.add_argument("--stop-on-error", action="store_true")
    parser.add_argument("--drain", action="store_true")
    parser.add_argument("--reopen", action="store_true")
    parser.add_argument("--abandon", action="store_true")
    args = parser.parse_args()
    try:
        configure()
        astm.run(run, args)
    except BaseException as exc:  # everything the tests should see, as a line they can read
        emit("FATAL " + json.dumps(describe(exc)))
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
