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

Changes to the big values (a seat map, the ledger, a customer's holdings) go
through astm's collection helpers (``astm.assoc``, ``astm.dissoc``,
``astm.conj``, ``astm.disj``): astm then checks and stores only what changed,
so a commit costs the same on a ledger of ten entries or of a million.
Reads for names that come from clients (a customer id) use
``store.lookup``, which creates nothing: a flood of unknown names costs no
memory. Reads run as read-only transactions (``Seats.read``): one consistent
state that never conflicts, and on a PostgreSQL peer, which holds refs
lazily, a ref it has not loaded yet is fetched rather than refused.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pyrsistent import PMap, PSet, PVector, pmap, pset, pvector

import astm

Key = tuple[int, int]
T = TypeVar("T")
R = TypeVar("R")


class Reader(Protocol):
    """What the read functions read through: a db value (``db[ref]``), or the current transaction."""

    def __getitem__(self, ref: astm.Ref[T], /) -> T: ...


class _InTransaction:
    """The current transaction as a reader: ``reader[ref]`` is ``ref.get()``."""

    def __getitem__(self, ref: astm.Ref[T], /) -> T:
        return ref.get()


IN_TRANSACTION = _InTransaction()

#: how long an Idempotency-Key's answer is kept after its request (a client retries within minutes)
IDEMPOTENCY_TTL = 24 * 3600.0

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

    def has_seat(self, seat: str) -> bool:
        """Whether ``seat`` is one of ``seat_ids()`` (without making them all: a booking checks a few)."""
        row, number = seat[:1], seat[1:]
        return (
            row != ""
            and row in string.ascii_uppercase[: self.rows]
            and number.isascii()
            and number.isdigit()
            and number[0] != "0"
            and int(number) <= self.cols
        )


class ReservationError(Exception):
    """A request the domain refuses; ``status`` says how HTTP should answer."""

    status = 400
    code = "bad_request"
    title = "Bad request"

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.detail = detail


class UnknownShow(ReservationError):
    status, code, title = 404, "unknown_show", "Unknown show"


class Unavailable(ReservationError):
    status, code, title = 409, "unavailable", "Seats unavailable"


class Invalid(ReservationError):
    status, code, title = 422, "invalid", "Invalid request"


class _Recorded(Exception):
    """Internal: a concurrent request with the same Idempotency-Key committed first."""


