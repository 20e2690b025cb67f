"""The safe codec: how values cross into storage (no pickle).

Values are written as compact tagged JSON. Plain JSON types stand for
themselves; every other type is a one-key object whose key is its tag::

    None, bool, int, float, str      as JSON
    tuple          {"t": [...]}          bytes      {"b": "<base64>"}
    Decimal        {"d": "1.50"}         UUID       {"u": "<hex>"}
    datetime       {"dt": "<iso>"}       date       {"da": "<iso>"}     time  {"ti": "<iso>"}
    frozenset      {"fs": [...]}         pset       {"ps": [...]}
    pvector        {"pv": [...]}         pmap       {"pm": [[k, v], ...]}
    frozen dataclass   {"dc": "<module>:<qualname>", "f": {field: value}}
    registered type    {"x": "<name>", "v": <encoded value>}

Decoding never runs code from the file: a dataclass is looked up by name
among registered classes or, failing that, imported by module and qualified
name and checked to be a frozen dataclass. Register other immutable types with
:func:`register`.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import importlib
import json
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from pyrsistent import PMap, PSet, PVector, pmap, pset, pvector

from ._errors import CodecError

__all__ = ["decode", "dumps", "encode", "loads", "register"]

_registered_by_type: dict[type, tuple[str, Callable[[Any], Any]]] = {}
_registered_by_name: dict[str, Callable[[Any], Any]] = {}
_dataclasses: dict[str, type] = {}


def register(cls: type, name: str, encode: Callable[[Any], Any], decode: Callable[[Any], Any]) -> None:
    """Teach the codec an immutable type: ``encode(value)`` returns a codec-able value, ``decode`` inverts it.

    ``name`` is written to storage, so keep it stable across versions.
    """
    if not isinstance(cls, type):
        raise TypeError(f"register(cls, ...): cls must be a type, got {cls!r}")
    if not isinstance(name, str) or not name:
        raise TypeError("register(...): name must be a non-empty str")
    known = _registered_by_name.get(name)
    if known is not None and _registered_by_type.get(cls, (None,))[0] != name:
        raise ValueError(f"codec name {name!r} is already registered for another type")
    _registered_by_type[cls] = (name, encode)
    _registered_by_name[name] = decode


def _dc_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def encode(value: Any, where: str = "value") -> Any:
    """The JSON-able tagged form of ``value``; ``CodecError`` for a type the codec cannot write."""
    t = type(value)
    if value is None or t is bool or t is int or t is float or t is str:
        return value
    if t is tuple:
        return {"t": [encode(v, where) for v in value]}
    if t is Decimal:
        return {"d": str(value)}
    if t is bytes:
        return {"b": base64.b64encode(value).decode("ascii")}
    if t is _dt.datetime:
        return {"dt": value.isoformat()}
    if t is _dt.date:
        return {"da": value.isoformat()}
    if t is _dt.time:
        return {"ti": value.isoformat()}
    if t is uuid.UUID:
        return {"u": value.hex}
    if t is frozenset:
        return {"fs": [encode(v, where) for v in value]}
    if isinstance(value, PMap):
        return {"pm": [[encode(k, where), encode(v, where)] for k, v in value.items()]}
    if isinstance(value, PVector):
        return {"pv": [encode(v, where) for v in value]}
    if isinstance(value, PSet):
        return {"ps": [encode(v, where) for v in value]}
    reg = _registered_by_type.get(t)
    if reg is not None:
        return {"x": reg[0], "v": encode(reg[1](value), where)}
    if dataclasses.is_dataclass(value) and t.__dataclass_params__.frozen:
        name = _dc_name(t)
        _dataclasses.setdefault(name, t)
        return {
            "dc": name,
            "f": {f.name: encode(getattr(value, f.name), where) for f in dataclasses.fields(value) if f.init},
        }
    raise CodecError(where, value)


def _dataclass(name: str) -> type:
    cls = _dataclasses.get(name)
    if cls is None:
        module, _, qualname = name.partition(":")
        try:
            obj: Any = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise CodecError.unknown(f"dataclass {name!r}", "import it or define it before opening the store") from exc
        if not (isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__dataclass_params__.frozen):  # type: ignore[attr-defined]
            raise CodecError.unknown(f"{name!r}", "it is not a frozen dataclass")
        cls = _dataclasses[name] = obj
    return cls


def decode(data: Any) -> Any:
    """The value whose tagged form is ``data``."""
    if not isinstance(data, dict):
        return data
    if len(data) == 1:
        ((tag, v),) = data.items()
        if tag == "t":
            return tuple(decode(x) for x in v)
        if tag == "d":
            return Decimal(v)
        if tag == "b":
            return base64.b64decode(v)
        if tag == "dt":
            return _dt.datetime.fromisoformat(v)
        if tag == "da":
            return _dt.date.fromisoformat(v)
        if tag == "ti":
            return _dt.time.fromisoformat(v)
        if tag == "u":
            return uuid.UUID(hex=v)
        if tag == "fs":
            return frozenset(decode(x) for x in v)
        if tag == "pm":
            return pmap({decode(k): decode(x) for k, x in v})
        if tag == "pv":
            return pvector(decode(x) for x in v)
        if tag == "ps":
            return pset(decode(x) for x in v)
    elif len(data) == 2:
        if "x" in data:
            dec = _registered_by_name.get(data["x"])
            if dec is None:
                raise CodecError.unknown(f"type {data['x']!r}", "register it with astm.codec.register(...)")
            return dec(decode(data["v"]))
        if "dc" in data:
            cls = _dataclass(data["dc"])
            return cls(**{k: decode(x) for k, x in data["f"].items()})
    raise CodecError.unknown(f"tagged value {str(data)[:60]!r}", "the file may be from a newer astm")


def dumps(value: Any, where: str = "value") -> str:
    """``value`` as a compact JSON string of its tagged form."""
    t = type(value)
    if t is int:
        return str(value)
    if t is str:
        return _encode_str(value)
    return json.dumps(encode(value, where), separators=(",", ":"), ensure_ascii=False)


_encode_str = json.JSONEncoder(ensure_ascii=False).encode


def loads(text: str | bytes) -> Any:
    """The value a :func:`dumps` string stands for."""
    return decode(json.loads(text))
