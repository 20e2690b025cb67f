"""The value test applied to everything a ref, an atom or an outbox entry takes.

It is the codec's test (``astm.codec.check``), so every store, memory
included, refuses the same values with the same error. Scalars take a fast
path; a value produced by one of astm's collection helpers (``astm.conj``,
``astm.assoc``, ...) from an already checked one needs only its new parts
checked, which keeps changes to large collections cheap.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import sys
import uuid
from decimal import Decimal
from typing import Final

from pyrsistent import pmap, pset, pvector

from . import codec

__all__ = ["check_changed_value", "check_value", "untrack_large"]

#: types whose every value is immutable and storable as it is
_IMMUTABLE_FAST: Final[frozenset[type]] = frozenset(
    {int, str, float, bool, type(None), bytes, Decimal, uuid.UUID, _dt.date}
)


def check_value(value: object, name: str, what: str = "ref") -> None:
    """Refuse a value that is mutable anywhere inside, or that the codec cannot round-trip."""
    if type(value) in _IMMUTABLE_FAST:
        return
    try:
        codec.check(value)
    except TypeError:
        codec.check(value, f"{what} {name!r}")  # again, for the message naming the ref
        raise


def check_changed_value(value: object, base: object, name: str, what: str = "ref") -> None:
    """``check_value``, for a value derived from the checked ``base`` (only the parts that differ are walked)."""
    if type(value) in _IMMUTABLE_FAST:
        return
    try:
        codec.check_changed(value, base)
    except TypeError:
        codec.check_changed(value, base, f"{what} {name!r}")  # again, for the message naming the ref
        raise


#: collections at least this long are taken out of the garbage collector's view once committed
UNTRACK_AT: Final = 256
_PVECTOR: type = type(pvector())
_PMAP: type = type(pmap())
_PSET: type = type(pset())
LARGE_TYPES: Final[frozenset[type]] = frozenset({_PVECTOR, _PMAP, _PSET})

if sys.implementation.name == "cpython":
    _gc_untrack = ctypes.pythonapi.PyObject_GC_UnTrack
    _gc_untrack.argtypes = [ctypes.py_object]
    _gc_untrack.restype = None
    _untracking = True
else:  # pragma: no cover - other interpreters have other collectors
    _untracking = False


def untrack_large(value: object) -> None:
    """Take a large committed pyrsistent collection out of the cyclic garbage collector's view.

    pyrsistent's C vector makes the collector visit every element each time it
    looks at a vector, so every young or promoted version of a 100k-entry
    value costs a walk over 100k entries; a store keeps recent versions alive
    for history, and one-entry commits then cost what the whole value holds.
    A checked ref value is an immutable tree built bottom-up, so it cannot be
    part of a reference cycle, and the collector has nothing to find in it:
    reference counting frees it. Its elements stay tracked (each new one is
    visited once, while young).
    """
    if not _untracking:
        return
    t = type(value)
    if t is _PMAP:
        _gc_untrack(value)
        _gc_untrack(value._buckets)  # type: ignore[attr-defined]
    elif t is _PVECTOR:
        _gc_untrack(value)
    elif t is _PSET:
        _gc_untrack(value)
        inner = value._map  # type: ignore[attr-defined]
        _gc_untrack(inner)
        _gc_untrack(inner._buckets)
