"""The list-append checker (tests/elle.py) on crafted histories: it finds each anomaly it claims, and only that."""

from __future__ import annotations

import random
import time
from collections.abc import Hashable
from typing import Any

import pytest

from .elle import ALL_CYCLES, REALTIME, Result, Txn, check

A = "append"
CYCLES = {"G0", "G1c", "G-single", "G2"}


def T(  # noqa: N802 - reads like the notation of the paper
    i: int, *ops: tuple[str, Hashable, Any], s: str = "ok", start: float | None = None, end: float | None = None
) -> Txn:
    status: Any = s
    return Txn(i, status, list(ops), start, end)


def only(result: Result, *kinds: str) -> None:
    """The result reports exactly these anomaly classes."""
    assert set(result.anomalies) == set(kinds), str(result)
    assert result.ok == (not kinds)


class TestCycles:
    def test_g0_write_cycle(self) -> None:
        """Two transactions appending to x and y in opposite orders make a G0 (ww only) cycle."""
        h = [T(1, (A, "x", 1), (A, "y", 1)), T(2, (A, "x", 2), (A, "y", 2))]
        r = check(h, final={"x": (1, 2), "y": (2, 1)})
        only(r, "G0")
        [e] = r.anomalies["G0"]
        assert {x.kind for x in e.cycle} == {"ww"} and {t.id for t in e.txns} == {1, 2}

    def test_g1c_circular_information_flow(self) -> None:
        """Each transaction reads the other's append: G1c, not G0."""
        h = [T(1, (A, "x", 1), ("r", "y", (2,))), T(2, (A, "y", 2), ("r", "x", (1,)))]
        only(check(h, final={"x": (1,), "y": (2,)}), "G1c")

    def test_g_single_read_skew(self) -> None:
        """A read skew (one rw edge back along a wr edge) is G-single, not G2."""
        h = [T(1, ("r", "x", ()), ("r", "y", (2,))), T(2, (A, "x", 1), (A, "y", 2))]
        r = check(h, final={"x": (1,), "y": (2,)})
        only(r, "G-single")
        assert [e.kind for e in r.anomalies["G-single"][0].cycle].count("rw") == 1

    def test_g2_write_skew(self) -> None:
        """Write skew (two rw edges) is G2, not G-single."""
        h = [
            T(1, ("r", "x", ()), ("r", "y", ()), (A, "x", 1)),
            T(2, ("r", "x", ()), ("r", "y", ()), (A, "y", 2)),
        ]
        r = check(h, final={"x": (1,), "y": (2,)})
        only(r, "G2")
        assert check(h, final={"x": (1,), "y": (2,)}, allow={"G2"}).ok

    def test_g_single_and_g2_in_one_component(self) -> None:
        """A component holding both a G-single and a G2 cycle reports both: G-single is never hidden behind G2."""
        h = [
            T(1, ("r", "x", ()), ("r", "y", (1,)), ("r", "z", ()), (A, "w", 7)),
            T(2, (A, "x", 1), (A, "y", 1)),
            T(3, (A, "z", 5), ("r", "w", ())),
        ]
        r = check(h, final={"x": (1,), "y": (1,), "z": (5,), "w": (7,)}, allow={"G2"})
        only_kinds = set(r.anomalies)
        assert only_kinds == {"G-single", "G2"}, str(r)
        assert not r.ok and r.unexpected == {"G-single"}
        assert r.stats["sccs"] == 1

    def test_long_g_single(self) -> None:
        """A G-single whose way back is a long ww/wr chain is found exactly (not as G2)."""
        n = 50
        h = [T(0, ("r", "a", ()), ("r", "k49", (49,)))]
        h.append(T(1, (A, "a", 1000), (A, "k1", 1)))  # T0 -rw-> T1
        for i in range(2, n):
            h.append(T(i, ("r", f"k{i - 1}", (i - 1,)), (A, f"k{i}", i)))  # T(i-1) -wr-> T(i)
        r = check(h)
        only(r, "G-single")
        assert len(r.anomalies["G-single"][0].cycle) == n

    def test_unobserved_append_orders_after_the_last_read(self) -> None:
        """An append nobody read follows every read state: readers of the last state get an rw edge to it."""
        h = [
            T(1, ("r", "x", ()), (A, "y", 1)),
            T(2, ("r", "y", ()), (A, "x", 2)),  # x's 2 is never read: T1 -rw-> T2 by inference
        ]
        only(check(h), "G2")


