from __future__ import annotations

import pytest

import astm

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
