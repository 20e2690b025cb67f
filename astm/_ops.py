"""Collection helpers that keep changes to large values cheap: ``conj``, ``assoc``, ``dissoc``, ``disj``.

They are plain functions on astm's immutable collections (pyrsistent
``pvector``/``pmap``/``pset``, ``tuple``, ``frozenset``), named after
Clojure's. Passed to ``alter`` or ``commute`` (``ledger.commute(astm.conj,
sale)``), they tell astm what changed: only the new parts (``sale``) are
checked for immutability, so the cost of the change does not grow with the
collection, where an arbitrary function's result must be checked whole.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from pyrsistent import pmap, pset, pvector

from . import codec
from ._errors import CodecError
from ._values import check_value

__all__ = ["STRUCTURAL", "apply_calls", "assoc", "check_args", "conj", "decode_calls", "disj", "dissoc", "encode_calls"]

C = TypeVar("C")

_PMAP: type = type(pmap())
_PVECTOR: type = type(pvector())
_PSET: type = type(pset())


def conj(coll: C, *items: Any) -> C:
    """``coll`` with ``items`` added: appended to a pvector or tuple, added to a pset or frozenset.

    For a pmap each item is a ``(key, value)`` pair.
    """
    t = type(coll)
    out: Any = coll
    if t is _PVECTOR:
        return out.extend(items) if len(items) != 1 else out.append(items[0])  # type: ignore[no-any-return]
    if t is tuple:
        return out + items  # type: ignore[no-any-return]
    if t is _PSET:
        return out.add(items[0]) if len(items) == 1 else out.update(items)  # type: ignore[no-any-return]
    if t is frozenset:
        return out.union(items)  # type: ignore[no-any-return]
    if t is _PMAP:
        if len(items) == 1:
            k, v = items[0]
            return out.set(k, v)  # type: ignore[no-any-return]
        e = out.evolver()  # one copy of the touched paths for all the items
        for k, v in items:
            e.set(k, v)
        return e.persistent()  # type: ignore[no-any-return]
    raise TypeError(f"conj(coll, ...): coll must be a pvector, tuple, pset, frozenset or pmap, got {t.__qualname__}")


def assoc(coll: C, key: Any, value: Any) -> C:
    """``coll`` with ``key`` set to ``value``: a pmap key, or a pvector index."""
    t = type(coll)
    if t is _PMAP or t is _PVECTOR:
        return coll.set(key, value)  # type: ignore[attr-defined, no-any-return]
    raise TypeError(f"assoc(coll, key, value): coll must be a pmap or pvector, got {t.__qualname__}")


def dissoc(coll: C, *keys: Hashable) -> C:
    """``coll`` without these keys (a pmap; absent keys are ignored)."""
    if type(coll) is not _PMAP:
        raise TypeError(f"dissoc(coll, ...): coll must be a pmap, got {type(coll).__qualname__}")
    out: Any = coll
    if len(keys) == 1:
        return out.discard(keys[0])  # type: ignore[no-any-return]
    e = out.evolver()
    for k in keys:
        if k in e:
            e.remove(k)
    return e.persistent()  # type: ignore[no-any-return]


def disj(coll: C, *items: Hashable) -> C:
    """``coll`` without these items (a pset or frozenset; absent items are ignored)."""
    t = type(coll)
    out: Any = coll
    if t is _PSET:
        if len(items) == 1:
            return out.discard(items[0])  # type: ignore[no-any-return]
        e = out.evolver()
        for x in frozenset(items):
            if x in out:
                e.remove(x)
        return e.persistent()  # type: ignore[no-any-return]
    if t is frozenset:
        return out.difference(items)  # type: ignore[no-any-return]
    raise TypeError(f"disj(coll, ...): coll must be a pset or frozenset, got {t.__qualname__}")


#: the helpers whose result is immutable whenever their collection and arguments are
STRUCTURAL: frozenset[Callable[..., Any]] = frozenset({conj, assoc, dissoc, disj})


def check_args(fn: Callable[..., Any], args: tuple[Any, ...], name: str) -> None:
    """Check what a structural helper adds to an already checked collection."""
    if fn is conj or fn is assoc:
        for a in args:
            check_value(a, name)


_BY_NAME: dict[str, Callable[..., Any]] = {"conj": conj, "assoc": assoc, "dissoc": dissoc, "disj": disj}
_NAMES = {fn: name for name, fn in _BY_NAME.items()}

#: one helper call as stored: (its name, its arguments)
Call = tuple[Callable[..., Any], tuple[Any, ...]]


def encode_calls(calls: list[Call], where: str) -> Any:
    """Helper calls in the codec's tagged form: ``[[name, [arg, ...]], ...]`` (a delta in a log record)."""
    return [[_NAMES[fn], [codec.encode(a, where) for a in args]] for fn, args in calls]


def decode_calls(data: Any) -> list[Call]:
    """The helper calls a stored delta holds."""
    out = []
    for name, args in data:
        fn = _BY_NAME.get(name)
        if fn is None:
            raise CodecError.unknown(f"collection helper {name!r}", "the file may be from a newer astm")
        out.append((fn, tuple(codec.decode(a) for a in args)))
    return out


def apply_calls(value: Any, calls: list[Call]) -> Any:
    """``value`` after the helper calls of a delta, in order (the same functions the transaction ran)."""
    for fn, args in calls:
        value = fn(value, *args)
    return value
