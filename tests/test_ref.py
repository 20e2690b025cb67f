"""Refs and the semantics of one transaction: reads, writes, validators, watches, errors."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import anyio
import pytest
from pyrsistent import PMap, PVector, pmap, pvector

import astm


class TestCreation:
    def test_same_name_same_ref(self, store: astm.Store) -> None:
        """store.ref(name) returns the one ref of that name; the initial value of a later call is ignored."""
        a = store.ref("a", 1)
        assert store.ref("a", 99) is a
        assert a.get() == 1

    def test_initial_value_checked(self, store: astm.Store) -> None:
        """A mutable initial value is refused with a TypeError that suggests pyrsistent."""
        with pytest.raises(astm.MutableValueError, match="pyrsistent") as info:
            store.ref("xs", [1, 2])
        assert isinstance(info.value, TypeError)
        assert "xs" not in store.refs()

    def test_initial_value_validated(self, store: astm.Store) -> None:
        """A validator must accept the initial value."""
        with pytest.raises(astm.ValidationError):
            store.ref("n", -1, validator=lambda v: v >= 0)

    def test_bad_name(self, store: astm.Store) -> None:
        """Ref names are non-empty strings."""
        with pytest.raises(TypeError, match="non-empty str"):
            store.ref("", 0)

    def test_ref_and_atom_names_do_not_collide(self, store: astm.Store) -> None:
        """One name cannot be both a ref and an atom."""
        store.ref("x", 0)
        with pytest.raises(ValueError, match="already names a ref"):
            store.atom("x", 0)


class TestOutsideTransaction:
    def test_get_returns_newest(self, store: astm.Store) -> None:
        """Outside a transaction get() and peek() return the newest committed value."""
        r = store.ref("r", 5)
        assert r.get() == 5
        assert r.peek() == 5

    @pytest.mark.parametrize(
        "op",
        [
            lambda r: r.set(1),
            lambda r: r.alter(lambda v: v + 1),
            lambda r: r.commute(lambda v: v + 1),
            lambda r: r.ensure(),
        ],
        ids=["set", "alter", "commute", "ensure"],
    )
    def test_writes_refused(self, store: astm.Store, op: Any) -> None:
        """Every write outside a transaction raises NotInTransactionError naming the fix."""
        r = store.ref("r", 0)
        with pytest.raises(astm.NotInTransactionError, match="transactional"):
            op(r)
        assert r.get() == 0

    def test_retry_outside(self) -> None:
        """astm.retry() outside a transaction is an error, not a hang."""
        with pytest.raises(astm.NotInTransactionError):
            astm.retry()


class TestInTransaction:
    async def test_in_transaction_value(self, store: astm.Store) -> None:
        """A transaction sees its own writes; others see them only after commit."""
        r = store.ref("r", 1)
        seen = []

        async def body() -> None:
            r.set(2)
            seen.append(r.get())
            r.alter(lambda v: v * 10)
            seen.append(r.get())
            assert astm.in_transaction()

        await store.atomically(body)
        assert seen == [2, 20]
        assert r.get() == 20
        assert store.t == 1

    async def test_one_write_point(self, store: astm.Store) -> None:
        """Every change of one transaction appears at the same t, and t grows by one."""
        a, b = store.ref("a", 0), store.ref("b", 0)

        def body() -> None:
            a.set(1)
            b.set(1)

        report = await store.transact(body)
        assert report.t == 1 == store.t
        assert {c.ref.name: (c.old, c.new) for c in report.changes} == {"a": (0, 1), "b": (0, 1)}
        assert report.db_before[a] == 0
        assert report.db_after[b] == 1

    async def test_plain_def_body_and_result(self, store: astm.Store) -> None:
        """A plain def body works and its return value is returned."""
        r = store.ref("r", 1)
        assert await store.atomically(lambda: r.alter(lambda v: v + 1)) == 2

    async def test_args_and_kwargs(self, store: astm.Store) -> None:
        """atomically passes positional and keyword arguments through."""
        r = store.ref("r", 0)

        def add(ref: astm.Ref[int], n: int, *, times: int) -> int:
            return ref.alter(lambda v: v + n * times)

        assert await store.atomically(add, r, 2, times=3) == 6

    async def test_read_only_transaction_commits_nothing(self, store: astm.Store) -> None:
        """A transaction that only reads does not advance t."""
        r = store.ref("r", 1)
        report = await store.transact(lambda: r.get() + 1)
        assert report.result == 2
        assert store.t == 0
        assert report.changes == ()

    async def test_exception_leaves_everything(self, store: astm.Store) -> None:
        """An exception in the body aborts: every ref stays as it was, t does not move."""
        a, b = store.ref("a", 1), store.ref("b", 2)

        async def body() -> None:
            a.set(10)
            b.set(20)
            await anyio.sleep(0)
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await store.atomically(body)
        assert (a.get(), b.get(), store.t) == (1, 2, 0)

    async def test_mutable_value_refused_in_tx(self, store: astm.Store) -> None:
        """set/alter with a dict aborts the transaction with a clear error; nothing committed."""
        a = store.ref("a", 1)
        b: astm.Ref[PMap[str, int]] = store.ref("b", pmap())

        def body() -> None:
            a.set(2)
            b.alter(lambda m: {**m, "k": 1})  # type: ignore[arg-type,return-value]

        with pytest.raises(astm.MutableValueError, match="pmap"):
            await store.atomically(body)
        assert (a.get(), b.get(), store.t) == (1, pmap(), 0)

    async def test_immutable_values_accepted(self, store: astm.Store) -> None:
        """pyrsistent collections, tuples and frozen dataclasses are fine."""

        @dataclass(frozen=True)
        class Point:
            x: int

        r: astm.Ref[PVector[Any]] = store.ref("r", pvector())

        def body() -> None:
            r.alter(lambda v: v.append((1, Point(2), frozenset({3}))))

        await store.atomically(body)
        assert r.get() == pvector([(1, Point(2), frozenset({3}))])

    async def test_two_stores_refused(self) -> None:
        """One transaction cannot touch refs of two stores."""
        s1, s2 = astm.Store(), astm.Store()
        a, b = s1.ref("a", 0), s2.ref("b", 0)

        @astm.transactional
        def body() -> None:
            a.set(1)
            b.set(1)

        with pytest.raises(astm.StoreMismatchError):
            await body()
        assert a.get() == 0
        assert b.get() == 0

    async def test_set_after_commute_refused(self, store: astm.Store) -> None:
        """alter/set after commute on one ref is refused (Clojure's rule)."""
        r = store.ref("r", 0)

        def body() -> None:
            r.commute(lambda v: v + 1)
            r.set(5)

        with pytest.raises(astm.CommuteConflictError):
            await store.atomically(body)
        assert r.get() == 0

    async def test_commute_after_alter_folds_in(self, store: astm.Store) -> None:
        """commute after alter on the same ref simply updates the in-transaction value."""
        r = store.ref("r", 1)

        def body() -> int:
            r.alter(lambda v: v * 10)
            return r.commute(lambda v: v + 1)

        assert await store.atomically(body) == 11
        assert r.get() == 11

    async def test_ensure_returns_value(self, store: astm.Store) -> None:
        """ensure() reads the ref inside a transaction."""
        r = store.ref("r", 7)
        assert await store.atomically(r.ensure) == 7


class TestValidators:
    async def test_failing_validator_aborts_all(self, store: astm.Store) -> None:
        """A validator refusing one ref aborts the whole transaction with ValidationError."""
        checking = store.ref("checking", Decimal(100), validator=lambda v: v >= 0)
        savings = store.ref("savings", Decimal(0))

        def overdraw() -> None:
            savings.alter(lambda v: v + 500)
            checking.alter(lambda v: v - 500)

        with pytest.raises(astm.ValidationError, match="checking") as info:
            await store.atomically(overdraw)
        assert isinstance(info.value, ValueError)
        assert (checking.get(), savings.get(), store.t) == (Decimal(100), Decimal(0), 0)

    async def test_validator_exception_wrapped(self, store: astm.Store) -> None:
        """A validator that raises is reported as a ValidationError caused by that exception."""

        def bad(v: int) -> bool:
            raise KeyError("nope")

        r = store.ref("r", 0)
        r2 = store.ref("r2", 0)
        r2._validator = bad

        def body() -> None:
            r.set(1)
            r2.set(1)

        with pytest.raises(astm.ValidationError) as info:
            await store.atomically(body)
        assert isinstance(info.value.__cause__, KeyError)
        assert r.get() == 0

    async def test_validator_runs_on_commuted_value(self, store: astm.Store) -> None:
        """Validators see the value commute produces at commit."""
        r = store.ref("r", 0, validator=lambda v: v <= 1)
        await store.atomically(lambda: r.commute(lambda v: v + 1))
        with pytest.raises(astm.ValidationError):
            await store.atomically(lambda: r.commute(lambda v: v + 1))
        assert r.get() == 1

    def test_new_validator_checks_current_value(self, store: astm.Store) -> None:
        """Giving a validator to an existing ref checks the value it holds now."""
        store.ref("r", 5)
        with pytest.raises(astm.ValidationError):
            store.ref("r", 0, validator=lambda v: v < 5)
        assert store.ref("r", 0, validator=lambda v: v >= 0).validator is not None


class TestWatches:
    async def test_watch_after_commit(self, store: astm.Store) -> None:
        """Watches run after commit with (key, ref, old, new), outside the transaction."""
        r = store.ref("r", 1)
        calls: list[tuple[Any, ...]] = []

        def watch(key: str, ref: astm.Ref[int], old: int, new: int) -> None:
            calls.append((key, ref.name, old, new, astm.in_transaction(), store.t))

        r.add_watch("w", watch)
        await store.atomically(lambda: r.set(2))
        assert calls == [("w", "r", 1, 2, False, 1)]
        r.remove_watch("w")
        await store.atomically(lambda: r.set(3))
        assert len(calls) == 1

    async def test_watch_not_called_on_abort(self, store: astm.Store) -> None:
        """An aborted transaction calls no watch."""
        r = store.ref("r", 1)
        calls: list[int] = []
        r.add_watch("w", lambda k, ref, old, new: calls.append(new))

        def body() -> None:
            r.set(2)
            raise ValueError

        with pytest.raises(ValueError):  # noqa: PT011
            await store.atomically(body)
        assert calls == []

    async def test_async_watch_and_failing_watch(self, store: astm.Store, caplog: pytest.LogCaptureFixture) -> None:
        """An async watch is awaited; a failing watch is logged and does not undo the commit."""
        r = store.ref("r", 1)
        calls: list[int] = []

        async def awatch(k: str, ref: astm.Ref[int], old: int, new: int) -> None:
            await anyio.sleep(0)
            calls.append(new)

        def broken(k: str, ref: astm.Ref[int], old: int, new: int) -> None:
            raise RuntimeError("watch broke")

        r.add_watch("broken", broken)
        r.add_watch("a", awatch)
        await store.atomically(lambda: r.set(5))
        assert calls == [5]
        assert r.get() == 5
        assert "watch broke" in caplog.text


class TestIO:
    async def test_io_guard(self, store: astm.Store) -> None:
        """An @astm.io function works outside and raises IOInTransactionError inside."""
        sent: list[str] = []

        @astm.io
        def send_email(to: str) -> None:
            sent.append(to)

        @astm.io
        async def send_sms(to: str) -> None:
            sent.append(to)

        send_email("a")
        await send_sms("b")
        r = store.ref("r", 0)

        def body() -> None:
            r.set(1)
            send_email("c")

        async def abody() -> None:
            r.set(1)
            await send_sms("d")

        with pytest.raises(astm.IOInTransactionError, match="send_email"):
            await store.atomically(body)
        with pytest.raises(astm.IOInTransactionError, match="send_sms"):
            await store.atomically(abody)
        assert sent == ["a", "b"]
        assert r.get() == 0


class TestNesting:
    async def test_inner_joins_outer(self, store: astm.Store) -> None:
        """A transactional function called inside another joins it: one commit, one t."""
        a, b = store.ref("a", 0), store.ref("b", 0)

        @astm.transactional
        async def inner(n: int) -> int:
            return a.alter(lambda v: v + n)

        @astm.transactional
        async def outer() -> int:
            x = await inner(5)
            b.set(a.get() * 2)
            return x

        assert await outer() == 5
        assert (a.get(), b.get(), store.t) == (5, 10, 1)

    async def test_outer_abort_discards_inner(self, store: astm.Store) -> None:
        """When the outer transaction fails, the joined inner writes are discarded too."""
        a = store.ref("a", 0)

        @astm.transactional
        def inner() -> None:
            a.set(1)

        async def outer() -> None:
            await inner()
            raise LookupError

        with pytest.raises(LookupError):
            await store.atomically(outer)
        assert a.get() == 0
        assert store.t == 0
