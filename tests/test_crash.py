"""Crash test: SIGKILL a process mid-transfers, over and over; nothing acknowledged is lost."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import anyio

from astm import codec

from .crash_child import ACCOUNTS, START, open_store

CHILD = Path(__file__).with_name("crash_child.py")


def test_sigkill_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """22 SIGKILLs at random moments: acknowledged commits survive, totals hold, only committed entries go out."""
    path, deliveries = tmp_path / "bank.db", tmp_path / "deliveries.txt"
    rng = random.Random(11)
    acked: dict[int, str] = {}
    kills = 0
    for _ in range(22):
        child = subprocess.Popen(
            [sys.executable, str(CHILD), str(path), str(deliveries)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        first = child.stdout.readline()  # it is running and has acknowledged something
        assert first, "the child died before its first commit"
        time.sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate(timeout=30)
        kills += child.returncode == -signal.SIGKILL
        for line in [first, *rest.splitlines()]:
            if line.strip():
                t_text, tid = line.split()
                acked[int(t_text)] = tid
    assert kills == 22 and len(acked) > 100

    async def recover_and_deliver() -> int:
        store = open_store(str(path), str(deliveries))
        async with store:
            await store.outbox.drain()
            return store.t

    basis = anyio.run(recover_and_deliver)

    conn = sqlite3.connect(path)
    log: dict[int, str] = dict(conn.execute("SELECT t, changes FROM log").fetchall())
    refs = {name: codec.loads(v) for name, v in conn.execute("SELECT name, value FROM refs")}
    outbox_left = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    conn.close()

    committed: dict[int, str] = {}
    for t, raw in log.items():
        changes = {name: (codec.decode(old), codec.decode(new)) for name, old, new in json.loads(raw)}
        deltas = [new - old for name, (old, new) in changes.items() if name.startswith("acct-")]
        assert len(deltas) == 2 and sum(deltas) == 0, f"t={t} is half applied: {changes}"
        committed[t] = changes["last"][1]
    assert max(acked) <= basis == max(committed)
    assert sorted(committed) == list(range(1, basis + 1)), "a commit is missing from the log"
    for t, tid in acked.items():
        assert committed[t] == tid, f"acknowledged t={t} is not in the store"
    assert sum(refs[f"acct-{i}"] for i in range(ACCOUNTS)) == START * ACCOUNTS
    assert all(refs[f"acct-{i}"] >= Decimal(0) for i in range(ACCOUNTS))

    delivered: dict[tuple[int, int], str] = {}
    for line in deliveries.read_text().splitlines():
        t_text, seq_text, tid = line.split(",")
        delivered[(int(t_text), int(seq_text))] = tid
    for key, tid in delivered.items():
        assert committed.get(key[0]) == tid, f"delivered {key} belongs to no committed transaction"
    assert {t for t, _ in delivered} == set(committed), "a committed entry was never delivered"
    assert outbox_left == 0
