"""Worker processes for the cases that span processes, spoken to one line at a time.

A worker starts, does its setup (opens a store, connects), prints ``ready``
and then answers each command line on its stdin with one result line. Keeping
workers alive between rounds keeps process start-up and connecting outside
the timed region, and lets several workers start a round at the same moment.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import anyio
import anyio.abc
import anyio.to_thread
from anyio.streams.buffered import BufferedByteReceiveStream

__all__ = ["Child", "command", "reply", "start_all"]


class Child:
    """A started worker: ``await child.ask("go 0.3")`` sends one command and returns its one-line answer."""

    def __init__(self, proc: anyio.abc.Process) -> None:
        self.proc = proc
        assert proc.stdout is not None
        self._out = BufferedByteReceiveStream(proc.stdout)
        #: what the worker said after ``ready`` (which engine it runs, ...)
        self.ready = ""

    @classmethod
    async def start(cls, *args: str, env: dict[str, str] | None = None) -> Child:
        """Start ``python -m astm.bench ARGS`` and wait for its ``ready`` line (its setup done).

        ``env`` is the worker's whole environment (default: this process's).
        """
        argv = [sys.executable, "-m", "astm.bench", *args]
        proc = await anyio.open_process(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            env=dict(os.environ) if env is None else env,
        )
        child = cls(proc)
        first = await child.line()
        if not first.startswith("ready"):
            await child.close()
            raise RuntimeError(f"benchmark worker {args[0]} did not start: {first!r}")
        child.ready = first.removeprefix("ready").strip()
        return child

    async def send(self, line: str) -> None:
        """Send one command line."""
        assert self.proc.stdin is not None
        await self.proc.stdin.send(line.encode() + b"\n")

    async def line(self) -> str:
        """The next line the worker prints."""
        try:
            return (await self._out.receive_until(b"\n", 1 << 20)).decode()
        except (anyio.EndOfStream, anyio.IncompleteRead):
            code = await self.proc.wait()
            raise RuntimeError(f"benchmark worker exited (code {code})") from None

    async def ask(self, line: str) -> str:
        """Send a command and return its answer."""
        await self.send(line)
        return await self.line()

    async def close(self) -> None:
        """Close its stdin (the worker exits at end of input) and wait for it; kill it after 30 s."""
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            await self.proc.stdin.aclose()
        with anyio.move_on_after(30) as scope:
            await self.proc.wait()
        if scope.cancelled_caught:  # pragma: no cover - a stuck worker
            self.proc.kill()
            await self.proc.wait()


async def start_all(specs: list[tuple[str, ...]], envs: list[dict[str, str]] | None = None) -> list[Child]:
    """Start several workers at once (each spec is its arguments, each env its environment); in order, all ready."""
    started: list[Child | None] = [None] * len(specs)

    async def one(i: int) -> None:
        started[i] = await Child.start(*specs[i], env=None if envs is None else envs[i])

    try:
        async with anyio.create_task_group() as tg:
            for i in range(len(specs)):
                tg.start_soon(one, i)
    except BaseException:
        for c in started:
            if c is not None:
                await c.close()
        raise
    return [c for c in started if c is not None]


async def command() -> str:
    """In a worker: the next command line ('' at end of input), read without blocking the event loop."""
    line: str = await anyio.to_thread.run_sync(sys.stdin.readline)
    return line.strip()


def reply(*parts: object) -> None:
    """In a worker: print one answer line."""
    print(*parts, flush=True)
