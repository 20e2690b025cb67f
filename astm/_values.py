"""The value test applied to everything a ref, an atom or an outbox entry takes.

It is the codec's test (``astm.codec.check``), so every store, memory
included, refuses the same values with the same error. Scalars take a fast
path; a value produced by one of astm's collection helpers (``astm.conj``,
``astm.assoc``, ...) from an already checked one needs only its new parts
checked, which keeps changes to large collections cheap.
"""

from __future__ import annotations

import datetime as _dt
import uuid
from decimal import Decimal

from . import codec

__all__ = ["check_value"]

#: types whose every value is immutable and storable as it is
_IMMUTABLE_FAST = frozenset({int, str, float, bool, type(None), bytes, Decimal, uuid.UUID, _dt.date})


def check_value(value: object, name: str, what: str = "ref") -> None:
    """Refuse a value that is mutable anywhere inside, or that the codec cannot round-trip."""
    if type(value) in _IMMUTABLE_FAST:
        return
    try:
        codec.check(value)
    except TypeError:
        codec.check(value, f"{what} {name!r}")  # again, for the message naming the ref
        raise
