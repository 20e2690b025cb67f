"""The safe codec: which values a ref may hold, and how they cross into storage (no pickle).

Every store, the in-memory one included, accepts exactly the values this codec
can write and read back unchanged, so code tested on ``Store()`` behaves the
same on a durable store. :func:`check` is that test; the mutable built-ins
(``list``, ``dict``, ``set``, ``bytearray``) anywhere inside a value give a
``MutableValueError``, any other type the codec cannot round-trip a
``CodecError``.

Values are written as compact tagged JSON. Plain JSON types stand for
themselves; every other type is a one-key object whose key is its tag::

    None, bool, int, float, str      as JSON (str exactly, lone surrogates included)
    int beyond 4000 digits  {"ix": "<hex>"}
    tuple          {"t": [...]}          bytes      {"b": "<base64>"}
    Decimal        {"d": "1.50"}         UUID       {"u": "<hex>"}
    datetime       {"dt": "<iso>"}       date       {"da": "<iso>"}     time  {"ti": "<iso>"}
    datetime, time with a named zone or fold    {"dz": [iso, fold, zone]} / {"tz": [iso, fold, zone]}
    frozenset      {"fs": [...]}         pset       {"ps": [...]}
    pvector        {"pv": [...]}         pmap       {"pm": [[k, v], ...]}
    frozen dataclass   {"dc": "<module>:<qualname>", "f": {field: value}}
    NamedTuple         {"nt": "<module>:<qualname>", "v": [...]}
    Enum member        {"en": "<module>:<qualname>", "v": "<member name>"}
    PRecord, PClass    {"pr": "<module>:<qualname>", "f": {...}} / {"pc": ...}
    frozen pydantic model, frozen msgspec Struct   {"py": ...} / {"ms": ...}, like a dataclass
    registered type    {"x": "<name>", "v": <encoded value>}

A zone is an IANA key (``zoneinfo.ZoneInfo``) or ``[offset seconds, name]``
(``datetime.timezone``).

Decoding never runs code from the file and never imports a module because the
data names it: a class is found among the classes registered or encoded in
this process, or in a module the process has already imported; an unknown
name is a ``CodecError``. Register other immutable types with :func:`register`.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import enum
import json
import sys
import uuid
import zoneinfo
from collections.abc import Callable, Iterable
from decimal import Decimal
from itertools import compress, count, islice
from operator import is_not
from typing import Any

from pyrsistent import PClass, PRecord, pmap, pset, pvector

from ._errors import CodecError, MutableValueError

__all__ = ["check", "check_changed", "decode", "dumps", "encode", "loads", "register", "text"]

_registered_by_type: dict[type, tuple[str, Callable[[Any], Any]]] = {}
_registered_by_name: dict[str, Callable[[Any], Any]] = {}
#: classes met while encoding (or registered), by "<module>:<qualname>"
_classes: dict[str, type] = {}

_PMAP: type = type(pmap())
_PVECTOR: type = type(pvector())
_PSET: type = type(pset())
_MUTABLE = (list, dict, set, bytearray)
_UTC = _dt.UTC
#: ints with more digits than this are written in hex (Python refuses to print them in decimal)
_BIG_INT_BITS = 13_000


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


def _class_name(cls: type) -> str:
    name = f"{cls.__module__}:{cls.__qualname__}"
    _classes.setdefault(name, cls)
    return name


def _zone(tz: _dt.tzinfo, where: str, value: object) -> Any:
    """The encoded form of a time zone, or CodecError for one the codec cannot name."""
    if type(tz) is zoneinfo.ZoneInfo and tz.key is not None:
        return tz.key
    if type(tz) is _dt.timezone:
        offset = tz.utcoffset(None)
        name = tz.tzname(None)
        default = _dt.timezone(offset).tzname(None)
        return [offset.total_seconds(), None if name == default else name]
    raise CodecError(
        where,
        value,
        message=f"{where}: cannot store a time zone of type {type(tz).__qualname__}; use zoneinfo.ZoneInfo "
        "or datetime.timezone (or register the type with astm.codec.register). Nothing was committed",
    )


def _from_zone(spec: Any) -> _dt.tzinfo:
    if isinstance(spec, str):
        try:
            return zoneinfo.ZoneInfo(spec)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise CodecError.unknown(f"time zone {spec!r}", "install the tzdata package") from exc
    offset, name = spec
    delta = _dt.timedelta(seconds=offset)
    return _dt.timezone(delta) if name is None else _dt.timezone(delta, name)


def _plain_zone(tz: _dt.tzinfo | None) -> bool:
    """Whether an ISO offset alone restores ``tz`` exactly (none, or a fixed offset with its default name)."""
    if tz is None:
        return True
    if type(tz) is not _dt.timezone:
        return False
    return tz.tzname(None) == _dt.timezone(tz.utcoffset(None)).tzname(None)


def encode(value: Any, where: str = "value") -> Any:
    """The JSON-able tagged form of ``value``.

    Raises ``MutableValueError`` for a mutable built-in anywhere inside it,
    ``CodecError`` for any other type the codec cannot write.
    """
    t = type(value)
    if value is None or t is bool or t is str or t is float:
        return value
    if t is int:
        if value.bit_length() > _BIG_INT_BITS:
            return {"ix": hex(value)}
        return value
    if t is tuple:
        return {"t": [encode(v, where) for v in value]}
    if t is Decimal:
        return {"d": str(value)}
    if t is bytes:
        return {"b": base64.b64encode(value).decode("ascii")}
    if t is _PMAP:
        return {"pm": [[encode(k, where), encode(v, where)] for k, v in value.items()]}
    if t is _PVECTOR:
        return {"pv": [encode(v, where) for v in value]}
    if t is _PSET:
        return {"ps": [encode(v, where) for v in value]}
    if t is frozenset:
        return {"fs": [encode(v, where) for v in value]}
    if t is _dt.datetime:
        tz = value.tzinfo
        if value.fold == 0 and _plain_zone(tz):
            return {"dt": value.isoformat()}
        zone = None if tz is None else _zone(tz, where, value)
        return {"dz": [value.replace(tzinfo=None).isoformat(), value.fold, zone]}
    if t is _dt.date:
        return {"da": value.isoformat()}
    if t is _dt.time:
        tz = value.tzinfo
        if value.fold == 0 and _plain_zone(tz):
            return {"ti": value.isoformat()}
        zone = None if tz is None else _zone(tz, where, value)
        return {"tz": [value.replace(tzinfo=None).isoformat(), value.fold, zone]}
    if t is uuid.UUID:
        return {"u": value.hex}
    reg = _registered_by_type.get(t)
    if reg is not None:
        return {"x": reg[0], "v": encode(reg[1](value), where)}
    if isinstance(value, _MUTABLE):
        raise MutableValueError(where, value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if not t.__dataclass_params__.frozen:
            raise CodecError(
                where,
                value,
                message=f"{where}: {t.__qualname__} is a dataclass that is not frozen, so it could change under "
                "a transaction that read it; declare it @dataclass(frozen=True). Nothing was committed",
            )
        return {
            "dc": _class_name(t),
            "f": {f.name: encode(getattr(value, f.name), where) for f in dataclasses.fields(value) if f.init},
        }
    if isinstance(value, enum.Enum):
        return {"en": _class_name(t), "v": value.name}
    if isinstance(value, tuple) and hasattr(t, "_fields"):
        return {"nt": _class_name(t), "v": [encode(v, where) for v in value]}
    if isinstance(value, PRecord):
        return {"pr": _class_name(t), "f": {k: encode(v, where) for k, v in value.items()}}
    if isinstance(value, PClass):
        fields: dict[str, Any] = value._to_dict()  # type: ignore[attr-defined]
        return {"pc": _class_name(t), "f": {k: encode(v, where) for k, v in fields.items()}}
    model = _model_fields(value, where)
    if model is not None:
        tag, names = model
        return {tag: _class_name(t), "f": {k: encode(getattr(value, k), where) for k in names}}
    raise CodecError(where, value)


def _model_fields(value: Any, where: str) -> tuple[str, list[str]] | None:
    """A frozen pydantic model's or msgspec Struct's tag and field names (only where those libraries are in use)."""
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(value, pydantic.BaseModel):
        cls: Any = type(value)
        if not cls.model_config.get("frozen"):
            raise CodecError(
                where,
                value,
                message=f"{where}: {cls.__qualname__} is a pydantic model that is not frozen, so it could change "
                "under a transaction that read it; set model_config = ConfigDict(frozen=True). Nothing was committed",
            )
        return "py", list(cls.model_fields)
    msgspec = sys.modules.get("msgspec")
    if msgspec is not None and isinstance(value, msgspec.Struct):
        cls = type(value)
        if not cls.__struct_config__.frozen:
            raise CodecError(
                where,
                value,
                message=f"{where}: {cls.__qualname__} is a msgspec Struct that is not frozen, so it could change "
                "under a transaction that read it; declare it with frozen=True. Nothing was committed",
            )
        return "ms", list(cls.__struct_fields__)
    return None


_SCALARS = frozenset({type(None), bool, str, float, bytes, Decimal, uuid.UUID, _dt.date})
#: the scalars and int: the leaves a check has nothing to walk in
_LEAVES = _SCALARS | {int}


def check(value: Any, where: str = "value") -> None:
    """Raise unless ``value`` is immutable and every store can keep it (the same test everywhere).

    ``MutableValueError`` for a mutable built-in anywhere inside it,
    ``CodecError`` for a type the codec cannot round-trip. It accepts exactly
    what :func:`encode` does, without building the encoded form (the common
    containers and scalars are walked here; every other type is encoded).
    """
    t = type(value)
    if t in _LEAVES:
        return
    if t is tuple or t is _PVECTOR or t is frozenset or t is _PSET:
        if len(value) > 16 and _LEAVES.issuperset(map(type, value)):
            return  # scalars only: their types gathered at C speed, several times faster than the loop below
        leaves = _LEAVES
        for v in value:
            if type(v) not in leaves:
                check(v, where)
        return
    if t is _PMAP:
        _check_buckets(value._buckets, where)
        return
    encode(value, where)


def _check_buckets(buckets: Iterable[Any], where: str) -> None:
    """Check the keys and values in a pmap's buckets (``None`` for an empty one)."""
    leaves = _LEAVES
    for bucket in buckets:
        if bucket:
            for k, v in bucket:
                if type(k) not in leaves:
                    check(k, where)
                if type(v) not in leaves:
                    check(v, where)


