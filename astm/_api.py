"""The public transaction functions: ``transactional``, ``retry``, ``check``, ``or_else``, ``after_commit``, ``io``.

They live apart from the engine (``astm._tx``) so that they stay ordinary
Python functions when the engine is compiled: their docstrings, signatures,
``functools.wraps`` and ``inspect`` behave as users expect, and none of them
is on the hot path (a ``@transactional`` call is one plain function call
into the engine's runner).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn, ParamSpec, TypeVar, cast, overload

from ._errors import IOInTransactionError, _Blocked, _Conflict
from ._tx import _SEALED, _current, current_for, run_transaction

__all__ = ["after_commit", "check", "in_transaction", "io", "or_else", "retry", "transactional"]

P = ParamSpec("P")
R = TypeVar("R")


def in_transaction() -> bool:
    """True when called inside a transaction body."""
    tx = _current.get()
    return tx is not None and tx.vals is not _SEALED


def retry() -> NoReturn:
    """Abandon this attempt and run the body again once a ref it read has changed.

    Blocking retry in the style of Haskell's STM: the transaction sleeps (no
    polling) until another transaction commits a change to something this
    attempt read. Bound the wait with ``anyio.fail_after``.
    """
    current_for("astm.retry()")
    raise _Blocked()


def check(condition: object) -> None:
    """``astm.retry()`` unless ``condition`` is true."""
    if not condition:
        retry()


async def or_else(*alternatives: Callable[[], Any]) -> Any:
    """Run the first alternative that does not ``retry()``; its result is returned.

    An alternative that retries (or raises) has its writes and effects rolled
    back; what it read still counts, so when every alternative retries the
    transaction waits for a change to anything any of them read.
    """
    tx = current_for("astm.or_else()")
    if not alternatives:
        raise TypeError("or_else() needs at least one alternative")
    for i, alt in enumerate(alternatives):
        saved = tx.savepoint()
        try:
            r = alt()
            if inspect.isawaitable(r):
                r = await r
            return r
        except _Blocked:
            tx.rollback(saved)
            if i == len(alternatives) - 1:
                raise
        except _Conflict:
            raise
        except BaseException:
            tx.rollback(saved)  # an alternative that raises leaves no trace either
            raise
    raise AssertionError("unreachable")


def after_commit(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` after the current transaction commits (never on retry or abort)."""
    tx = current_for("astm.after_commit()")
    if tx.effects is None:
        tx.effects = [(fn, args)]
    else:
        tx.effects.append((fn, args))


@overload
def transactional(
    fn: Callable[P, Awaitable[R]], *, retry_limit: int | None = None
) -> Callable[P, Coroutine[Any, Any, R]]: ...
@overload
def transactional(fn: Callable[P, R], *, retry_limit: int | None = None) -> Callable[P, Coroutine[Any, Any, R]]: ...
@overload
def transactional(
    fn: None = None, *, retry_limit: int | None = None
) -> Callable[[Callable[P, Any]], Callable[P, Coroutine[Any, Any, Any]]]: ...
def transactional(fn: Any = None, *, retry_limit: int | None = None) -> Any:
    """Make a function a transaction: calling it runs it atomically, retried on conflict.

    Works on ``async def`` and plain ``def``; the call always returns an
    awaitable. The store is the one of the first ref the body touches. Called
    inside another transaction, it joins that one; if it raises there, what it
    did is undone (a savepoint), so an outer body that catches the exception
    goes on exactly as before the call.
    """
    if fn is None:
        return functools.partial(transactional, retry_limit=retry_limit)

    # a plain function returning the runner's coroutine: one frame, not two
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        return run_transaction(None, fn, args, kwargs, retry_limit)

    return wrapper


def io(fn: Callable[P, R]) -> Callable[P, R]:
    """Mark ``fn`` as side-effecting: calling it inside a transaction raises ``IOInTransactionError``."""
    name = getattr(fn, "__qualname__", repr(fn))
    if inspect.iscoroutinefunction(fn):
        afn = cast(Callable[..., Awaitable[Any]], fn)

        @functools.wraps(fn)
        async def aguard(*args: Any, **kwargs: Any) -> Any:
            if _current.get() is not None:
                raise IOInTransactionError(name)
            return await afn(*args, **kwargs)

        return cast(Callable[P, R], aguard)

    @functools.wraps(fn)
    def guard(*args: P.args, **kwargs: P.kwargs) -> R:
        if _current.get() is not None:
            raise IOInTransactionError(name)
        return fn(*args, **kwargs)

    return guard
