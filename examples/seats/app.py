"""The seat-reservation web service (Starlette): JSON API, live page, server-sent events.

Every response carries the basis ``t`` it was read at or committed at in the
``X-Astm-T`` header. A request may send ``X-Astm-Min-T`` (or ``?min_t=``) to be
answered from a state that includes that ``t`` (read-your-writes through
``store.sync``, e.g. behind a load balancer). POST requests accept an
``Idempotency-Key`` header: a client retry never books twice.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import astm

from .domain import Invalid, ReservationError, Seats

MAX_BODY = 16 * 1024
MAX_SEATS = 8
_CUSTOMER = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
STATIC = Path(__file__).with_name("static")


class BodyTooLarge(Exception):
    pass


def create_app(store_url: str = "sqlite:///seats.db", mail_log: str = "seats-mail.log") -> Starlette:
    """The ASGI app; its store is opened and closed with the app's lifespan (one store per process)."""
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = astm.Store(store_url)
        seats = Seats(store, Path(mail_log))
        async with store:
            await seats.setup()
            state["store"], state["seats"] = store, seats
            yield
        seats.close()

    def svc() -> Seats:
        return state["seats"]  # type: ignore[no-any-return]

    async def read_db(request: Request) -> astm.Db:
        raw = request.headers.get("x-astm-min-t") or request.query_params.get("min_t")
        if raw is None:
            return svc().store.db()
        try:
            min_t = int(raw)
        except ValueError:
            raise Invalid("X-Astm-Min-T must be an integer t") from None
        return await svc().store.sync(min_t, timeout=5)

    def answer(body: Any, t: int, status: int = 200) -> JSONResponse:
        return JSONResponse(body, status_code=status, headers={"X-Astm-T": str(t)})

    def error(status: int, code: str, message: str, **detail: Any) -> JSONResponse:
        return JSONResponse(
            {"error": {"code": code, "message": message, **detail}},
            status_code=status,
            headers={"X-Astm-T": str(svc().store.t)},
        )

    async def json_body(request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            raise BodyTooLarge
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise BodyTooLarge
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except ValueError:
            raise Invalid("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise Invalid("the body must be a JSON object")
        return body

    def parse_booking(body: dict[str, Any]) -> tuple[str, list[str]]:
        customer, seats = body.get("customer"), body.get("seats")
        if not isinstance(customer, str) or not _CUSTOMER.match(customer):
            raise Invalid("customer must be 1-64 letters, digits or _.@-")
        if (
            not isinstance(seats, list)
            or not 1 <= len(seats) <= MAX_SEATS
            or not all(isinstance(s, str) for s in seats)
            or len(set(seats)) != len(seats)
        ):
            raise Invalid(f'seats must be a list of 1 to {MAX_SEATS} distinct seat ids, like ["A1", "A2"]')
        return customer, seats

    def guarded(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)  # type: ignore[no-any-return]
            except ReservationError as exc:
                return error(exc.status, exc.code, str(exc), **exc.detail)
            except BodyTooLarge:
                return error(413, "too_large", f"the body is larger than {MAX_BODY} bytes")
            except astm.SyncTimeout as exc:
                return error(504, "behind", str(exc))

        return endpoint

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def list_shows(request: Request) -> Response:
        db = await read_db(request)
        return answer({"shows": svc().list_shows(db)}, db.t)

    async def get_show(request: Request) -> Response:
        db = await read_db(request)
        return answer(svc().describe(db, request.path_params["show"]), db.t)

    async def reserve(request: Request) -> Response:
        customer, seats = parse_booking(await json_body(request))
        t, result = await svc().reserve(
            request.path_params["show"], customer, seats, request.headers.get("idempotency-key")
        )
        return answer({**result, "t": t}, t, 200 if result.get("replayed") else 201)

    async def cancel(request: Request) -> Response:
        customer, seats = parse_booking(await json_body(request))
        t, result = await svc().cancel(
            request.path_params["show"], customer, seats, request.headers.get("idempotency-key")
        )
        return answer({**result, "t": t}, t)

    async def customer_reservations(request: Request) -> Response:
        db = await read_db(request)
        customer = request.path_params["customer"]
        return answer({"customer": customer, "reservations": svc().reservations(db, customer)}, db.t)

    async def sales(request: Request) -> Response:
        db = await read_db(request)
        return answer(svc().ledger(db), db.t)

    async def events(request: Request) -> Response:
        """Server-sent events: a snapshot of one show's seats, then every change as it commits."""
        show_id = request.query_params.get("show", "")
        seats = svc()
        db = seats.store.db()
        seats.show(db, show_id)  # 404 for an unknown show
        seat_ref = seats.seat_map(show_id)

        async def stream() -> AsyncIterator[str]:
            snapshot, since = db, db.t
            while True:
                yield _sse("snapshot", {"t": since, **seats.describe(snapshot, show_id)})
                try:
                    async for rep in seats.store.reports(since=since):
                        since = rep.t
                        for change in rep.changes:
                            if change.ref is seat_ref:
                                old, new = change.old, change.new
                                diff = {s: new.get(s) for s in set(old) | set(new) if old.get(s) != new.get(s)}
                                yield _sse("seats", {"t": rep.t, "seats": diff})
                    return  # the store closed
                except astm.HistoryUnavailable:
                    snapshot = seats.store.db()  # fell behind: start again from a fresh value
                    since = snapshot.t

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Astm-T": str(db.t), "X-Accel-Buffering": "no"},
        )

    routes = [
        Route("/", index),
        Route("/shows", guarded(list_shows)),
        Route("/shows/{show}", guarded(get_show)),
        Route("/shows/{show}/reservations", guarded(reserve), methods=["POST"]),
        Route("/shows/{show}/cancellations", guarded(cancel), methods=["POST"]),
        Route("/customers/{customer}/reservations", guarded(customer_reservations)),
        Route("/sales", guarded(sales)),
        Route("/events", guarded(events)),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.astm = state
    return app


def from_env() -> Starlette:
    """The app configured by ASTM_SEATS_STORE and ASTM_SEATS_MAIL_LOG (for ``uvicorn --workers``)."""
    return create_app(
        os.environ.get("ASTM_SEATS_STORE", "sqlite:///seats.db"),
        os.environ.get("ASTM_SEATS_MAIL_LOG", "seats-mail.log"),
    )


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
