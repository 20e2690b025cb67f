"""The crash and fault tests' accounting can fail: crafted bad states each give the finding they should.

``tests/fault_ledger.py`` is what says "nothing acknowledged was lost" after
every SIGKILL and injected fault; a checker that passed everything would make
those tests pass whatever the store did. Here a consistent state built from
the transactions' plans passes, and each way a store could go wrong (a lost
commit, a half-applied one, a duplicate, a log row missing, the shared ledger
damaged, reordered or out of step, a delivery twice) is written into a copy of
it and must be reported.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from .fault_child import plan
from .fault_ledger import Ledger, Output

SEED = 50
IDS = list(range(1, 31))


def good_state() -> tuple[Ledger, dict[str, Any], list[tuple[int, int, int]]]:
    """A ledger of ids 1..30 acknowledged at t = id + 1 (t=1 seeded the ledger) and the state that matches it."""
    ledger = Ledger(seed=SEED)
    out = Output()
    for x in IDS:
        out.feed(f"{x} {x + 1}")
    ledger.take(out)
    refs: dict[str, Any] = {}
    for x in IDS:
        p = plan(x)
        for name in p.refs:
            refs.setdefault(name, []).append(x)
        if p.new_ref is not None:
            refs[p.new_ref] = x
    state = {
        "audit_size": 0,
        "stage": "open",
        "t": IDS[-1] + 1,
        "checkpoint_t": 0,
        "refs": refs,
        "other_refs": ["ledger"],
        "ledger": [*range(-SEED, 0), *IDS],
        "log_oldest": 1,
        "log": [[x + 1, [x]] for x in IDS],
        "pending": 0,
        "dead": 0,
    }
    deliveries = [(x + 1, 0, x) for x in IDS]
    return ledger, state, deliveries


def lose_one(state: dict[str, Any], _: list[Any]) -> None:
    name = plan(7).refs[1]
    state["refs"][name].remove(7)


def twice_in_a_ref(state: dict[str, Any], _: list[Any]) -> None:
    state["refs"][plan(3).refs[0]].append(3)


def half_applied(state: dict[str, Any], _: list[Any]) -> None:
    x = 99  # never acknowledged: present in one of its two refs only
    state["refs"].setdefault(plan(x).refs[0], []).append(x)
    state["ledger"].append(x)


def t_behind(state: dict[str, Any], _: list[Any]) -> None:
    state["t"] -= 3
    state["log"] = [row for row in state["log"] if row[0] <= state["t"]]


def log_row_missing(state: dict[str, Any], _: list[Any]) -> None:
    del state["log"][10]


def seed_damaged(state: dict[str, Any], _: list[Any]) -> None:
    state["ledger"][5] = 12345


def seed_cut(state: dict[str, Any], _: list[Any]) -> None:
    del state["ledger"][:1]


def ledger_misses_an_id(state: dict[str, Any], _: list[Any]) -> None:
    state["ledger"].remove(20)


def ledger_has_a_stray_id(state: dict[str, Any], _: list[Any]) -> None:
    state["ledger"].append(777)


def ledger_twice(state: dict[str, Any], _: list[Any]) -> None:
    state["ledger"].append(4)


def ledger_reordered(state: dict[str, Any], _: list[Any]) -> None:
    ledger = state["ledger"]
    i, j = ledger.index(11), ledger.index(12)
    ledger[i], ledger[j] = ledger[j], ledger[i]


def ledger_gone(state: dict[str, Any], _: list[Any]) -> None:
    state["ledger"] = None


def delivered_twice(_: dict[str, Any], deliveries: list[Any]) -> None:
    deliveries.append((99, 1, 5))


def delivered_uncommitted(_: dict[str, Any], deliveries: list[Any]) -> None:
    deliveries.append((40, 0, 555))


MUTATIONS: list[tuple[Callable[[dict[str, Any], list[Any]], None], str]] = [
    (lose_one, "acknowledged commits lost"),
    (twice_in_a_ref, "more than once in a ref"),
    (half_applied, "half-applied"),
    (t_behind, "behind acknowledged"),
    (log_row_missing, "missing from the retained log"),
    (seed_damaged, "seed of 50 entries is damaged from index 5"),
    (seed_cut, "seed of 50 entries is damaged from index 0"),
    (ledger_misses_an_id, "1 committed ids missing from it: [20]"),
    (ledger_has_a_stray_id, "whose transaction is not in its refs: [777]"),
    (ledger_twice, "ids there more than once: [4]"),
    (ledger_reordered, "out of commit order: id 12 (t=13) before id 11 (t=12)"),
    (ledger_gone, "the ledger ref is gone"),
    (delivered_twice, "delivered under keys"),
    (delivered_uncommitted, "which is not committed"),
]


def test_a_consistent_state_passes() -> None:
    ledger, state, deliveries = good_state()
    assert ledger.check(state, deliveries) == []
    assert ledger.check_all_delivered(state, deliveries) == []


@pytest.mark.parametrize(("mutate", "finding"), MUTATIONS, ids=[m.__name__ for m, _ in MUTATIONS])
def test_each_fault_is_reported(mutate: Callable[[dict[str, Any], list[Any]], None], finding: str) -> None:
    ledger, state, deliveries = good_state()
    bad, bad_deliveries = copy.deepcopy(state), list(deliveries)
    mutate(bad, bad_deliveries)
    problems = ledger.check(bad, bad_deliveries)
    assert any(finding in p for p in problems), problems


def test_a_second_ack_of_one_id_is_reported() -> None:
    ledger, _, _ = good_state()
    again = Output()
    again.feed("5 40")
    ledger.take(again)
    assert any("acknowledged twice" in p for p in ledger.problems), ledger.problems


def test_an_undelivered_commit_is_reported_after_a_clean_close() -> None:
    ledger, state, deliveries = good_state()
    problems = ledger.check_all_delivered(state, [d for d in deliveries if d[2] != 9])
    assert problems == ["1 committed ids were never delivered: [9]"]


def test_a_commit_said_not_committed_is_reported_and_an_unknown_outcome_is_not() -> None:
    ledger, state, _ = good_state()
    x = 99  # raised, never acknowledged, yet whole in the state
    for name in plan(x).refs:
        state["refs"].setdefault(name, []).append(x)
    if plan(x).new_ref is not None:
        state["refs"][plan(x).new_ref] = x
    state["ledger"].append(x)
    unknown = {"type": "astm._errors.CommitOutcomeUnknown", "astm": True, "message": "its outcome is unknown"}
    ledger.errors[x] = unknown
    assert ledger.check(state) == []
    ledger.errors[x] = {**unknown, "type": "astm._errors.StorageError", "message": "it was not committed"}
    assert any("raised 'not committed' are committed: ids [99]" in p for p in ledger.check(state))
    # a subclass of CommitOutcomeUnknown (a commit known to have happened) is not "not committed" either
    ledger.errors[x] = {"type": "astm._errors.CommittedNotApplied", "astm": True, "unknown": True, "message": "t=9"}
    assert ledger.check(state) == []
    ledger.errors[x] = {"type": "astm._errors.StorageError", "astm": True, "unknown": False, "message": "refused"}
    assert any("raised 'not committed' are committed: ids [99]" in p for p in ledger.check(state))