def check_changed(value: Any, base: Any, where: str = "value") -> None:
    """``check(value)``, where ``base`` is a checked value ``value`` was derived from (an ``alter``'s input).

    A persistent collection changed by an arbitrary function shares most of
    its parts with ``base``; those are compared by identity (at C speed) and
    only the parts that differ are checked. Still linear in the size, but
    without visiting every element in Python; astm's collection helpers avoid
    even that.
    """
    t = type(value)
    if t is not type(base):
        check(value, where)
    elif t is _PMAP:
        new, old = value._buckets, base._buckets
        if len(new) != len(old):
            check(value, where)  # resized: nothing lines up
            return
        _check_buckets((new[i] for i in compress(count(), map(is_not, new, old))), where)
    elif t is _PVECTOR or t is tuple:
        n = min(len(value), len(base))
        for i in compress(count(), map(is_not, value, base)):
            check(value[i], where)
        for v in islice(value, n, None):
            check(v, where)
    elif t is _PSET:
        check_changed(value._map, base._map, where)
    else:
        check(value, where)


def _lookup(name: str, kind: str, ok: Callable[[Any], bool]) -> Any:
    """A class by "<module>:<qualname>": met in this process, or in a module already imported. Never imports."""
    cls = _classes.get(name)
    if cls is not None:
        return cls
    module, _, qualname = name.partition(":")
    obj: Any = sys.modules.get(module)
    if obj is None:
        raise CodecError.unknown(
            f"{kind} {name!r}",
            f"its module {module!r} is not imported; import it before opening the store "
            "(astm never imports a module because stored data names it)",
        )
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise CodecError.unknown(f"{kind} {name!r}", f"module {module!r} has no {qualname!r}")
    if not (isinstance(obj, type) and ok(obj)):
        raise CodecError.unknown(f"{name!r}", f"it is not a {kind}")
    _classes[name] = obj
    return obj


