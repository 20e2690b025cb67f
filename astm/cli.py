"""The command line: ``python -m astm inspect state.db`` and ``python -m astm dump state.db``.

Both open the file read-only (they work while a service holds the store) and
change nothing in it.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as _dt
import json
import sqlite3
import sys
import uuid
from decimal import Decimal
from typing import Any

from pyrsistent import PMap, PSet, PVector

from ._errors import AstmError, StorageError
from .stores.sqlite import load, read_only

__all__ = ["main"]


def _plain(value: Any) -> Any:
    """A JSON rendering of a stored value for people and tools (not for reading back)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Decimal | uuid.UUID | _dt.date | _dt.time):
        return str(value) if not isinstance(value, _dt.date | _dt.time) else value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, PMap):
        if all(isinstance(k, str) for k in value):
            return {k: _plain(v) for k, v in value.items()}
        return [[_plain(k), _plain(v)] for k, v in value.items()]
    if isinstance(value, tuple | PVector | frozenset | PSet):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return repr(value)


def inspect(path: str) -> dict[str, Any]:
    """Basis t, ref count, log range, pending and dead outbox entries of a store file."""
    conn = read_only(path)
    try:
        rec, refs = load(conn, path)
        basis = rec.log[-1][0] if rec.log else rec.checkpoint_t
        try:
            lo, hi = conn.execute("SELECT MIN(t), MAX(t) FROM log").fetchone()
            pending = conn.execute("SELECT COUNT(*) FROM outbox WHERE error IS NULL").fetchone()[0]
            dead = conn.execute("SELECT COUNT(*) FROM outbox WHERE error IS NOT NULL").fetchone()[0]
            version = int(conn.execute("SELECT value FROM astm_meta WHERE key = 'schema_version'").fetchone()[0])
        except (sqlite3.Error, ValueError, TypeError) as exc:
            raise StorageError(path, f"the file is damaged ({exc!r})", "restore it from a backup") from exc
    finally:
        conn.close()
    return {
        "path": path,
        "schema_version": version,
        "basis_t": basis,
        "refs": len(refs),
        "log": None if lo is None else [lo, hi],
        "outbox_pending": pending,
        "outbox_dead": dead,
    }


def dump(path: str, out: Any = None) -> None:
    """Print every ref as one JSON line: name, t of its last commit, value."""
    out = out or sys.stdout
    conn = read_only(path)
    try:
        _, refs = load(conn, path)
    finally:
        conn.close()
    for name, (t, value) in sorted(refs.items()):
        out.write(json.dumps({"ref": name, "t": t, "value": _plain(value)}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m astm", description="Look into an astm SQLite store.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("inspect", help="basis t, ref count, log range, outbox").add_argument("path")
    sub.add_parser("dump", help="every ref as a JSON line").add_argument("path")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            info = inspect(args.path)
            log = "empty" if info["log"] is None else f"t {info['log'][0]}..{info['log'][1]}"
            print(f"store       {info['path']} (schema {info['schema_version']})")
            print(f"basis t     {info['basis_t']}")
            print(f"refs        {info['refs']}")
            print(f"log         {log}")
            print(f"outbox      {info['outbox_pending']} pending, {info['outbox_dead']} dead")
        else:
            dump(args.path)
    except AstmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
