"""The seat-reservation domain: shows, seat maps, a sales ledger, confirmations.

State lives in astm refs, one identity per thing that changes on its own:

* ``shows``: every show's title and size (a pmap of frozen ``Show`` values);
* ``seats:<show>``: that show's seat map, seat id -> customer (free seats absent);
* ``customer:<id>``: the (show, seat) pairs a customer holds;
* ``sales``: the ledger, appended with ``commute`` (entries need no order);
* ``idem:<key>``: the response to a request made with an Idempotency-Key.

Reserving several seats is one transaction: all of them or none. Each sale
enqueues a confirmation on the outbox, delivered after commit; the mail
"service" (a log file) drops duplicates by idempotency key.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyrsistent import PMap, PSet, PVector, pmap, pset, pvector

import astm

Key = tuple[int, int]

DEMO_SHOWS = {
    "hamlet": ("Hamlet", 6, 10),
    "tempest": ("The Tempest", 5, 8),
    "lear": ("King Lear", 4, 6),
}


@dataclass(frozen=True)
class Show:
    id: str
    title: str
    rows: int
    cols: int

    def seat_ids(self) -> list[str]:
        return [f"{string.ascii_uppercase[r]}{c + 1}" for r in range(self.rows) for c in range(self.cols)]


class ReservationError(Exception):
    """A request the domain refuses; ``status`` says how HTTP should answer."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.detail = detail


class UnknownShow(ReservationError):
    status, code = 404, "unknown_show"


class Unavailable(ReservationError):
    status, code = 409, "unavailable"


class Invalid(ReservationError):
    status, code = 422, "invalid"


