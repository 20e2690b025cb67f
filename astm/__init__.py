"""astm: asyncio-native transactional state.

Refs changed together by transactions that retry on conflict, atoms, a
timeline of immutable db values, and blocking retry. See the user guide in
``docs/``.
"""

# first: with ASTM_PURE=1 the engine modules must load from source before anything imports them
from . import _engine  # isort: skip
from . import codec as codec
from ._agent import Agent as Agent
from ._agent import AgentFamily as AgentFamily
from ._api import after_commit as after_commit
from ._api import check as check
from ._api import in_transaction as in_transaction
from ._api import io as io
from ._api import or_else as or_else
from ._api import retry as retry
from ._api import transactional as transactional
from ._atom import Atom as Atom
from ._db import Change as Change
from ._db import Db as Db
from ._db import TxReport as TxReport
from ._errors import AgentFailed as AgentFailed
from ._errors import AgentWaitError as AgentWaitError
from ._errors import AstmError as AstmError
from ._errors import AtomInTransactionError as AtomInTransactionError
from ._errors import CodecError as CodecError
from ._errors import CommitOutcomeUnknown as CommitOutcomeUnknown
from ._errors import CommittedNotApplied as CommittedNotApplied
from ._errors import CommuteConflictError as CommuteConflictError
from ._errors import HistoryUnavailable as HistoryUnavailable
from ._errors import IOInTransactionError as IOInTransactionError
from ._errors import MutableValueError as MutableValueError
from ._errors import NotInTransactionError as NotInTransactionError
from ._errors import RefDeleted as RefDeleted
from ._errors import RefNotLoaded as RefNotLoaded
from ._errors import RetryLimitExceeded as RetryLimitExceeded
from ._errors import StorageError as StorageError
from ._errors import StoreClosed as StoreClosed
from ._errors import StoreMismatchError as StoreMismatchError
from ._errors import SyncTimeout as SyncTimeout
from ._errors import TransactionEndedError as TransactionEndedError
from ._errors import ValidationError as ValidationError
from ._gc import tune_gc as tune_gc
from ._markers import DELETED as DELETED
from ._ops import assoc as assoc
from ._ops import conj as conj
from ._ops import disj as disj
from ._ops import dissoc as dissoc
from ._outbox import DeadLetter as DeadLetter
from ._outbox import Effect as Effect
from ._outbox import Outbox as Outbox
from ._ref import Ref as Ref
from ._run import run as run
from ._store import Stats as Stats
from ._store import Store as Store

__version__ = "0.1.0"

#: True when the transaction engine runs compiled (mypyc), False for the pure-Python modules
#: (no C compiler at install, ``ASTM_BUILD_PURE=1`` then, or ``ASTM_PURE=1`` now)
compiled: bool = _engine.compiled()

__all__ = [
    "Agent",
    "AgentFailed",
    "AgentFamily",
    "AgentWaitError",
    "AstmError",
    "Atom",
    "AtomInTransactionError",
    "Change",
    "CodecError",
    "CommitOutcomeUnknown",
    "CommittedNotApplied",
    "CommuteConflictError",
    "DELETED",
    "Db",
    "DeadLetter",
    "Effect",
    "HistoryUnavailable",
    "IOInTransactionError",
    "MutableValueError",
    "NotInTransactionError",
    "Outbox",
    "Ref",
    "RefDeleted",
    "RefNotLoaded",
    "RetryLimitExceeded",
    "Stats",
    "StorageError",
    "Store",
    "StoreClosed",
    "StoreMismatchError",
    "SyncTimeout",
    "TransactionEndedError",
    "TxReport",
    "ValidationError",
    "after_commit",
    "assoc",
    "check",
    "compiled",
    "conj",
    "disj",
    "dissoc",
    "in_transaction",
    "io",
    "or_else",
    "retry",
    "run",
    "transactional",
    "tune_gc",
]

for _name in __all__:
    _obj = globals()[_name]
    exported = isinstance(_obj, type) or (callable(_obj) and hasattr(_obj, "__dict__"))  # not DELETED
    if exported and getattr(_obj, "__module__", "").startswith("astm."):
        _obj.__module__ = "astm"
del _name, _obj, exported
