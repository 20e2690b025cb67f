"""Fault injection with real tools: I/O errors and full disks while a SQLite store is created, opened and written.

Each case runs ``tests/fault_child.py`` under ``strace -f --seccomp-bpf -e
inject=SYSCALL:error=ERRNO:when=N``: the Nth call of SYSCALL fails with ERRNO
(``N+``: that call and every later one). The child makes these calls only on
the store's files (its own output goes through writev, and PYTHONDONTWRITEBYTECODE
keeps .pyc writes out), so N counts the store's calls, including those on a
temporary file the store may create. ``openat`` case N is the Nth openat of
a file in the store's directory by the thread that opens the store (imports
open hundreds of others; a dry run of the phase finds which call that is), and
``pread64`` case N likewise the Nth read of the store's files by that thread
(the dynamic loader reads libc with pread64 first; SQLite reports some pages
it failed to read as "database disk image is malformed", which counts as
naming the cause there). strace counts
calls per thread, so ``when=N`` hits the Nth call of the thread that opens the
store and the Nth call of the store's writer thread. On Linux, SQLite syncs
with fdatasync and writes with pwrite64 (fsync and write are not used: a dry
trace shows none); the cases inject ``fsync,fdatasync`` and ``write,pwrite64``
together so that they keep hitting if that changes. A case whose call never
happened (strace injected nothing) skips, saying so.

Phases: ``create`` (the child creates a new file and commits 5 transactions),
``open`` (it opens a file of 30 acknowledged commits and commits 5) and
``stream`` (it opens that file and commits 150 transactions from 8 tasks, with
a checkpoint every 20 commits). Then, without strace, a checker child opens the
file, commits one more transaction, closes it, and opens it again.

For every case: every error the child saw is an ``astm.AstmError`` whose
message names the cause (no bare sqlite3/OSError); a transaction that was
applied in memory when an fdatasync failed gets an error saying the outcome is
unknown (or, definitely, that it was not committed); an error that says a
commit did not happen is true after reopening; a refused transaction is
absent; the file opens afterwards; and both openings hold every acknowledged
commit exactly (the ledger of ``tests/fault_ledger.py``: each id in exactly its
refs, no half-applied commit, outbox deliveries only of committed
transactions).

The full-disk tests mount a 2 MB tmpfs (or, if that is refused, a loop-mounted
ext4 image; failing both, they skip), fill it, and commit until the store
refuses; after freeing space every acknowledged commit is there and the
store works again.

Cases skip when strace is missing or cannot trace, except with ``CI`` set,
where they fail. The default run (46 cases) takes about a minute;
``ASTM_SOAK=1`` tries many more call counts (about 350 cases, 5 minutes)::

    ASTM_SOAK=1 .venv/bin/pytest tests/test_faults.py
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .disks import fill, mount_small_disk, unmount
from .fault_child import is_k_ref, is_new_ref
from .fault_ledger import Child, Ledger, Output, load_states, read_deliveries, run_child
from .strace import need_strace, strace_prefix

SOAK = bool(os.environ.get("ASTM_SOAK"))

SYNC = "fsync,fdatasync"
WRITE = "write,pwrite64"
OPEN = "openat"
#: SQLite reads its pages with pread64; Python's imports read with read, so they are not hit
READ = "pread64"

#: what an error's message must mention: the failure (SQLite reports a failed fdatasync as a disk I/O error)
#: and one it cannot open for writing as a readonly database
CAUSE = re.compile(
    r"I/O error|Input/output error|disk is full|No space left|unable to open|readonly database", re.IGNORECASE
)
#: for failed reads, also SQLite's own report of a page it could not read: "database disk image is malformed"
CAUSE_OF_READS = re.compile(CAUSE.pattern + "|malformed", re.IGNORECASE)
UNKNOWN = re.compile(r"\bunknown\b|may or may not|may (?:still )?have (?:been )?committed", re.IGNORECASE)
NOT_COMMITTED = re.compile(
    r"not committed|was not written|never written|did not commit|nothing was committed|rolled back", re.IGNORECASE
)


@dataclass(frozen=True)
class Fault:
    phase: str
    syscalls: str
    error: str
    when: str

    @property
    def id(self) -> str:
        label = {SYNC: "fdatasync", WRITE: "pwrite64", OPEN: "openat", READ: "pread64"}[self.syscalls]
        return f"{self.phase}-{label}-{self.error}-{self.when}"


def _case(phase: str, syscalls: str, error: str, when: str | int) -> Any:
    fault = Fault(phase, syscalls, error, str(when))
    return pytest.param(fault, id=fault.id)


#: the default cases, each with the bugs it showed on the store as it was (none: it passed)
CASES = [
    *(_case("create", SYNC, "EIO", n) for n in (1, 3, 4)),
    _case("create", SYNC, "EIO", 2),
    _case("create", SYNC, "EIO", 5),
    _case("create", SYNC, "EIO", 6),
    _case("create", WRITE, "EIO", 1),
    _case("create", WRITE, "EIO", 2),
    _case("create", WRITE, "EIO", 4),
    *(_case("create", WRITE, "EIO", n) for n in (5, 13, 15, 28)),
    _case("create", WRITE, "EIO", 30),
    _case("create", WRITE, "ENOSPC", 4),
    _case("create", WRITE, "ENOSPC", 15),
    _case("create", OPEN, "EIO", 1),
    *(_case("create", OPEN, "EIO", n) for n in (2, 3)),
    *(_case("create", OPEN, "EIO", n) for n in (4, 5)),
    _case("open", OPEN, "EIO", 1),
    *(_case("open", OPEN, "EIO", n) for n in (2, 3, 4)),
    _case("open", WRITE, "EIO", 1),
    *(_case("open", WRITE, "EIO", n) for n in (2, 10, 11)),
    *(_case("open", SYNC, "EIO", n) for n in (1, 3)),
    _case("open", SYNC, "EIO", 2),
    *(_case("stream", SYNC, "EIO", n) for n in (3, 5, 10, 25, "10+")),
    _case("stream", SYNC, "ENOSPC", 6),
    *(_case("stream", WRITE, "EIO", n) for n in (30, 45, 60)),
    *(_case("stream", WRITE, "ENOSPC", n) for n in (40, "40+")),
    *(_case("open", READ, "EIO", n) for n in (1, 2, 4, 8, 12, "8+")),
    *(_case("stream", READ, "EIO", n) for n in (2, 8, 12, "8+")),
]

#: ASTM_SOAK=1 adds these call counts (unmarked: a soak run is for finding failures)
SOAK_COUNTS = {
    ("create", SYNC, "EIO"): range(1, 12),
    ("create", WRITE, "EIO"): range(1, 40),
    ("create", WRITE, "ENOSPC"): range(1, 40, 2),
    ("create", OPEN, "EIO"): range(1, 10),
    ("open", WRITE, "EIO"): range(1, 30),
    ("open", SYNC, "EIO"): range(1, 10),
    ("stream", SYNC, "EIO"): range(1, 60),
    ("stream", SYNC, "ENOSPC"): range(1, 60, 4),
    ("stream", WRITE, "EIO"): range(10, 300, 3),
    ("stream", WRITE, "ENOSPC"): range(10, 300, 7),
}


def _cases() -> list[Any]:
    if not SOAK:
        return CASES
    known = {p.values[0].id for p in CASES}
    extra = [
        _case(phase, syscalls, error, n)
        for (phase, syscalls, error), counts in SOAK_COUNTS.items()
        for n in counts
        if Fault(phase, syscalls, error, str(n)).id not in known
    ]
    return CASES + extra


@dataclass
class Template:
    """A store of 30 acknowledged commits, closed cleanly, with its audit file."""

    db: Path
    audit: Path
    acked: dict[int, int]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    """A cleanly closed store of 30 acknowledged commits (ids 1000...1029)."""
    d = tmp_path_factory.mktemp("template")
    db, audit = d / "state.db", d / "audit.txt"
    child = run_child([str(db), "--audit", str(audit), "--base", "1000", "--commits", "30", "--tasks", "4"])
    assert child.proc.returncode == 0 and len(child.out.acked) == 30, child.summary()
    return Template(db, audit, dict(child.out.acked))


@dataclass
class Setup:
    """One fault case's files, the child's arguments and environment, and the ledger so far."""

    db: Path
    audit: Path
    state: Path
    args: list[str]
    env: dict[str, str]
    ledger: Ledger


def prepare(fault: Fault, where: Path, template: Template) -> Setup:
    """The store directory for one run of a phase (a copy of the template unless creating)."""
    d = where / "store"
    d.mkdir(parents=True)
    db, audit = d / "state.db", where / "audit.txt"
    ledger = Ledger()
    env = {"PYTHONDONTWRITEBYTECODE": "1"}  # no .pyc writes to count
    args = ["--base", "1", "--commits", "5", "--tasks", "2"]
    if fault.phase != "create":
        shutil.copy(template.db, db)
        shutil.copy(template.audit, audit)
        ledger.acked.update(template.acked)
    if fault.phase == "stream":
        args = ["--base", "1", "--commits", "150", "--tasks", "8"]
        env["ASTM_TEST_CHECKPOINT_EVERY"] = "20"
    args = [str(db), "--audit", str(audit), "--state", str(where / "state.json"), "--stop-on-error", *args]
    return Setup(db, audit, where / "state.json", args, env, ledger)


#: (phase, syscall) -> the numbers of the opening thread's calls that are on the store's files
_STORE_CALLS: dict[tuple[str, str], list[int]] = {}


def store_calls(strace: str, fault: Fault, where: Path, template: Template) -> list[int]:
    """Which calls of the fault's syscall by the thread that opens the store are on the store's files (one
    dry run per phase and syscall).

    Imports open hundreds of files, and the dynamic loader reads libc with
    pread64 before Python starts, so ``openat`` and ``pread64`` case N is the
    Nth such call on the store's directory (a temporary file the store may
    create included), found by tracing the phase once without a fault
    (``strace -y`` names the file of each descriptor).
    """
    key = (fault.phase, fault.syscalls)
    if key not in _STORE_CALLS:
        setup = prepare(fault, where, template)
        log = where / "dry-run.strace"
        dry = Child(setup.args, setup.env, prefix=strace_prefix(strace, fault.syscalls, "", log, paths=True))
        dry.finish(120)
        lines = log.read_text().splitlines()
        main = lines[0].split()[0]
        name = f"{fault.syscalls}("
        calls = [line for line in lines if line.split()[0] == main and line.split(maxsplit=1)[1].startswith(name)]
        inside = f"{setup.db.parent}/"
        _STORE_CALLS[key] = [i for i, line in enumerate(calls, 1) if inside in line]
    return _STORE_CALLS[key]


def wal_mode(db: Path) -> bool:
    """Whether the SQLite file's header says WAL mode (bytes 18 and 19 are 2)."""
    with db.open("rb") as f:
        return f.read(20)[18:20] == b"\x02\x02"


