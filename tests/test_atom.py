"""Atoms: compare-and-set identities outside transactions."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import astm


class TestAtom:
    def test_swap_reset_cas(self, store: astm.Store) -> None:
        """swap applies a function, reset replaces, compare_and_set only on the expected value."""
        hits = store.atom("hits", 0)
        assert hits.swap(lambda v, n: v + n, 5) == 5
        assert hits.reset(10) == 10
        assert hits.compare_and_set(10, 11) is True
        assert hits.compare_and_set(10, 12) is False
        assert hits.get() == 11
        assert store.atom("hits", 99) is hits

    def test_validator_and_mutable_values(self, store: astm.Store) -> None:
        """A refused value leaves the atom unchanged; mutable values are refused."""
        a = store.atom("a", 1, validator=lambda v: v > 0)
        with pytest.raises(astm.ValidationError):
            a.swap(lambda v: v - 5)
        with pytest.raises(astm.MutableValueError):
            a.reset([1])  # type: ignore[arg-type]
        assert a.get() == 1

    def test_watches(self, store: astm.Store) -> None:
        """Watches see (key, atom, old, new) for every change."""
        a = store.atom("a", 1)
        seen: list[tuple[Any, ...]] = []
        a.add_watch("k", lambda k, atom, old, new: seen.append((k, atom.name, old, new)))
        a.swap(lambda v: v + 1)
        a.reset(7)
        a.remove_watch("k")
        a.reset(8)
        assert seen == [("k", "a", 1, 2), ("k", "a", 2, 7)]

    async def test_refused_inside_transaction(self, store: astm.Store) -> None:
        """swap/reset inside a transaction raise an error that says to use a ref."""
        a = store.atom("a", 0)
        r = store.ref("r", 0)

        def body() -> None:
            r.set(1)
            a.swap(lambda v: v + 1)

        with pytest.raises(astm.AtomInTransactionError, match="Use a ref"):
            await store.atomically(body)
        assert a.get() == 0 and r.get() == 0

    def test_swap_from_threads_is_exact(self, store: astm.Store) -> None:
        """4 threads doing 2000 swaps each lose no update."""
        a = store.atom("n", 0)

        def work() -> None:
            for _ in range(2000):
                a.swap(lambda v: v + 1)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert a.get() == 8000
