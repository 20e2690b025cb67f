from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

import astm
from astm.testing import Cluster, Standby

pytest_plugins = ["pytester"]


@pytest.fixture
def store() -> astm.Store:
    """A fresh in-memory store."""
    return astm.Store()


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run @pytest.mark.anyio tests on both backends."""
    return str(request.param)


@pytest.fixture
def pg_dsn(astm_postgres_dsn: str) -> str:
    """A fresh, empty database on the test cluster (the astm pytest plugin's)."""
    return astm_postgres_dsn


@pytest.fixture(scope="session")
def pg_standby(astm_postgres_cluster: str) -> Iterator[Standby]:
    """A hot standby of the session's throwaway cluster (a streaming replica; skipped on ASTM_TEST_POSTGRES_DSN)."""
    data = os.environ.get("ASTM_TEST_PG_DATA")
    if not data:
        pytest.skip("needs the throwaway cluster (not ASTM_TEST_POSTGRES_DSN) to make a standby of it")
    port = urllib.parse.urlsplit(astm_postgres_cluster).port
    assert port is not None
    standby = Standby(Cluster.existing(Path(data), port))
    try:
        yield standby
    finally:
        standby.destroy()


@pytest.fixture
def pg_replica(pg_dsn: str, pg_standby: Standby) -> str:
    """The DSN of ``pg_dsn``'s database on the standby, once the standby has replayed its creation."""
    pg_standby.wait_caught_up()
    return pg_standby.dsn_of(pg_dsn)
