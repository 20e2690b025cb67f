"""astm in Starlette and FastAPI apps: lifespan, read-your-writes headers, problem+json errors, live reports.

Install the extra (``pip install 'astm-state[web]'``), then::

    import astm, astm.web
    from fastapi import Depends, FastAPI

    store = astm.Store("sqlite:///state.db")
    app = FastAPI(lifespan=astm.web.lifespan(store))
    astm.web.install(app)

    @app.get("/hits")
    async def hits(store: astm.Store = Depends(astm.web.get_store)) -> dict[str, int]: ...

Everything here is pure ASGI (no ``BaseHTTPMiddleware``), so streaming
responses and server-sent events go through untouched. ``import astm`` never
imports this module: ``import astm.web`` is the opt-in.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._db import Db, TxReport
from ._errors import (
    AstmError,
    CodecError,
    CommitOutcomeUnknown,
    HistoryUnavailable,
    MutableValueError,
    NotInTransactionError,
    RefNotLoaded,
    RetryLimitExceeded,
    StorageError,
    StoreClosed,
    SyncTimeout,
    ValidationError,
)
from ._store import Store

__all__ = ["PROBLEM_TYPES", "get_store", "install", "lifespan", "problem", "report_events"]

log = logging.getLogger("astm.web")

#: the header a response's basis t is in, and the one a request asks for a basis with
T_HEADER = "X-Astm-T"
MIN_T_HEADER = "X-Astm-Min-T"
_T_KEY = T_HEADER.lower().encode()
_MIN_T_KEY = MIN_T_HEADER.lower().encode()
#: where the store lives on the app (``app.state.astm_store``) and on each request's scope
_STATE_KEY = "astm_store"
_SCOPE_KEY = "astm.store"
_T_VALUE = re.compile(r"[0-9]{1,18}")


def _type(slug: str) -> str:
    return f"tag:astm-state,2025:{slug}"


#: the ``type`` of every problem astm.web answers with: stable identifiers to match on (tag URIs, not links)
PROBLEM_TYPES: Mapping[str, str] = {
    slug: _type(slug)
    for slug in (
        "validation-failed",
        "retry-limit-exceeded",
        "sync-timeout",
        "store-closed",
        "history-unavailable",
        "not-in-transaction",
        "mutable-value",
        "codec",
        "ref-not-loaded",
        "commit-outcome-unknown",
        "storage-unavailable",
        "astm-error",
        "bad-min-t",
    )
}


class _ProblemResponse(JSONResponse):
    media_type = "application/problem+json"


def problem(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    type: str = "about:blank",
    instance: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    """An RFC 9457 ``application/problem+json`` response: ``type``, ``title``, ``status``, ``detail``, extensions.

    ``title`` is short and the same for every occurrence of the problem;
    ``detail`` says what went wrong this time and what to do about it.
    Extension members (``seats=["A2"]``) must be JSON values.
    """
    body: dict[str, Any] = {"type": type, "title": title, "status": status}
    if detail is not None:
        body["detail"] = detail
    if instance is not None:
        body["instance"] = instance
    body.update(extensions)
    return _ProblemResponse(body, status_code=status, headers=dict(headers or {}))


# -- the store on the app --------------------------------------------------------------------


def lifespan(
    store: Store | Callable[[], Store], *, close_timeout: float | None = 10.0
) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """A lifespan for ``FastAPI(lifespan=...)`` / ``Starlette(lifespan=...)`` that opens and closes ``store``.

    On startup it opens the store (``await store.open()``) and puts it on
    ``app.state.astm_store``, where :func:`get_store` and :func:`install` find
    it. On shutdown it closes it: new work is refused, agents and the outbox
    are drained for at most ``close_timeout`` seconds, report streams end.

    ``store`` may be a function that makes the store (``lambda:
    astm.Store("sqlite:///state.db")``): it is called in a worker thread,
    because opening a file store replays its log, which blocks. Register the
    store's effects in that function, before the store opens and resumes
    their deliveries.

    To open more than the store, enter it from your own lifespan::

        @asynccontextmanager
        async def app_lifespan(app):
            async with astm.web.lifespan(store)(app):
                ...  # the store is open here
                yield
    """

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[None]:
        opened = store if isinstance(store, Store) else await anyio.to_thread.run_sync(_make, store)
        try:
            await opened.open()
        except BaseException:
            with contextlib.suppress(Exception):  # release what it holds (a file lock, connections)
                await opened.aclose(timeout=0)
            raise
        state = getattr(app, "state", None)
        if state is not None:
            setattr(state, _STATE_KEY, opened)
        try:
            yield
        finally:
            await opened.aclose(timeout=close_timeout)

    return run


def _make(factory: Callable[[], Store]) -> Store:
    made = factory()
    if not isinstance(made, Store):
        raise TypeError(
            f"astm.web.lifespan(factory): the factory must return an astm.Store, got {type(made).__name__}; "
            "pass the store itself or a function that makes one"
        )
    return made


async def get_store(conn: HTTPConnection) -> Store:
    """The app's store, for ``Depends(astm.web.get_store)``; in plain Starlette ``await get_store(request)``.

    It is ``async`` so that FastAPI calls it on the event loop (a plain
    function dependency would cost a worker-thread hop on every request).
    """
    found = conn.scope.get(_SCOPE_KEY) or _app_store(conn.scope.get("app"))
    if found is None:
        raise RuntimeError(
            "this app has no astm store: create it with lifespan=astm.web.lifespan(store), "
            "or call astm.web.install(app, store)"
        )
    return found


def _app_store(app: Any) -> Store | None:
    state = getattr(app, "state", None)
    found = getattr(state, _STATE_KEY, None)
    return found if isinstance(found, Store) else None


# -- the middleware and the error handlers -------------------------------------------------------


def install(app: Starlette, store: Store | None = None, *, sync_timeout: float = 5.0) -> None:
    """Add astm's middleware and exception handlers to a Starlette or FastAPI app (before it starts).

    * Every HTTP response gets ``X-Astm-T``: the store's basis when the
      response starts, so it includes the request's own commits (a response
      that already set the header keeps its own).
    * A request with ``X-Astm-Min-T: t`` (or ``?min_t=t``) waits until the
      store includes ``t`` (``store.sync``, at most ``sync_timeout`` seconds)
      before the endpoint runs: read-your-writes across processes. A ``t``
      that is not a non-negative integer is a 422 problem; running out of time
      is a 504.
    * astm's errors become RFC 9457 problem+json responses (see
      ``docs/web.md`` for the table).

    ``store`` defaults to the one :func:`lifespan` puts on ``app.state``.
    """
    if store is not None:
        setattr(app.state, _STATE_KEY, store)
    app.add_middleware(_AstmMiddleware, owner=app, store=store, sync_timeout=sync_timeout)
    for exc_class in _ERRORS:
        app.add_exception_handler(exc_class, _handle_astm_error)


@dataclass(frozen=True)
class _Mapping:
    status: int
    slug: str
    title: str
    #: the detail for the client; None: the error's own message (only in debug for a 500)
    detail: Callable[[Any], str] | None = None
    retry_after: bool = False


_ERRORS: dict[type[AstmError], _Mapping] = {
    ValidationError: _Mapping(
        409,
        "validation-failed",
        "A validator refused the change",
        lambda e: (
            f"the new value of {e.name!r} was refused by its validator; nothing was committed. "
            "Check the request against the current state and send it again"
        ),
    ),
    RetryLimitExceeded: _Mapping(
        503,
        "retry-limit-exceeded",
        "Too much contention: the transaction gave up",
        lambda e: (
            f"the transaction conflicted with others on each of its {e.attempts} attempts and "
            "committed nothing; send the request again after Retry-After seconds"
        ),
        retry_after=True,
    ),
    SyncTimeout: _Mapping(
        504,
        "sync-timeout",
        "This server is behind the requested t",
        lambda e: (
            f"this server is at t={e.basis}, {e.t - e.basis} commit(s) behind the requested t={e.t}, "
            "and did not catch up in time; send the request again (or to another server)"
        ),
        retry_after=True,
    ),
    StoreClosed: _Mapping(
        503,
        "store-closed",
        "The store is closed",
        lambda e: (
            "this server's store is closed (it is shutting down); send the request again, another server may answer it"
        ),
        retry_after=True,
    ),
    HistoryUnavailable: _Mapping(
        410,
        "history-unavailable",
        "That point in history is no longer kept",
        lambda e: (
            f"t={e.t} is older than the history this server keeps (the oldest t it has is {e.oldest}); "
            "start again from the current state"
        ),
    ),
    CommitOutcomeUnknown: _Mapping(
        500,
        "commit-outcome-unknown",
        "The outcome of the commit is unknown",
        lambda e: (
            "the commit may or may not have happened; read the current state before sending the "
            "request again (an Idempotency-Key makes a retry safe)"
        ),
    ),
    StorageError: _Mapping(
        503,
        "storage-unavailable",
        "The store's storage failed",
        lambda e: "the store could not read or write its storage; nothing was committed. Send the request again later",
        retry_after=True,
    ),
    NotInTransactionError: _Mapping(500, "not-in-transaction", "The server changed state outside a transaction"),
    MutableValueError: _Mapping(500, "mutable-value", "The server offered a mutable value to the store"),
    CodecError: _Mapping(500, "codec", "The server offered a value the store cannot keep"),
    RefNotLoaded: _Mapping(500, "ref-not-loaded", "The server read a ref this peer has not loaded"),
    AstmError: _Mapping(500, "astm-error", "The server misused astm"),
}


def _mapping_of(exc: BaseException) -> _Mapping:
    for cls in type(exc).__mro__:
        found = _ERRORS.get(cls)
        if found is not None:
            return found
    return _ERRORS[AstmError]


def _extensions(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, SyncTimeout):
        return {"min_t": exc.t, "basis": exc.basis, "behind": exc.t - exc.basis}
    if isinstance(exc, HistoryUnavailable):
        return {"t": exc.t, "oldest": exc.oldest}
    if isinstance(exc, ValidationError):
        return {"ref": exc.name}
    if isinstance(exc, RetryLimitExceeded):
        return {"attempts": exc.attempts}
    return {}


def _problem_for(exc: AstmError, *, debug: bool, instance: str | None = None) -> JSONResponse:
    m = _mapping_of(exc)
    if m.detail is not None:
        detail = m.detail(exc)
    elif debug:
        detail = str(exc)
    else:
        detail = f"the server hit a bug ({type(exc).__name__}); its log has the details"
    if m.status >= 500 and not m.retry_after:
        log.error("%s answered %d: %s", instance or "a request", m.status, exc, exc_info=exc)
    headers = {"Retry-After": "1"} if m.retry_after else None
    return problem(
        m.status, m.title, detail, type=_type(m.slug), instance=instance, headers=headers, **_extensions(exc)
    )


async def _handle_astm_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AstmError)
    debug = bool(getattr(request.app, "debug", False))
    return _problem_for(exc, debug=debug, instance=request.url.path)


class _AstmMiddleware:
    """X-Astm-T on every response; X-Astm-Min-T / ``min_t`` waits before the endpoint (pure ASGI)."""

    def __init__(self, app: ASGIApp, owner: Starlette, store: Store | None, sync_timeout: float) -> None:
        self.app = app
        self.owner = owner
        self.store = store
        self.sync_timeout = sync_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        store = self.store or _app_store(self.owner)
        if store is None:
            await problem(
                503,
                "The store is not open",
                "this app's astm store is not open yet (or no longer); send the request again shortly",
                type=_type("store-closed"),
                headers={"Retry-After": "1"},
            )(scope, receive, send)
            return
        scope[_SCOPE_KEY] = store
        path = scope.get("path")

        async def send_with_t(message: Message) -> None:
            if message["type"] == "http.response.start":
                raw = message.get("headers")
                if raw is None:
                    message["headers"] = [(_T_KEY, str(store.t).encode())]
                elif not any(key.lower() == _T_KEY for key, _ in raw):
                    message["headers"] = [*raw, (_T_KEY, str(store.t).encode())]
            await send(message)

        try:
            min_t = _min_t(scope)
        except ValueError as exc:
            await problem(422, "Invalid min_t", str(exc), type=_type("bad-min-t"), instance=path)(
                scope, receive, send_with_t
            )
            return
        if min_t is not None and min_t > store.t:
            try:
                await store.sync(min_t, timeout=self.sync_timeout)
            except (SyncTimeout, StoreClosed) as exc:
                await _problem_for(exc, debug=False, instance=path)(scope, receive, send_with_t)
                return
        await self.app(scope, receive, send_with_t)


def _min_t(scope: Scope) -> int | None:
    """The t a request asks for (the larger of the header and the query parameter), or None.

    It reads the raw ASGI headers and query string: this runs on every request.
    """
    header = next((value for key, value in scope["headers"] if key.lower() == _MIN_T_KEY), None)
    query: bytes = scope.get("query_string", b"")
    raw_values = [
        (f"the {MIN_T_HEADER} header", None if header is None else header.decode("latin-1")),
        ("the min_t query parameter", QueryParams(query).get("min_t") if b"min" in query else None),
    ]
    wanted: int | None = None
    for where, raw in raw_values:
        if raw is None:
            continue
        raw = raw.strip()
        if not _T_VALUE.fullmatch(raw):
            raise ValueError(
                f"{where} must be a t: a non-negative integer, like the {T_HEADER} header of an "
                f"earlier response; got {raw[:40]!r}"
            )
        t = int(raw)
        wanted = t if wanted is None else max(wanted, t)
    return wanted


# -- server-sent events ------------------------------------------------------------------------


@dataclass
class _Position:
    """The newest t a stream has delivered or skipped (what a ping's ``id`` may claim)."""

    t: int | None = None


def report_events(
    store: Store,
    request: Request,
    render: Callable[[TxReport[None] | Db], Any],
    *,
    event: str = "report",
    snapshot_event: str = "snapshot",
    ping: float = 15,
    retry: int | None = 1000,
    sync_timeout: float = 2.0,
    headers: Mapping[str, str] | None = None,
) -> EventSourceResponse:
    """A server-sent events response: one event per commit, each with ``id: <t>``, resumable without a gap.

    ``render(report_or_db)`` makes an event's data: for a :class:`~astm.TxReport`
    (an ``event``-named event) or a :class:`~astm.Db` (a ``snapshot_event``
    event, the state to start from). It may be ``async``; it returns a str
    (sent as is), any other JSON value (sent as JSON), an
    ``sse_starlette.ServerSentEvent`` (its ``id`` is set to ``t``), or None
    to send nothing for that commit.

    A client that sends ``Last-Event-ID: t`` (browsers' ``EventSource`` does
    on every reconnection) or ``?last_event_id=t`` gets every commit after
    ``t`` from ``store.reports(since=t)``, so it misses nothing. One without an
    id, or further behind than the store's history (``HistoryUnavailable``),
    or with an id from another timeline, first gets a snapshot of
    ``store.db()``. Keep-alive pings every ``ping`` seconds are comments that
    also carry the stream's position as ``id``, so a stream whose commits
    ``render`` skips still resumes from near the present. ``retry`` is the
    reconnection delay in milliseconds the browser is told. The stream ends
    when the store closes.
    """
    last_id = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    since = int(last_id) if last_id is not None and _T_VALUE.fullmatch(last_id.strip()) else None
    position = _Position(since)

    async def data_of(item: TxReport[None] | Db) -> Any:
        out = render(item)
        if inspect.isawaitable(out):
            out = await out
        return out

    def as_event(t: int, name: str, data: Any) -> ServerSentEvent:
        if isinstance(data, ServerSentEvent):
            data.id = str(t)
            if data.event is None:
                data.event = name
            return data
        if isinstance(data, bytes):
            data = data.decode()
        elif not isinstance(data, str):
            data = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        return ServerSentEvent(data, event=name, id=str(t))

    async def stream() -> AsyncIterator[ServerSentEvent]:
        pos = since
        yield ServerSentEvent(comment=f"astm reports after t={pos}" if pos is not None else "astm reports", retry=retry)
        if pos is not None and pos > store.t:
            try:  # a client that talked to a peer further ahead: wait for this one to catch up
                await store.sync(pos, timeout=sync_timeout)
            except SyncTimeout:
                pos = None  # an id from another timeline (a store started afresh): start from a snapshot
            except StoreClosed:
                return
        while True:
            if pos is None:
                db = store.db()
                pos = db.t
                data = await data_of(db)
                if data is not None:
                    yield as_event(db.t, snapshot_event, data)
                del db
                position.t = pos
            try:
                async with contextlib.aclosing(store.reports(since=pos)) as reports:
                    async for report in reports:
                        data = await data_of(report)
                        if data is not None:
                            yield as_event(report.t, event, data)
                        pos = position.t = report.t
                        del report
                return  # the store closed
            except HistoryUnavailable:
                pos = None  # further behind than the store's history: start again from a snapshot

    def keepalive() -> ServerSentEvent:
        t = position.t
        return ServerSentEvent(comment="ping", id=None if t is None else str(t))

    return EventSourceResponse(
        stream(),
        headers={"Cache-Control": "no-cache", **dict(headers or {})},
        ping=ping,
        ping_message_factory=keepalive,
    )
