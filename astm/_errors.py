"""Every error astm raises, in one place.

The tree::

    AstmError
    ├── NotInTransactionError (RuntimeError)   a transactional operation outside a transaction
    │   └── TransactionEndedError              ... from a task that outlived its transaction's attempt
    ├── IOInTransactionError (RuntimeError)    an @astm.io function called inside one
    ├── AtomInTransactionError (RuntimeError)  atom.swap/reset inside a transaction
    ├── MutableValueError (TypeError)          list/dict/set/bytearray offered as a ref value
    ├── CodecError (TypeError)                 a value the storage codec cannot write or read
    ├── StorageError (RuntimeError)            the store cannot be used (locked, corrupt, newer, failed)
    │   └── CommitOutcomeUnknown               a commit that may or may not have happened
    │       └── CommittedNotApplied            ... that happened, but this process cannot show it yet
    ├── StoreMismatchError (ValueError)        one transaction touching refs of two stores
    ├── CommuteConflictError (RuntimeError)    set/alter after commute on the same ref
    ├── ValidationError (ValueError)           a validator refused a new value
    ├── RetryLimitExceeded                     a transaction kept conflicting
    ├── HistoryUnavailable (LookupError)       as_of / reports beyond retention
    ├── RefNotLoaded (LookupError)             a read outside transactions of a ref a peer has not cached
    ├── RefDeleted (LookupError)               a read of a ref a commit deleted
    ├── SyncTimeout (TimeoutError)             sync(t) waited too long
    ├── AgentFailed (RuntimeError)             a send to (or wait on) a failed agent
    ├── AgentWaitError (RuntimeError)          agent.wait() where it could never return right
    └── StoreClosed (RuntimeError)             work submitted to a closed store

Private control-flow signals (``_Conflict``, ``_Blocked``) derive from
``BaseException`` so that ``except Exception:`` in a transaction body cannot
swallow them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "AgentFailed",
    "AgentWaitError",
    "AstmError",
    "AtomInTransactionError",
    "CodecError",
    "CommitOutcomeUnknown",
    "CommittedNotApplied",
    "CommuteConflictError",
    "HistoryUnavailable",
    "IOInTransactionError",
    "MutableValueError",
    "NotInTransactionError",
    "RefDeleted",
    "RefNotLoaded",
    "RetryLimitExceeded",
    "StoreClosed",
    "StorageError",
    "StoreMismatchError",
    "SyncTimeout",
    "TransactionEndedError",
    "ValidationError",
]


class AstmError(Exception):
    """Base class of every error astm raises."""


class NotInTransactionError(AstmError, RuntimeError):
    """Raised when ``set``/``alter``/``commute``/``ensure``/``retry`` is used outside a transaction."""

    def __init__(self, operation: str) -> None:
        self.operation = operation
        super().__init__(
            f"{operation} can only be called inside a transaction; "
            "wrap the change in a function decorated with @astm.transactional "
            "or run it with `await store.atomically(fn)`"
        )


class TransactionEndedError(NotInTransactionError):
    """Raised when a task uses a transaction whose attempt has already ended (committed, retried or aborted).

    A task spawned inside a body shares the body's transaction; it must finish
    before the body returns. A write it made later would belong to no commit.
    """

    def __init__(self, operation: str) -> None:
        self.operation = operation
        RuntimeError.__init__(
            self,
            f"{operation} was called after its transaction's attempt ended (it committed, retried or "
            "aborted), so the change would belong to no commit; a task started inside a transaction "
            "body must finish before the body returns (await it, or use a task group inside the body)",
        )


class IOInTransactionError(AstmError, RuntimeError):
    """Raised when a function marked with ``@astm.io`` is called inside a transaction."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"{name}() is marked @astm.io (it has side effects) and was called inside a "
            "transaction, whose body may run more than once; call it after the "
            "transaction commits, or register it with astm.after_commit(...)"
        )


class AtomInTransactionError(AstmError, RuntimeError):
    """Raised when ``atom.swap``/``atom.reset`` is called inside a transaction."""

    def __init__(self, name: str, operation: str) -> None:
        self.name = name
        super().__init__(
            f"atom {name!r}: {operation}() was called inside a transaction; a retried "
            "body would apply it twice. Use a ref (store.ref) for state that changes "
            "with the transaction, or change the atom after the transaction commits"
        )


