"""The public API: every name in astm.__all__ exists, and nothing private leaks."""

from __future__ import annotations

import astm


def test_all_exports_exist_and_say_astm() -> None:
    """Every exported class and function exists and reports module 'astm' (tracebacks say astm.Ref)."""
    for name in astm.__all__:
        obj = getattr(astm, name)
        if isinstance(obj, type) or callable(obj):
            assert obj.__module__ == "astm", name
    assert repr(astm.DELETED) == "astm.DELETED"


def test_public_surface_is_pinned() -> None:
    """The names users rely on (DESIGN.md) are all exported."""
    expected = {
        "Agent", "AgentFailed", "AgentFamily", "AgentWaitError", "AstmError", "Atom",
        "AtomInTransactionError", "Change", "CodecError", "CommitOutcomeUnknown", "CommittedNotApplied",
        "CommuteConflictError",
        "DELETED", "Db", "DeadLetter", "Effect", "HistoryUnavailable", "IOInTransactionError",
        "MutableValueError", "NotInTransactionError", "Outbox", "Ref", "RefDeleted", "RefNotLoaded",
        "RetryLimitExceeded", "Stats", "StorageError", "Store", "StoreClosed", "StoreMismatchError",
        "SyncTimeout", "TransactionEndedError", "TxReport", "ValidationError", "after_commit", "assoc",
        "check", "compiled", "conj", "disj", "dissoc", "in_transaction", "io", "or_else", "retry", "run",
        "transactional", "tune_gc",
    }  # fmt: skip
    assert set(astm.__all__) == expected
    assert astm.__all__ == sorted(astm.__all__)


def test_errors_derive_from_astm_error() -> None:
    """Every public error is an AstmError."""
    for name in astm.__all__:
        obj = getattr(astm, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, astm.AstmError), name