def _is_frozen_dataclass(cls: Any) -> bool:
    return dataclasses.is_dataclass(cls) and bool(getattr(cls, "__dataclass_params__").frozen)  # noqa: B009


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
        if tag == "pm":
            return pmap({decode(k): decode(x) for k, x in v})
        if tag == "pv":
            return pvector(decode(x) for x in v)
        if tag == "ps":
            return pset(decode(x) for x in v)
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
        if tag == "ix":
            return int(v, 16)
        if tag == "dz":
            iso, fold, zone = v
            naive = _dt.datetime.fromisoformat(iso)
            return naive.replace(tzinfo=None if zone is None else _from_zone(zone), fold=fold)
        if tag == "tz":
            iso, fold, zone = v
            naive_t = _dt.time.fromisoformat(iso)
            return naive_t.replace(tzinfo=None if zone is None else _from_zone(zone), fold=fold)
    elif len(data) == 2:
        if "x" in data:
            dec = _registered_by_name.get(data["x"])
            if dec is None:
                raise CodecError.unknown(f"type {data['x']!r}", "register it with astm.codec.register(...)")
            return dec(decode(data["v"]))
        if "dc" in data:
            cls = _lookup(data["dc"], "frozen dataclass", _is_frozen_dataclass)
            return cls(**{k: decode(x) for k, x in data["f"].items()})
        if "nt" in data:
            cls = _lookup(data["nt"], "NamedTuple", lambda c: issubclass(c, tuple) and hasattr(c, "_fields"))
            return cls(*(decode(x) for x in data["v"]))
        if "en" in data:
            cls = _lookup(data["en"], "Enum", lambda c: issubclass(c, enum.Enum))
            return cls[data["v"]]
        if "pr" in data:
            cls = _lookup(data["pr"], "PRecord", lambda c: issubclass(c, PRecord))
            return cls(**{k: decode(x) for k, x in data["f"].items()})
        if "pc" in data:
            cls = _lookup(data["pc"], "PClass", lambda c: issubclass(c, PClass))
            return cls(**{k: decode(x) for k, x in data["f"].items()})
        if "py" in data:
            cls = _lookup(data["py"], "frozen pydantic model", lambda c: hasattr(c, "model_fields"))
            return cls(**{k: decode(x) for k, x in data["f"].items()})
        if "ms" in data:
            cls = _lookup(data["ms"], "frozen msgspec Struct", lambda c: hasattr(c, "__struct_fields__"))
            return cls(**{k: decode(x) for k, x in data["f"].items()})
    raise CodecError.unknown(f"tagged value {str(data)[:60]!r}", "the file may be from a newer astm")