def error_problems(out: Output, stderr: str, cause: re.Pattern[str]) -> list[str]:
    """Every error is an AstmError naming the cause; nothing else printed a traceback."""
    problems = []
    errors = [("opening or closing the store", out.fatal)] if out.fatal is not None else []
    errors += [(f"transaction {x}", e) for x, e in sorted(out.errors.items())]
    for where, e in errors:
        if not e["astm"]:
            frames = [line for line in e["traceback"].splitlines() if line.startswith("  File ")][-2:]
            problems.append(f"{where} raised {e['type']}, not an astm error: {e['message']!r} ({'; '.join(frames)})")
        elif not cause.search(e["message"]):
            problems.append(f"{where}: the message does not say what failed: {e['type']}: {e['message']!r}")
    if "Traceback" in stderr:
        problems.append(f"the child printed a traceback on stderr:\n{stderr[-3000:]}")
    return problems


def present_ids(state: dict[str, Any]) -> set[int]:
    """Every id the refs of a state hold."""
    refs = state["refs"]
    ids = {x for name, value in refs.items() if is_k_ref(name) for x in value}
    return ids | {int(name[1:]) for name in refs if is_new_ref(name)}


def outcome_problems(out: Output, states: list[dict[str, Any]], sync_fault: bool) -> list[str]:
    """What each failed transaction was told agrees with what the file holds (one line per kind of finding)."""
    found: dict[str, list[tuple[int, str]]] = {}
    for x, e in sorted(out.errors.items()):
        msg = f"{e['type']}: {e['message']}"
        present = [x in present_ids(s) for s in states]
        says_unknown = bool(UNKNOWN.search(e["message"]))
        says_not = bool(NOT_COMMITTED.search(e["message"])) and not says_unknown
        kinds = []
        if not e["applied"]:
            if any(present):
                kinds.append("were refused before they committed, yet are in the file")
        else:
            if sync_fault and not (says_unknown or says_not):
                kinds.append(
                    "were waiting for an fdatasync that failed: the error should say the outcome is unknown "
                    "(or that the commit did not happen), it does not"
                )
            if any(present) and not says_unknown:
                kinds.append("got an error but are in the file after reopening, and the error did not say it might be")
            if says_not and any(present):
                kinds.append("were told they did not commit, yet are in the file")
        if len(set(present)) > 1:
            kinds.append(f"are in one opening of the file and not in the other ({present})")
        for kind in kinds:
            found.setdefault(kind, []).append((x, msg))
    return [
        f"transactions {[x for x, _ in hits][:10]}{' ...' if len(hits) > 10 else ''} ({len(hits)}) {kind}; "
        f"the first error: {hits[0][1]!r}"
        for kind, hits in found.items()
    ]


