"""The benchmark harness: alternating rounds, per-round ratios, sizing, selection, JSON (figures are not asserted)."""

from __future__ import annotations

import gc
import json
import time
from contextlib import redirect_stdout
from io import StringIO

import anyio
import pytest

from astm.bench import main
from astm.bench._harness import Case, Cases, Config, Derived, GcTimer, Result, Sized, Timed, run_case, run_groups
from astm.testing import available


async def test_rounds_alternate_abba_and_ratios_are_per_round() -> None:
    """Warm-up once each, then S B, B S, S B, ...; the ratio is taken per round and summarized by its median."""
    order: list[str] = []
    subject_values = iter([0.0, 2.0, 4.0, 8.0, 6.0])  # first is the warm-up
    baseline_values = iter([0.0, 1.0, 1.0, 2.0, 3.0])

    async def subject() -> Result:
        order.append("S")
        return next(subject_values)

    async def baseline() -> Result:
        order.append("B")
        return next(baseline_values)

    rows = await run_case(Case("c", subject, baseline, "x/s"), Config(rounds=4, progress=False))
    assert order == ["S", "B", "S", "B", "B", "S", "S", "B", "B", "S"]
    (row,) = rows
    assert row.ratios == [2.0, 4.0, 4.0, 2.0]
    assert (row.ratio, row.ratio_min, row.ratio_max) == (3.0, 2.0, 4.0)
    assert row.astm == 5.0
    assert row.baseline == 1.5
    assert row.astm_rounds == [2.0, 4.0, 8.0, 6.0]


async def test_side_figures_notes_and_derived_rows() -> None:
    """Side figures are summarized in the notes; a derived row compares a subject figure with a baseline one."""
    calls = {"s": 0, "b": 0}

    async def subject() -> Result:
        calls["s"] += 1
        return 10.0, {"attempts/commit": 1.0 + calls["s"], "idle": 100.0}

    async def baseline() -> Result:
        calls["b"] += 1
        return 5.0, {"dict": 50.0}

    case = Case(
        "mem",
        subject,
        baseline,
        "B",
        lower_is_better=True,
        note="fixed",
        formats={"attempts/commit": ".1f"},
        also=(Derived("idle row", "idle", "dict", "B", lower_is_better=True),),
    )
    main_row, idle_row = await run_case(case, Config(rounds=3, progress=False))
    assert main_row.lower_is_better
    assert main_row.extra == "fixed; attempts/commit 4.0 (3.0 to 5.0)"
    assert main_row.figures["attempts/commit"] == [3.0, 4.0, 5.0]
    assert idle_row.case == "idle row"
    assert idle_row.ratios == [2.0, 2.0, 2.0]
    assert idle_row.lower_is_better


async def test_max_rounds_caps_a_costly_case() -> None:
    """A case may ask for fewer rounds than the run's."""

    async def one() -> Result:
        return 1.0

    (row,) = await run_case(Case("c", one, one, "x", max_rounds=2), Config(rounds=5, progress=False))
    assert len(row.ratios) == 2


async def test_sized_rounds_last_about_the_target() -> None:
    """Sized grows n on its warm-up call until it can size rounds of about ``seconds``."""
    seen: list[int] = []

    async def body(n: int) -> float:
        seen.append(n)
        t0 = time.perf_counter()
        await anyio.sleep(n * 0.0001)  # 0.1 ms per operation
        return time.perf_counter() - t0

    sized = Sized(body, 0.05, start=1)
    await sized()  # warm-up: 1, 10, 100 (long enough), then sized
    assert seen[:2] == [1, 10]
    assert 150 <= sized.n <= 500  # 0.05 s at 0.1 ms (less: sleeps overshoot)
    rate, _ = await sized()  # type: ignore[misc]
    assert seen[-1] == sized.n
    assert rate > 0


async def test_sized_does_not_size_from_a_slow_first_call() -> None:
    """A first call that carries a one-time cost (a new ref's first commit) does not size the rounds."""
    calls = 0

    async def body(n: int) -> Timed:
        nonlocal calls
        calls += 1
        return Timed(n, 0.5 if calls == 1 else n * 0.001)  # the first call: one slow operation

    sized = Sized(body, 0.05, start=1)
    await sized()
    assert calls == 2
    assert 40 <= sized.n <= 60  # sized from the second call (1 ms per operation), not from the slow first one


async def test_sized_respects_the_granule_and_timed_ops() -> None:
    """``granule`` keeps n a multiple (n per task); a body reporting Timed sets the operation count."""

    async def body(n: int) -> Timed:
        return Timed(n * 10, 0.01, {"k": 1.0})

    sized = Sized(body, 0.05, start=7, granule=5)
    assert sized.n == 5
    rate, figures = await sized()  # type: ignore[misc]
    assert rate == 5 * 10 / 0.01
    assert sized.n == 25  # 5 operations took 0.01 s: 25 take 0.05 s
    assert figures == {"k": 1.0}


async def test_run_groups_selects_cases_and_closes_groups() -> None:
    """``only`` runs the matching cases; every group is closed afterwards, its teardown run."""
    closed: list[str] = []

    async def one() -> Result:
        return 1.0

    async def group(cfg: Config) -> Cases:
        try:
            yield Case("alpha case", one, one, "x")
            yield Case("beta case", one, one, "x")
        finally:
            closed.append("g")

    rows = await run_groups([group], Config(rounds=1, only="BETA", progress=False))
    assert [r.case for r in rows] == ["beta case"]
    assert closed == ["g"]


