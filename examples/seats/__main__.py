"""Run the seat-reservation service: ``python -m examples.seats [--store URL] [--port 8000]``."""

from __future__ import annotations

import argparse
import os
from typing import Any

import uvicorn

from .app import create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.seats", description=__doc__)
    parser.add_argument("--store", default="sqlite:///seats.db", help="astm store URL (default: %(default)s)")
    parser.add_argument("--mail-log", default="seats-mail.log", help="where confirmations are 'sent'")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes (each a peer: needs a postgresql:// store)"
    )
    args = parser.parse_args(argv)
    if args.workers > 1 and not args.store.startswith(("postgresql://", "postgres://")):
        parser.error("--workers > 1 needs a store shared between processes: --store postgresql://...")
    print(f"seat service on http://{args.host}:{args.port}  (store {args.store})", flush=True)
    common: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "log_level": "warning",
        "timeout_graceful_shutdown": 2,  # live pages hold event streams open
    }
    if args.workers > 1:
        os.environ["ASTM_SEATS_STORE"] = args.store
        os.environ["ASTM_SEATS_MAIL_LOG"] = args.mail_log
        uvicorn.run("examples.seats.app:from_env", factory=True, workers=args.workers, **common)
    else:
        uvicorn.run(create_app(args.store, args.mail_log), **common)


if __name__ == "__main__":
    main()
