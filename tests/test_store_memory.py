"""The in-memory store passes the conformance suite."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from pyrsistent import pmap

import astm

from .conformance import StoreConformance


class TestMemoryStore(StoreConformance):
    def make_store(self, **options: Any) -> astm.Store:
        return astm.Store(**options)


class TestLargeValues:
    """Large committed collections are kept out of the collector's way, and still freed when history lets go."""

    @pytest.mark.parametrize("kind", ["memory", "sqlite"])
    async def test_versions_of_a_large_value_are_freed_as_history_moves_on(self, kind: str, tmp_path: Path) -> None:
        store = astm.Store(None if kind == "memory" else f"sqlite:///{tmp_path}/s.db", history=5)
        async with store:
            big: astm.Ref[Any] = store.ref("big", pmap({i: i for i in range(5000)}))
            small: astm.Ref[Any] = store.ref("small", pmap({1: 1}))

            def change(i: int) -> None:
                big.alter(astm.assoc, f"k{i}", i)
                small.alter(astm.assoc, 2, i)

            async def round(n: int, start: int) -> None:
                for i in range(start, start + n):
                    await store.atomically(change, i)

            await round(50, 0)
            assert not gc.is_tracked(big.get()), "a committed 5000-entry map is untracked"
            assert gc.is_tracked(small.get()), "small values are left to the collector"
            tracemalloc.start()
            try:
                await round(200, 1000)
                gc.collect()
                after_200 = tracemalloc.get_traced_memory()[0]
                await round(800, 2000)
                gc.collect()
                after_1000 = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            # each version shares all but a path of its trie with the last; only `history` versions stay alive,
            # so 800 more commits add only their new entries (about 200 bytes each), not 800 versions
            assert after_1000 - after_200 < 800 * 400, (after_200, after_1000)
            assert len(big.get()) == 5000 + 1050 and big.get()["k2500"] == 2500
