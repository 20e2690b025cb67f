"""The codec: which values every store accepts, exact round trips, and decoding that never runs stored code."""

from __future__ import annotations

import datetime as dt
import enum
import json
import subprocess
import sys
import uuid
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyrsistent import PClass, PRecord, field, pmap, pset, pvector

import astm
from astm import codec


@dataclass(frozen=True)
class Seat:
    row: str
    number: int
    held_by: uuid.UUID | None = None


class Money:
    """A user type registered with the codec."""

    __slots__ = ("cents",)

    def __init__(self, cents: int) -> None:
        self.cents = cents

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and other.cents == self.cents

    def __hash__(self) -> int:
        return hash(self.cents)


codec.register(Money, "test.Money", lambda m: m.cents, Money)


class Point(NamedTuple):
    x: int
    y: int


class Color(enum.Enum):
    RED = "r"
    BLUE = "b"


class Account(PRecord):  # type: ignore[type-arg]
    owner: Any = field()
    balance: Any = field()


class Box(PClass):
    label: Any = field()


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(st.characters(codec="utf-8") | st.characters(categories=["Cs"])),  # lone surrogates too
    st.binary(),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.datetimes(),
    st.datetimes(timezones=st.timezones()),
    st.datetimes(timezones=st.just(dt.timezone(dt.timedelta(hours=5, minutes=30), "IST"))),
    st.dates(),
    st.times(),
    st.times(timezones=st.just(dt.UTC)),
    st.uuids(),
    st.builds(Money, st.integers()),
    st.builds(Point, st.integers(), st.integers()),
    st.sampled_from(Color),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(tuple),
        st.lists(inner, max_size=4).map(pvector),
        st.dictionaries(st.text(max_size=5), inner, max_size=4).map(pmap),
        st.frozensets(st.integers(), max_size=4),
        st.builds(pset, st.lists(st.text(max_size=3), max_size=4)),
        st.builds(Seat, st.text(max_size=3), st.integers()),
        st.builds(Account, owner=st.text(max_size=3), balance=inner),
        st.builds(Box, label=inner),
    ),
    max_leaves=12,
)


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type all the way down, time zones and folds included."""
    if type(a) is not type(b) or a != b:
        return False
    if isinstance(a, dt.datetime | dt.time):
        return bool(a.tzinfo == b.tzinfo and a.fold == b.fold and a.tzname() == b.tzname())
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, PRecord):
        return all(_same(a[k], b[k]) for k in a)
    return True


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(data=_JSON)
def test_compact_json_is_the_standard_encoders_text(data: Any) -> None:
    """The codec's JSON writer (its C encoder made once) writes what ``json.JSONEncoder`` writes, NaN included."""
    for ascii_only, ours in ((False, codec._dump_fast), (True, codec._dump_ascii)):
        standard = json.JSONEncoder(ensure_ascii=ascii_only, separators=(",", ":")).encode(data)
        assert ours(data) == standard


class TestRoundTrip:
    @settings(max_examples=400, deadline=None)
    @given(values)
    def test_round_trip(self, value: Any) -> None:
        """Every supported value comes back equal and of the same type, and its text is valid UTF-8."""
        text = codec.dumps(value)
        text.encode("utf-8")
        assert _same(codec.loads(text), value)

    def test_zoned_datetime_keeps_its_zone_across_a_dst_change(self) -> None:
        """A ZoneInfo datetime comes back in its zone: arithmetic across a DST change is the same."""
        paris = zoneinfo.ZoneInfo("Europe/Paris")
        before = dt.datetime(2026, 3, 28, 12, 0, tzinfo=paris)
        back = codec.loads(codec.dumps(before))
        assert back.tzinfo is paris
        assert (back + dt.timedelta(days=1)).utcoffset() == (before + dt.timedelta(days=1)).utcoffset()
        ambiguous = dt.datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=paris)
        assert codec.loads(codec.dumps(ambiguous)).utcoffset() == ambiguous.utcoffset()

    def test_records_come_back_as_their_class(self) -> None:
        """PRecord, PClass, NamedTuple and Enum values come back as their own classes, not as plain pmaps."""
        for value in (Account(owner="ann", balance=Decimal(3)), Box(label="x"), Point(1, 2), Color.BLUE):
            back = codec.loads(codec.dumps(value))
            assert type(back) is type(value) and back == value

    def test_lone_surrogates_and_huge_ints(self) -> None:
        """What client JSON can hold (a lone surrogate) and ints beyond Python's digit limit round-trip."""
        odd = json.loads('"caf\\u00e9 \\ud800 end"')
        assert codec.loads(codec.dumps(odd)) == odd
        big = -(7**20000)
        assert codec.loads(codec.dumps((big, pvector([big])))) == (big, pvector([big]))