class Seats:
    """The service's operations, each one transaction."""

    def __init__(self, store: astm.Store, mail_log: Path) -> None:
        self.store = store
        self.shows: astm.Ref[PMap[str, Show]] = store.ref("shows", pmap())
        self.sales: astm.Ref[PVector[PMap[str, Any]]] = store.ref("sales", pvector())
        self.mail_log = mail_log
        self._mailed = self._load_mail_keys()
        self._mail_fd = os.open(mail_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

        @store.effect("send-confirmation", backoff=0.05)
        async def send_confirmation(message: PMap[str, Any], *, key: Key) -> None:
            # the mail service is idempotent on the key: a redelivery sends nothing twice
            k = f"{key[0]}:{key[1]}"
            if k in self._mailed:
                return
            line = {"key": k, **{f: _plain(v) for f, v in message.items()}}
            os.write(self._mail_fd, (json.dumps(line, sort_keys=True) + "\n").encode())
            self._mailed.add(k)

        self.send_confirmation = send_confirmation

    def _load_mail_keys(self) -> set[str]:
        if not self.mail_log.exists():
            return set()
        return {json.loads(line)["key"] for line in self.mail_log.read_text().splitlines() if line.strip()}

    def close(self) -> None:
        os.close(self._mail_fd)

    # -- refs ----------------------------------------------------------------

    def seat_map(self, show_id: str) -> astm.Ref[PMap[str, str]]:
        return self.store.ref(f"seats:{show_id}", pmap())

    def holdings(self, customer: str) -> astm.Ref[PSet[tuple[str, str]]]:
        return self.store.ref(f"customer:{customer}", pset())

    async def setup(self, shows: dict[str, tuple[str, int, int]] | None = None) -> None:
        """Create the demo shows if the store has none."""
        wanted = shows or DEMO_SHOWS

        def create() -> None:
            if not self.shows.get():
                self.shows.set(pmap({sid: Show(sid, *spec) for sid, spec in wanted.items()}))

        await self.store.atomically(create)

    # -- reading (from a db value: consistent, never blocks a writer) ----------------

    def show(self, db: astm.Db, show_id: str) -> Show:
        show = db[self.shows].get(show_id)
        if show is None:
            raise UnknownShow(f"there is no show {show_id!r}", show=show_id)
        return show

    def describe(self, db: astm.Db, show_id: str) -> dict[str, Any]:
        show = self.show(db, show_id)
        taken = db[self.seat_map(show_id)]
        return {
            "id": show.id,
            "title": show.title,
            "rows": show.rows,
            "cols": show.cols,
            "free": show.rows * show.cols - len(taken),
            "seats": {seat: taken.get(seat) for seat in show.seat_ids()},
        }

    def list_shows(self, db: astm.Db) -> list[dict[str, Any]]:
        out = []
        for sid, show in sorted(db[self.shows].items()):
            out.append({"id": sid, "title": show.title, "free": show.rows * show.cols - len(db[self.seat_map(sid)])})
        return out

    def reservations(self, db: astm.Db, customer: str) -> list[dict[str, str]]:
        held: PSet[tuple[str, str]] = db[self.holdings(customer)]
        return [{"show": s, "seat": seat} for s, seat in sorted(held)]

    def ledger(self, db: astm.Db) -> dict[str, Any]:
        entries = [dict(e) for e in db[self.sales]]
        sold = sum(1 for e in entries if e["kind"] == "sale") - sum(1 for e in entries if e["kind"] == "refund")
        return {"entries": entries, "seats_sold": sold}

    # -- changing (transactions) --------------------------------------------------

    async def reserve(
        self, show_id: str, customer: str, seats: list[str], idempotency_key: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Reserve all of ``seats`` for ``customer``, or none; returns (t, reservation)."""
        request = ("reserve", show_id, customer, tuple(seats))
        return await self._once(idempotency_key, request, self._reserve, show_id, customer, seats)

    def _reserve(self, show_id: str, customer: str, seats: list[str]) -> dict[str, Any]:
        show = self._show_in_tx(show_id)
        self._check_seats(show, seats)
        seat_map = self.seat_map(show_id)
        taken = seat_map.get()
        clash = sorted(s for s in seats if s in taken)
        if clash:
            if len(taken) == show.rows * show.cols:
                raise Unavailable(f"{show.title} is sold out", show=show_id)
            raise Unavailable(f"seats {', '.join(clash)} are already taken", show=show_id, seats=clash)
        seat_map.set(taken.update({s: customer for s in seats}))
        self.holdings(customer).alter(lambda h: h.update((show_id, s) for s in seats))
        for s in seats:
            self.sales.commute(_append, pmap({"kind": "sale", "show": show_id, "seat": s, "customer": customer}))
        self.send_confirmation.enqueue(
            pmap({"kind": "confirmation", "show": show_id, "seats": tuple(seats), "customer": customer})
        )
        return {"show": show_id, "customer": customer, "seats": list(seats)}

    async def cancel(
        self, show_id: str, customer: str, seats: list[str], idempotency_key: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Give back seats the customer holds; returns (t, cancellation)."""
        request = ("cancel", show_id, customer, tuple(seats))
        return await self._once(idempotency_key, request, self._cancel, show_id, customer, seats)

    def _cancel(self, show_id: str, customer: str, seats: list[str]) -> dict[str, Any]:
        show = self._show_in_tx(show_id)
        self._check_seats(show, seats)
        seat_map = self.seat_map(show_id)
        taken = seat_map.get()
        not_held = sorted(s for s in seats if taken.get(s) != customer)
        if not_held:
            raise Unavailable(f"{customer} does not hold {', '.join(not_held)}", seats=not_held)
        freed = taken.evolver()
        for s in seats:
            freed.remove(s)
        seat_map.set(freed.persistent())
        self.holdings(customer).alter(lambda h: h.difference((show_id, s) for s in seats))
        for s in seats:
            self.sales.commute(_append, pmap({"kind": "refund", "show": show_id, "seat": s, "customer": customer}))
        return {"show": show_id, "customer": customer, "cancelled": list(seats)}

    async def _once(self, key: str | None, request: tuple[Any, ...], fn: Any, *args: Any) -> tuple[int, dict[str, Any]]:
        """Run ``fn`` as a transaction; with an idempotency key, at most once per key."""

        def body() -> dict[str, Any]:
            if key is None:
                return fn(*args)  # type: ignore[no-any-return]
            record: astm.Ref[PMap[str, Any] | None] = self.store.ref(f"idem:{key}", None)
            done = record.get()
            if done is not None:
                if done["request"] != request:
                    raise Invalid("this Idempotency-Key was used for a different request", key=key)
                return {**json.loads(done["response"]), "replayed": True}
            result: dict[str, Any] = fn(*args)
            record.set(pmap({"request": request, "response": json.dumps(result)}))
            return result

        report = await self.store.transact(body)
        return report.t, report.result

    def _show_in_tx(self, show_id: str) -> Show:
        show = self.shows.get().get(show_id)
        if show is None:
            raise UnknownShow(f"there is no show {show_id!r}", show=show_id)
        return show

    @staticmethod
    def _check_seats(show: Show, seats: Iterable[str]) -> None:
        valid = set(show.seat_ids())
        unknown = sorted(s for s in seats if s not in valid)
        if unknown:
            raise Invalid(f"{show.title} has no seat {', '.join(unknown)}", seats=unknown)


def _append(ledger: PVector[Any], entry: Any) -> PVector[Any]:
    return ledger.append(entry)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