class TestRealtime:
    def test_stale_read_is_a_realtime_cycle(self) -> None:
        """A read that misses a commit completed before it started is G-single-realtime, not plain G-single."""
        h = [T(1, (A, "x", 1), start=0, end=1), T(2, ("r", "x", ()), start=2, end=3)]
        r = check(h, final={"x": (1,)})
        only(r, "G-single-realtime")
        assert "rt" in {e.kind for e in r.anomalies["G-single-realtime"][0].cycle}
        assert check(h, final={"x": (1,)}, realtime=False).ok
        assert check(h, final={"x": (1,)}, allow=REALTIME).ok

    def test_overlapping_is_fine(self) -> None:
        """The same reads by overlapping transactions are serializable in another order: valid."""
        h = [T(1, (A, "x", 1), start=0, end=2), T(2, ("r", "x", ()), start=1, end=3)]
        only(check(h, final={"x": (1,)}))

    def test_g0_realtime(self) -> None:
        """Appends ordered against real time make G0-realtime."""
        h = [T(1, (A, "x", 1), start=0, end=1), T(2, (A, "x", 2), start=2, end=3)]
        only(check(h, final={"x": (2, 1)}), "G0-realtime")

    def test_g1c_realtime_future_read(self) -> None:
        """Reading an append of a transaction that started only later is G1c-realtime."""
        h = [T(1, (A, "x", 1), start=2, end=3), T(2, ("r", "x", (1,)), start=0, end=1)]
        only(check(h, final={"x": (1,)}), "G1c-realtime")

    def test_g2_realtime(self) -> None:
        """Two rw edges closed by a real-time edge make G2-realtime."""
        h = [
            T(1, ("r", "a", ()), start=10, end=11),
            T(2, (A, "a", 1), ("r", "b", ()), start=0, end=12),
            T(3, (A, "b", 2), start=0, end=1),
        ]
        only(check(h, final={"a": (1,), "b": (2,)}), "G2-realtime")

    def test_realtime_per_process(self) -> None:
        """With realtime="process", only transactions of one process are ordered by real time."""

        def h(p1: str, p2: str) -> list[Txn]:
            return [Txn(1, "ok", [(A, "x", 1)], 0, 1, p1), Txn(2, "ok", [("r", "x", ())], 2, 3, p2)]

        final = {"x": (1,)}
        only(check(h("a", "b"), final), "G-single-realtime")
        only(check(h("a", "b"), final, realtime="process"))
        only(check(h("a", "a"), final, realtime="process"), "G-single-realtime")

    def test_info_transactions_have_no_end(self) -> None:
        """An info transaction may take effect after it was given up on: no real-time edge leaves it."""
        h = [T(1, (A, "x", 1), s="info", start=0, end=1), T(2, ("r", "x", ()), start=2, end=3)]
        only(check(h, final={"x": (1,)}))

    def test_long_chain_of_realtime(self) -> None:
        """A stale read across a long serial chain is found through the completion chain."""
        h = [T(i, (A, f"k{i}", i), start=2 * i, end=2 * i + 1) for i in range(200)]
        h.append(T(999, ("r", "k0", ()), start=1000, end=1001))
        only(check(h, final={f"k{i}": (i,) for i in range(200)}), "G-single-realtime")


