"""The compiled engine and its pure-Python twin: which one runs, the switch between them, and what compiling changed.

The whole suite runs on both (CI runs it once more with ``ASTM_PURE=1``);
these tests cover what is particular to having two.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from typing import Any

import pytest

import astm
from astm import _engine


def _engine_files(env: dict[str, str]) -> dict[str, Any]:
    """The file each engine module is loaded from, in a fresh process with ``env``."""
    code = (
        "import astm, json, sys\n"
        "mods = {m: sys.modules['astm.' + m].__file__ for m in astm._engine.ENGINE}\n"
        "print(json.dumps({'compiled': astm.compiled, **mods}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_astm_pure_loads_every_engine_module_from_source() -> None:
    """ASTM_PURE=1 gives the .py of every engine module, compiled build or not, and says so."""
    files = _engine_files({**os.environ, "ASTM_PURE": "1"})
    assert files.pop("compiled") is False
    assert all(f.endswith(".py") for f in files.values()), files


def test_one_engine_at_a_time() -> None:
    """By default the engine modules are all compiled or all source: never a mix."""
    env = {k: v for k, v in os.environ.items() if k != "ASTM_PURE"}
    files = _engine_files(env)
    compiled = files.pop("compiled")
    assert {f.endswith(".py") for f in files.values()} == {not compiled}, files


def _should_be_compiled() -> str | None:
    """Why this install may be pure Python (None: it should be compiled)."""
    if _engine.pure_requested():
        return "ASTM_PURE is set"
    if os.environ.get("ASTM_BUILD_PURE", "") not in ("", "0"):
        return "ASTM_BUILD_PURE is set"
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc}) here"
    return None


def test_the_build_is_compiled_where_it_can_be() -> None:
    """A silent fallback to pure Python shows: with a C compiler and no opt-out, the engine runs compiled."""
    why = _should_be_compiled()
    if why is not None:
        pytest.skip(f"the pure-Python engine is expected: {why}")
    assert _engine.stale_build() is None, "an engine .py changed after it was compiled: reinstall (pip install -e .)"
    assert astm.compiled, (
        "the engine is pure Python although a C compiler is here: the install's mypyc build failed "
        "(see its warning), or set ASTM_BUILD_PURE=1 to accept that"
    )


def test_compiled_flag_matches_the_loaded_module() -> None:
    """astm.compiled says which engine this process runs."""
    import astm._tx

    assert astm.compiled is (not (astm._tx.__file__ or "").endswith(".py"))
    if _engine.pure_requested():
        assert not astm.compiled


async def test_sync_body_returning_a_transactional_call_is_awaited() -> None:
    """A plain ``def`` body that returns another ``@transactional`` call gets that call's result.

    Compiled, the runner's coroutine is not a ``types.CoroutineType``: the
    runner must still see that it has to await it, at top level and nested.
    """
    store = astm.Store()
    a = store.ref("a", 0)

    @astm.transactional
    async def bump(n: int) -> int:
        return a.alter(lambda v: v + n)

    @astm.transactional
    def via(n: int) -> Any:
        return bump(n)  # a coroutine of the engine's runner, not awaited here

    assert await via(1) == 1

    @astm.transactional
    async def outer() -> tuple[int, int]:
        first = await via(10)  # nested: joins this transaction
        return first, a.get()

    assert await outer() == (11, 11)
    assert a.get() == 11
    twice = astm.transactional(astm.transactional(bump))
    assert await twice(5) == 16
    assert await store.atomically(lambda: bump(1)) == 17
    assert a.get() == 17


def test_public_functions_keep_docstrings_and_signatures() -> None:
    """The public functions stay plain Python (astm._api), so help() and inspect work on both engines."""
    import inspect

    for fn in (astm.transactional, astm.retry, astm.check, astm.or_else, astm.after_commit, astm.io):
        assert fn.__doc__, fn
        inspect.signature(fn)
    assert inspect.iscoroutinefunction(astm.or_else)


def test_ref_keeps_its_docstring() -> None:
    """Ref's docstring survives compilation (restored from astm._ref._DOC, which must match the source's)."""
    import ast

    from astm import _ref

    with open(os.path.join(os.path.dirname(astm.__file__), "_ref.py"), encoding="utf-8") as f:
        source = ast.parse(f.read())
    cls = next(n for n in source.body if isinstance(n, ast.ClassDef) and n.name == "Ref")
    assert ast.get_docstring(cls, clean=False) == _ref._DOC
    assert astm.Ref.__doc__ == _ref._DOC
