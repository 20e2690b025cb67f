"""astm.web through a real server: uvicorn on a free loopback port, driven by httpx (and a raw socket)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import httpx
import pytest
import pytest_asyncio
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import astm
import astm.web

StoreDep = Annotated[astm.Store, Depends(astm.web.get_store)]


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn on a free loopback port in this event loop; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        with anyio.fail_after(10):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn stopped before it started")
                await anyio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with anyio.fail_after(10):
            await task


def counter_app(store: astm.Store, *, sync_timeout: float = 0.5, ping: float = 15) -> FastAPI:
    """A small FastAPI app on ``store``: a counter that must stay >= 0, its live events, and error endpoints."""
    app = FastAPI(lifespan=astm.web.lifespan(store))
    astm.web.install(app, sync_timeout=sync_timeout)
    n = store.ref("n", 0, validator=lambda v: v >= 0)
    other = store.ref("other", 0)

    @app.post("/add/{k}")
    async def add(k: int, store: StoreDep) -> dict[str, int]:
        report = await store.transact(lambda: n.alter(lambda v: v + k))
        return {"n": report.result, "t": report.t}

    @app.post("/other")
    async def bump_other(store: StoreDep) -> dict[str, int]:
        report = await store.transact(lambda: other.alter(lambda v: v + 1))
        return {"t": report.t}

    @app.get("/n")
    async def read(store: StoreDep) -> dict[str, int]:
        db = store.db()
        return {"n": db[n], "t": db.t}

    @app.get("/as-of/{t}", response_model=None)
    async def as_of(t: int, store: StoreDep) -> Response:
        return JSONResponse({"n": store.as_of(t)[n]}, headers={astm.web.T_HEADER: str(t)})

    @app.get("/mutable")
    async def mutable(store: StoreDep) -> None:
        await store.atomically(lambda: n.set([1]))  # type: ignore[arg-type, call-overload]

    @app.get("/outside")
    async def outside() -> None:
        n.set(1)

    @app.get("/raise/{name}")
    async def raise_(name: str) -> None:
        raise ERRORS[name]

    @app.get("/stream", response_model=None)
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"chunk {i} at {time.monotonic()}\n".encode()
                await anyio.sleep(0.3)

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/events", response_model=None)
    async def events(request: Request, store: StoreDep) -> Response:
        def render(item: astm.TxReport[None] | astm.Db) -> dict[str, int] | None:
            if isinstance(item, astm.Db):
                return {"n": item[n]}
            changed = [c.new for c in item.changes if c.ref is n]
            return {"n": changed[0]} if changed else None

        return astm.web.report_events(store, request, render, event="n", ping=ping, sync_timeout=sync_timeout)

    return app


ERRORS: dict[str, astm.AstmError] = {
    "retry": astm.RetryLimitExceeded(7, {"n": 7}),
    "sync": astm.SyncTimeout(12, 9, 1.0),
    "closed": astm.StoreClosed(),
    "history": astm.HistoryUnavailable(3, 40, "reports(since)"),
    "codec": astm.CodecError("ref 'n'", object()),
    "unknown": astm.CommitOutcomeUnknown("state.db", "fsync failed"),
    "storage": astm.StorageError("state.db", "disk I/O error"),
    "mismatch": astm.StoreMismatchError("n"),
    "cold": astm.RefNotLoaded("n"),
}


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with serve(counter_app(astm.Store())) as base:
        yield base


@pytest.fixture
async def client(url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        yield c


def test_import_astm_does_not_import_the_web() -> None:
    """``import astm`` loads no web framework; ``import astm.web`` is the opt-in."""
    code = (
        "import sys, astm\n"
        "assert 'astm.web' not in sys.modules and 'starlette' not in sys.modules, sorted(sys.modules)\n"
        "import astm.web\n"
        "assert 'starlette' in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


class TestHeaders:
    async def test_every_response_carries_x_astm_t(self, client: httpx.AsyncClient) -> None:
        """Responses, errors and unknown paths alike carry X-Astm-T; after a commit it includes that commit."""
        r = await client.post("/add/2")
        assert r.status_code == 200 and int(r.headers["x-astm-t"]) >= r.json()["t"] == 1
        assert (await client.get("/n")).headers["x-astm-t"] == "1"
        assert (await client.get("/no/such/path")).headers["x-astm-t"] == "1"
        assert (await client.post("/add/-5")).headers["x-astm-t"] == "1"

    async def test_a_response_with_its_own_t_keeps_it(self, client: httpx.AsyncClient) -> None:
        """An endpoint that answers for an older t says so: its X-Astm-T stands, and only once."""
        await client.post("/add/2")
        await client.post("/add/3")
        r = await client.get("/as-of/1")
        assert r.json() == {"n": 2} and r.headers.get_list("x-astm-t") == ["1"]
        assert (await client.get("/n")).headers.get_list("x-astm-t") == ["2"]

    async def test_min_t_waits_for_the_commit(self, client: httpx.AsyncClient) -> None:
        """A request with X-Astm-Min-T ahead of the store waits until a commit reaches it, then runs."""
        t = int((await client.post("/add/1")).headers["x-astm-t"])

        async def commit_later() -> None:
            await anyio.sleep(0.2)
            await client.post("/add/1")

        async with anyio.create_task_group() as tg:
            tg.start_soon(commit_later)
            start = time.monotonic()
            r = await client.get("/n", headers={"X-Astm-Min-T": str(t + 1)})
            waited = time.monotonic() - start
        assert r.status_code == 200 and r.json() == {"n": 2, "t": t + 1} and waited >= 0.15
        r = await client.get("/n", params={"min_t": str(t)})  # already there: no wait
        assert r.status_code == 200 and int(r.headers["x-astm-t"]) >= t

    async def test_min_t_timeout_is_a_504_problem(self, client: httpx.AsyncClient) -> None:
        """A t the store does not reach in time is a 504 problem saying how far behind the server is."""
        start = time.monotonic()
        r = await client.get("/n", params={"min_t": "5"})
        assert 0.4 <= time.monotonic() - start < 5
        assert r.status_code == 504 and r.headers["content-type"] == "application/problem+json"
        body = r.json()
        assert body["type"] == astm.web.PROBLEM_TYPES["sync-timeout"] and body["status"] == 504
        assert (body["min_t"], body["basis"], body["behind"]) == (5, 0, 5)
        assert "5 commit(s) behind" in body["detail"] and r.headers["retry-after"] == "1"
        assert r.headers["x-astm-t"] == "0"

    async def test_streaming_responses_stream_through(self, client: httpx.AsyncClient) -> None:
        """The middleware is pure ASGI: a streaming response's first chunk arrives before the last is made."""
        async with client.stream("GET", "/stream") as r:
            assert r.headers["x-astm-t"] == "0"
            arrivals = []
            async for _line in r.aiter_lines():
                arrivals.append(time.monotonic())
        assert len(arrivals) == 3 and arrivals[-1] - arrivals[0] >= 0.5


