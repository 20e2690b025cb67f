"""The in-memory store passes the conformance suite."""

from __future__ import annotations

from typing import Any

import astm

from .conformance import StoreConformance


class TestMemoryStore(StoreConformance):
    def make_store(self, **options: Any) -> astm.Store:
        return astm.Store(**options)
