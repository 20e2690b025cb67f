"""The bridge to the running async backend (asyncio or trio): waking and spawning.

``Waiter``: a one-shot wake-up that any thread may fire without blocking.

Commits happen under a ``threading.Lock`` and may be made from several threads,
each running its own event loop (asyncio or trio). A task that waits for a
commit (``astm.retry()``, a contention queue, ``store.sync``) parks on a
:class:`Waiter`; the committer fires it after leaving the critical section. Firing
from the waiter's own thread sets the event directly; from another thread it is
scheduled on the waiter's loop with that backend's thread-safe call, so the
committer never blocks on another loop. (anyio's ``from_thread.run_sync`` waits
for the result, which a committer must not do.)
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import sniffio

__all__ = ["Waiter", "spawn"]

_background: set[asyncio.Task[Any]] = set()


def spawn(fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
    """Start ``fn(*args)`` as a background task of the running event loop.

    It runs in a fresh context, so no transaction leaks into it. Agents and the
    outbox use this to run work only while there is work (no idle tasks).
    """
    if sniffio.current_async_library() == "trio":
        import trio

        trio.lowlevel.spawn_system_task(fn, *args, context=contextvars.Context())
    else:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(fn(*args), context=contextvars.Context())
        _background.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(_background.discard)


def _set_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Waiter:
    """A single wake-up for the current task, fireable from any thread."""

    __slots__ = ("_fire", "_wait", "fired", "payload")

    def __init__(self) -> None:
        self.fired = False
        self.payload: Any = None
        thread = threading.get_ident()
        if sniffio.current_async_library() == "trio":
            import trio

            event = trio.Event()
            token = trio.lowlevel.current_trio_token()

            def fire_trio() -> None:
                if threading.get_ident() == thread:
                    event.set()
                else:
                    token.run_sync_soon(event.set)

            self._wait: Callable[[], Any] = event.wait
            self._fire = fire_trio
        else:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()

            def fire_asyncio() -> None:
                if threading.get_ident() == thread:
                    _set_future(fut)
                else:
                    loop.call_soon_threadsafe(_set_future, fut)

            # shielded: a cancelled wait (a timeout) must leave the waiter fireable
            self._wait = lambda: asyncio.shield(fut)
            self._fire = fire_asyncio

    def fire(self, payload: Any = None) -> None:
        """Wake the waiting task (idempotent; safe from any thread)."""
        if not self.fired:
            self.fired = True
            self.payload = payload
            self._fire()

    async def wait(self) -> None:
        """Wait until fired; cancellable by the caller's cancel scope."""
        await self._wait()
