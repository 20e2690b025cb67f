"""The seat-reservation web service (FastAPI on astm.web): JSON API, live page, server-sent events.

Every response carries the basis ``t`` it was read at or committed at in the
``X-Astm-T`` header. A request may send ``X-Astm-Min-T`` (or ``?min_t=``) to be
answered from a state that includes that ``t`` (read-your-writes through
``store.sync``, e.g. behind a load balancer). POST requests accept an
``Idempotency-Key`` header: a client retry never books twice. Errors are
RFC 9457 ``application/problem+json``. The OpenAPI description is at ``/docs``.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import astm
import astm.web

from .domain import ReservationError, Seats

MAX_BODY = 16 * 1024
MAX_SEATS = 8
CUSTOMER_PATTERN = r"^[A-Za-z0-9_.@-]{1,64}$"
_CUSTOMER = re.compile(CUSTOMER_PATTERN)
STATIC = Path(__file__).with_name("static")
#: the ``type`` of the service's own problems (tag URIs: identifiers, not links)
PROBLEM_BASE = "tag:astm-state,2025:seats/"


class Booking(BaseModel):
    """Seats for one customer: reserved (or cancelled) all together or not at all."""

    customer: str = Field(description="1-64 letters, digits or _.@-", examples=["ann"])
    seats: list[str] = Field(description=f"1 to {MAX_SEATS} distinct seat ids", examples=[["A1", "A2"]])

    @field_validator("customer")
    @classmethod
    def _customer(cls, value: str) -> str:
        if not _CUSTOMER.match(value):
            raise ValueError("customer must be 1-64 letters, digits or _.@-")
        return value

    @field_validator("seats")
    @classmethod
    def _seats(cls, value: list[str]) -> list[str]:
        if not 1 <= len(value) <= MAX_SEATS or len(set(value)) != len(value):
            raise ValueError(f'seats must be a list of 1 to {MAX_SEATS} distinct seat ids, like ["A1", "A2"]')
        return value


class Problem(BaseModel):
    """An RFC 9457 problem: what went wrong (``title``), this time (``detail``), and what to do."""

    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None


PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "content": {"application/problem+json": {}}, "description": text}
    for status, text in [
        (404, "unknown show"),
        (409, "seats taken, or not held by this customer"),
        (413, "body too large"),
        (422, "invalid request"),
        (504, "this server is behind X-Astm-Min-T"),
    ]
}

SHOW_MAX = 64
KEY_PATTERN = r"^[\x21-\x7e]{1,128}$"
_KEY = re.compile(KEY_PATTERN)
ShowId = Annotated[str, PathParam(max_length=SHOW_MAX)]
#: the booking endpoints' request in their OpenAPI description (they read it themselves: see ``_booking_request``)
BOOKING_REQUEST: dict[str, Any] = {
    "parameters": [
        {"name": "show", "in": "path", "required": True, "schema": {"type": "string", "maxLength": SHOW_MAX}},
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "pattern": KEY_PATTERN},
            "description": "a retry with the same key replays the first answer and never books twice",
        },
    ],
    "requestBody": {"required": True, "content": {"application/json": {"schema": Booking.model_json_schema()}}},
}
CustomerId = Annotated[str, PathParam(pattern=CUSTOMER_PATTERN)]


StoreDep = Annotated[astm.Store, Depends(astm.web.get_store)]


def create_app(
    store_url: str = "sqlite:///seats.db",
    mail_log: str = "seats-mail.log",
    *,
    sync_timeout: float = 5.0,
    shows: dict[str, tuple[str, int, int]] | None = None,
) -> FastAPI:
    """The ASGI app; its store is opened and closed with the app's lifespan (one store per process).

    ``sync_timeout`` bounds how long a request with X-Astm-Min-T waits for
    this process to catch up before it is answered 504. ``shows`` (id ->
    (title, rows, cols)) are created if the store has no shows yet (default:
    the demo shows).
    """

    def make_store() -> astm.Store:
        # runs in a worker thread (opening a file store replays its log); the effect is registered before it opens
        store = astm.Store(store_url)
        app.state.seats = Seats(store, Path(mail_log))
        return store

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with astm.web.lifespan(make_store)(app):
                await app.state.seats.setup(shows)
                yield
        finally:
            seats: Seats | None = getattr(app.state, "seats", None)
            if seats is not None:
                seats.close()

    app = FastAPI(
        title="astm seats",
        summary="Seat reservations on astm: all-or-none bookings, idempotent retries, live seat maps.",
        lifespan=lifespan,
    )
    app.add_middleware(_BodyLimit, limit=MAX_BODY)
    astm.web.install(app, sync_timeout=sync_timeout)
    _problem_handlers(app)

    def seats() -> Seats:
        return app.state.seats  # type: ignore[no-any-return]

    def answer(body: Any, t: int, status: int = 200) -> JSONResponse:
        # the endpoints build their response themselves: no response model to validate a dict against
        return JSONResponse(body, status, headers={astm.web.T_HEADER: str(t)})

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/shows", summary="Every show and how many seats it has free")
    async def list_shows() -> JSONResponse:
        s = seats()
        t, shows = await s.read(s.list_shows)
        return answer({"shows": shows}, t)

    @app.get("/shows/{show}", summary="One show's seat map: seat id -> customer (null when free)", responses=PROBLEMS)
    async def get_show(show: ShowId) -> JSONResponse:
        s = seats()
        t, described = await s.read(s.describe, show)
        return answer(described, t)

    @app.post(
        "/shows/{show}/reservations",
        status_code=201,
        summary="Reserve seats for a customer, all of them or none",
        responses={**PROBLEMS, 200: {"description": "a replay: the answer to the first request with this key"}},
        openapi_extra=BOOKING_REQUEST,
    )
    async def reserve(request: Request) -> JSONResponse:
        show, booking, key = await _booking_request(request)
        t, result = await seats().reserve(show, booking.customer, booking.seats, key)
        return answer({**result, "t": t}, t, 200 if result.get("replayed") else 201)

    @app.post(
        "/shows/{show}/cancellations",
        summary="Give back seats the customer holds, all or none",
        responses=PROBLEMS,
        openapi_extra=BOOKING_REQUEST,
    )
    async def cancel(request: Request) -> JSONResponse:
        show, booking, key = await _booking_request(request)
        t, result = await seats().cancel(show, booking.customer, booking.seats, key)
        return answer({**result, "t": t}, t)

    @app.get("/customers/{customer}/reservations", summary="The seats a customer holds", responses=PROBLEMS)
    async def customer_reservations(customer: CustomerId) -> JSONResponse:
        s = seats()
        t, held = await s.read(s.reservations, customer)
        return answer({"customer": customer, "reservations": held}, t)

    @app.get("/sales", summary="The sales ledger: every sale and refund")
    async def sales() -> JSONResponse:
        s = seats()
        t, ledger = await s.read(s.ledger)
        return answer(ledger, t)

    @app.get("/stats", summary="This process's store: its counters and how many refs it holds")
    async def stats(store: StoreDep) -> dict[str, Any]:
        s = store.stats()
        return {
            "pid": os.getpid(),
            "t": store.t,
            "refs": len(store.refs()),
            "commits": s.commits,
            "attempts": s.attempts,
            "retries": s.retries,
            "conflicts": [list(c) for c in s.conflicts],
            "cached": s.cached,  # a PostgreSQL peer: the refs it holds, within Store(cache_refs=...)
            "misses": s.misses,
        }

    @app.get(
        "/events",
        summary="Server-sent events: a snapshot of one show's seats, then every change (resumes from Last-Event-ID)",
        responses={404: PROBLEMS[404], 200: {"content": {"text/event-stream": {}}}},
        response_model=None,
    )
    async def events(
        request: Request, store: StoreDep, show: Annotated[str, Query(max_length=SHOW_MAX)] = ""
    ) -> Response:
        service = seats()
        await service.read(service.show, show)  # 404 for an unknown show
        seat_ref = service.seat_map(show)
        await store.load(service.shows, seat_ref)  # a PostgreSQL peer: hold them, so snapshots read them

        def render(item: astm.TxReport[None] | astm.Db) -> dict[str, Any] | None:
            if isinstance(item, astm.Db):
                return {"t": item.t, **service.describe(item, show)}
            for change in item.changes:
                if change.ref is seat_ref:
                    old, new = change.old, change.new
                    diff = {s: new.get(s) for s in set(old) | set(new) if old.get(s) != new.get(s)}
                    return {"t": item.t, "seats": diff}
            return None

        return astm.web.report_events(store, request, render, event="seats")

    return app


async def _booking_request(request: Request) -> tuple[str, Booking, str | None]:
    """A booking POST's show, body and Idempotency-Key, checked as declared parameters would be (422 if not).

    The two booking endpoints are the service's hot path, and FastAPI's
    per-request parameter solving cost about a tenth of the service's time
    there; so they read the request themselves and describe it in
    ``openapi_extra`` (FastAPI's documented way to do so). The errors have the
    same shape as FastAPI's own.
    """
    errors: list[dict[str, Any]] = []
    show: str = request.path_params["show"]
    if len(show) > SHOW_MAX:
        errors.append(_error(("path", "show"), f"String should have at most {SHOW_MAX} characters", "string_too_long"))
    key = request.headers.get("idempotency-key")
    if key is not None and not _KEY.match(key):
        msg = "must be 1 to 128 printable ASCII characters"
        errors.append(_error(("header", "Idempotency-Key"), msg, "string_pattern_mismatch"))
    booking = None
    try:
        booking = Booking.model_validate_json(await request.body())
    except ValidationError as exc:
        errors += [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
    if errors or booking is None:
        raise RequestValidationError(errors)
    return show, booking, key


def _error(loc: tuple[str, ...], msg: str, type: str) -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": type}


def _problem_handlers(app: FastAPI) -> None:
    """The service's own errors, and FastAPI's, as problem+json (astm's come from astm.web.install)."""

    async def domain(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ReservationError)
        return astm.web.problem(
            exc.status,
            exc.title,
            str(exc),
            type=PROBLEM_BASE + exc.code,
            instance=request.url.path,
            code=exc.code,
            **exc.detail,
        )

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors) or "invalid request"
        return astm.web.problem(
            422,
            "Invalid request",
            detail,
            type=PROBLEM_BASE + "invalid",
            instance=request.url.path,
            code="invalid",
            errors=errors,
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        title = HTTPStatus(exc.status_code).phrase
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title else None
        return astm.web.problem(exc.status_code, title, detail, instance=request.url.path, headers=exc.headers)

    app.add_exception_handler(ReservationError, domain)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)


class _BodyLimit:
    """Refuse request bodies larger than ``limit`` bytes with a 413 problem, before any endpoint reads them.

    A body announced too large by Content-Length is refused at once; one
    streamed without it is read up to the limit and handed on in one piece.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away: let the app see it
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await astm.web.problem(
            413,
            "Request body too large",
            f"the body is larger than {self.limit} bytes; a booking is a customer and at most {MAX_SEATS} seats",
            type=PROBLEM_BASE + "too-large",
            instance=scope.get("path"),
        )(scope, receive, send)


def from_env() -> FastAPI:
    """The app configured by ASTM_SEATS_STORE and ASTM_SEATS_MAIL_LOG (for ``uvicorn --workers``)."""
    return create_app(
        os.environ.get("ASTM_SEATS_STORE", "sqlite:///seats.db"),
        os.environ.get("ASTM_SEATS_MAIL_LOG", "seats-mail.log"),
    )