class TestReadAnomalies:
    def test_g1a_aborted_read(self) -> None:
        """Reading an element only a failed transaction appended is G1a; the failed one is in no cycle."""
        h = [T(1, (A, "x", 1), s="fail"), T(2, ("r", "x", (1,)))]
        r = check(h, final={"x": (1,)})
        only(r, "G1a")
        assert {t.id for e in r.anomalies["G1a"] for t in e.txns} == {1, 2}
        assert r.stats["committed"] == 1

    def test_g1a_in_final_state(self) -> None:
        """A failed append in the final state is G1a, read by the final observer."""
        h = [T(1, (A, "x", 1), s="fail")]
        r = check(h, final={"x": (1,)})
        only(r, "G1a")
        assert "the final state" in str(r)

    def test_g1b_intermediate_read(self) -> None:
        """Reading a state ending in another transaction's non-final append is G1b (and, through rw, G-single)."""
        h = [T(1, (A, "x", 1), (A, "x", 2)), T(2, ("r", "x", (1,)))]
        only(check(h, final={"x": (1, 2)}), "G1b", "G-single")

    def test_own_intermediate_read_is_fine(self) -> None:
        """A transaction reading its own intermediate state is not G1b."""
        h = [T(1, (A, "x", 1), ("r", "x", (1,)), (A, "x", 2), ("r", "x", (1, 2)))]
        only(check(h, final={"x": (1, 2)}))

    def test_incompatible_order(self) -> None:
        """Two reads neither of which is a prefix of the other are an incompatible order."""
        h = [T(1, (A, "x", 1)), T(2, (A, "x", 2)), T(3, (A, "x", 3)), T(4, ("r", "x", (1, 3)))]
        r = check(h, final={"x": (1, 2, 3)})
        assert "incompatible-order" in r.anomalies, str(r)
        assert not (set(r.anomalies) & {"G1a", "G1b", "duplicate-elements", "garbage-read"})
        assert {t.id for t in r.anomalies["incompatible-order"][0].txns} == {4}

    def test_incompatible_between_reads(self) -> None:
        """Without a final state, reads [1 2] and [2 1] are an incompatible order."""
        h = [T(1, (A, "x", 1)), T(2, (A, "x", 2)), T(3, ("r", "x", (1, 2))), T(4, ("r", "x", (2, 1)))]
        assert "incompatible-order" in check(h).anomalies

    def test_duplicate_elements(self) -> None:
        """An element read twice is a duplicate."""
        h = [T(1, (A, "x", 1)), T(2, ("r", "x", (1, 1)))]
        r = check(h, final={"x": (1,)})
        assert "duplicate-elements" in r.anomalies, str(r)

    def test_duplicate_in_the_order(self) -> None:
        """A duplicate in the longest read itself is reported for every read reaching it."""
        h = [T(1, (A, "x", 1)), T(2, (A, "x", 2)), T(3, ("r", "x", (1, 2, 1)))]
        r = check(h)
        assert set(r.anomalies) == {"duplicate-elements"}, str(r)

    def test_garbage_read(self) -> None:
        """An element nobody appended to that key is a garbage read."""
        h = [T(1, (A, "x", 1)), T(2, (A, "y", 7)), T(3, ("r", "x", (1, 7)))]
        r = check(h, final={"x": (1,), "y": (7,)})
        assert "garbage-read" in r.anomalies, str(r)

    def test_internal_own_append_missing(self) -> None:
        """A read that does not show the transaction's own earlier append is internal inconsistency."""
        h = [T(1, (A, "x", 1), ("r", "x", ()))]
        only(check(h, final={"x": (1,)}), "internal")

    def test_internal_two_reads_disagree(self) -> None:
        """Two reads of one key in one transaction, with no append between, must agree."""
        h = [T(1, (A, "x", 1)), T(2, ("r", "x", ()), ("r", "x", (1,)))]
        r = check(h, final={"x": (1,)})
        assert "internal" in r.anomalies, str(r)

    def test_internal_future_read(self) -> None:
        """A read that shows an element the transaction appends only later is internal inconsistency."""
        h = [T(1, ("r", "x", (1,)), (A, "x", 1))]
        assert "internal" in check(h, final={"x": (1,)}).anomalies

    def test_internal_unknown_prefix(self) -> None:
        """After appends to an unread key, a read must end with them, whatever comes before."""
        good = [T(0, (A, "x", 0)), T(1, (A, "x", 1), (A, "x", 2), ("r", "x", (0, 1, 2)))]
        only(check(good, final={"x": (0, 1, 2)}))
        bad = [T(0, (A, "x", 0)), T(1, (A, "x", 1), (A, "x", 2), ("r", "x", (0, 2, 1)))]
        assert "internal" in check(bad).anomalies