class MutableValueError(AstmError, TypeError):
    """Raised when a mutable built-in (list, dict, set, bytearray) is offered as a value."""

    _SUGGEST: tuple[tuple[type, str], ...] = (
        (list, "pyrsistent.pvector(...) or a tuple"),
        (dict, "pyrsistent.pmap(...)"),
        (set, "pyrsistent.pset(...) or a frozenset"),
        (bytearray, "bytes"),
    )

    def __init__(self, where: str, value: object) -> None:
        self.value = value
        suggestion = next((s for kind, s in self._SUGGEST if isinstance(value, kind)), "an immutable value")
        super().__init__(
            f"{where}: values must be immutable, got a {type(value).__name__}. "
            f"Use {suggestion} instead (pyrsistent collections, tuples and frozen "
            "dataclasses are all fine); a mutable value could change under a "
            "transaction that already read it"
        )


class CodecError(AstmError, TypeError):
    """Raised when a value cannot be written to (or read from) durable storage."""

    def __init__(self, where: str, value: object = None, *, message: str | None = None) -> None:
        self.where = where
        self.value = value
        super().__init__(
            message
            or (
                f"{where}: cannot keep a value of type {type(value).__module__}.{type(value).__qualname__}; "
                "every store accepts None, bool, int, float, str, bytes, Decimal, datetime/date/time, "
                "UUID, tuple, frozenset, pyrsistent pmap/pvector/pset/PRecord/PClass, frozen dataclasses, "
                "NamedTuples, Enum members, and types "
                "registered with astm.codec.register(...). Nothing was committed"
            )
        )

    @classmethod
    def unknown(cls, what: str, fix: str) -> CodecError:
        return cls(what, message=f"cannot decode {what}: {fix}")


class StorageError(AstmError, RuntimeError):
    """Raised when a store's storage cannot be opened or written: locked, corrupt, of another version, failed.

    Raised by a commit, it means the commit did not happen (it is safe to run
    again), except for its subclass :class:`CommitOutcomeUnknown`.
    """

    def __init__(self, path: str, problem: str, fix: str = "") -> None:
        self.path = path
        super().__init__(f"{path}: {problem}" + (f"; {fix}" if fix else ""))


class CommitOutcomeUnknown(StorageError):
    """Raised when a commit may or may not have happened: its write failed or its connection dropped mid-way.

    Running the transaction again could apply it twice. Read the state (after
    reopening the store, or once the server is back) to find out.
    """


class CommittedNotApplied(CommitOutcomeUnknown):
    """Raised when a commit happened (at ``t``) but this process could not apply it yet: do not run it again.

    A PostgreSQL peer lost the server right after the commit was acknowledged,
    before it could read the shared log up to it, so its own reads would not
    show the commit. The commit is durable; the peer shows it once the server
    is reachable (``await store.sync(err.t)``). It is a
    :class:`CommitOutcomeUnknown`, so code that handles an unknown outcome by
    reading the state first handles it right.
    """

    def __init__(self, path: str, problem: str, fix: str, t: int) -> None:
        self.t = t
        super().__init__(path, problem, fix)


class StoreMismatchError(AstmError, ValueError):
    """Raised when one transaction touches refs that belong to two different stores."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"ref {name!r} belongs to a different store than the other refs of this "
            "transaction; a transaction commits to exactly one store"
        )


class CommuteConflictError(AstmError, RuntimeError):
    """Raised when ``set``/``alter`` follows ``commute`` on the same ref in one transaction."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"ref {name!r} was commuted earlier in this transaction and cannot now be "
            "set or altered (its commutes are re-applied at commit); use alter for "
            "every change to it in this transaction"
        )


class ValidationError(AstmError, ValueError):
    """Raised when a validator refuses a ref's new value; the transaction committed nothing."""

    def __init__(self, name: str, value: object, reason: str | None = None) -> None:
        self.name = name
        self.value = value
        detail = f": {reason}" if reason else ""
        super().__init__(
            f"validator of {name!r} refused the value {value!r}{detail}; "
            "the transaction was aborted and nothing was committed"
        )


