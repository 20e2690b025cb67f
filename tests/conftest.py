from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import astm


@pytest.fixture
def store() -> astm.Store:
    """A fresh in-memory store."""
    return astm.Store()


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run @pytest.mark.anyio tests on both backends."""
    return str(request.param)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[str]:
    """An admin DSN: ASTM_TEST_POSTGRES_DSN, or a throwaway cluster started for this test run."""
    from astm import testing as pgcluster

    if os.environ.get("ASTM_TEST_POSTGRES_DSN"):
        yield os.environ["ASTM_TEST_POSTGRES_DSN"]
        return
    if not pgcluster.available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL's programs are missing: .ci/run installs Debian's postgresql", pytrace=False)
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed here")
    cluster = pgcluster.Cluster()
    os.environ["ASTM_TEST_PG_DATA"] = str(cluster.data)
    try:
        yield cluster.dsn
    finally:
        cluster.destroy()


@pytest.fixture
def pg_dsn(pg_cluster: str) -> str:
    """A fresh, empty database on the test cluster."""
    import asyncio
    import urllib.parse
    import uuid

    import asyncpg

    name = f"t_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(pg_cluster)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    parts = urllib.parse.urlsplit(pg_cluster)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
