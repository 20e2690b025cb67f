"""Compiled vs pure engine: the uncontended transfer case in two child processes, with and without ``ASTM_PURE=1``.

When ``astm._tx`` is a compiled extension (its file ends in ``.so`` or
``.pyd``), ``ASTM_PURE=1`` is to make a process use the pure-Python engine
instead, and the row shows what compilation buys. Without a compiled build
both children run the same pure-Python engine; the row says so, and its ratio
(about 1) shows how much two processes doing the same thing differ on this
machine. Each child reports which ``astm._tx`` file it runs.
"""

from __future__ import annotations

import os

from ._child import command, reply, start_all
from ._core import Uncontended
from ._harness import Case, Cases, Config, Result

__all__ = ["compiled", "engine", "engine_worker"]


def compiled() -> bool:
    """Whether this process runs a compiled transaction engine."""
    import astm._tx

    return astm._tx.__file__.endswith((".so", ".pyd"))


def _engine_label() -> str:
    import astm._tx

    return f"{'compiled' if compiled() else 'pure Python'} ({os.path.basename(astm._tx.__file__)})"


async def engine_worker(seconds: float) -> None:
    """The child: answer each command with the rate of one round of the uncontended case."""
    u = Uncontended.make(seconds)
    reply("ready", _engine_label())
    while await command():
        result = await u.subject()
        reply(result[0] if isinstance(result, tuple) else result)
    u.check()


async def engine(cfg: Config) -> Cases:
    """The compiled-vs-pure row (or, without a compiled build, the row saying the engine is pure Python)."""
    if compiled():
        name = "engine: compiled vs ASTM_PURE=1, uncontended transfer"
    else:
        name = "engine is pure Python (no compiled build): default vs ASTM_PURE=1"
    if not cfg.wants(name):
        return
    env = {k: v for k, v in os.environ.items() if k != "ASTM_PURE"}
    spec = ("--engine-worker", str(cfg.seconds))
    default, pure = await start_all([spec, spec], [env, {**env, "ASTM_PURE": "1"}])
    try:

        async def subject() -> Result:
            return float(await default.ask("go"))

        async def baseline() -> Result:
            return float(await pure.ask("go"))

        yield Case(
            name,
            subject,
            baseline,
            "tx/s",
            "",
            note=f"default child: {default.ready}; ASTM_PURE=1 child: {pure.ready}",
        )
    finally:
        await pure.close()
        await default.close()
