"""The seat service's HTTP API: through httpx's ASGI transport, then through real servers (uvicorn, workers)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from examples.seats.app import MAX_BODY, create_app
from examples.seats.load import Latencies, latency_lines, percentiles
from tests.test_web import events_of, serve

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(f"sqlite:///{tmp_path / 'seats.db'}", str(tmp_path / "mail.log"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://seats") as c:
            yield c


async def reserve(
    c: httpx.AsyncClient, customer: str, seats: list[str], show: str = "hamlet", headers: dict[str, str] | None = None
) -> httpx.Response:
    return await c.post(f"/shows/{show}/reservations", json={"customer": customer, "seats": seats}, headers=headers)


class TestApi:
    async def test_shows_and_seat_map(self, client: httpx.AsyncClient) -> None:
        """The demo shows are listed; a seat map lists every seat as free; responses carry X-Astm-T."""
        r = await client.get("/shows")
        assert r.status_code == 200 and int(r.headers["x-astm-t"]) >= 1
        assert {s["id"] for s in r.json()["shows"]} == {"hamlet", "tempest", "lear"}
        hamlet = (await client.get("/shows/hamlet")).json()
        assert hamlet["free"] == 60 and hamlet["seats"]["A1"] is None

    async def test_reserve_several_all_or_none(self, client: httpx.AsyncClient) -> None:
        """Several seats are reserved atomically; a request with one taken seat books none of them."""
        r = await reserve(client, "ann", ["A1", "A2"])
        assert r.status_code == 201 and r.json()["seats"] == ["A1", "A2"]
        t = int(r.headers["x-astm-t"])
        assert r.json()["t"] == t
        r = await reserve(client, "bob", ["A3", "A2"])
        assert r.status_code == 409 and r.json()["seats"] == ["A2"]
        assert r.headers["content-type"] == "application/problem+json" and "A2" in r.json()["detail"]
        seats = (await client.get("/shows/hamlet")).json()["seats"]
        assert (seats["A1"], seats["A2"], seats["A3"]) == ("ann", "ann", None)

    async def test_cancel_and_customer_listing(self, client: httpx.AsyncClient) -> None:
        """A customer's reservations are listed; cancelling frees the seat; others cannot cancel it."""
        await reserve(client, "ann", ["B1", "B2"])
        r = await client.get("/customers/ann/reservations")
        assert r.json()["reservations"] == [{"show": "hamlet", "seat": "B1"}, {"show": "hamlet", "seat": "B2"}]
        r = await client.post("/shows/hamlet/cancellations", json={"customer": "bob", "seats": ["B1"]})
        assert r.status_code == 409
        r = await client.post("/shows/hamlet/cancellations", json={"customer": "ann", "seats": ["B1"]})
        assert r.status_code == 200
        assert (await client.get("/shows/hamlet")).json()["seats"]["B1"] is None
        ledger = (await client.get("/sales")).json()
        assert ledger["seats_sold"] == 1 and [e["kind"] for e in ledger["entries"]].count("refund") == 1

    async def test_sold_out(self, client: httpx.AsyncClient) -> None:
        """A full show answers 409 sold out."""
        seats = list((await client.get("/shows/lear")).json()["seats"])
        for i in range(0, len(seats), 8):
            assert (await reserve(client, "bulk", seats[i : i + 8], show="lear")).status_code == 201
        r = await reserve(client, "late", ["A1"], show="lear")
        assert r.status_code == 409 and "sold out" in r.json()["detail"]

    @pytest.mark.parametrize(
        ("body", "status"),
        [
            (b'{"customer": "ann"', 422),
            (b"[1, 2]", 422),
            (b'{"customer": "", "seats": ["A1"]}', 422),
            (b'{"customer": "ann", "seats": []}', 422),
            (b'{"customer": "ann", "seats": ["A1", "A1"]}', 422),
            (b'{"customer": "ann", "seats": ["Z99"]}', 422),
            (b'{"customer": "ann", "seats": ["A1"], "pad": "' + b"x" * MAX_BODY + b'"}', 413),
        ],
        ids=["truncated", "not-object", "no-customer", "no-seats", "duplicate", "no-such-seat", "too-large"],
    )
    async def test_bad_input(self, client: httpx.AsyncClient, body: bytes, status: int) -> None:
        """Malformed bodies get 422, oversized ones 413, always as a problem+json; nothing is booked."""
        r = await client.post("/shows/hamlet/reservations", content=body)
        assert r.status_code == status
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["status"] == status and r.json()["title"] and r.json()["detail"]
        assert (await client.get("/sales")).json()["entries"] == []

    async def test_bad_parameters_are_422_naming_them(self, client: httpx.AsyncClient) -> None:
        """A too-long show id, a bad Idempotency-Key and a bad body are each named in one 422; nothing is booked."""
        r = await client.post(
            f"/shows/{'x' * 65}/reservations",
            json={"customer": "ann", "seats": "A1"},
            headers={"Idempotency-Key": "has space"},
        )
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        locs = [e["loc"] for e in r.json()["errors"]]
        assert locs == [["path", "show"], ["header", "Idempotency-Key"], ["body", "seats"]]
        assert "Idempotency-Key" in r.json()["detail"]
        for key in ("", "k" * 129):
            r = await client.post("/shows/hamlet/cancellations", json={"customer": "ann", "seats": ["A1"]},
                                  headers={"Idempotency-Key": key})  # fmt: skip
            assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["header", "Idempotency-Key"]
        assert (await reserve(client, "ann", ["A1"], headers={"Idempotency-Key": "k" * 128})).status_code == 201
        assert len((await client.get("/sales")).json()["entries"]) == 1

    async def test_unknown_show(self, client: httpx.AsyncClient) -> None:
        """An unknown show is a 404 problem for reads, writes and event streams."""
        r = await client.get("/shows/nope")
        assert r.status_code == 404 and r.json()["detail"] == "there is no show 'nope'" and r.json()["show"] == "nope"
        assert (await reserve(client, "ann", ["A1"], show="nope")).status_code == 404
        assert (await client.get("/events", params={"show": "nope"})).status_code == 404

    async def test_idempotency_key(self, client: httpx.AsyncClient, tmp_path: Path) -> None:
        """A retried POST with the same Idempotency-Key replays the answer and never books twice."""
        headers = {"Idempotency-Key": "req-1"}
        first = await reserve(client, "ann", ["C1"], headers=headers)
        again = await reserve(client, "ann", ["C1"], headers=headers)
        assert first.status_code == 201 and again.status_code == 200
        assert again.json()["replayed"] is True and again.json()["t"] == first.json()["t"]
        other = await reserve(client, "ann", ["C2"], headers=headers)
        assert other.status_code == 422 and "different request" in other.json()["detail"]
        ledger = (await client.get("/sales")).json()
        assert ledger["seats_sold"] == 1

    async def test_concurrent_retries_with_one_key_book_once(self, client: httpx.AsyncClient) -> None:
        """Ten concurrent retries of one request book the seat once."""
        statuses: list[int] = []

        async def attempt() -> None:
            statuses.append((await reserve(client, "ann", ["D1"], headers={"Idempotency-Key": "same"})).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(attempt)
        assert sorted(statuses) == [200] * 9 + [201]
        assert (await client.get("/sales")).json()["seats_sold"] == 1

    async def test_read_your_writes(self, client: httpx.AsyncClient) -> None:
        """X-Astm-Min-T answers from a state including that t; a t that is not an integer is refused."""
        t = int((await reserve(client, "ann", ["E1"])).headers["x-astm-t"])
        r = await client.get("/customers/ann/reservations", headers={"X-Astm-Min-T": str(t)})
        assert int(r.headers["x-astm-t"]) >= t and r.json()["reservations"] == [{"show": "hamlet", "seat": "E1"}]
        bad = await client.get("/shows/hamlet", params={"min_t": "x"})
        assert bad.status_code == 422 and "min_t" in bad.json()["detail"]

    async def test_confirmation_through_the_outbox(self, client: httpx.AsyncClient, tmp_path: Path) -> None:
        """Each reservation sends one confirmation, with its idempotency key, after commit."""
        r = await reserve(client, "ann", ["F1", "F2"])
        t = r.json()["t"]
        log = tmp_path / "mail.log"
        with anyio.fail_after(5):
            while not log.exists() or not log.read_text():
                await anyio.sleep(0.01)
        [mail] = [json.loads(line) for line in log.read_text().splitlines()]
        assert mail == {
            "key": f"{t}:0",
            "kind": "confirmation",
            "show": "hamlet",
            "seats": ["F1", "F2"],
            "customer": "ann",
        }

    async def test_index_page_and_openapi(self, client: httpx.AsyncClient) -> None:
        """/ serves the live page; /docs and /openapi.json describe the API with its request models."""
        r = await client.get("/")
        assert r.status_code == 200 and "EventSource" in r.text
        assert (await client.get("/docs")).status_code == 200
        spec = (await client.get("/openapi.json")).json()
        for path in ("/shows/{show}/reservations", "/shows/{show}/cancellations"):
            post = spec["paths"][path]["post"]
            body = post["requestBody"]["content"]["application/json"]["schema"]
            assert body["title"] == "Booking" and set(body["required"]) == {"customer", "seats"}
            params = {(p["name"], p["in"]) for p in post["parameters"]}
            assert params == {("show", "path"), ("Idempotency-Key", "header")}

    async def test_unknown_customer_creates_nothing(self, client: httpx.AsyncClient) -> None:
        """Looking up customers who hold nothing answers an empty list and creates no ref."""
        before = (await client.get("/stats")).json()["refs"]
        for i in range(50):
            r = await client.get(f"/customers/nobody-{i}/reservations")
            assert r.status_code == 200 and r.json()["reservations"] == []
        assert (await client.get("/stats")).json()["refs"] == before
        assert (await client.get("/customers/bad name!/reservations")).status_code == 422

    async def test_failed_request_with_a_key_records_nothing(self, client: httpx.AsyncClient) -> None:
        """A refused request with an Idempotency-Key leaves no record: the same key may then book."""
        await reserve(client, "ann", ["F7"])
        before = (await client.get("/stats")).json()["refs"]
        taken = await reserve(client, "bob", ["F7", "F8"], headers={"Idempotency-Key": "bob-1"})
        assert taken.status_code == 409
        assert (await client.get("/stats")).json()["refs"] == before
        ok = await reserve(client, "bob", ["F8"], headers={"Idempotency-Key": "bob-1"})
        assert ok.status_code == 201

    async def test_cancel_own_seats_with_collection_helpers(self, client: httpx.AsyncClient) -> None:
        """Booking and cancelling several seats keeps the seat map, holdings and ledger in step."""
        await reserve(client, "ann", ["E7", "E8", "E9"])
        r = await client.post("/shows/hamlet/cancellations", json={"customer": "ann", "seats": ["E7", "E9"]})
        assert r.status_code == 200 and r.json()["cancelled"] == ["E7", "E9"]
        seats = (await client.get("/shows/hamlet")).json()["seats"]
        assert (seats["E7"], seats["E8"], seats["E9"]) == (None, "ann", None)
        held = (await client.get("/customers/ann/reservations")).json()["reservations"]
        assert held == [{"show": "hamlet", "seat": "E8"}]
        ledger = (await client.get("/sales")).json()
        assert ledger["seats_sold"] == 1 and len(ledger["entries"]) == 5


def test_load_driver_short_run() -> None:
    """The load driver hammers a real server for a few seconds, reports latency percentiles, and its checks pass."""
    out = subprocess.run(
        [sys.executable, "-m", "examples.seats.load", "--clients", "60", "--seconds", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "checks passed" in out.stdout
    assert "reserved" in out.stdout and "requests" in out.stdout  # progress was shown
    assert re.search(r"^throughput: \d+ requests in [\d.]+s \(\d+ req/s\)$", out.stdout, re.M), out.stdout
    found = re.search(r"^latency all: p50 ([\d.]+) ms  p90 ([\d.]+) ms  p99 ([\d.]+) ms  \((\d+) requests\)$",
                      out.stdout, re.M)  # fmt: skip
    assert found, out.stdout
    p50, p90, p99 = (float(x) for x in found.groups()[:3])
    assert 0 < p50 <= p90 <= p99
    assert re.search(r"^latency reserve: p50", out.stdout, re.M)


def test_latency_percentiles() -> None:
    """Percentiles are read from the samples (inclusive), per kind and overall."""
    samples = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    p = percentiles(samples)
    assert (p[50], p[90], p[99]) == pytest.approx((0.0505, 0.0901, 0.09901))
    assert percentiles([0.25]) == {50: 0.25, 90: 0.25, 99: 0.25}
    lat = Latencies()
    for x in samples:
        lat.add("reserve", x)
    lat.add("cancel", 0.002)
    lines = latency_lines(lat)
    assert lines[0].startswith("latency cancel: p50 2.0 ms") and lines[-1].startswith("latency all: p50 50.")
    with pytest.raises(ValueError, match="no request completed"):
        percentiles([])


# -- through real servers ---------------------------------------------------------------------


@contextmanager
def service(*args: str, cwd: Path = ROOT, timeout: float = 30) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``python -m examples.seats --port 0 ...`` in a subprocess; yields its URL, read from the start banner."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.seats", "--port", "0", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + timeout
        line = ""
        while "seat service on" not in line:
            ready, _, _ = select.select([proc.stdout], [], [], max(deadline - time.monotonic(), 0))
            assert ready, "the seat service printed no start banner in time"
            line = proc.stdout.readline()
            assert line, f"the seat service exited ({proc.wait()}) before it listened"
        found = re.search(r"http://\S+", line)
        assert found, line
        yield found.group(0), proc
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stdout.close()


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The seat service under uvicorn on a free port (SQLite store), and an httpx client for it."""
    app = create_app(f"sqlite:///{tmp_path / 'seats.db'}", str(tmp_path / "mail.log"), sync_timeout=0.5)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as c:
        yield c


class TestOverHttp:
    async def test_problems(self, live: httpx.AsyncClient) -> None:
        """404, 409, 413 and 422 are problem+json with title, detail and members, and carry X-Astm-T."""
        r404 = await live.get("/shows/nope")
        await reserve(live, "ann", ["A1"])
        r409 = await reserve(live, "bob", ["A1", "A2"])
        r413 = await live.post("/shows/hamlet/reservations", content=b"x" * (MAX_BODY + 1))

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(20):
                yield b"x" * 1024

        r413_streamed = await live.post("/shows/hamlet/reservations", content=chunks())
        r422 = await live.post("/shows/hamlet/reservations", json={"customer": "ann", "seats": "A1"})
        for r, status in [(r404, 404), (r409, 409), (r413, 413), (r413_streamed, 413), (r422, 422)]:
            assert r.status_code == status, r.text
            assert r.headers["content-type"] == "application/problem+json" and int(r.headers["x-astm-t"]) >= 1
            body = r.json()
            assert body["status"] == status and body["title"] and body["detail"] and body["type"].startswith("tag:")
        assert r409.json()["seats"] == ["A1"] and r409.json()["title"] == "Seats unavailable"
        assert f"larger than {MAX_BODY} bytes" in r413.json()["detail"]
        assert r422.json()["errors"][0]["loc"] == ["body", "seats"]
        assert (await live.get("/sales")).json()["seats_sold"] == 1

    async def test_min_t_waits_and_times_out(self, live: httpx.AsyncClient) -> None:
        """A read with X-Astm-Min-T waits for a commit that lands later; one never reached is a 504 problem."""
        t = int((await live.get("/shows")).headers["x-astm-t"])

        async def book_later() -> None:
            await anyio.sleep(0.2)
            await reserve(live, "ann", ["B5"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(book_later)
            r = await live.get("/shows/hamlet", headers={"X-Astm-Min-T": str(t + 1)})
        assert r.status_code == 200 and r.json()["seats"]["B5"] == "ann" and int(r.headers["x-astm-t"]) == t + 1
        late = await live.get("/customers/ann/reservations", params={"min_t": str(t + 100)})
        assert late.status_code == 504 and late.json()["behind"] == 99 and late.headers["retry-after"] == "1"

    async def test_ten_concurrent_requests_with_one_key_book_once(self, live: httpx.AsyncClient) -> None:
        """Ten concurrent POSTs with one Idempotency-Key, on separate connections, book the seats once."""
        answers: list[httpx.Response] = []

        async def attempt() -> None:
            async with httpx.AsyncClient(base_url=str(live.base_url), timeout=10) as own:
                answers.append(await reserve(own, "ann", ["D1", "D2"], headers={"Idempotency-Key": "k-1"}))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(attempt)
        assert sorted(r.status_code for r in answers) == [200] * 9 + [201]
        assert {r.json()["t"] for r in answers} == {next(r.json()["t"] for r in answers if r.status_code == 201)}
        assert sum(bool(r.json().get("replayed")) for r in answers) == 9
        assert (await live.get("/sales")).json()["seats_sold"] == 2

    async def test_live_events_resume_with_last_event_id(self, live: httpx.AsyncClient) -> None:
        """/events resumes from Last-Event-ID after a dropped connection: the bookings made meanwhile, no snapshot."""
        with anyio.fail_after(20):
            async with live.stream("GET", "/events", params={"show": "tempest"}) as r:
                async for ev in events_of(r):
                    if ev.data:
                        break
            assert ev.event == "snapshot" and json.loads(ev.data[0])["seats"]["A1"] is None
            last = ev.id or ""
            booked = [int((await reserve(live, f"c{i}", [f"A{i}"], show="tempest")).headers["x-astm-t"])
                      for i in range(1, 4)]  # fmt: skip
            await reserve(live, "other", ["A1"], show="lear")  # another show: not in this stream
            got = []
            async with live.stream("GET", "/events", params={"show": "tempest"}, headers={"Last-Event-ID": last}) as r:
                async for ev in events_of(r):
                    if ev.data:
                        got.append(ev)
                        if len(got) == 3:
                            break
        assert [e.event for e in got] == ["seats"] * 3 and [int(e.id or 0) for e in got] == booked
        assert [json.loads(e.data[0])["seats"] for e in got] == [{"A1": "c1"}, {"A2": "c2"}, {"A3": "c3"}]

    async def test_ten_thousand_unknown_customers_leave_memory_flat(self, live: httpx.AsyncClient) -> None:
        """10,000 lookups of customers who do not exist create no ref and do not grow memory."""
        port = live.base_url.port
        assert port is not None

        async def pipelined(paths: list[str]) -> int:
            """Send every request at once on one connection (HTTP/1.1 pipelining), the last closing it; count 200s."""
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            requests = [f"GET {p} HTTP/1.1\r\nHost: seats\r\n\r\n" for p in paths[:-1]]
            requests.append(f"GET {paths[-1]} HTTP/1.1\r\nHost: seats\r\nConnection: close\r\n\r\n")
            writer.write("".join(requests).encode())
            await writer.drain()
            answers = await reader.read()  # to the end: the server closes after the last answer
            writer.close()
            assert answers.count(b"HTTP/1.1 ") == len(paths), "some requests got no answer"
            return answers.count(b"HTTP/1.1 200 OK\r\n")

        async def lookups(start: int, n: int, conns: int = 4) -> None:
            per = n // conns
            ok = await asyncio.gather(
                *(pipelined([f"/customers/nobody-{start + c * per + i}/reservations" for i in range(per)])
                  for c in range(conns))
            )  # fmt: skip
            assert sum(ok) == n

        await lookups(0, 1000)  # warm up
        before = (await live.get("/stats")).json()
        rss_before = _rss()
        with anyio.fail_after(60):
            await lookups(10_000, 10_000)
        after = (await live.get("/stats")).json()
        assert after["refs"] == before["refs"] and after["t"] == before["t"]
        assert _rss() - rss_before < 8 * 2**20, "memory grew with the number of unknown customers"

    def test_banner_after_bind_then_serving(self, tmp_path: Path) -> None:
        """The start banner is printed once the port is bound and the store open: the URL answers at once."""
        args = ["--store", f"sqlite:///{tmp_path / 's.db'}", "--mail-log", str(tmp_path / "m.log")]
        with service(*args) as (url, _):
            assert httpx.get(f"{url}/shows", timeout=5).status_code == 200
            port = url.rsplit(":", 1)[1]
            taken = subprocess.run(
                [sys.executable, "-m", "examples.seats", "--port", port, *args],
                cwd=ROOT, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        assert taken.returncode != 0 and "seat service on" not in taken.stdout
        assert f"cannot listen on 127.0.0.1:{port}" in taken.stderr and "--port" in taken.stderr

    def test_workers_need_a_shared_store(self) -> None:
        """--workers with a SQLite store is refused with the fix in the message."""
        out = subprocess.run(
            [sys.executable, "-m", "examples.seats", "--workers", "2"], cwd=ROOT, capture_output=True, text=True
        )
        assert out.returncode == 2 and "--store postgresql://" in out.stderr

    def test_workers_share_one_postgresql_store(self, pg_dsn: str, tmp_path: Path) -> None:
        """Two worker processes serve one PostgreSQL state: a booking on one is read on both with X-Astm-Min-T."""
        with service("--workers", "2", "--store", pg_dsn, "--mail-log", str(tmp_path / "m.log")) as (url, _):
            deadline = time.monotonic() + 30
            pids: dict[int, int] = {}
            while len(pids) < 2:
                assert time.monotonic() < deadline, f"only workers {sorted(pids)} answered"
                try:
                    r = httpx.get(f"{url}/stats", timeout=5)  # a new connection each time
                except httpx.TransportError:
                    time.sleep(0.1)
                    continue
                pids[r.json()["pid"]] = r.json()["t"]
            booked = httpx.post(f"{url}/shows/hamlet/reservations", json={"customer": "ann", "seats": ["C3"]})
            assert booked.status_code == 201, booked.text
            t = booked.headers["x-astm-t"]
            seen: set[int] = set()
            while len(seen) < 2:
                assert time.monotonic() < deadline
                with httpx.Client(base_url=url, headers={"X-Astm-Min-T": t}, timeout=10) as worker:  # one connection
                    pid = worker.get("/stats").json()["pid"]
                    held = worker.get("/customers/ann/reservations").json()["reservations"]
                    assert held == [{"show": "hamlet", "seat": "C3"}], f"worker {pid}"
                    assert worker.get("/shows/hamlet").json()["seats"]["C3"] == "ann", f"worker {pid}"
                seen.add(pid)


def _rss() -> int:
    """This process's resident memory in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