class Seats:
    """The service's operations, each one transaction."""

    def __init__(self, store: astm.Store, mail_log: Path) -> None:
        self.store = store
        # store.lookup on a PostgreSQL peer sees only the refs that peer holds (it loads them lazily), so
        # there a None is not "no such ref": a read falls back to store.ref, whose handle the peer holds
        # weakly (and caches within Store(cache_refs=...)), so a flood of unknown names costs no memory
        self._lookup_is_local = store.url.startswith(("postgresql:", "postgres:"))
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
        """The customer's holdings ref, created if new: only for a customer who is getting seats."""
        return self.store.ref(f"customer:{customer}", pset())

    def existing_holdings(self, customer: str) -> astm.Ref[PSet[tuple[str, str]]] | None:
        """The customer's holdings ref if the customer ever held a seat, else None; creates nothing."""
        found = self.store.lookup(f"customer:{customer}")  # a name from a client: never create a ref for it
        if found is None and self._lookup_is_local:
            return self.holdings(customer)
        return found

    def idempotency_record(self, key: str) -> astm.Ref[PMap[str, Any] | None]:
        """The ref keeping the answer to the request made with ``key``; it expires after IDEMPOTENCY_TTL."""
        return self.store.ref(f"idem:{key}", None, expire_after=IDEMPOTENCY_TTL)

    async def setup(self, shows: dict[str, tuple[str, int, int]] | None = None) -> None:
        """Create the demo shows if the store has none; records of earlier runs expire as they would have."""
        wanted = shows or DEMO_SHOWS
        await self.store.expire("idem:", after=IDEMPOTENCY_TTL)

        def create() -> None:
            if not self.shows.get():
                self.shows.set(pmap({sid: Show(sid, *spec) for sid, spec in wanted.items()}))

        await self.store.atomically(create)

    # -- reading (one consistent state; never blocks a writer) --------------------------

    async def read(self, fn: Callable[..., R], *args: Any) -> tuple[int, R]:
        """``fn(reader, *args)`` in a read-only transaction; returns (the t it read at, the result).

        A read-only transaction never conflicts and never retries.
        """
        report = await self.store.transact(fn, IN_TRANSACTION, *args)
        return report.db_after.t, report.result

    def show(self, db: Reader, show_id: str) -> Show:
        show = db[self.shows].get(show_id)
        if show is None:
            raise UnknownShow(f"there is no show {show_id!r}", show=show_id)
        return show

    def describe(self, db: Reader, show_id: str) -> dict[str, Any]:
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

    def list_shows(self, db: Reader) -> list[dict[str, Any]]:
        out = []
        for sid, show in sorted(db[self.shows].items()):
            out.append({"id": sid, "title": show.title, "free": show.rows * show.cols - len(db[self.seat_map(sid)])})
        return out

    def reservations(self, db: Reader, customer: str) -> list[dict[str, str]]:
        ref = self.existing_holdings(customer)
        held: PSet[tuple[str, str]] = pset() if ref is None else db[ref]
        return [{"show": s, "seat": seat} for s, seat in sorted(held)]

    def ledger(self, db: Reader) -> dict[str, Any]:
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
            taken_text = f"seat {clash[0]} is" if len(clash) == 1 else f"seats {', '.join(clash)} are"
            raise Unavailable(f"{taken_text} already taken; pick free seats", show=show_id, seats=clash)
        seat_map.alter(astm.conj, *((s, customer) for s in seats))
        self.holdings(customer).alter(astm.conj, *((show_id, s) for s in seats))
        self.sales.commute(
            astm.conj, *(pmap({"kind": "sale", "show": show_id, "seat": s, "customer": customer}) for s in seats)
        )
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
            raise Unavailable(
                f"{customer} does not hold {', '.join(not_held)}; only the customer holding a seat can cancel it",
                seats=not_held,
            )
        seat_map.alter(astm.dissoc, *seats)
        self.holdings(customer).alter(astm.disj, *((show_id, s) for s in seats))
        self.sales.commute(
            astm.conj, *(pmap({"kind": "refund", "show": show_id, "seat": s, "customer": customer}) for s in seats)
        )
        return {"show": show_id, "customer": customer, "cancelled": list(seats)}

    async def _once(self, key: str | None, request: tuple[Any, ...], fn: Any, *args: Any) -> tuple[int, dict[str, Any]]:
        """Run ``fn`` as a transaction; with an idempotency key, at most once per key.

        The answer is recorded in the same transaction as the change it
        describes, so a retry either finds it or runs the request for the
        first time: never twice. A request that fails records nothing (and
        creates no ref): only successes are replayed.
        """

        def replay(done: PMap[str, Any]) -> dict[str, Any]:
            if done["request"] != request:
                raise Invalid("this Idempotency-Key was used for a different request; use a new key", key=key)
            return {**json.loads(done["response"]), "replayed": True}

        def body() -> dict[str, Any]:
            if key is None:
                return fn(*args)  # type: ignore[no-any-return]
            existing: astm.Ref[PMap[str, Any] | None] | None = self.store.lookup(f"idem:{key}")
            if existing is None and self._lookup_is_local:
                existing = self.store.ref(f"idem:{key}", None)  # a peer: the record may be in the database
            done = None if existing is None else existing.get()
            if done is not None:
                return replay(done)
            result: dict[str, Any] = fn(*args)
            record = self.idempotency_record(key)
            done = record.get()
            if done is not None:
                # another request with this key committed after this one looked: undo this attempt, replay that one
                raise _Recorded
            record.set(pmap({"request": request, "response": json.dumps(result)}))
            return result

        for _ in range(3):
            try:
                report = await self.store.transact(body)
            except _Recorded:
                continue
            return report.t, report.result
        raise RuntimeError(f"the answer recorded for Idempotency-Key {key!r} kept changing; send the request again")

    def _show_in_tx(self, show_id: str) -> Show:
        show = self.shows.get().get(show_id)
        if show is None:
            raise UnknownShow(f"there is no show {show_id!r}", show=show_id)
        return show

    @staticmethod
    def _check_seats(show: Show, seats: Iterable[str]) -> None:
        unknown = sorted(s for s in seats if not show.has_seat(s))
        if unknown:
            raise Invalid(f"{show.title} has no seat {', '.join(unknown)}", seats=unknown)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