async def test_a_failing_case_still_tears_its_group_down() -> None:
    """An error in a round propagates, and the group's cleanup runs."""
    closed: list[str] = []

    async def boom() -> Result:
        raise RuntimeError("boom")

    async def group(cfg: Config) -> Cases:
        try:
            yield Case("c", boom, boom, "x")
        finally:
            closed.append("g")

    with pytest.raises(RuntimeError, match="boom"):
        await run_groups([group], Config(rounds=1, progress=False))
    assert closed == ["g"]


def test_gc_timer_times_collections() -> None:
    """GcTimer adds up the time of the collections made while it is installed, and uninstalls itself."""
    garbage = []
    for _ in range(1000):
        a: list[object] = []
        a.append(a)
        garbage.append(a)
    del garbage, a
    n = len(gc.callbacks)
    with GcTimer() as g:
        gc.collect()
    assert g.collections >= 1
    assert g.seconds > 0
    assert len(gc.callbacks) == n


def test_main_json_for_selected_cases() -> None:
    """``--only`` with ``--json``: only that row, with its per-round ratios."""
    out = StringIO()
    with redirect_stdout(out):
        assert main(["--quick", "--rounds", "2", "--only", r"^db\(\)", "--json", "--quiet"]) == 0
    rows = json.loads(out.getvalue())
    assert [r["case"] for r in rows] == ["db() + 10 reads vs read-only tx"]
    (row,) = rows
    assert len(row["ratios"]) == 2
    assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
    assert row["astm"] > 0
    assert row["baseline"] > 0


def test_main_table_for_selected_cases() -> None:
    """The text table has a header, a rule and one line per row, with the min-max column."""
    out = StringIO()
    with redirect_stdout(out):
        assert main(["--quick", "--rounds", "1", "--only", "hot counter", "--quiet"]) == 0
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("case")
    assert "min to max" in lines[1]
    assert lines[3].startswith("hot counter, 100 tasks: commute vs alter")


async def test_budget_stops_long_cases_after_three_rounds() -> None:
    """Once a case has used its budget, no round starts after the third."""

    async def slow() -> Result:
        await anyio.sleep(0.01)
        return 1.0

    (row,) = await run_case(Case("c", slow, slow, "x", budget=0.0), Config(rounds=5, progress=False))
    assert len(row.ratios) == 3


async def test_gc_pause_is_reported_when_asked() -> None:
    """A case with ``gc_pause`` gets the full collection before each round as a side figure of that side."""

    async def one() -> Result:
        return 1.0

    (row,) = await run_case(Case("c", one, one, "x", gc_pause=True), Config(rounds=2, progress=False))
    assert len(row.figures["full gc ms"]) == 2
    assert len(row.figures["baseline full gc ms"]) == 2
    assert "full gc ms" in row.extra


def test_seat_service_case_runs_both_servers_over_http() -> None:
    """The end-to-end seat case, short: both servers served the load generator, whose checks found no error."""
    out = StringIO()
    with redirect_stdout(out):
        assert main(["--quick", "--rounds", "1", "--only", "seat service", "--json", "--quiet"]) == 0
    rows = {r["case"]: r for r in json.loads(out.getvalue())}
    (name,) = [n for n in rows if n.startswith("seat service over HTTP") and ":" not in n]
    assert set(rows) == {
        name,
        f"{name}: p50 latency",
        f"{name}: p99 latency",
        f"{name}: req/s in the round's last second",
    }
    row = rows[name]
    assert row["unit"] == "req/s"
    assert row["astm"] > 0
    assert row["baseline"] > 0
    figures = row["figures"]
    assert figures["errors"] == [0.0]
    assert figures["baseline errors"] == [0.0]
    for side in ("", "baseline "):
        assert 0 < figures[f"{side}p50 ms"][0] <= figures[f"{side}p90 ms"][0] <= figures[f"{side}p99 ms"][0]
        assert 0 < figures[f"{side}sold"][0] <= 1
        assert figures[f"{side}last s req/s"][0] > 0
    assert rows[f"{name}: p99 latency"]["lower_is_better"]


@pytest.mark.skipif(not available(), reason="needs PostgreSQL (ASTM_BENCH_POSTGRES_DSN or its programs)")
def test_postgres_scaling_cases_run_short() -> None:
    """The PostgreSQL scaling cases, quick: every row is there with positive figures on both sides.

    The catch-up case checks by itself that the resumed peer holds every commit's value.
    """
    out = StringIO()
    with redirect_stdout(out):
        assert main(["--quick", "--rounds", "1", "--only", "postgres scale", "--json", "--quiet"]) == 0
    rows = {r["case"]: r for r in json.loads(out.getvalue())}
    assert set(rows) == {
        "postgres scale: open a new peer, 2k refs vs 20",
        "postgres scale: open a new peer, 2k refs vs 20: memory",
        "postgres scale: disjoint-key transfers, 1 peer process",
        "postgres scale: disjoint-key transfers, 2 peer processes",
        "postgres scale: disjoint-key transfers, astm 8 peer processes vs astm 1",
        "postgres scale: hot-key transfers, 2 peer processes",
        "postgres scale: longest event-loop stall during a 300-commit catch-up",
    }
    for row in rows.values():
        assert row["astm"] > 0
        assert row["baseline"] > 0
    opened = rows["postgres scale: open a new peer, 2k refs vs 20"]
    assert opened["lower_is_better"]
    assert opened["figures"]["first read ms"][0] > 0
    stall = rows["postgres scale: longest event-loop stall during a 300-commit catch-up"]
    assert stall["figures"]["commits/s made"][0] > 0
    assert rows["postgres scale: hot-key transfers, 2 peer processes"]["figures"]["baseline retries/tx"][0] >= 0
