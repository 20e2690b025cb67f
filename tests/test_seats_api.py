"""The seat service's HTTP API, through httpx's ASGI transport (statuses, idempotency, read-your-writes)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from examples.seats.app import MAX_BODY, create_app


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
        assert r.status_code == 409 and r.json()["error"]["seats"] == ["A2"]
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
        assert r.status_code == 409 and "sold out" in r.json()["error"]["message"]

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
        """Malformed bodies get 422, oversized ones 413, always as a JSON error; nothing is booked."""
        r = await client.post("/shows/hamlet/reservations", content=body)
        assert r.status_code == status
        assert r.json()["error"]["message"]
        assert (await client.get("/sales")).json()["entries"] == []

    async def test_unknown_show(self, client: httpx.AsyncClient) -> None:
        """An unknown show is a 404 for reads, writes and event streams."""
        assert (await client.get("/shows/nope")).status_code == 404
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
        assert other.status_code == 422 and "different request" in other.json()["error"]["message"]
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
        assert (await client.get("/shows/hamlet", params={"min_t": "x"})).status_code == 422

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

    async def test_index_page(self, client: httpx.AsyncClient) -> None:
        """/ serves the live page."""
        r = await client.get("/")
        assert r.status_code == 200 and "EventSource" in r.text


def test_load_driver_short_run() -> None:
    """The load driver hammers a real server for a few seconds and its invariant checks pass."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-m", "examples.seats.load", "--clients", "60", "--seconds", "3"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "checks passed" in out.stdout
    assert "reserved" in out.stdout and "requests" in out.stdout  # progress was shown
