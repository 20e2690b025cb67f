"""``astm.run``: run a coroutine function on the best event loop available."""

from __future__ import annotations

import gc
import importlib.util
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from ._gc import tune_gc as _tune_gc

__all__ = ["run"]

T = TypeVar("T")


def run(main: Callable[..., Awaitable[T]], *args: Any, backend: str = "asyncio", tune_gc: bool = True) -> T:
    """Run ``main(*args)`` to completion; on asyncio, use uvloop when it is installed.

    With ``tune_gc`` (the default) the garbage collector runs less often while
    ``main`` runs (``astm.tune_gc``: what it costs and buys); the collector is
    as before afterwards.
    """
    options: dict[str, Any] = {}
    if backend == "asyncio" and importlib.util.find_spec("uvloop") is not None:
        options["use_uvloop"] = True
    if not tune_gc:
        return anyio.run(main, *args, backend=backend, backend_options=options)
    old = _tune_gc()
    try:
        return anyio.run(main, *args, backend=backend, backend_options=options)
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()
