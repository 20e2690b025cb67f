"""Build the transaction engine compiled with mypyc, or fall back to the pure-Python modules.

The engine modules (``ENGINE``) are ordinary, fully typed Python. Where mypyc
and a C compiler work at install, they are also compiled to extension modules
that sit beside the ``.py`` files and are imported instead of them (about a
quarter faster uncontended; see docs/performance.md). Anything that goes wrong
while compiling (no compiler, a mypyc error) is reported as a warning and the
install goes on with the pure-Python engine, which behaves identically.

``ASTM_BUILD_PURE=1`` at install time skips compiling altogether;
``ASTM_PURE=1`` at run time makes a process import the pure-Python modules
even when compiled ones are installed (see ``astm/_engine.py``).
"""

from __future__ import annotations

import ast
import glob
import os
import sys
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _engine_modules() -> tuple[str, ...]:
    """The engine's module names: ``ENGINE`` in astm/_engine.py (read, not imported: no dependencies here)."""
    with open(os.path.join(_HERE, "astm", "_engine.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "ENGINE" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise RuntimeError("astm/_engine.py names no ENGINE")


_HERE = os.path.dirname(os.path.abspath(__file__))
#: the modules on the hot path of a transaction, compiled together (one shared library)
ENGINE = _engine_modules()


def _warn(what: str, exc: BaseException) -> None:
    print(f"astm: {what} ({type(exc).__name__}: {exc}); installing the pure-Python engine", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """``build_ext`` that installs without the compiled engine when the C build fails."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            _warn("compiling the engine failed", exc)
            # all or nothing: a compiled module needs the shared library and its siblings compiled
            for ext in self.extensions:
                path = self.get_ext_fullpath(ext.name)
                if os.path.exists(path):
                    os.remove(path)
            self.extensions = []
            return
        for ext in self.extensions:  # newer than the sources they came from, even if left unchanged
            path = self.get_ext_fullpath(ext.name)
            if os.path.exists(path):
                os.utime(path)


def _remove_compiled() -> None:
    """Delete compiled engine modules an earlier in-place build left here: they would shadow the sources."""
    for path in glob.glob(os.path.join(_HERE, "astm_engine__mypyc.*")) + [
        p for m in ENGINE for p in glob.glob(os.path.join(_HERE, "astm", f"{m}.*")) if not p.endswith(".py")
    ]:
        if os.path.isfile(path):
            os.remove(path)


def _ext_modules() -> list[Any]:
    if sys.argv[1:2] and sys.argv[1] in ("egg_info", "dist_info", "sdist"):
        return []  # metadata only: no need to run mypyc
    if os.environ.get("ASTM_BUILD_PURE", "") not in ("", "0"):
        print("astm: ASTM_BUILD_PURE is set; installing the pure-Python engine", file=sys.stderr)
        _remove_compiled()
        return []
    try:
        from mypyc.build import mypycify

        # errors in the modules the engine imports but that are not compiled (optional extras that
        # may be missing here) are not the compiler's business: CI's mypy --strict checks them
        args = ["--follow-imports=silent", *(f"astm/{m}.py" for m in ENGINE)]
        return list(mypycify(args, opt_level="3", group_name="astm_engine"))
    except (Exception, SystemExit) as exc:  # mypyc reports its own errors by exiting
        _warn("mypyc could not compile the engine", exc)
        _remove_compiled()
        return []


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
