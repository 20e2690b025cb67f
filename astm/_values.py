"""The immutability check applied to every value a ref or atom takes."""

from __future__ import annotations

from ._errors import MutableValueError

__all__ = ["check_value"]

_MUTABLE = (list, dict, set, bytearray)
_IMMUTABLE_FAST = frozenset({int, str, float, bool, type(None), tuple, bytes, frozenset})


def check_value(value: object, name: str) -> None:
    """Refuse the mutable built-ins (and their subclasses) as values of ``name``."""
    if type(value) in _IMMUTABLE_FAST:
        return
    if isinstance(value, _MUTABLE):
        raise MutableValueError(f"ref {name!r}", value)
