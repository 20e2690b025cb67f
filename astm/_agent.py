"""Agents: per-identity serial task queues whose sends respect transactions.

An agent is one identity with a state and a queue of actions; ``send(action,
*args)`` queues ``action(state, *args)`` and its result becomes the new state.
Actions of one agent run one at a time, in order. A send inside a transaction
is held until the transaction commits (dropped on retry or abort); a send made
while an action runs is held until that action has finished successfully.

When an action fails, as in Clojure, its held sends are dropped, the
``error_handler`` (if any) is called with ``(agent, exception)`` and its own
sends go out at once, then the ``error_mode`` decides: ``"fail"`` stops the
agent until ``restart``, ``"continue"`` goes on with the queue. The mode
defaults to ``"continue"`` when a handler is given, else ``"fail"``.

A family (``store.agents(name, initial)``) is a mapping from keys to agents that
holds, per idle identity, only its state: the queue and its task exist only
while that identity has work.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import anyio
import anyio.to_thread

from ._backend import Waiter, spawn
from ._errors import AgentFailed, AgentWaitError, StoreClosed
from ._tx import _current, in_transaction

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["Agent", "AgentFamily"]

S = TypeVar("S")
log = logging.getLogger("astm")

ErrorMode = Literal["fail", "continue"]
#: a queued action: (function, args, run in a worker thread)
_Action = tuple[Callable[..., Any], tuple[Any, ...], bool]
#: sends made by the running action, dispatched when it succeeds
_held: ContextVar[list[tuple[AgentFamily[Any], Hashable, _Action]] | None] = ContextVar("astm.agent_held", default=None)


class _Work:
    """The queue of one busy (or failed) identity; dropped when it goes idle."""

    __slots__ = ("done", "error", "queue", "running", "sent", "waiters")

    def __init__(self) -> None:
        self.queue: deque[_Action] = deque()
        self.running = False
        self.error: BaseException | None = None
        self.sent = 0
        self.done = 0
        self.waiters: list[tuple[int, Waiter]] = []


class AgentFamily(Generic[S]):
    """A mapping of keys to agents, created on first use: ``family[user_id].send(...)``."""

    def __init__(
        self,
        store: Store,
        name: str,
        initial: S,
        error_mode: ErrorMode | None = None,
        error_handler: Callable[[Agent[S], BaseException], Any] | None = None,
    ) -> None:
        if error_mode is not None and error_mode not in ("fail", "continue"):
            raise ValueError(f"error_mode must be 'fail' or 'continue', got {error_mode!r}")
        if error_handler is not None and not callable(error_handler):
            raise TypeError(f"error_handler must be callable, got {error_handler!r}")
        if error_mode is None:
            # Clojure's default: an agent given an error handler continues after a failure
            error_mode = "fail" if error_handler is None else "continue"
        self.store = store
        self.name = name
        self.initial = initial
        self.error_mode: ErrorMode = error_mode
        #: called as ``error_handler(agent, exception)`` (sync or async) when an action fails
        self.error_handler = error_handler
        self._states: dict[Hashable, S] = {}
        self._work: dict[Hashable, _Work] = {}
        self._lock = threading.Lock()
        #: "agent" (store.agent) or "family" (store.agents)
        self.kind = "family"

    def __getitem__(self, key: Hashable) -> Agent[S]:
        return Agent(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self._states or key in self._work

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._states))

    def __len__(self) -> int:
        return len(self._states)

    @property
    def busy(self) -> int:
        """How many identities have queued or running actions (or a failure) right now."""
        return len(self._work)

    # -- sending ---------------------------------------------------------------

    def _send(self, key: Hashable, fn: Callable[..., Any], args: tuple[Any, ...], off: bool) -> None:
        if not callable(fn):
            raise TypeError(f"agent {self._label(key)}: send(action, ...) needs a callable, got {fn!r}")
        work = self._work.get(key)
        if work is not None and work.error is not None and self.error_mode == "fail":
            raise AgentFailed(self._label(key), work.error)
        action: _Action = (fn, args, off)
        tx = _current.get()
        if tx is not None:
            if self.store._closed:
                raise StoreClosed(f"store of agent {self._label(key)}")
            tx.bind_store(self.store)
            if tx.effects is None:
                tx.effects = []
            tx.effects.append((self._dispatch, (key, action)))
            return
        held = _held.get()
        if held is not None:
            held.append((self, key, action))
            return
        if self.store._closed:
            raise StoreClosed(f"store of agent {self._label(key)}")
        self._dispatch(key, action)

    def _dispatch(self, key: Hashable, action: _Action) -> None:
        with self._lock:
            work = self._work.get(key)
            if work is None:
                work = self._work[key] = _Work()
            work.queue.append(action)
            work.sent += 1
            start = not work.running and work.error is None
            if start:
                work.running = True
        if start:
            spawn(self._drain, key, work)

    async def _drain(self, key: Hashable, work: _Work) -> None:
        """Run the identity's actions one by one until its queue is empty."""
        while True:
            with self._lock:
                if not work.queue or work.error is not None:
                    work.running = False
                    wake = self._wake_locked(work)
                    if work.error is None and not work.queue and not work.waiters:
                        self._work.pop(key, None)
                    break
                fn, args, off = work.queue.popleft()
            state = self._states.get(key, self.initial)
            held: list[tuple[AgentFamily[Any], Hashable, _Action]] = []
            token = _held.set(held)
            try:
                try:
                    if off:
                        new = await anyio.to_thread.run_sync(fn, state, *args)
                    else:
                        new = fn(state, *args)
                        if inspect.isawaitable(new):
                            new = await new
                except Exception as exc:
                    await self._failed(key, work, exc)
                else:
                    self._states[key] = new
                    for family, k, action in held:
                        family._dispatch(k, action)
            except BaseException as exc:
                # KeyboardInterrupt, SystemExit, cancellation, or the action's own
                # BaseException: the agent fails (whatever its mode) rather than
                # stay busy forever, and the exception goes on
                with self._lock:
                    work.error = exc
                    work.running = False
                    work.done += 1
                    wake = self._wake_locked(work)
                for w in wake:
                    w.fire()
                raise
            finally:
                _held.reset(token)
            with self._lock:
                work.done += 1
                wake = self._wake_locked(work)
            for w in wake:
                w.fire()
        for w in wake:
            w.fire()

    async def _failed(self, key: Hashable, work: _Work, exc: Exception) -> None:
        """The action failed: its held sends are dropped; call the handler; apply the error mode.

        As in Clojure, the handler runs before the failure is recorded, and its
        own sends are not held: they are dispatched at once (a send to this
        agent itself is queued behind the failed action, so in fail mode it
        waits for ``restart``).
        """
        if self.error_handler is not None:
            token = _held.set(None)
            try:
                res = self.error_handler(Agent(self, key), exc)
                if inspect.isawaitable(res):
                    await res
            except Exception:
                log.exception("error handler of agent %s failed", self._label(key))
            finally:
                _held.reset(token)
        else:
            log.error("action of agent %s failed", self._label(key), exc_info=exc)
        if self.error_mode == "fail":
            with self._lock:
                work.error = exc

    def _wake_locked(self, work: _Work) -> list[Waiter]:
        if not work.waiters:
            return []
        stuck = work.error is not None
        ready = [w for target, w in work.waiters if stuck or work.done >= target]
        work.waiters = [(t, w) for t, w in work.waiters if not (stuck or work.done >= t)]
        return ready

    # -- waiting, failure ----------------------------------------------------------

    async def _wait(self, key: Hashable, timeout: float | None) -> None:
        if in_transaction():
            raise AgentWaitError(self._label(key), "transaction")
        if _held.get() is not None:
            raise AgentWaitError(self._label(key), "action")
        with self._lock:
            work = self._work.get(key)
            if work is None:
                return
            if work.error is not None:
                raise AgentFailed(self._label(key), work.error)
            target = work.sent
            if work.done >= target:
                return
            w = Waiter()
            work.waiters.append((target, w))
        with anyio.fail_after(timeout):
            await w.wait()
        if work.error is not None:
            raise AgentFailed(self._label(key), work.error)

    async def _drained(self) -> None:
        """Wait until no identity of this family has queued actions (failed ones excepted)."""
        for key, work in list(self._work.items()):
            if work.error is None:
                with contextlib.suppress(AgentFailed):  # a failed agent has nothing more to run
                    await self._wait(key, None)

    def _restart(self, key: Hashable, state: S, clear_actions: bool) -> None:
        with self._lock:
            work = self._work.get(key)
            if work is None or work.error is None:
                raise RuntimeError(f"agent {self._label(key)} has not failed; restart() is for failed agents")
            self._states[key] = state
            work.error = None
            if clear_actions:
                work.done += len(work.queue)
                work.queue.clear()
            start = bool(work.queue) and not work.running
            if start:
                work.running = True
            elif not work.queue:
                self._work.pop(key, None)
        if start:
            spawn(self._drain, key, work)

    def _label(self, key: Hashable) -> str:
        return repr(self.name) if key is None else f"{self.name!r}[{key!r}]"

    def __repr__(self) -> str:
        return f"<astm.AgentFamily {self.name!r} identities={len(self)} busy={self.busy}>"