class TestModels:
    def test_frozen_pydantic_models_and_msgspec_structs_round_trip(self) -> None:
        """Frozen pydantic models and msgspec Structs are values like frozen dataclasses; unfrozen ones are refused."""
        pydantic = pytest.importorskip("pydantic")
        msgspec = pytest.importorskip("msgspec")

        class Seat(pydantic.BaseModel):  # type: ignore[misc, name-defined]
            model_config = pydantic.ConfigDict(frozen=True)
            row: str
            held_by: tuple[str, ...] = ()

        class Loose(pydantic.BaseModel):  # type: ignore[misc, name-defined]
            row: str

        class Point(msgspec.Struct, frozen=True):  # type: ignore[misc, name-defined, call-arg]
            x: int
            y: Decimal

        class Open(msgspec.Struct):  # type: ignore[misc, name-defined]
            x: int

        for value in (Seat(row="A", held_by=("ann",)), Point(1, Decimal("2.5")), pvector([Point(3, Decimal(0))])):
            back = codec.loads(codec.dumps(value))
            assert back == value and type(back) is type(value)
        for bad in (Loose(row="A"), Open(1)):
            with pytest.raises(astm.CodecError, match="not frozen"):
                astm.Store().ref("r", bad)
        with pytest.raises(astm.MutableValueError):
            astm.Store().ref("r", Seat.model_construct(row="A", held_by=["mutable"]))


class TestRefusals:
    def test_refusals_name_the_type(self) -> None:
        """A type the codec cannot write is refused with its name."""

        class Opaque:
            pass

        with pytest.raises(astm.CodecError, match="Opaque"):
            codec.dumps((1, Opaque()))
        with pytest.raises(astm.CodecError):
            codec.loads('{"x": "not.registered", "v": 1}')

    def test_unnamed_time_zones_are_refused(self) -> None:
        """A tzinfo the codec cannot name is refused at write time, not changed on the way back."""

        class Odd(dt.tzinfo):
            def utcoffset(self, d: dt.datetime | None) -> dt.timedelta:
                return dt.timedelta(hours=1)

            def dst(self, d: dt.datetime | None) -> dt.timedelta:
                return dt.timedelta(0)

            def tzname(self, d: dt.datetime | None) -> str:
                return "ODD"

        with pytest.raises(astm.CodecError, match="time zone"):
            codec.dumps(dt.datetime(2026, 1, 1, tzinfo=Odd()))


@dataclass
class Mutable:
    items: Any


@dataclass(frozen=True)
class Frozen:
    items: Any


class Opaque:
    pass


BAD_VALUES = [
    ((1, [2]), astm.MutableValueError),
    (Frozen([1]), astm.MutableValueError),
    (pvector([{"a": 1}]), astm.MutableValueError),
    (pmap({"k": (1, {2})}), astm.MutableValueError),
    (Mutable(1), astm.CodecError),
    (Opaque(), astm.CodecError),
    ((1, Opaque()), astm.CodecError),
    # long collections of scalars take a faster path: one bad element among many is still found
    ((*range(100), [2]), astm.MutableValueError),
    (pvector([*range(100), (1, {2})]), astm.MutableValueError),
    (frozenset(range(100)) | {Opaque()}, astm.CodecError),
]


