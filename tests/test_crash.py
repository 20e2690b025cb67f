"""Crash test: SIGKILL a process mid-transfers, over and over; nothing acknowledged is lost."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import anyio

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

    async def recover_and_deliver() -> tuple[int, dict[int, str], list[Decimal]]:
        store = open_store(str(path), str(deliveries))
        async with store:
            await store.outbox.drain()
            last = store.ref("last", "")
            accounts = [store.ref(f"acct-{i}", START) for i in range(ACCOUNTS)]
            committed = {}
            for t in range(1, store.t + 1):  # the whole history: every commit, as of its t
                db = store.as_of(t)
                before = store.as_of(t - 1)
                moved = [db[a] - before[a] for a in accounts if db[a] != before[a]]
                assert len(moved) in (0, 2) and sum(moved) == 0, f"t={t} is not one whole transfer: {moved}"
                committed[t] = db[last]
            assert await store.outbox.pending_count() == 0
            return store.t, committed, [a.get() for a in accounts]

    basis, committed, balances = anyio.run(recover_and_deliver)
    assert max(acked) <= basis
    for t, tid in acked.items():
        assert committed[t] == tid, f"acknowledged t={t} is not in the store"
    assert sum(balances) == START * ACCOUNTS and all(b >= Decimal(0) for b in balances)

    delivered: dict[tuple[int, int], str] = {}
    for line in deliveries.read_text().splitlines():
        t_text, seq_text, tid = line.split(",")
        delivered[(int(t_text), int(seq_text))] = tid
    for key, tid in delivered.items():
        assert committed.get(key[0]) == tid, f"delivered {key} belongs to no committed transaction"
    assert {t for t, _ in delivered} == set(committed), "a committed entry was never delivered"