class Agent(Generic[S]):
    """One identity of an agent family (or a lone agent from ``store.agent``)."""

    __slots__ = ("_family", "key")

    def __init__(self, family: AgentFamily[S], key: Hashable) -> None:
        self._family = family
        self.key = key

    @property
    def name(self) -> str:
        return self._family.name

    @property
    def state(self) -> S:
        """The state after the last action that finished."""
        return self._family._states.get(self.key, self._family.initial)

    @property
    def error_mode(self) -> ErrorMode:
        """What a failed action does: ``"fail"`` stops the agent, ``"continue"`` goes on."""
        return self._family.error_mode

    @property
    def error_handler(self) -> Callable[[Agent[S], BaseException], Any] | None:
        """Called with ``(agent, exception)`` when an action fails, or None."""
        return self._family.error_handler

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped this agent (in ``"fail"`` mode, or a ``BaseException`` in either), else None."""
        work = self._family._work.get(self.key)
        return None if work is None else work.error

    def send(self, action: Callable[..., S | Awaitable[S]], *args: Any) -> None:
        """Queue ``action(state, *args)`` (sync or async); its result becomes the state.

        Inside a transaction the send is held until it commits; inside another
        action, until that action succeeds.
        """
        self._family._send(self.key, action, args, False)

    def send_off(self, action: Callable[..., S], *args: Any) -> None:
        """Like ``send`` for a blocking function: it runs in a worker thread."""
        self._family._send(self.key, action, args, True)

    async def wait(self, timeout: float | None = None) -> None:
        """Wait until every action sent before this call has run.

        Raises ``AgentFailed`` if the agent fails meanwhile, ``TimeoutError``
        after ``timeout`` seconds.
        """
        await self._family._wait(self.key, timeout)

    def restart(self, state: S, clear_actions: bool = False) -> None:
        """Clear a failure, set ``state``, and run the queued actions (or drop them)."""
        self._family._restart(self.key, state, clear_actions)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Agent) and other._family is self._family and other.key == self.key

    def __hash__(self) -> int:
        return hash((id(self._family), self.key))

    def __repr__(self) -> str:
        return f"<astm.Agent {self._family._label(self.key)} state={self.state!r}>"