class TestLostAppends:
    def test_ok_append_missing_from_final(self) -> None:
        """An acknowledged append that the final state lacks is a lost append."""
        h = [T(1, (A, "x", 1)), T(2, (A, "x", 2))]
        r = check(h, final={"x": (2,)})
        only(r, "lost-append")
        assert [t.id for t in r.anomalies["lost-append"][0].txns] == [1]

    def test_info_is_all_or_nothing(self) -> None:
        """An info transaction seen on one key must be in the final state on every key it appended to."""
        h = [T(1, (A, "x", 1), (A, "y", 2), s="info"), T(2, ("r", "x", (1,)))]
        r = check(h, final={"x": (1,), "y": ()})
        assert "lost-append" in r.anomalies, str(r)
        only(check(h, final={"x": (1,), "y": (2,)}))

    def test_unobserved_info_is_not_lost(self) -> None:
        """An info transaction none of whose appends were observed may simply not have committed."""
        h = [T(1, (A, "x", 1), (A, "y", 2), s="info"), T(2, ("r", "x", ()))]
        only(check(h, final={"x": (), "y": ()}))

    def test_lost_in_a_read_of_an_observer(self) -> None:
        """Without a final state: a transaction that saw T1's append to y but not its append to x lost it."""
        h = [T(1, (A, "x", 1), (A, "y", 2)), T(2, ("r", "y", (2,)), ("r", "x", ()))]
        r = check(h)
        assert "lost-append" in r.anomalies and "G-single" in r.anomalies, str(r)

    def test_lost_in_a_later_read(self) -> None:
        """Without a final state: a read that started after the append completed, and lacks it, lost it."""
        h = [T(1, (A, "x", 1), (A, "x", 2), start=0, end=1), T(2, ("r", "x", ()), start=2, end=3)]
        r = check(h)
        assert "lost-append" in r.anomalies, str(r)


class TestValid:
    def test_serial_history(self) -> None:
        """A serial history of appends and reads is valid."""
        h = [
            T(1, (A, "x", 1), ("r", "x", (1,))),
            T(2, ("r", "x", (1,)), (A, "y", 2)),
            T(3, ("r", "y", (2,)), (A, "x", 3), ("r", "x", (1, 3))),
            T(4, ("r", "x", (1, 3)), ("r", "y", (2,))),
        ]
        only(check(h, final={"x": (1, 3), "y": (2,)}))

    def test_concurrent_history_with_info_and_fail(self) -> None:
        """Overlapping transactions, failed ones, info ones seen and unseen: valid."""
        h = [
            T(1, (A, "x", 1), start=0, end=5),
            T(2, ("r", "x", ()), (A, "y", 2), start=1, end=3),
            T(3, (A, "x", 3), ("r", "y", (2,)), s="info", start=4, end=6),  # observed below: committed
            T(4, (A, "y", 4), s="info", start=4, end=9),  # never observed: may not have committed
            T(5, (A, "x", 5), s="fail", start=6, end=7),
            T(6, ("r", "x", (1, 3)), ("r", "y", (2,)), start=7, end=8),
            T(7, ("r", "y", None), s="info", start=7, end=8),  # a read whose result is unknown
        ]
        only(check(h, final={"x": (1, 3), "y": (2,)}))

    def test_unobserved_info_makes_no_false_cycle(self) -> None:
        """An info transaction whose appends nobody saw is left out of the graph, so it makes no false G2."""
        h = [
            T(1, (A, "y", 1)),
            T(9, ("r", "y", (1,)), (A, "x", 9), s="info"),
            T(2, ("r", "x", ()), (A, "y", 2)),
        ]
        only(check(h, final={"x": (), "y": (1, 2)}))

    def test_history_errors(self) -> None:
        """Appending one value twice, unknown micro-ops and statuses are refused."""
        with pytest.raises(ValueError, match="twice"):
            check([T(1, (A, "x", 1)), T(2, (A, "x", 1))])
        with pytest.raises(ValueError, match="micro-op"):
            check([T(1, ("w", "x", 1))])
        with pytest.raises(ValueError, match="status"):
            check([T(1, (A, "x", 1), s="maybe")])

    def test_report_names_the_transactions(self) -> None:
        """The printed result names the anomaly, the transactions and their operations."""
        h = [T(41, ("r", "x", ()), ("r", "y", (2,))), T(42, (A, "x", 1), (A, "y", 2))]
        text = str(check(h, final={"x": (1,), "y": (2,)}))
        assert "INVALID" in text and "G-single" in text
        assert "T41 (ok): [r 'x' [], r 'y' [2]]" in text and "T41 -rw-> T42" in text
        assert str(check([T(1, (A, "x", 1))], final={"x": (1,)})).startswith("valid")


