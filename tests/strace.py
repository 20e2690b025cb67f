"""strace for the fault-injection tests: a system call of the child made to fail at its Nth call.

``strace -f --seccomp-bpf -e inject=SYSCALL:error=ERRNO:when=N`` fails the Nth
call of SYSCALL (per thread) with ERRNO; ``N+`` fails that call and every later
one. Where strace is missing or cannot trace, the tests skip, except with
``CI`` set, where they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

STRACE = shutil.which("strace")


def need_strace() -> str:
    """The strace program, once it is known to trace here; else the test skips (fails with ``CI`` set)."""
    reason = None
    if STRACE is None:
        reason = "strace is not installed (apt-get install strace)"
    else:
        probe = subprocess.run(
            [STRACE, "-f", "-qq", "-o", "/dev/null", "-e", "trace=fdatasync", "true"], capture_output=True, text=True
        )
        if probe.returncode != 0:
            reason = f"strace cannot trace here: {probe.stderr.strip()}"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    assert STRACE is not None
    return STRACE


def strace_prefix(strace: str, syscalls: str, inject: str, log: Path, paths: bool = False) -> list[str]:
    """strace writing its trace of ``syscalls`` to ``log`` (with ``paths``, each descriptor's file), and
    injecting ``inject`` (if any)."""
    injecting = ["-e", f"inject={syscalls}:{inject}"] if inject else []
    naming = ["-y"] if paths else []
    return [strace, "-f", "-qq", *naming, "--seccomp-bpf", "-o", str(log), "-e", f"trace={syscalls}", *injecting]
