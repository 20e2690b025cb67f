"""Atoms: one identity that changes on its own, by compare-and-set.

An atom is simpler than a ref when an invariant spans a single identity. Its
changes are not coordinated with transactions, so ``swap``/``reset`` refuse to
run inside one (a retried body would apply them twice).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ._errors import AtomInTransactionError
from ._tx import _current, _validate_value
from ._values import check_value

__all__ = ["Atom"]

T = TypeVar("T")
log = logging.getLogger("astm")


class Atom(Generic[T]):
    """A named value changed atomically with ``swap`` (retried compare-and-set) or ``reset``."""

    __slots__ = ("__weakref__", "_lock", "_validator", "_value", "_watches", "name")

    def __init__(self, name: str, value: T, validator: Callable[[T], bool] | None) -> None:
        check_value(value, name)
        if validator is not None:
            _validate_value(name, validator, value)
        self.name = name
        self._value = value
        self._validator = validator
        self._watches: dict[Any, Callable[[Any, Atom[T], T, T], Any]] | None = None
        self._lock = threading.Lock()

    def get(self) -> T:
        """The current value."""
        return self._value

    def swap(self, fn: Callable[..., T], *args: Any) -> T:
        """Set the value to ``fn(value, *args)``, retrying ``fn`` if another change lands first.

        ``fn`` may run more than once, so it must be free of side effects.
        """
        if _current.get() is not None:
            raise AtomInTransactionError(self.name, "swap")
        while True:
            old = self._value
            new = fn(old, *args)
            if self._cas(old, new):
                return new

    def reset(self, value: T) -> T:
        """Set the value regardless of what it was."""
        if _current.get() is not None:
            raise AtomInTransactionError(self.name, "reset")
        self._check(value)
        with self._lock:
            old = self._value
            self._value = value
        self._notify(old, value)
        return value

    def compare_and_set(self, old: T, new: T) -> bool:
        """Set to ``new`` only if the current value is ``old`` (by identity); True on success."""
        if _current.get() is not None:
            raise AtomInTransactionError(self.name, "compare_and_set")
        return self._cas(old, new)

    def _cas(self, old: T, new: T) -> bool:
        self._check(new)
        with self._lock:
            if self._value is not old:
                return False
            self._value = new
        self._notify(old, new)
        return True

    def _check(self, value: T) -> None:
        check_value(value, self.name)
        if self._validator is not None:
            _validate_value(self.name, self._validator, value)

    def add_watch(self, key: Any, fn: Callable[[Any, Atom[T], T, T], Any]) -> None:
        """Call ``fn(key, atom, old, new)`` after every change."""
        if not callable(fn):
            raise TypeError(f"add_watch(key, fn): fn must be callable, got {fn!r}")
        if self._watches is None:
            self._watches = {}
        self._watches[key] = fn

    def remove_watch(self, key: Any) -> None:
        if self._watches is not None:
            self._watches.pop(key, None)

    def _notify(self, old: T, new: T) -> None:
        if self._watches:
            for key, fn in list(self._watches.items()):
                try:
                    fn(key, self, old, new)
                except Exception:
                    log.exception("watch %r on atom %r failed", key, self.name)

    def __repr__(self) -> str:
        return f"<astm.Atom {self.name!r} value={self._value!r}>"
