"""The astm pytest plugin: a store fixture per kind of store, and the mode that runs every body twice."""

from __future__ import annotations

import anyio
import pytest

import astm

INNER = """
import anyio
import astm

sent = []


def book(store):
    seats = store.ref("seats", 10)

    def body():
        sent.append("mail")  # a side effect inside a transaction body
        seats.alter(lambda n: n - 1)

    async def main():
        async with store:
            await store.atomically(body)
            return await store.atomically(seats.get)

    return anyio.run(main)


def test_books_once(astm_store):
    sent.clear()
    assert book(astm_store) == 9
    assert sent == ["mail"]


def test_kinds(astm_store_url):
    assert astm_store_url.split(":")[0] in ("memory", "sqlite", "postgresql")
"""


def test_a_store_fixture_per_kind_of_store(pytester: pytest.Pytester) -> None:
    """astm_store runs a test on memory, on a SQLite file and on PostgreSQL (when a server can be had)."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "kinds", "-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*test_kinds?memory?*PASSED*", "*test_kinds?sqlite?*PASSED*", "*postgresql*PASSED*"])


def test_bodies_twice_exposes_side_effects(pytester: pytest.Pytester) -> None:
    """With --astm-bodies-twice a body's side effect shows twice and the test fails; its state changes once."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "books_once and memory")
    result.assert_outcomes(passed=1)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-k", "books_once and memory", "--astm-bodies-twice"
    )
    result.assert_outcomes(failed=1)
    result.stdout.re_match_lines([r".*AssertionError: assert \['mail', 'mail'\] == \['mail'\]"])


@pytest.mark.astm_bodies_twice
def test_the_marker_runs_bodies_twice_and_commits_once() -> None:
    """Under the marker a body runs twice per transaction while its commit happens once."""
    store = astm.Store()
    r = store.ref("r", 0)
    runs = 0

    def body() -> None:
        nonlocal runs
        runs += 1
        r.alter(lambda v: v + 1)

    anyio.run(store.atomically, body)
    assert (runs, r.get(), store.t) == (2, 1, 1)