@pytest_asyncio.fixture(scope="class", loop_scope="class")
async def shared() -> AsyncIterator[httpx.AsyncClient]:
    """One server for a whole class of tests that change nothing."""
    async with serve(counter_app(astm.Store())) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        yield c


@pytest.mark.asyncio(loop_scope="class")
class TestProblems:
    @pytest.mark.parametrize(
        ("path", "status", "slug", "extensions"),
        [
            ("/raise/retry", 503, "retry-limit-exceeded", {"attempts": 7}),
            ("/raise/sync", 504, "sync-timeout", {"min_t": 12, "basis": 9, "behind": 3}),
            ("/raise/closed", 503, "store-closed", {}),
            ("/raise/history", 410, "history-unavailable", {"t": 3, "oldest": 40}),
            ("/raise/storage", 503, "storage-unavailable", {}),
        ],
    )
    async def test_errors_the_client_can_act_on(
        self, shared: httpx.AsyncClient, path: str, status: int, slug: str, extensions: dict[str, int]
    ) -> None:
        """Each astm error the client can act on is an RFC 9457 problem with its status, type and members."""
        r = await shared.get(path)
        assert r.status_code == status and r.headers["content-type"] == "application/problem+json"
        body = r.json()
        assert body["type"] == astm.web.PROBLEM_TYPES[slug] and body["status"] == status
        assert body["title"] and body["detail"] and body["instance"] == path
        assert {k: body[k] for k in extensions} == extensions
        assert ("retry-after" in r.headers) == (status in (503, 504))
        assert "x-astm-t" in r.headers

    @pytest.mark.parametrize("raw", ["abc", "-1", "1.5", "1e3", "9" * 30])
    async def test_bad_min_t_is_a_422_problem(self, shared: httpx.AsyncClient, raw: str) -> None:
        """A min_t that is not a non-negative integer is refused with a 422 problem naming it."""
        r = await shared.get("/n", headers={"X-Astm-Min-T": raw})
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        assert "X-Astm-Min-T" in r.json()["detail"] and r.json()["type"] == astm.web.PROBLEM_TYPES["bad-min-t"]
        r = await shared.get("/n", params={"min_t": raw})
        assert r.status_code == 422 and "min_t query parameter" in r.json()["detail"]

    async def test_validation_error_is_a_409(self, shared: httpx.AsyncClient) -> None:
        """A validator refusing a commit is a 409 naming the ref; nothing was committed."""
        r = await shared.post("/add/-1")
        assert r.status_code == 409 and r.json()["ref"] == "n"
        assert (
            r.json()["type"] == astm.web.PROBLEM_TYPES["validation-failed"]
            and "nothing was committed" in r.json()["detail"]
        )
        assert (await shared.get("/n")).json()["n"] == 0

    @pytest.mark.parametrize(
        ("path", "slug"),
        [("/mutable", "mutable-value"), ("/outside", "not-in-transaction"), ("/raise/codec", "codec"),
         ("/raise/unknown", "commit-outcome-unknown"), ("/raise/cold", "ref-not-loaded"),
         ("/raise/mismatch", "astm-error")],
    )  # fmt: skip
    async def test_programming_errors_are_500s_with_a_clear_title(
        self, shared: httpx.AsyncClient, path: str, slug: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Misuse of astm is a 500 problem with a clear title; the details go to the log, not the client."""
        with caplog.at_level(logging.ERROR, logger="astm.web"):
            r = await shared.get(path)
        assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json"
        body = r.json()
        assert body["type"] == astm.web.PROBLEM_TYPES[slug] and body["title"].startswith(("The server", "The outcome"))
        assert "Traceback" not in body["detail"] and path in caplog.text


class TestLifespan:
    async def test_opens_in_a_thread_and_closes_on_shutdown(self) -> None:
        """A store factory runs off the event loop; get_store finds the store; shutdown closes it."""
        made: list[astm.Store] = []
        threads: list[int] = []

        def make() -> astm.Store:
            threads.append(threading.get_ident())
            made.append(astm.Store())
            return made[0]

        app = FastAPI(lifespan=astm.web.lifespan(make))
        astm.web.install(app)

        @app.get("/which")
        async def which(store: StoreDep) -> dict[str, bool]:
            return {"same": store is made[0], "open": not store.closed}

        async with serve(app) as base, httpx.AsyncClient(base_url=base) as c:
            assert (await c.get("/which")).json() == {"same": True, "open": True}
        assert threads and threads[0] != threading.get_ident()
        assert made[0].closed

    async def test_plain_starlette(self) -> None:
        """The same lifespan, middleware and get_store serve a plain Starlette app."""
        store = astm.Store()
        hits = store.ref("hits", 0)

        async def hit(request: Request) -> Response:
            s = await astm.web.get_store(request)
            report = await s.transact(lambda: hits.alter(lambda n: n + 1))
            return JSONResponse({"hits": report.result})

        app = Starlette(routes=[Route("/hit", hit, methods=["POST"])], lifespan=astm.web.lifespan(store))
        astm.web.install(app)
        async with serve(app) as base, httpx.AsyncClient(base_url=base) as c:
            r = await c.post("/hit")
            assert r.json() == {"hits": 1} and r.headers["x-astm-t"] == "1"
        assert store.closed

    async def test_no_store_says_what_to_do(self) -> None:
        """An app whose store was never set up answers 503 and get_store explains the fix."""
        app = FastAPI()
        astm.web.install(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            r = await c.get("/")
        assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
        request = Request({"type": "http", "app": FastAPI(), "headers": []})
        with pytest.raises(RuntimeError, match=r"lifespan=astm\.web\.lifespan\(store\)"):
            await astm.web.get_store(request)


# -- server-sent events ----------------------------------------------------------------------------


class Event:
    """One server-sent event as a client parses it."""

    def __init__(self) -> None:
        self.id: str | None = None
        self.event = "message"
        self.data: list[str] = []
        self.comment: list[str] = []
        self.retry: int | None = None

    def __repr__(self) -> str:
        return f"<Event {self.event} id={self.id} data={self.data} comment={self.comment}>"


async def events_of(response: httpx.Response) -> AsyncIterator[Event]:
    """Parse a text/event-stream response into events (comments and id-only blocks included)."""
    ev = Event()
    async for line in response.aiter_lines():
        if line == "":
            yield ev
            ev = Event()
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "":
            ev.comment.append(value)
        elif name == "id":
            ev.id = value
        elif name == "event":
            ev.event = value
        elif name == "data":
            ev.data.append(value)
        elif name == "retry":
            ev.retry = int(value)


async def take(
    client: httpx.AsyncClient, n: int, last_id: int | None = None, skip_if: Callable[[Event], bool] | None = None
) -> list[Event]:
    """Connect to /events (resuming after ``last_id``), read ``n`` events with data, then drop the connection."""
    headers = {} if last_id is None else {"Last-Event-ID": str(last_id)}
    got: list[Event] = []
    async with client.stream("GET", "/events", headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        async for ev in events_of(r):
            if ev.data and not (skip_if and skip_if(ev)):
                got.append(ev)
                if len(got) == n:
                    break
    return got


class TestReportEvents:
    async def test_resume_after_dropped_connections_misses_nothing(self, client: httpx.AsyncClient) -> None:
        """Commits go on while a client drops and reconnects with Last-Event-ID: it gets every one, once, in order."""
        commits: list[int] = []
        total = 40

        async def writer() -> None:
            for _ in range(total):
                commits.append((await client.post("/add/1")).json()["t"])
                await anyio.sleep(0.005)

        seen: list[Event] = []
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                [snapshot] = await take(client, 1)
                assert snapshot.event == "snapshot" and snapshot.retry is None
                last = int(snapshot.id or "-1")
                tg.start_soon(writer)
                while last < total:
                    batch = await take(client, min(7, total - last), last_id=last)  # then the connection drops
                    assert all(ev.event == "n" for ev in batch), batch  # resumed: no snapshot
                    seen += batch
                    last = int(batch[-1].id or "-1")
                    if len(seen) % 2:
                        await anyio.sleep(0.05)  # stay away a while: commits happen meanwhile
        assert [int(ev.id or "-1") for ev in seen] == commits == list(range(1, total + 1))
        assert [ev.data for ev in seen] == [[f'{{"n":{t}}}'] for t in commits]

    async def test_snapshot_when_behind_history(self) -> None:
        """A client further behind than the store's history gets a snapshot, then the commits after it."""
        store = astm.Store(history=2)
        async with serve(counter_app(store)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
            for _ in range(6):
                await c.post("/add/1")
            [snap] = await take(c, 1, last_id=1)
            assert (snap.event, snap.id, snap.data) == ("snapshot", "6", ['{"n":6}'])
            [recent] = await take(c, 1, last_id=5)  # still within history: the commit, no snapshot
            assert (recent.event, recent.id) == ("n", "6")

    async def test_id_from_another_timeline_starts_from_a_snapshot(self, client: httpx.AsyncClient) -> None:
        """A Last-Event-ID the store never reaches (a store started afresh) gets a snapshot after a short wait."""
        await client.post("/add/1")
        with anyio.fail_after(10):
            [snap] = await take(client, 1, last_id=10**6)
        assert (snap.event, snap.id) == ("snapshot", "1")

    async def test_pings_carry_the_position(self) -> None:
        """Keep-alive pings are comments with the stream's id, so commits render skipped still move the resume point."""
        async with serve(counter_app(astm.Store(), ping=0.2)) as base, httpx.AsyncClient(base_url=base) as c:
            for _ in range(3):
                await c.post("/other")  # commits the stream renders as nothing
            with anyio.fail_after(10):
                async with c.stream("GET", "/events", headers={"Last-Event-ID": "1"}) as r:
                    async for ev in events_of(r):
                        if ev.comment == ["ping"] and ev.id is not None:
                            break
                        assert not ev.data, ev  # no event for the skipped commits
        assert ev.id == "3"

    async def test_stream_ends_when_the_store_closes(self) -> None:
        """Closing the store (the app shutting down) ends open event streams."""
        store = astm.Store()
        async with serve(counter_app(store)) as base, httpx.AsyncClient(base_url=base) as c:
            with anyio.fail_after(10):
                async with c.stream("GET", "/events") as r:
                    async for ev in events_of(r):
                        if ev.event == "snapshot":
                            await store.aclose()
                # the loop ended: the server closed the stream
        assert store.closed
