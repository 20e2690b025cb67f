"""Run the seat-reservation service: ``python -m examples.seats [--store URL] [--port 8000] [--workers N]``."""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import socket
import sys
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

import astm


class _Server(uvicorn.Server):
    """A uvicorn server that prints the banner once it serves (the store is open, the port listens)."""

    banner: str = ""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            print(self.banner, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.seats", description=__doc__)
    parser.add_argument("--store", default="sqlite:///seats.db", help="astm store URL (default: %(default)s)")
    parser.add_argument("--mail-log", default="seats-mail.log", help="where confirmations are 'sent'")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s; 0 picks a free one)")
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes (each a peer: needs a postgresql:// store)"
    )
    parser.add_argument(
        "--show",
        action="append",
        metavar="ID:TITLE:ROWS:COLS",
        help="a show to create if the store has none (repeatable; rows 1-26; default: the demo shows)",
    )
    args = parser.parse_args(argv)
    shows = _shows(args.show, parser) if args.show else None
    if args.workers > 1 and not args.store.startswith(("postgresql://", "postgres://")):
        parser.error(
            "--workers > 1 needs a store shared between processes: --store postgresql://... "
            "(a SQLite file is opened by one process only)"
        )
    sock = _bind(args.host, args.port, parser)  # first: a port in use fails at once, before anything opens
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{sock.getsockname()[1]}"
    shown = args.store.rsplit("@", 1)[-1]  # no password in the banner
    common: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "log_level": "warning",
        "timeout_graceful_shutdown": 2,  # live pages hold event streams open
    }
    if args.workers > 1:
        if shows is not None:
            parser.error("--show is for a single worker (workers create the demo shows)")
        os.environ["ASTM_SEATS_STORE"] = args.store
        os.environ["ASTM_SEATS_MAIL_LOG"] = args.mail_log
        config = uvicorn.Config("examples.seats.app:from_env", factory=True, workers=args.workers, **common)
        print(f"seat service on {url}  ({args.workers} workers, store {shown})", flush=True)
        supervisor: Any = Multiprocess
        if "target" in inspect.signature(Multiprocess).parameters:  # uvicorn before 0.30
            supervisor = functools.partial(supervisor, target=uvicorn.Server(config).run)
        supervisor(config, sockets=[sock]).run()
        return
    from .app import create_app

    astm.tune_gc()  # the collector out of the way of the transactions in flight (astm.run does this for its own loop)
    server = _Server(uvicorn.Config(create_app(args.store, args.mail_log, shows=shows), **common))
    server.banner = f"seat service on {url}  (store {shown})"
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(3)  # the app did not start (say, the store could not open): uvicorn logged why


def _shows(specs: list[str], parser: argparse.ArgumentParser) -> dict[str, tuple[str, int, int]]:
    """``--show ID:TITLE:ROWS:COLS`` options as create_app's ``shows``."""
    shows = {}
    for spec in specs:
        try:
            sid, rest = spec.split(":", 1)
            title, rows, cols = rest.rsplit(":", 2)
            shape = int(rows), int(cols)
        except ValueError:
            parser.error(f"--show {spec!r}: expected ID:TITLE:ROWS:COLS, like hamlet:Hamlet:6:10")
        if not (sid and 1 <= shape[0] <= 26 and shape[1] >= 1):
            parser.error(f"--show {spec!r}: needs an id, 1 to 26 rows and at least one column")
        shows[sid] = (title, *shape)
    return shows


def _bind(host: str, port: int, parser: argparse.ArgumentParser) -> socket.socket:
    """The listening address, bound (uvicorn listens on it; workers inherit it)."""
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on accepted sockets whose protocol says
    # TCP, and without it a response's headers and body (two writes) meet the client's delayed ACK: 40 ms
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        parser.exit(1, f"cannot listen on {host}:{port}: {exc.strerror}; pick another port with --port\n")
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    main()
