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
holds, per idle identity, only its state, and per busy identity one entry
holding its actions: a bounded pool of worker tasks, shared by the family's
identities, runs them.
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

from ._api import in_transaction
from ._backend import Waiter, spawn
from ._errors import AgentFailed, AgentWaitError, StoreClosed
from ._tx import _current

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


#: at most this many actions of one family run at once (each in a worker task; identities take turns)
MAX_WORKERS = 512


class _Waiting:
    """A ``wait()`` on one identity: how many of its actions are still to finish before it returns."""

    __slots__ = ("left", "waiter")

    def __init__(self, left: int, waiter: Waiter) -> None:
        self.left = left
        self.waiter = waiter


class AgentFamily(Generic[S]):
    """A mapping of keys to agents, created on first use: ``family[user_id].send(...)``.

    An identity costs its state when idle, and about one dict entry and its
    action while it has work: pending identities wait in one ready queue, and
    a pool of at most ``MAX_WORKERS`` worker tasks (there only while there is
    work) runs their actions, one at a time per identity, identities taking
    turns.
    """

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
        #: the actions of identities with work: one action, or a deque of them when several wait
        self._queues: dict[Hashable, _Action | deque[_Action]] = {}
        #: identities with actions and none running, in turn
        self._ready: deque[Hashable] = deque()
        #: identities whose action is running now
        self._running: set[Hashable] = set()
        #: identities stopped by a failure (fail mode, or a BaseException)
        self._errors: dict[Hashable, BaseException] = {}
        self._waiting: dict[Hashable, list[_Waiting]] = {}
        self._workers = 0
        self._lock = threading.Lock()
        #: "agent" (store.agent) or "family" (store.agents)
        self.kind = "family"

    def __getitem__(self, key: Hashable) -> Agent[S]:
        return Agent(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self._states or key in self._queues or key in self._errors

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._states))

    def __len__(self) -> int:
        return len(self._states)

    @property
    def busy(self) -> int:
        """How many identities have queued or running actions (or a failure) right now."""
        return len(self._queues.keys() | self._running | self._errors.keys())

    # -- sending ---------------------------------------------------------------

    def _send(self, key: Hashable, fn: Callable[..., Any], args: tuple[Any, ...], off: bool) -> None:
        if not callable(fn):
            raise TypeError(f"agent {self._label(key)}: send(action, ...) needs a callable, got {fn!r}")
        error = self._errors.get(key)
        if error is not None and self.error_mode == "fail":
            raise AgentFailed(self._label(key), error)
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
            queued = self._queues.get(key)
            if queued is None:
                self._queues[key] = action
                if key not in self._running and key not in self._errors:
                    self._ready.append(key)
            elif type(queued) is deque:
                queued.append(action)
            else:
                self._queues[key] = deque((queued, action))  # type: ignore[arg-type]
            hire = self._workers < MAX_WORKERS and self._workers < len(self._ready)
            if hire:
                self._workers += 1
        if hire:
            spawn(self._work)

    def _next_locked(self, key: Hashable) -> _Action | None:
        """Take the identity's next action off its queue (under the lock)."""
        queued = self._queues.get(key)
        if queued is None:
            return None
        if type(queued) is deque:
            action = queued.popleft()
            if len(queued) == 1:
                self._queues[key] = queued[0]
            elif not queued:
                del self._queues[key]
            return action
        del self._queues[key]
        return queued  # type: ignore[return-value]

    async def _work(self) -> None:
        """A worker: run ready identities' next actions until none is ready."""
        try:
            while True:
                with self._lock:
                    if not self._ready:
                        self._workers -= 1
                        return
                    key = self._ready.popleft()
                    action = self._next_locked(key)
                    if action is None:
                        continue
                    self._running.add(key)
                await self._run(key, action)
        except BaseException:
            with self._lock:
                self._workers -= 1
            raise

    async def _run(self, key: Hashable, action: _Action) -> None:
        """Run one action of ``key`` and hand the identity its next turn (or its idleness)."""
        fn, args, off = action
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
                await self._failed(key, exc)
            else:
                self._states[key] = new
                for family, k, sent in held:
                    family._dispatch(k, sent)
        except BaseException as exc:
            # KeyboardInterrupt, SystemExit, cancellation, or the action's own
            # BaseException: the agent fails (whatever its mode) rather than
            # stay busy forever, and the exception goes on
            with self._lock:
                self._errors[key] = exc
            self._finished(key)
            raise
        finally:
            _held.reset(token)
        self._finished(key)

    def _finished(self, key: Hashable) -> None:
        """One action of ``key`` ended: wake its waiters that were waiting for it, give it its next turn."""
        wake: list[Waiter] = []
        with self._lock:
            self._running.discard(key)
            stuck = key in self._errors
            waiting = self._waiting.get(key)
            if waiting:
                keep = []
                for entry in waiting:
                    entry.left -= 1
                    if stuck or entry.left <= 0:
                        wake.append(entry.waiter)
                    else:
                        keep.append(entry)
                if keep:
                    self._waiting[key] = keep
                else:
                    del self._waiting[key]
            if not stuck and key in self._queues:
                self._ready.append(key)
        for w in wake:
            w.fire()

    async def _failed(self, key: Hashable, exc: Exception) -> None:
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
                self._errors[key] = exc

    def _pending_locked(self, key: Hashable) -> int:
        """How many actions of ``key`` are queued or running (under the lock)."""
        queued = self._queues.get(key)
        n = 0 if queued is None else len(queued) if type(queued) is deque else 1
        return n + (key in self._running)

    # -- waiting, failure ----------------------------------------------------------

    async def _wait(self, key: Hashable, timeout: float | None) -> None:
        if in_transaction():
            raise AgentWaitError(self._label(key), "transaction")
        if _held.get() is not None:
            raise AgentWaitError(self._label(key), "action")
        with self._lock:
            error = self._errors.get(key)
            if error is not None:
                raise AgentFailed(self._label(key), error)
            left = self._pending_locked(key)
            if not left:
                return
            w = Waiter()
            self._waiting.setdefault(key, []).append(_Waiting(left, w))
        with anyio.fail_after(timeout):
            await w.wait()
        error = self._errors.get(key)
        if error is not None:
            raise AgentFailed(self._label(key), error)

    async def _drained(self) -> None:
        """Wait until no identity of this family has queued actions (failed ones excepted)."""
        while True:
            with self._lock:
                keys = [k for k in self._queues.keys() | self._running if k not in self._errors]
            if not keys:
                return
            for key in keys:
                with contextlib.suppress(AgentFailed):  # a failed agent has nothing more to run
                    await self._wait(key, None)

    def _restart(self, key: Hashable, state: S, clear_actions: bool) -> None:
        with self._lock:
            if key not in self._errors:
                raise RuntimeError(f"agent {self._label(key)} has not failed; restart() is for failed agents")
            self._states[key] = state
            del self._errors[key]
            if clear_actions:
                self._queues.pop(key, None)
            if key in self._queues and key not in self._running:
                self._ready.append(key)
            hire = self._workers < MAX_WORKERS and self._workers < len(self._ready)
            if hire:
                self._workers += 1
        if hire:
            spawn(self._work)

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
        return self._family._errors.get(self.key)

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