# -- randomized: serial executions pass, one corrupted read fails ------------------------------------------


def serial_history(rng: random.Random, n: int, nkeys: int) -> tuple[list[Txn], dict[str, tuple[int, ...]]]:
    """A random serial execution: each transaction applied to a dict state in turn, reads recorded.

    Some transactions fail (their appends are not applied) and some are info
    (applied or not, at random). Each one's real-time interval contains its
    serial point, so the real-time order agrees with the serial order.
    """
    state: dict[str, tuple[int, ...]] = {f"k{i}": () for i in range(nkeys)}
    out: list[Txn] = []
    nxt = 0
    for i in range(n):
        status = rng.choices(["ok", "fail", "info"], [0.85, 0.05, 0.1])[0]
        applies = status == "ok" or (status == "info" and rng.random() < 0.5)
        local = dict(state)
        ops: list[tuple[str, Hashable, Any]] = []
        for _ in range(rng.randint(1, 4)):
            k = f"k{rng.randrange(nkeys)}"
            if rng.random() < 0.5:
                nxt += 1
                local[k] = (*local[k], nxt)
                ops.append((A, k, nxt))
            else:
                ops.append(("r", k, local[k]))
        if applies:
            state = local
        point = float(i)
        start, end = point - rng.uniform(0, 3), point + rng.uniform(0, 3)
        out.append(Txn(i, status, ops, start, end))  # type: ignore[arg-type]
    return out, state


def corrupt(rng: random.Random, history: list[Txn], final: dict[str, tuple[int, ...]]) -> tuple[list[Txn], str]:
    """Change one read of an ok transaction in a way no serial execution explains; returns how."""
    reads = [
        (ti, mi) for ti, t in enumerate(history) if t.status == "ok" for mi, op in enumerate(t.ops) if op[0] == "r"
    ]
    long_reads = [(ti, mi) for ti, mi in reads if len(history[ti].ops[mi][2]) >= 2]
    kinds = ["foreign", "duplicate"] + (["drop", "swap"] if long_reads else [])
    kind = rng.choice(kinds)
    ti, mi = rng.choice(long_reads if kind in ("drop", "swap") else reads)
    t = history[ti]
    f, k, v = t.ops[mi]
    v = list(v)
    if kind == "drop":  # any element but the last: the read is no longer a prefix of the final state
        del v[rng.randrange(len(v) - 1)]
    elif kind == "swap":
        j = rng.randrange(len(v) - 1)
        v[j], v[j + 1] = v[j + 1], v[j]
    elif kind == "duplicate":
        if not v:
            v = [*final[str(k)][:1]] * 2 or [-1]
        else:
            v.insert(rng.randrange(len(v) + 1), rng.choice(v))
    else:  # an element appended to another key, or never appended at all
        others = [e for kk, vals in final.items() if kk != k for e in vals]
        v.insert(rng.randrange(len(v) + 1), rng.choice(others) if others and rng.random() < 0.5 else -7)
    ops = list(t.ops)
    ops[mi] = (f, k, tuple(v))
    bad = list(history)
    bad[ti] = Txn(t.id, t.status, ops, t.start, t.end)
    return bad, kind


