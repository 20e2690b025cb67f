"""Property: random concurrent histories are serializable in commit order."""

from __future__ import annotations

from typing import Any

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import astm

NREFS = 3

op = st.one_of(
    st.tuples(st.just("get"), st.integers(0, NREFS - 1)),
    st.tuples(st.just("add"), st.integers(0, NREFS - 1), st.integers(-3, 3)),
    st.tuples(st.just("set"), st.integers(0, NREFS - 1), st.integers(-9, 9)),
    st.tuples(st.just("commute"), st.integers(0, NREFS - 1), st.integers(1, 3)),
    st.tuples(st.just("sleep"), st.sampled_from([0, 0, 0.001])),
)
history = st.lists(st.lists(op, min_size=1, max_size=6), min_size=2, max_size=10)


def _replay(ops: list[tuple[Any, ...]], state: list[int]) -> list[tuple[int, int]]:
    """Run ops sequentially on ``state``; returns the (ref, value) of every checked read."""
    reads = []
    commuted: set[int] = set()
    for o in ops:
        kind = o[0]
        if kind == "get" and o[1] not in commuted:
            reads.append((o[1], state[o[1]]))
        elif kind == "add" and o[1] not in commuted:
            reads.append((o[1], state[o[1]]))
            state[o[1]] += o[2]
        elif kind == "set" and o[1] not in commuted:
            state[o[1]] = o[2]
        elif kind == "commute":
            commuted.add(o[1])
            state[o[1]] += o[2]
    return reads


def _add(v: int, n: int) -> int:
    return v + n


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history)
def test_concurrent_histories_are_serializable(txs: list[list[tuple[Any, ...]]]) -> None:
    """Replaying committed transactions in t order reproduces every read they made and every state."""
    store = astm.Store()
    refs = [store.ref(f"r{i}", 0) for i in range(NREFS)]
    observed: dict[int, list[tuple[int, int]]] = {}
    results: list[tuple[int, int, astm.TxReport[Any]]] = []

    async def run_one(i: int, ops: list[tuple[Any, ...]]) -> None:
        async def body() -> None:
            reads: list[tuple[int, int]] = []
            observed[i] = reads
            commuted: set[int] = set()
            for o in ops:
                kind = o[0]
                if kind == "sleep":
                    await anyio.sleep(o[1])
                elif o[1] in commuted and kind != "commute":
                    continue  # the in-transaction value of a commuted ref is not checked
                elif kind == "get":
                    reads.append((o[1], refs[o[1]].get()))
                elif kind == "add":
                    reads.append((o[1], refs[o[1]].get()))
                    refs[o[1]].alter(_add, o[2])
                elif kind == "set":
                    refs[o[1]].set(o[2])
                else:
                    commuted.add(o[1])
                    refs[o[1]].commute(_add, o[2])

        rep = await store.transact(body)
        results.append((rep.t, i, rep))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i, ops in enumerate(txs):
                tg.start_soon(run_one, i, ops)

    anyio.run(main)

    writers = sorted((t, i, rep) for t, i, rep in results if rep.changes)
    assert [t for t, _, _ in writers] == list(range(1, store.t + 1))
    state = [0] * NREFS
    for t, i, rep in writers:
        assert [rep.db_before[r] for r in refs] == state, f"t={t}: db_before is not the state after t-1"
        assert _replay(txs[i], state) == observed[i], f"transaction {i} at t={t} read a non-serializable value"
        assert [rep.db_after[r] for r in refs] == state, f"t={t}: committed state differs from the replay"
    for _t, i, rep in results:
        if not rep.changes:  # read-only: serializable at its read point
            snapshot = [rep.db_after[r] for r in refs]
            assert _replay(txs[i], snapshot) == observed[i]
    assert [r.get() for r in refs] == state
