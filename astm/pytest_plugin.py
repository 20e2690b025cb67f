"""A pytest plugin for code built on astm (registered as ``astm`` when astm-state is installed).

Fixtures:

* ``astm_store_url``: a store URL for each kind of store, one test per kind:
  ``memory://``, a SQLite file in the test's temporary directory, and a fresh
  PostgreSQL database when one can be had (``ASTM_TEST_POSTGRES_DSN``, or
  PostgreSQL's programs to start a throwaway cluster; otherwise that case is
  skipped). ``astm_store`` is a ``Store`` on it, not yet opened: use it with
  ``async with astm_store:``.
* ``astm_postgres_dsn``: a fresh, empty PostgreSQL database (the cluster is
  started once per test session).
* ``astm_bodies_twice``: while it is active, every transaction body runs
  twice, its first run discarded as if it had conflicted. A body with side
  effects (a counter bumped, a message sent) then shows them twice, so a test
  of it fails; bodies must be safe to run again (in the spirit of Django's
  ``captureOnCommitCallbacks``). ``pytest --astm-bodies-twice`` turns it on
  for every test, and the ``astm_bodies_twice`` marker for one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import astm

from . import _tx

__all__ = ["bodies_twice"]


class bodies_twice:  # noqa: N801 - a context manager used like a function
    """Run every transaction body twice while active (the first run is discarded)."""

    def __enter__(self) -> None:
        _tx.BODIES_TWICE += 1

    def __exit__(self, *exc: object) -> None:
        _tx.BODIES_TWICE -= 1


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("astm")
    group.addoption(
        "--astm-bodies-twice",
        action="store_true",
        help="run every astm transaction body twice (its first run discarded) to expose side effects in bodies",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "astm_bodies_twice: run every astm transaction body twice in this test (first run discarded)"
    )


@pytest.fixture(autouse=True)
def _astm_bodies_twice_marker(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.config.getoption("--astm-bodies-twice") or request.node.get_closest_marker("astm_bodies_twice"):
        with bodies_twice():
            yield
    else:
        yield


@pytest.fixture
def astm_bodies_twice() -> Iterator[None]:
    """Every transaction body in the test runs twice, its first run discarded."""
    with bodies_twice():
        yield


@pytest.fixture(scope="session")
def astm_postgres_cluster() -> Iterator[str]:
    """An admin DSN: ASTM_TEST_POSTGRES_DSN, or a throwaway cluster started for this test session."""
    from . import testing

    if os.environ.get("ASTM_TEST_POSTGRES_DSN"):
        yield os.environ["ASTM_TEST_POSTGRES_DSN"]
        return
    if not testing.available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL's programs are missing (initdb, pg_ctl, postgres)", pytrace=False)
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed here")
    cluster = testing.Cluster()
    before = os.environ.get("ASTM_TEST_PG_DATA")
    os.environ["ASTM_TEST_PG_DATA"] = str(cluster.data)  # tests that stop and start the server find it
    try:
        yield cluster.dsn
    finally:
        cluster.destroy()
        if before is None:
            os.environ.pop("ASTM_TEST_PG_DATA", None)
        else:
            os.environ["ASTM_TEST_PG_DATA"] = before


@pytest.fixture
def astm_postgres_dsn(astm_postgres_cluster: str) -> str:
    """A fresh, empty database on the test cluster."""
    import asyncio
    import urllib.parse
    import uuid

    import asyncpg

    name = f"t_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(astm_postgres_cluster)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    parts = urllib.parse.urlsplit(astm_postgres_cluster)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def astm_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL of each kind in turn (the PostgreSQL case is skipped where no server can be had)."""
    kind = request.param
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'astm-state.db'}"
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        pytest.skip("the PostgreSQL store needs asyncpg (astm-state[postgres])")
    return str(request.getfixturevalue("astm_postgres_dsn"))


@pytest.fixture
def astm_store(astm_store_url: str) -> Iterator[astm.Store]:
    """A store of each kind in turn, not yet opened: ``async with astm_store:``."""
    store = astm.Store(astm_store_url)
    yield store
    if not store.closed and store._peer is None:
        _close(store)


def _close(store: astm.Store) -> Any:
    import anyio

    return anyio.run(store.aclose)
