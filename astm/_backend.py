"""The bridge to the running async backend (asyncio or trio): waking and spawning.

``Waiter``: a one-shot wake-up that any thread may fire without blocking.
Commits happen under a ``threading.Lock`` and may be made from several
threads, each running its own event loop (asyncio or trio). A task that waits
for a commit (``astm.retry()``, a contention queue, ``store.sync``, durability)
parks on a :class:`Waiter`; the committer fires it after leaving the critical
section. Firing from the waiter's own thread sets it directly; from another
thread it is scheduled on the waiter's loop with that backend's thread-safe
call, so the committer never blocks on another loop. (anyio's
``from_thread.run_sync`` waits for the result, which a committer must not do.)
``fire_all`` wakes many waiters with one thread-safe call per loop.

Firing never raises. A waiter whose event loop has ended (its thread ran
``asyncio.run`` to completion, or its trio run finished) has nobody left to
wake, so firing it is a no-op: a committer, or the durable store's writer,
must never fail because some other thread's loop went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import sniffio

__all__ = ["Waiter", "fire_all", "spawn"]

_background: set[asyncio.Task[Any]] = set()


def _under_trio() -> bool:
    """Whether the running task is trio's, as ``sniffio.current_async_library() == "trio"`` says.

    Both lookups are what sniffio itself checks first; skipping its asyncio
    sniff (``asyncio.current_task``, Python code on 3.11) matters because every
    durable commit makes a waiter.
    """
    return sniffio.thread_local.name == "trio" or sniffio.current_async_library_cvar.get() == "trio"


def spawn(fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
    """Start ``fn(*args)`` as a background task of the running event loop.

    It runs in a fresh context, so no transaction leaks into it. Agents and the
    outbox use this to run work only while there is work (no idle tasks).
    """
    if _under_trio():
        import trio

        trio.lowlevel.spawn_system_task(fn, *args, context=contextvars.Context())
    else:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(fn(*args), context=contextvars.Context())
        _background.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(_background.discard)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], arg: Any) -> None:
    """Schedule ``fn(arg)`` on ``loop`` from another thread; nothing if that loop has closed."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: its tasks are gone, nobody to wake
        loop.call_soon_threadsafe(fn, arg)


def _set_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_futures(futs: list[asyncio.Future[None]]) -> None:
    for fut in futs:
        if not fut.done():
            fut.set_result(None)


class Waiter:
    """A single wake-up for the current task, fireable from any thread."""

    __slots__ = ("_event", "_fut", "_loop", "_thread", "_token", "fired", "payload")

    def __init__(self) -> None:
        self.fired = False
        self.payload: Any = None
        self._thread = threading.get_ident()
        if _under_trio():
            import trio

            self._loop: asyncio.AbstractEventLoop | None = None
            self._event: Any = trio.Event()
            self._token: Any = trio.lowlevel.current_trio_token()
        else:
            loop = self._loop = asyncio.get_running_loop()
            self._fut: asyncio.Future[None] = loop.create_future()

    def fire(self, payload: Any = None) -> None:
        """Wake the waiting task (idempotent; safe from any thread)."""
        if self.fired:
            return
        self.fired = True
        self.payload = payload
        loop = self._loop
        if loop is not None:
            if threading.get_ident() == self._thread and not loop.is_closed():
                _set_future(self._fut)
            else:
                _call_soon(loop, _set_future, self._fut)
        elif threading.get_ident() == self._thread:
            self._event.set()
        else:
            _trio_soon(self._token, self._event.set)

    async def wait(self) -> None:
        """Wait until fired; cancellable by the caller's cancel scope (then make a new waiter)."""
        if self._loop is not None:
            await self._fut
        else:
            await self._event.wait()


def fire_all(waiters: Iterable[Waiter]) -> None:
    """Fire many waiters, with one thread-safe call per foreign asyncio loop."""
    me = threading.get_ident()
    foreign: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for w in waiters:
        if w.fired:
            continue
        loop = w._loop
        if loop is None or w._thread == me:
            w.fire()
        else:
            w.fired = True
            foreign.setdefault(loop, []).append(w._fut)
    for loop, futs in foreign.items():
        _call_soon(loop, _set_futures, futs)


def _trio_soon(token: Any, fn: Callable[[], None]) -> None:
    """Run ``fn`` in the trio run of ``token`` from another thread; nothing if that run has finished."""
    import trio

    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(fn)
