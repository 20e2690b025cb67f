"""Which transaction engine a process runs: the modules compiled with mypyc, or the pure-Python ones.

Where a C compiler was present at install, the engine modules (``ENGINE``)
are also compiled to extension modules that sit beside their ``.py`` files,
and Python's import system prefers an extension module to a source file of
the same name. ``ASTM_PURE=1`` in the environment makes a process import the
``.py`` files anyway: :func:`select` puts a finder first on ``sys.meta_path``
that loads them from source, before anything imports the engine. Both engines
behave identically; the switch is there to measure one against the other and
to test both.

This module imports only the standard library (and ``mypy_extensions`` for the
compiler's class decorator, where it is installed): ``setup.py`` reads
``ENGINE`` from it without importing the package.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

__all__ = ["ENGINE", "compiled", "mypyc_attr", "pure_requested", "select", "stale_build"]

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # not a dependency: only mypyc reads the decorator, when it compiles the engine

    def mypyc_attr(*attrs: str, **kwattrs: object) -> Callable[[Any], Any]:  # type: ignore[misc]
        return lambda cls: cls


#: the engine modules compiled with mypyc, in their package (setup.py compiles ``astm/<name>.py``)
ENGINE = ("_commit", "_timeline", "_tx", "_ref", "codec", "_values", "_markers")
_NAMES = frozenset(f"astm.{m}" for m in ENGINE)


def pure_requested() -> bool:
    """Whether ``ASTM_PURE`` asks for the pure-Python engine (set, and not ``0`` or empty)."""
    return os.environ.get("ASTM_PURE", "") not in ("", "0")


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the engine modules as ``.py`` source files, ignoring compiled ones beside them."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _NAMES or not path:
            return None
        leaf = fullname.rpartition(".")[2]
        for folder in path:
            source = os.path.join(folder, leaf + ".py")
            if os.path.isfile(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None


def stale_build() -> str | None:
    """In a source checkout, an engine module whose ``.py`` changed after it was compiled (else None).

    An editable install builds the extension modules in place; until the next
    install they would shadow every later edit of the sources.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.isfile(os.path.join(here, os.pardir, "setup.py")):
        return None  # an installed wheel: its files were not edited
    for leaf in ENGINE:
        source = os.path.join(here, leaf + ".py")
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            ext = os.path.join(here, leaf + suffix)
            if os.path.isfile(ext) and os.path.isfile(source) and os.path.getmtime(source) > os.path.getmtime(ext):
                return leaf + ".py"
    return None


def select() -> None:
    """Make the engine modules load from source when asked to, or when the compiled ones are stale.

    Runs when this module is imported, which the package's ``__init__`` does
    before anything imports an engine module.
    """
    if any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        return
    if not pure_requested():
        stale = stale_build()
        if stale is None:
            return
        warnings.warn(
            f"astm: {stale} changed after the engine was compiled; running the pure-Python engine "
            "(reinstall, e.g. pip install -e ., to compile it again)",
            RuntimeWarning,
            stacklevel=2,
        )
    sys.meta_path.insert(0, _SourceFinder())


select()


def compiled() -> bool:
    """Whether this process runs the compiled engine (``astm._tx`` is an extension module)."""
    import astm._tx

    return not (astm._tx.__file__ or "").endswith(".py")
