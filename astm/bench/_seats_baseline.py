"""The seat service written without astm: the baseline of the end-to-end seat case.

The same HTTP API as ``examples/seats`` for what the load generator does
(``GET /shows``, ``GET /shows/{show}``, ``POST .../reservations`` with an
optional ``Idempotency-Key``, ``POST .../cancellations``, ``GET /sales``), with
the same JSON shapes and status codes (201 booked, 200 replayed or
cancelled, 404 unknown show, 409 taken or not held, 422 invalid), as a plain
Starlette app: what a competent engineer writes for one process.

State is plain dicts and a list (seat maps, holdings, the sales ledger,
idempotency records) under one ``asyncio.Lock``. Every booking and every
cancellation is one sqlite3 transaction on a file in ``journal_mode=WAL``
with ``synchronous=FULL`` (one fsync each), with the lock held until it is
durable; only then does it change the dicts and answer. So an answer is
never given for a booking that a crash would lose, and a failed write
changes nothing; a refused request writes nothing.

The commit runs on the event loop's own thread. The lock serializes
bookings anyway, and on a 2-core machine this served about 1.3 times the
requests of the same commit handed to a worker thread (``anyio.to_thread``,
two thread hand-offs per booking; ``--commit-in-thread``), although it stalls
every other request through each fsync: the faster of the two is the
baseline.
After each sale a confirmation line is appended to the mail log (as the seat
service's outbox does after commit), so the load generator's checks hold
here too. On start the state is loaded from the file.

Run it with ``python -m astm.bench._seats_baseline --db PATH --mail-log PATH
--show ID:TITLE:ROWS:COLS --port 0``; it prints ``seat baseline on URL`` once
it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import sqlite3
import string
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["Baseline", "ShowSpec", "create_app", "main", "parse_show"]

MAX_SEATS = 8
_CUSTOMER = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")
PROBLEM_BASE = "tag:astm-state,2025:seats/"

SCHEMA = """
CREATE TABLE IF NOT EXISTS seats (show TEXT NOT NULL, seat TEXT NOT NULL, customer TEXT NOT NULL,
                                  PRIMARY KEY (show, seat));
CREATE TABLE IF NOT EXISTS sales (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, show TEXT NOT NULL,
                                  seat TEXT NOT NULL, customer TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, request TEXT NOT NULL, response TEXT NOT NULL);