@pytest.mark.parametrize("seed", range(40))
def test_random_serial_passes_and_corruption_fails(seed: int) -> None:
    """A shuffled random serial execution is valid; after corrupting one read it is not."""
    rng = random.Random(seed)
    history, final = serial_history(rng, rng.randint(20, 300), rng.randint(1, 8))
    rng.shuffle(history)
    only(check(history, final))
    bad, how = corrupt(rng, history, final)
    r = check(bad, final)
    assert not r.ok, f"corruption {how!r} was not detected"


@pytest.mark.parametrize("seed", range(10))
def test_failed_status_of_a_visible_append_is_g1a(seed: int) -> None:
    """Marking a transaction whose append is visible as failed makes the history G1a."""
    rng = random.Random(seed)
    history, final = serial_history(rng, 100, 3)
    seen = {e for vals in final.values() for e in vals}
    candidates = [i for i, t in enumerate(history) if any(op[0] == A and op[2] in seen for op in t.ops)]
    i = rng.choice(candidates)
    t = history[i]
    history[i] = Txn(t.id, "fail", t.ops, t.start, t.end)
    assert "G1a" in check(history, final).anomalies


def snapshot_isolation_history(rng: random.Random, n: int, nkeys: int, concurrency: int) -> list[Txn]:
    """A simulated snapshot-isolation store: reads from a snapshot at start, first committer wins on writes."""
    versions: dict[str, list[tuple[int, tuple[int, ...]]]] = {f"k{i}": [(0, ())] for i in range(nkeys)}
    clock = nxt = started = 0
    active: list[tuple[int, int, list[tuple[str, Hashable, Any]], list[tuple[str, int]]]] = []
    out: list[Txn] = []

    def at(k: str, snap: int) -> tuple[int, ...]:
        return next(v for c, v in reversed(versions[k]) if c <= snap)

    while started < n or active:
        if started < n and (not active or (len(active) < concurrency and rng.random() < 0.6)):
            ops: list[tuple[str, Hashable, Any]] = []
            local: dict[str, tuple[int, ...]] = {}
            writes: list[tuple[str, int]] = []
            for _ in range(rng.randint(1, 4)):
                k = f"k{rng.randrange(nkeys)}"
                cur = local.get(k, at(k, clock))
                if rng.random() < 0.5:
                    nxt += 1
                    local[k] = (*cur, nxt)
                    ops.append((A, k, nxt))
                    writes.append((k, nxt))
                else:
                    ops.append(("r", k, cur))
            active.append((started, clock, ops, writes))
            started += 1
            continue
        i, snap, ops, writes = active.pop(rng.randrange(len(active)))
        if any(versions[k][-1][0] > snap for k, _ in writes):
            out.append(Txn(i, "fail", ops))
            continue
        clock += 1
        for k, e in writes:
            versions[k].append((clock, (*versions[k][-1][1], e)))
        out.append(Txn(i, "ok", ops))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_snapshot_isolation_shows_only_g2(seed: int) -> None:
    """A simulated snapshot-isolation store produces G2 at most: never G-single, G1c or G0."""
    rng = random.Random(seed)
    r = check(snapshot_isolation_history(rng, 2000, rng.randint(2, 6), 8), allow={"G2"})
    assert r.ok, str(r)
    assert not set(r.anomalies) & (ALL_CYCLES - {"G2"})


def test_checks_20k_transactions_quickly() -> None:
    """20,000 transactions (with real time) are checked in a few seconds."""
    history, final = serial_history(random.Random(7), 20_000, 10)
    began = time.perf_counter()
    r = check(history, final)
    took = time.perf_counter() - began
    assert r.ok, str(r)
    assert took < 10, f"{took:.1f} s"  # about 1 s on a 2-core machine; generous for a loaded CI runner


def test_cycle_classes_are_disjoint_from_the_rest() -> None:
    """The exported class sets agree: cycles are the four data classes and their real-time variants."""
    assert CYCLES | REALTIME == ALL_CYCLES
    assert {f"{c}-realtime" for c in CYCLES} == REALTIME