PROBE_ARGS = ["--base", "900000", "--commits", "1", "--tasks", "1", "--reopen"]


def check_afterwards(
    db: Path, audit: Path, state_file: Path, ledger: Ledger, env: dict[str, str] | None = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """Open the file without faults, commit one transaction, close, open again: every acknowledged commit is there."""
    checker = run_child(
        [str(db), "--audit", str(audit), "--state", str(state_file), *PROBE_ARGS],
        env,
    )
    states = load_states(state_file)
    problems = []
    if not states:
        problems.append(f"the file does not open afterwards: {checker.summary()}")
        return problems, states
    first = ledger.check(states[0], read_deliveries(audit, states[0]["audit_size"]))
    problems += [f"opening the file afterwards: {p}" for p in first]
    if checker.out.errors or 900000 not in checker.out.acked:
        problems.append(f"the store does not work afterwards: {checker.summary()}")
    ledger.take(checker.out)
    if len(states) < 2:
        problems.append(f"after a probe commit and a clean close, the file does not open again: {checker.summary()}")
    else:
        second = ledger.check(states[1], read_deliveries(audit, states[1]["audit_size"]))
        problems += [f"opening it again after a commit and a clean close: {p}" for p in second]
    if checker.out.fatal is not None and len(states) >= 2:
        problems.append(f"the checker failed: {checker.summary()}")
    problems += ledger.problems
    return problems, states


@pytest.mark.parametrize("fault", _cases())
def test_fault_gives_a_clear_error_and_loses_nothing_acknowledged(
    fault: Fault, tmp_path: Path, template: Template
) -> None:
    """A failed syscall gives an AstmError naming it; afterwards the file opens with every acknowledged commit."""
    strace = need_strace()
    when = fault.when
    if fault.syscalls in (OPEN, READ):
        calls = store_calls(strace, fault, tmp_path / "dry", template)
        k = int(when.rstrip("+"))
        if k > len(calls):
            pytest.skip(f"the opening thread made only {len(calls)} {fault.syscalls} calls on the store, not {k}")
        when = str(calls[k - 1]) + ("+" if when.endswith("+") else "")
    setup = prepare(fault, tmp_path, template)
    db, audit, state_file, ledger, env = setup.db, setup.audit, setup.state, setup.ledger, setup.env
    log = tmp_path / "strace"
    child = Child(
        setup.args, env, prefix=strace_prefix(strace, fault.syscalls, f"error={fault.error}:when={when}", log)
    )
    rc = child.finish(120)
    trace = log.read_text() if log.exists() else ""
    if "INJECTED" not in trace:
        pytest.skip(f"strace injected nothing: the child made fewer than {fault.when} such calls ({child.summary()})")
    load_states(state_file)  # the faulty run's own opening is not what is checked
    ledger.take(child.out)
    problems = []
    if child.out.acked and not wal_mode(db):
        problems.append(
            "the store acknowledged commits with the file not in WAL mode (PRAGMA journal_mode=WAL failed "
            "silently): it runs on a rollback journal, where a reader such as `python -m astm inspect` blocks commits"
        )
    if rc not in (0, 3):
        problems.append(f"the child ended with status {rc}: {child.summary()}")
    problems += error_problems(child.out, child.stderr, CAUSE_OF_READS if fault.syscalls == READ else CAUSE)
    after, states = check_afterwards(db, audit, state_file, ledger, env)
    problems += after
    problems += outcome_problems(child.out, states, fault.syscalls == SYNC)
    if problems:
        injected = [line for line in trace.splitlines() if "INJECTED" in line][:3]
        pytest.fail(
            f"{fault.id}: strace injected {injected}; the child: {len(child.out.acked)} acknowledged, "
            f"{len(child.out.errors)} transaction errors, fatal: "
            f"{child.out.fatal['type'] + ': ' + child.out.fatal['message'] if child.out.fatal else None}\n  - "
            + "\n  - ".join(problems),
            pytrace=False,
        )


# -- a genuinely full disk -------------------------------------------------------------


class FullDisk:
    """A small file system to fill, or, where none can be mounted, strace failing writes with ENOSPC."""

    def __init__(self, where: Path) -> None:
        self.where = where
        where.mkdir()
        self.kind, self.tried = mount_small_disk(where)
        self.fillers: list[Path] = []
        self.prefix: list[str] = []

    def fill(self, leave: int, simulated_from: str) -> None:
        """Leave ``leave`` bytes free; simulated: pwrite64/write fail with ENOSPC from call ``simulated_from``."""
        if self.kind is not None:
            self.fillers = fill(self.where, leave)
            return
        strace = need_strace()
        self.prefix = strace_prefix(strace, WRITE, f"error=ENOSPC:when={simulated_from}", self.where.parent / "strace")

    def free(self) -> None:
        for p in self.fillers:
            p.unlink()
        self.fillers = []
        self.prefix = []

    def describe(self) -> str:
        if self.kind is not None:
            return f"a full {self.kind}"
        return "no small file system could be mounted (" + "; ".join(self.tried) + "): strace ENOSPC on write/pwrite64"

    def close(self) -> None:
        if self.kind is not None:
            unmount(self.where)


@contextlib.contextmanager
def full_disk(where: Path) -> Iterator[FullDisk]:
    disk = FullDisk(where)
    try:
        yield disk
    finally:
        disk.close()


FULL_DISK_ARGS = ["--base", "100000", "--commits", "3000", "--tasks", "4", "--payload", "8000", "--stop-on-error"]


def test_full_disk_refuses_clearly_and_recovers(tmp_path: Path) -> None:
    """On a full disk commits fail with a StorageError; after freeing space nothing acknowledged is lost."""
    with full_disk(tmp_path / "disk") as disk:
        db, audit, state_file = disk.where / "state.db", tmp_path / "audit.txt", tmp_path / "state.json"
        ledger = Ledger()
        first = run_child([str(db), "--audit", str(audit), "--base", "1", "--commits", "20", "--tasks", "4"])
        assert first.proc.returncode == 0 and len(first.out.acked) == 20, first.summary()
        ledger.take(first.out)
        disk.fill(256 * 1024, simulated_from="40+")
        child = Child([str(db), "--audit", str(audit), "--state", str(state_file), *FULL_DISK_ARGS], prefix=disk.prefix)
        child.finish(120)
        load_states(state_file)
        ledger.take(child.out)
        problems = []
        if not child.out.errors and child.out.fatal is None:
            problems.append(f"3000 commits of 8 KB fit on {disk.describe()}: {child.summary()}")
        problems += error_problems(child.out, child.stderr, CAUSE)
        disk.free()
        after, states = check_afterwards(db, audit, state_file, ledger)
        problems += after + outcome_problems(child.out, states, sync_fault=False)
        assert not problems, (
            f"{disk.describe()}; {len(ledger.acked)} acknowledged; the child: {child.summary()}\n  - "
            + "\n  - ".join(problems)
        )


@pytest.mark.parametrize(
    ("free", "simulated_from"),
    [
        pytest.param(0, "1+", id="no-space"),
        pytest.param(
            24 * 1024,
            "8+",
            id="24KB-free",
        ),
    ],
)
def test_creating_a_store_on_a_full_disk(tmp_path: Path, free: int, simulated_from: str) -> None:
    """Creating a store on a full disk fails with a StorageError; once there is space the path works."""
    with full_disk(tmp_path / "disk") as disk:
        db, audit, state_file = disk.where / "state.db", tmp_path / "audit.txt", tmp_path / "state.json"
        disk.fill(free, simulated_from)
        child = Child(
            [str(db), "--audit", str(audit), "--base", "1", "--commits", "5", "--tasks", "1"], prefix=disk.prefix
        )
        child.finish(120)
        ledger = Ledger()
        ledger.take(child.out)
        problems = error_problems(child.out, child.stderr, CAUSE)
        if child.out.fatal is None and not child.out.errors:
            problems.append(f"creating and writing a store on {disk.describe()} raised nothing: {child.summary()}")
        disk.free()
        after, states = check_afterwards(db, audit, state_file, ledger)
        problems += after + outcome_problems(child.out, states, sync_fault=False)
        assert not problems, f"{disk.describe()}:\n  - " + "\n  - ".join(problems)