@pytest.fixture(params=["memory", "sqlite"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[astm.Store]:
    store = astm.Store() if request.param == "memory" else astm.Store(f"sqlite:///{tmp_path / 's.db'}")
    yield store
    import anyio

    anyio.run(store.aclose)


class TestSameOnEveryStore:
    @pytest.mark.parametrize(("value", "error"), BAD_VALUES, ids=[type(v).__name__ for v, _ in BAD_VALUES])
    async def test_every_store_refuses_the_same_values(
        self, any_store: astm.Store, value: Any, error: type[Exception]
    ) -> None:
        """Memory and SQLite refuse the same values with the same error, and the refs stay as they were."""
        store = any_store
        a, b = store.ref("a", 1), store.ref("b", (2,))
        with pytest.raises(error, match="ref 'b'"):
            await store.atomically(lambda: (a.set(5), b.set(value)))
        with pytest.raises(error, match="ref 'b'"):
            await store.atomically(lambda: (a.set(5), b.alter(lambda _: value)))
        with pytest.raises(error, match="ref 'c'"):
            store.ref("c", value)
        with pytest.raises(error):
            store.atom("d", value)
        eff = store.outbox.effect("e")

        async def handler(payload: Any, *, key: tuple[int, int]) -> None:
            pass

        e = eff(handler)

        def enqueue() -> None:
            a.set(5)
            e.enqueue(value)

        with pytest.raises(error, match="outbox entry"):
            await store.atomically(enqueue)
        assert (a.get(), b.get(), store.t) == (1, (2,), 0)

    async def test_collection_helpers_check_what_they_add(self, any_store: astm.Store) -> None:
        """conj/assoc refuse a mutable addition; dissoc/disj remove; the collection's type is kept."""
        store = any_store
        ledger: astm.Ref[Any] = store.ref("ledger", pvector())
        seats: astm.Ref[Any] = store.ref("seats", pmap())
        with pytest.raises(astm.MutableValueError):
            await store.atomically(lambda: ledger.alter(astm.conj, [1]))
        with pytest.raises(astm.MutableValueError):
            await store.atomically(lambda: seats.commute(astm.assoc, "A1", {"who": "ann"}))
        await store.atomically(lambda: (ledger.commute(astm.conj, 1, 2), seats.alter(astm.assoc, "A1", "ann")))
        await store.atomically(lambda: (ledger.alter(astm.assoc, 0, 9), seats.alter(astm.dissoc, "A1", "B2")))
        assert ledger.get() == pvector([9, 2]) and seats.get() == pmap()
        one: tuple[int, ...] = (1,)
        assert astm.conj(one, 2) == (1, 2) and astm.disj(pset([1, 2]), 2) == pset([1])
        assert astm.conj(pmap(), ("k", 1)) == pmap({"k": 1}) and astm.disj(frozenset({1}), 1) == frozenset()
        with pytest.raises(TypeError, match="pvector"):
            astm.conj("text", "x")

    @settings(max_examples=200, deadline=None)
    @given(
        start=st.dictionaries(st.integers(0, 20), st.integers()),
        pairs=st.lists(st.tuples(st.integers(0, 30), st.integers()), max_size=6),
        keys=st.lists(st.integers(0, 30), max_size=6),
    )
    def test_collection_helpers_match_plain_sets_and_dicts(
        self, start: dict[int, int], pairs: list[tuple[int, int]], keys: list[int]
    ) -> None:
        """Any number of items, repeated or absent, does what the same steps do to a dict or a set, one by one."""
        want = dict(start)
        want.update(pairs)
        assert astm.conj(pmap(start), *pairs) == pmap(want)
        gone = {k: v for k, v in start.items() if k not in keys}
        assert astm.dissoc(pmap(start), *keys) == pmap(gone)
        members = set(start)
        assert astm.conj(pset(members), *keys) == pset(members | set(keys))
        assert astm.disj(pset(members), *keys) == pset(members - set(keys))

    async def test_a_lone_surrogate_survives_a_restart(self, tmp_path: Path) -> None:
        """A string with a lone surrogate (from client JSON) commits, reopens unchanged, and the store goes on."""
        url = f"sqlite:///{tmp_path / 's.db'}"
        odd = json.loads('"\\ud800"')
        async with astm.Store(url) as store:
            r = store.ref("r", "")
            await store.atomically(lambda: r.set(odd))
            await store.atomically(lambda: store.ref("after", 0).set(1))
        async with astm.Store(url) as again:
            assert again.ref("r", "").get() == odd and again.ref("after", 0).get() == 1 and again.t == 2


class TestDecodingRunsNoStoredCode:
    def test_a_name_in_the_data_imports_nothing(self) -> None:
        """Decoding a class named by the data never imports its module: a clear CodecError, the module untouched."""
        stored = [
            {"dc": "tabnanny:NannyNag", "f": {}},
            {"pr": "tabnanny:NannyNag", "f": {}},
            {"nt": "tabnanny:NannyNag", "v": []},
            {"en": "tabnanny:NannyNag", "v": "X"},
        ]
        code = (
            "import json, sys, astm\n"
            "for data in json.loads(sys.argv[1]):\n"
            "    try:\n"
            "        astm.codec.decode(data)\n"
            "    except astm.CodecError as e:\n"
            "        print('refused', 'not imported' in str(e))\n"
            "print('imported', 'tabnanny' in sys.modules)\n"
        )
        run = subprocess.run([sys.executable, "-c", code, json.dumps(stored)], capture_output=True, text=True)
        assert run.stdout.splitlines() == ["refused True"] * 4 + ["imported False"], run.stdout + run.stderr

    def test_an_imported_module_that_is_not_a_dataclass_is_refused(self) -> None:
        """A name that resolves to something other than a frozen dataclass is refused, not called."""
        with pytest.raises(astm.CodecError, match="not a frozen dataclass"):
            codec.loads('{"dc": "os:system", "f": {"command": "true"}}')