def _not_json(o: Any) -> Any:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def _compact_json(ensure_ascii: bool) -> Callable[[Any], str]:
    """``json.JSONEncoder(separators=(",", ":")).encode``, with its C encoder made once.

    ``JSONEncoder.encode`` builds a new C encoder on every call, which for a
    commit's small record was most of the encoding's time (6.8 µs against 2.7
    µs made once). The output is the same: the same C encoder and settings.
    """
    slow = json.JSONEncoder(ensure_ascii=ensure_ascii, separators=(",", ":")).encode
    make: Any = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - an interpreter without the C accelerator
        return slow
    strings = json.encoder.encode_basestring_ascii if ensure_ascii else json.encoder.encode_basestring
    encoder = make(None, _not_json, strings, None, ":", ",", False, False, True)

    def dump(data: Any) -> str:
        return "".join(encoder(data, 0))

    return dump


_dump_fast = _compact_json(False)
_dump_ascii = _compact_json(True)


def _utf8_safe(text: str, data: Any) -> str:
    """``text``, or its ASCII-escaped form when it holds lone surrogates (which UTF-8 cannot carry)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _dump_ascii(data)  # "\\ud800" escapes read back as the same lone surrogate
    return text


def text(data: Any) -> str:
    """Already tagged ``data`` as the compact JSON text :func:`dumps` writes (valid UTF-8)."""
    return _utf8_safe(_dump_fast(data), data)


def dumps(value: Any, where: str = "value") -> str:
    """``value`` as a compact JSON string of its tagged form (valid UTF-8 text, exact on reading back)."""
    t = type(value)
    if t is int and value.bit_length() <= _BIG_INT_BITS:
        return str(value)
    data = encode(value, where)
    return _utf8_safe(_dump_fast(data), data)


def loads(text: str | bytes) -> Any:
    """The value a :func:`dumps` string stands for."""
    return decode(json.loads(text))
