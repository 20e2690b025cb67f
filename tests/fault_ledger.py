"""The accounting of the crash-cycle and fault tests: every acknowledged commit, checked id by id.

A :class:`Ledger` collects what children of ``tests/fault_child.py`` reported
(acknowledged ids with their t, transactions that raised, fatal errors) and
checks each state a child dumped after opening the store, and the audit file
the outbox effect appends to. No aggregates: each finding names the ids.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fault_child import is_k_ref, is_new_ref, plan

CHILD = Path(__file__).with_name("fault_child.py")
ROOT = CHILD.parent.parent

#: how many ids a finding lists before it says "and N more"
SHOW = 8


def _some(items: list[str]) -> str:
    more = f" ... and {len(items) - SHOW} more" if len(items) > SHOW else ""
    return "; ".join(items[:SHOW]) + more


@dataclass
class Output:
    """What one child printed."""

    acked: dict[int, int] = field(default_factory=dict)
    errors: dict[int, dict[str, Any]] = field(default_factory=dict)
    fatal: dict[str, Any] | None = None
    ready: bool = False
    closed: list[int] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    def feed(self, line: str) -> None:
        word, _, rest = line.strip().partition(" ")
        if not word:
            return
        if word.isdigit():
            self.acked[int(word)] = int(rest)
        elif word == "TXERR":
            x, _, info = rest.partition(" ")
            self.errors[int(x)] = json.loads(info)
        elif word == "FATAL":
            self.fatal = json.loads(rest)
        elif word == "READY":
            self.ready = True
        elif word == "CLOSED":
            self.closed.append(int(rest))
        else:
            self.other.append(line.rstrip("\n"))


class Child:
    """A running ``fault_child.py`` whose stdout is read continuously by a thread."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, prefix: list[str] | None = None) -> None:
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, str(CHILD), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
            env=full_env,
        )
        self.out = Output()
        self.stderr = ""
        self._ready = threading.Event()
        self._first_ack = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.feed(line)
            if self.out.ready:
                self._ready.set()
            if self.out.acked:
                self._first_ack.set()
        self._ready.set()
        self._first_ack.set()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def wait_ready(self, timeout: float = 60) -> bool:
        """Wait for READY (False if the child ended without it)."""
        self._ready.wait(timeout)
        return self.out.ready

    def wait_first_ack(self, timeout: float = 60) -> None:
        self._first_ack.wait(timeout)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def finish(self, timeout: float = 120) -> int:
        """Wait for the child to end and its output to be read; its exit status."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the child did not end within {timeout}s; stderr:\n{self.stderr[-3000:]}") from None
        self._reader.join(30)
        self._err_reader.join(30)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return rc

    def summary(self) -> str:
        fatal = self.out.fatal
        lines = [f"exit status {self.proc.returncode}, {len(self.out.acked)} acknowledged"]
        if fatal is not None:
            frames = [line.strip() for line in fatal["traceback"].splitlines() if line.startswith("  File ")][-2:]
            lines.append(f"FATAL {fatal['type']}: {fatal['message']} (at {'; '.join(frames)})")
        if self.out.errors:
            first = min(self.out.errors)
            e = self.out.errors[first]
            lines.append(f"{len(self.out.errors)} transaction errors, first id {first}: {e['type']}: {e['message']}")
        if self.out.other:
            lines.append("other output: " + " | ".join(self.out.other[:5]))
        if self.stderr.strip() and fatal is None:
            lines.append("stderr: " + self.stderr[-2000:])
        return "; ".join(lines)


def run_child(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> Child:
    """Run a child to its end."""
    child = Child(args, env)
    child.finish(timeout)
    return child


def load_states(state_file: Path) -> list[dict[str, Any]]:
    """The states a child dumped (one per opening), or none."""
    if not state_file.exists():
        return []
    states: list[dict[str, Any]] = json.loads(state_file.read_text())
    state_file.unlink()
    return states


def read_deliveries(audit: Path, size: int | None = None) -> list[tuple[int, int, int]]:
    """(t, seq, id) of every outbox delivery, in the order they were made (the first ``size`` bytes' only)."""
    if not audit.exists():
        return []
    out = []
    for line in audit.read_bytes()[:size].decode().splitlines():
        t, seq, x = line.split(",")
        out.append((int(t), int(seq), int(x)))
    return out


def said_not_committed(error: dict[str, Any]) -> bool:
    """Whether a transaction's error (as the child described it) says it was not committed.

    An astm error other than ``CommitOutcomeUnknown`` (or a subclass, such as
    ``CommittedNotApplied``) means the commit did not happen (a conflict
    limit, a refused or fenced commit): the id must then be absent. An
    unknown outcome may go either way.
    """
    if not error.get("astm"):
        return False
    if "unknown" in error:
        return not error["unknown"]
    return not error.get("type", "").endswith(".CommitOutcomeUnknown")


class Ledger:
    """Every acknowledged commit (id and t) and every error, across all children of one test.

    ``seed`` is the children's ``--ledger``: the shared ledger ref must then
    hold ``-seed .. -1`` followed by every committed id once, in commit order.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.acked: dict[int, int] = {}
        #: id -> the error its transaction raised
        self.errors: dict[int, dict[str, Any]] = {}
        self.t_of_ack: dict[int, int] = {}
        self.problems: list[str] = []

    def take(self, out: Output) -> None:
        """Record a child's acknowledged commits (an ack of a t already acknowledged is a finding)."""
        for x, t in out.acked.items():
            if x in self.acked:
                self.problems.append(f"id {x} was acknowledged twice (t={self.acked[x]} and t={t})")
            other = self.t_of_ack.get(t)
            if other is not None and other != x:
                self.problems.append(f"t={t} was acknowledged for two transactions: ids {other} and {x}")
            self.acked[x] = t
            self.t_of_ack[t] = x
        self.errors.update(out.errors)

    def check(self, state: dict[str, Any], deliveries: list[tuple[int, int, int]] | None = None) -> list[str]:
        """Every finding about one state a child found on opening (empty: all is well)."""
        problems: list[str] = []
        refs: dict[str, Any] = state["refs"]
        store_t: int = state["t"]
        found: dict[int, set[str]] = defaultdict(set)
        twice: list[str] = []
        for name, value in refs.items():
            if not is_k_ref(name):
                continue
            for x, n in Counter(value).items():
                found[x].add(name)
                if n > 1:
                    twice.append(f"id {x} is {n} times in {name}")
        if twice:
            problems.append(f"ids present more than once in a ref: {_some(twice)}")
        present = set(found) | {int(name[1:]) for name in refs if is_new_ref(name)}

        lost: list[str] = []
        for x, t in sorted(self.acked.items(), key=lambda kv: kv[1]):
            p = plan(x)
            missing = [name for name in p.refs if name not in found.get(x, set())]
            if p.new_ref is not None and refs.get(p.new_ref) != x:
                missing.append(f"{p.new_ref} (ref {'holds ' + repr(refs[p.new_ref]) if p.new_ref in refs else 'gone'})")
            if missing:
                lost.append(f"id {x} (t={t}) missing from {', '.join(missing)}")
        if lost:
            n_lost = len(lost)
            problems.append(f"{n_lost} of {len(self.acked)} acknowledged commits lost: {_some(lost)}")

        half: list[str] = []
        for x in sorted(present):
            p = plan(x)
            where = found.get(x, set())
            want = set(p.refs)
            has_new = p.new_ref is not None and p.new_ref in refs
            if where != want or (p.new_ref is not None and not has_new):
                half.append(
                    f"id {x} is in {sorted(where) + ([p.new_ref] if has_new else [])}, "
                    f"its transaction wrote {sorted(want) + ([p.new_ref] if p.new_ref else [])}"
                )
            if p.new_ref is not None and has_new and refs[p.new_ref] != x:
                half.append(f"ref {p.new_ref} holds {refs[p.new_ref]!r}, not {x}")
        stray = [f"ref {name}" for name in refs if is_new_ref(name) and plan(int(name[1:])).new_ref != name]
        if half or stray:
            problems.append(f"half-applied or misplaced commits: {_some(half + stray)}")

        if self.acked and store_t < max(self.acked.values()):
            newest = max(self.acked.items(), key=lambda kv: kv[1])
            problems.append(f"store.t is {store_t}, behind acknowledged id {newest[0]} at t={newest[1]}")

        log_ids: dict[int, list[int]] = {t: ids for t, ids in state["log"]}
        bad_log: list[str] = []
        for t, ids in log_ids.items():
            if len(ids) != 1:
                bad_log.append(f"log row t={t} adds ids {ids}")
                continue
            x = ids[0]
            if x not in present:
                bad_log.append(f"log row t={t} (id {x}) is not in the refs")
            if x in self.acked and self.acked[x] != t:
                bad_log.append(f"log row t={t} holds id {x}, acknowledged at t={self.acked[x]}")
        for x, t in self.acked.items():
            if t > state["log_oldest"] and t <= store_t and t not in log_ids:
                bad_log.append(f"acknowledged t={t} (id {x}) is missing from the retained log")
        if bad_log:
            problems.append(f"the log disagrees: {_some(bad_log)}")

        refused = sorted(x for x, e in self.errors.items() if x in present and said_not_committed(e))
        if refused:
            problems.append(f"transactions that raised 'not committed' are committed: ids {refused[:SHOW]}")
        if self.seed:
            problems.extend(self.check_ledger(state.get("ledger"), present))
        if deliveries is not None:
            problems.extend(self.check_deliveries(state, deliveries, present, log_ids))
        return problems

    def check_ledger(self, ledger: list[int] | None, present: set[int]) -> list[str]:
        """The shared ledger: its seed intact, then exactly the committed ids, acknowledged ones in t order."""
        if ledger is None:
            return [f"the ledger ref is gone, with {len(present)} ids committed"] if present else []
        bad: list[str] = []
        head, tail, seed = ledger[: self.seed], ledger[self.seed :], list(range(-self.seed, 0))
        if head != seed:
            at = next((i for i, (a, b) in enumerate(zip(head, seed, strict=False)) if a != b), len(head))
            bad.append(f"its seed of {self.seed} entries is damaged from index {at} (holds {len(head)} of them)")
        counts = Counter(tail)
        twice = sorted(x for x, n in counts.items() if n > 1)
        if twice:
            bad.append(f"ids there more than once: {twice[:SHOW]}")
        missing = sorted(present - set(counts))
        if missing:
            bad.append(f"{len(missing)} committed ids missing from it: {missing[:SHOW]}")
        extra = sorted(set(counts) - present)
        if extra:
            bad.append(f"{len(extra)} ids there whose transaction is not in its refs: {extra[:SHOW]}")
        acked = [x for x in tail if x in self.acked]
        ts = [self.acked[x] for x in acked]
        pairs = zip(acked, acked[1:], ts, ts[1:], strict=False)
        out_of_order = [f"id {a} (t={s}) before id {b} (t={u})" for a, b, s, u in pairs if s > u]
        if out_of_order:
            bad.append(f"acknowledged ids out of commit order: {_some(out_of_order)}")
        return [f"the ledger disagrees: {'; '.join(bad)}"] if bad else []

    def check_deliveries(
        self,
        state: dict[str, Any],
        deliveries: list[tuple[int, int, int]],
        present: set[int],
        log_ids: dict[int, list[int]],
    ) -> list[str]:
        """Every delivered key belongs to a committed transaction; no transaction delivered under two keys."""
        keys_of: dict[int, set[tuple[int, int]]] = defaultdict(set)
        ids_of: dict[tuple[int, int], set[int]] = defaultdict(set)
        for t, seq, x in deliveries:
            keys_of[x].add((t, seq))
            ids_of[(t, seq)].add(x)
        bad: list[str] = []
        for key, ids in sorted(ids_of.items()):
            if len(ids) > 1:
                bad.append(f"key {key} was delivered for ids {sorted(ids)}")
        for x, keys in sorted(keys_of.items()):
            if len(keys) > 1:
                bad.append(f"id {x} was delivered under keys {sorted(keys)}")
            for t, seq in keys:
                if x not in present:
                    bad.append(f"key {(t, seq)} delivered id {x}, which is not committed")
                if x in self.acked and self.acked[x] != t:
                    bad.append(f"key {(t, seq)} delivered id {x}, acknowledged at t={self.acked[x]}")
                if t in log_ids and log_ids[t] != [x]:
                    bad.append(f"key {(t, seq)} delivered id {x}, the log's t={t} is ids {log_ids[t]}")
                if t > state["t"]:
                    bad.append(f"key {(t, seq)} is ahead of store.t={state['t']}")
        return [f"the outbox disagrees: {_some(bad)}"] if bad else []

    def check_all_delivered(self, state: dict[str, Any], deliveries: list[tuple[int, int, int]]) -> list[str]:
        """After a clean close: nothing pending, and every committed id was delivered."""
        delivered = {x for _, _, x in deliveries}
        refs = state["refs"]
        present = {x for name, v in refs.items() if is_k_ref(name) for x in v}
        never = sorted(present - delivered)
        problems = []
        if state["pending"] or state["dead"]:
            problems.append(f"after a clean close {state['pending']} entries pending, {state['dead']} dead")
        if never:
            problems.append(f"{len(never)} committed ids were never delivered: {never[:SHOW]}")
        return problems