"""


@dataclass(frozen=True)
class ShowSpec:
    id: str
    title: str
    rows: int
    cols: int

    def seat_ids(self) -> list[str]:
        return [f"{string.ascii_uppercase[r]}{c + 1}" for r in range(self.rows) for c in range(self.cols)]


def parse_show(text: str) -> ShowSpec:
    """``ID:TITLE:ROWS:COLS`` (the seat service's ``--show``)."""
    sid, rest = text.split(":", 1)
    title, rows, cols = rest.rsplit(":", 2)
    return ShowSpec(sid, title, int(rows), int(cols))


class _Refused(Exception):
    def __init__(self, status: int, code: str, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.title, self.detail, self.extra = status, code, title, detail, extra


@dataclass
class Baseline:
    """The state and its file: dicts under one lock, one durable sqlite3 commit per change."""

    db_path: str
    mail_log: str
    shows: dict[str, ShowSpec]
    seat_ids: dict[str, frozenset[str]] = field(default_factory=dict)
    seats: dict[str, dict[str, str]] = field(default_factory=dict)
    holdings: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    sales: list[dict[str, str]] = field(default_factory=list)
    idempotency: dict[str, tuple[list[Any], str]] = field(default_factory=dict)
    t: int = 0
    #: commit in a worker thread (the event loop serves other requests through the fsync) rather than on the loop
    in_thread: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def open(self) -> None:
        self.conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(SCHEMA)
        self.seat_ids = {sid: frozenset(show.seat_ids()) for sid, show in self.shows.items()}
        self.seats = {sid: {} for sid in self.shows}
        for show, seat, customer in self.conn.execute("SELECT show, seat, customer FROM seats"):
            self.seats.setdefault(show, {})[seat] = customer
            self.holdings.setdefault(customer, set()).add((show, seat))
        for kind, show, seat, customer in self.conn.execute("SELECT kind, show, seat, customer FROM sales ORDER BY id"):
            self.sales.append({"kind": kind, "show": show, "seat": seat, "customer": customer})
        for key, request, response in self.conn.execute("SELECT key, request, response FROM idempotency"):
            self.idempotency[key] = (json.loads(request), response)
        self.t = len(self.sales)
        self.mail_fd = os.open(self.mail_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def close(self) -> None:
        self.conn.close()
        os.close(self.mail_fd)

    def _write(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        """One transaction, durable when this returns (WAL, synchronous=FULL)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                self.conn.execute(sql, params)
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    async def _commit(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        if self.in_thread:
            await anyio.to_thread.run_sync(self._write, statements)
        else:
            self._write(statements)

    def _show(self, show_id: str) -> ShowSpec:
        show = self.shows.get(show_id)
        if show is None:
            raise _Refused(404, "unknown_show", "Unknown show", f"there is no show {show_id!r}", show=show_id)
        return show

    def _check_seats(self, show: ShowSpec, seats: list[str]) -> None:
        unknown = sorted(s for s in seats if s not in self.seat_ids[show.id])
        if unknown:
            raise _Refused(422, "invalid", "Invalid request", f"{show.title} has no seat {', '.join(unknown)}",
                           seats=unknown)  # fmt: skip

    def _replay(self, key: str | None, request: list[Any]) -> dict[str, Any] | None:
        if key is None or key not in self.idempotency:
            return None
        first, response = self.idempotency[key]
        if first != request:
            raise _Refused(422, "invalid", "Invalid request",
                           "this Idempotency-Key was used for a different request; use a new key", key=key)  # fmt: skip
        return {**json.loads(response), "replayed": True}

    def _start(
        self, key: str | None, request: list[Any], show_id: str, seats: list[str]
    ) -> tuple[dict[str, Any] | None, ShowSpec, dict[str, str]]:
        """Under the lock: the replayed response of ``key`` if it was seen, else the show checked and its seats."""
        replayed = self._replay(key, request)
        show = self._show(show_id)
        if replayed is None:
            self._check_seats(show, seats)
        return replayed, show, self.seats[show_id]

    @staticmethod
    def _remember(key: str | None, request: list[Any], result: dict[str, Any]) -> list[tuple[str, tuple[Any, ...]]]:
        """The write that records an Idempotency-Key's request and response (none without a key); last in a commit."""
        if key is None:
            return []
        return [("INSERT INTO idempotency VALUES (?, ?, ?)", (key, json.dumps(request), json.dumps(result)))]

    async def reserve(
        self, show_id: str, customer: str, seats: list[str], key: str | None
    ) -> tuple[int, dict[str, Any]]:
        request = ["reserve", show_id, customer, seats]
        async with self.lock:
            replayed, show, taken = self._start(key, request, show_id, seats)
            if replayed is not None:
                return self.t, replayed
            clash = sorted(s for s in seats if s in taken)
            if clash:
                if len(taken) == show.rows * show.cols:
                    raise _Refused(409, "unavailable", "Seats unavailable", f"{show.title} is sold out", show=show_id)
                text = f"seat {clash[0]} is" if len(clash) == 1 else f"seats {', '.join(clash)} are"
                raise _Refused(409, "unavailable", "Seats unavailable", f"{text} already taken; pick free seats",
                               show=show_id, seats=clash)  # fmt: skip
            result = {"show": show_id, "customer": customer, "seats": seats}
            writes: list[tuple[str, tuple[Any, ...]]] = []
            for s in seats:
                writes.append(("INSERT INTO seats VALUES (?, ?, ?)", (show_id, s, customer)))
                writes.append(("INSERT INTO sales (kind, show, seat, customer) VALUES ('sale', ?, ?, ?)",
                               (show_id, s, customer)))  # fmt: skip
            writes.extend(self._remember(key, request, result))
            await self._commit(writes)
            for s in seats:
                taken[s] = customer
                self.sales.append({"kind": "sale", "show": show_id, "seat": s, "customer": customer})
            self.holdings.setdefault(customer, set()).update((show_id, s) for s in seats)
            if key is not None:
                self.idempotency[key] = (request, json.dumps(result))
            self.t += 1
            t = self.t
        mail = {"key": f"{t}:0", "kind": "confirmation", "show": show_id, "seats": seats, "customer": customer}
        os.write(self.mail_fd, (json.dumps(mail, sort_keys=True) + "\n").encode())
        return t, result

    async def cancel(
        self, show_id: str, customer: str, seats: list[str], key: str | None
    ) -> tuple[int, dict[str, Any]]:
        request = ["cancel", show_id, customer, seats]
        async with self.lock:
            replayed, _, taken = self._start(key, request, show_id, seats)
            if replayed is not None:
                return self.t, replayed
            not_held = sorted(s for s in seats if taken.get(s) != customer)
            if not_held:
                raise _Refused(409, "unavailable", "Seats unavailable",
                               f"{customer} does not hold {', '.join(not_held)}; only the customer holding a seat "
                               "can cancel it", seats=not_held)  # fmt: skip
            result = {"show": show_id, "customer": customer, "cancelled": seats}
            writes: list[tuple[str, tuple[Any, ...]]] = []
            for s in seats:
                writes.append(("DELETE FROM seats WHERE show = ? AND seat = ?", (show_id, s)))
                writes.append(("INSERT INTO sales (kind, show, seat, customer) VALUES ('refund', ?, ?, ?)",
                               (show_id, s, customer)))  # fmt: skip
            writes.extend(self._remember(key, request, result))
            await self._commit(writes)
            for s in seats:
                del taken[s]
                self.sales.append({"kind": "refund", "show": show_id, "seat": s, "customer": customer})
            self.holdings[customer].difference_update((show_id, s) for s in seats)
            if key is not None:
                self.idempotency[key] = (request, json.dumps(result))
            self.t += 1
            return self.t, result

    def describe(self, show_id: str) -> dict[str, Any]:
        show = self._show(show_id)
        taken = self.seats[show_id]
        return {
            "id": show.id,
            "title": show.title,
            "rows": show.rows,
            "cols": show.cols,
            "free": show.rows * show.cols - len(taken),
            "seats": {seat: taken.get(seat) for seat in show.seat_ids()},
        }


class _Problem(JSONResponse):
    media_type = "application/problem+json"


def _problem(status: int, code: str, title: str, detail: str, instance: str, **extra: Any) -> Response:
    body = {"type": PROBLEM_BASE + code, "title": title, "status": status, "detail": detail, "instance": instance,
            "code": code, **extra}  # fmt: skip
    return _Problem(body, status_code=status)


async def _booking(request: Request) -> tuple[str, list[str], str | None]:
    """(customer, seats, idempotency key) from a request, or _Refused 422."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    customer = body.get("customer") if isinstance(body, dict) else None
    seats = body.get("seats") if isinstance(body, dict) else None
    if not isinstance(customer, str) or not _CUSTOMER.match(customer):
        raise _Refused(
            422, "invalid", "Invalid request", "body.customer: customer must be 1-64 letters, digits or _.@-"
        )
    if (
        not isinstance(seats, list)
        or not 1 <= len(seats) <= MAX_SEATS
        or not all(isinstance(s, str) for s in seats)
        or len(set(seats)) != len(seats)
    ):
        raise _Refused(422, "invalid", "Invalid request", f"body.seats: seats must be a list of 1 to {MAX_SEATS} "
                       'distinct seat ids, like ["A1", "A2"]')  # fmt: skip
    key = request.headers.get("idempotency-key")
    if key is not None and not _KEY.match(key):
        raise _Refused(422, "invalid", "Invalid request", "Idempotency-Key: 1 to 128 printable ASCII characters")
    return customer, seats, key


def create_app(db_path: str, mail_log: str, shows: list[ShowSpec], *, in_thread: bool = False) -> Starlette:
    """The baseline ASGI app on the sqlite3 file ``db_path`` (opened and loaded with the app's lifespan)."""
    state = Baseline(db_path, mail_log, {s.id: s for s in shows}, in_thread=in_thread)

    def answer(body: dict[str, Any], status: int = 200, t: int | None = None) -> Response:
        return JSONResponse(body, status_code=status, headers={"X-Astm-T": str(state.t if t is None else t)})

    async def list_shows(request: Request) -> Response:
        shows = [{"id": sid, "title": s.title, "free": s.rows * s.cols - len(state.seats[sid])}
                 for sid, s in sorted(state.shows.items())]  # fmt: skip
        return answer({"shows": shows})

    async def get_show(request: Request) -> Response:
        try:
            return answer(state.describe(request.path_params["show"]))
        except _Refused as exc:
            return _problem(exc.status, exc.code, exc.title, exc.detail, request.url.path, **exc.extra)

    async def reserve(request: Request) -> Response:
        try:
            customer, seats, key = await _booking(request)
            t, result = await state.reserve(request.path_params["show"], customer, seats, key)
        except _Refused as exc:
            return _problem(exc.status, exc.code, exc.title, exc.detail, request.url.path, **exc.extra)
        return answer({**result, "t": t}, 200 if result.get("replayed") else 201, t)

    async def cancel(request: Request) -> Response:
        try:
            customer, seats, key = await _booking(request)
            t, result = await state.cancel(request.path_params["show"], customer, seats, key)
        except _Refused as exc:
            return _problem(exc.status, exc.code, exc.title, exc.detail, request.url.path, **exc.extra)
        return answer({**result, "t": t}, 200, t)

    async def reservations(request: Request) -> Response:
        customer = request.path_params["customer"]
        held = sorted(state.holdings.get(customer, ()))
        return answer({"customer": customer, "reservations": [{"show": s, "seat": seat} for s, seat in held]})

    async def sales(request: Request) -> Response:
        entries = list(state.sales)
        sold = sum(1 if e["kind"] == "sale" else -1 for e in entries)
        return answer({"entries": entries, "seats_sold": sold})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(state.open)
        try:
            yield
        finally:
            state.close()

    return Starlette(
        routes=[
            Route("/shows", list_shows),
            Route("/shows/{show}", get_show),
            Route("/shows/{show}/reservations", reserve, methods=["POST"]),
            Route("/shows/{show}/cancellations", cancel, methods=["POST"]),
            Route("/customers/{customer}/reservations", reservations),
            Route("/sales", sales),
        ],
        lifespan=lifespan,
    )


class _Server(uvicorn.Server):
    banner = ""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            print(self.banner, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m astm.bench._seats_baseline", description=__doc__)
    parser.add_argument("--db", required=True, help="the sqlite3 file")
    parser.add_argument("--mail-log", required=True)
    parser.add_argument("--show", action="append", required=True, help="ID:TITLE:ROWS:COLS (repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--commit-in-thread", action="store_true", help="commit in a worker thread, not on the loop")
    args = parser.parse_args(argv)
    # IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when the protocol says TCP (as the seat service)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    app = create_app(args.db, args.mail_log, [parse_show(s) for s in args.show], in_thread=args.commit_in_thread)
    # the seat service's uvicorn settings (examples/seats/__main__.py)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2)
    server = _Server(config)
    server.banner = f"seat baseline on http://{args.host}:{sock.getsockname()[1]}"
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(3)


if __name__ == "__main__":
    main()
