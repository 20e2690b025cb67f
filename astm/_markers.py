"""Markers in a ref's version slot: not loaded here, or deleted.

A ref's newest version is ``(t, value)``. Two kinds of ref have no value to
show: a ref a PostgreSQL peer has not loaded (``Cold``), and a ref deleted by a
commit (``Tombstone``). Both take the version ``COLD``, newer than every read
point, so every read of them leaves the engine's fast path and finds out which.
"""

from __future__ import annotations

import sys
from typing import Any, Final

from ._engine import mypyc_attr

__all__ = ["COLD", "DELETED", "Cold", "Tombstone"]

# Compiled, only the constants change: they become static, read by the engine without a dict
# lookup. The classes stay ordinary classes, so they pickle and copy exactly as before.

#: the version of a ref that has no value here
COLD: Final = sys.maxsize


@mypyc_attr(native_class=False)
class Cold:
    """A ref this process does not hold: what it holds if storage has no value for it (its initial value)."""

    __slots__ = ("initial",)

    def __init__(self, initial: Any) -> None:
        self.initial = initial


@mypyc_attr(native_class=False)
class Tombstone:
    """A ref deleted by the commit at ``t``."""

    __slots__ = ("t",)

    def __init__(self, t: int) -> None:
        self.t = t


@mypyc_attr(native_class=False)
class _Deleted:
    """The value a commit writes to delete a ref (``Change.new`` of a deletion in reports)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "astm.DELETED"

    def __reduce__(self) -> str:
        return "DELETED"  # copies and pickles are the one DELETED


#: what a deleted ref's change shows as its new value
DELETED: Final = _Deleted()