class RetryLimitExceeded(AstmError):
    """Raised when a transaction conflicted on every one of its allowed attempts."""

    def __init__(self, attempts: int, conflicts: Mapping[str, int]) -> None:
        self.attempts = attempts
        self.conflicts = dict(conflicts)
        hot = ", ".join(f"{name!r} ({n}x)" for name, n in sorted(self.conflicts.items(), key=lambda kv: -kv[1])[:5])
        super().__init__(
            f"transaction gave up after {attempts} attempts; it conflicted on {hot or 'no ref'}. "
            "Keep the body short, split the hot ref, use commute for order-free updates, "
            "or raise retry_limit"
        )


class HistoryUnavailable(AstmError, LookupError):
    """Raised when a ``t`` asked for is older than the history the store still keeps."""

    def __init__(self, t: int, oldest: int, what: str = "as_of") -> None:
        self.t = t
        self.oldest = oldest
        super().__init__(
            f"{what}({t}): that point is no longer retained; the oldest t available is "
            f"{oldest}. Resume from a fresh db value (store.db()) or keep more history "
            "(Store(history=..., history_seconds=...))"
        )


class RefDeleted(AstmError, LookupError):
    """Raised when a ref that a commit deleted is read through an old handle."""

    def __init__(self, name: str, t: int) -> None:
        self.name = name
        self.t = t
        super().__init__(
            f"ref {name!r} was deleted by the commit at t={t}; `store.ref(name, initial)` creates it anew "
            "(this handle stays deleted), and `store.as_of(t)` reads what it held before"
        )


class RefNotLoaded(AstmError, LookupError):
    """Raised when a ref a PostgreSQL peer has not loaded (or has evicted) is read outside a transaction.

    Inside a transaction the peer fetches it and runs the body again; a plain
    read cannot wait.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"ref {name!r} is not loaded in this peer's cache, and a read outside a transaction cannot wait "
            "for it; read it inside a transaction (`await store.atomically(ref.get)`) or load it first "
            "(`await store.load(ref)`)"
        )


class SyncTimeout(AstmError, TimeoutError):
    """Raised when ``store.sync(t, timeout=...)`` runs out of time before the store reaches ``t``."""

    def __init__(self, t: int, basis: int, timeout: float) -> None:
        self.t = t
        self.basis = basis
        super().__init__(
            f"sync({t}) timed out after {timeout:g}s: this store is at t={basis}, {t - basis} commit(s) behind"
        )


class AgentFailed(AstmError, RuntimeError):
    """Raised when sending to, or waiting on, an agent whose action failed in ``"fail"`` mode."""

    def __init__(self, agent: str, error: BaseException) -> None:
        self.agent = agent
        self.error = error
        super().__init__(
            f"agent {agent} failed with {error!r} and accepts no actions; call agent.restart(state) to resume it"
        )
        self.__cause__ = error


class AgentWaitError(AstmError, RuntimeError):
    """Raised when ``agent.wait()`` is called inside a transaction or inside an agent action.

    In a transaction the sends it waits for go out only at commit, so it would
    return early; in an action it would wait for that very action.
    """

    def __init__(self, agent: str, where: str) -> None:
        self.agent = agent
        reason = (
            "the transaction's own sends go out only when it commits, so the wait could not see them; "
            "wait after the transaction returns"
            if where == "transaction"
            else "an action cannot wait for agents (it would wait for itself); send the follow-up work instead"
        )
        place = "a transaction" if where == "transaction" else "an agent action"
        super().__init__(f"agent {agent}: wait() was called inside {place}; {reason}")


class StoreClosed(AstmError, RuntimeError):
    """Raised when work is submitted to a store that is closing or closed."""

    def __init__(self, what: str = "the store") -> None:
        super().__init__(f"{what} is closed; open a new Store to continue")


class _Conflict(BaseException):
    """Internal: this attempt must retry because these refs conflicted."""

    __slots__ = ("fault", "refs")

    def __init__(self, refs: Iterable[Any], fault: bool = False) -> None:
        self.refs = tuple(refs)
        self.fault = fault


class _Blocked(BaseException):
    """Internal: the body called astm.retry(); wait for a change to what it read."""
