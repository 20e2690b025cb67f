"""The live page in a real browser: Debian's chromium driven by Playwright (headless)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from tests.test_seats_api import service

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package", pytrace=False)
    pytest.skip("Debian's chromium is not installed here (apt-get install chromium)", allow_module_level=True)

from playwright.async_api import Browser, Page, async_playwright, expect  # noqa: E402

LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
_REQUEST_LINE = re.compile(rb"(?:GET|POST|HEAD|PUT|DELETE|OPTIONS|PATCH) (\S+) HTTP/1\.[01]\r\n")


# one service and one browser for the module (each test uses its own show and its own browser contexts)
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The seat service in its own process, on a free port (read from its start banner)."""
    tmp = tmp_path_factory.mktemp("seats")
    with service("--store", f"sqlite:///{tmp / 's.db'}", "--mail-log", str(tmp / "mail.log")) as (url, _):
        yield url


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Debian's chromium, headless, driven by Playwright."""
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


class Proxy:
    """A TCP proxy in front of the service that can drop the pages' event streams and refuse new ones.

    It reads the request line of each request a connection carries, so it
    knows which connections hold an ``/events`` stream.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.refuse_events = False
        self.streams: dict[asyncio.StreamWriter, list[str]] = {}

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            client_w.transport.abort()
            return
        path = [""]
        self.streams[client_w] = path

        async def upstream() -> None:
            while data := await client_r.read(65536):
                found = _REQUEST_LINE.match(data)
                if found:
                    path[0] = found.group(1).decode()
                    if self.refuse_events and path[0].startswith("/events"):
                        return  # as if the network went away
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                client_w.write(data)
                await client_w.drain()

        try:
            with contextlib.suppress(OSError):
                done, pending = await asyncio.wait(
                    [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, *done, return_exceptions=True)
        finally:
            self.streams.pop(client_w, None)
            client_w.transport.abort()
            server_w.transport.abort()

    def drop_event_streams(self) -> int:
        """Cut every connection that carries an event stream (a network failure, not a close); returns how many."""
        cut = [w for w, path in self.streams.items() if path[0].startswith("/events")]
        for w in cut:
            w.transport.abort()
        return len(cut)


@contextlib.asynccontextmanager
async def proxy_for(url: str) -> AsyncIterator[tuple[str, Proxy]]:
    proxy = Proxy(int(url.rsplit(":", 1)[1]))
    listener = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", proxy
    finally:
        listener.close()
        for w in list(proxy.streams):
            w.transport.abort()
        await listener.wait_closed()


@contextlib.asynccontextmanager
async def two_customers(browser: Browser) -> AsyncIterator[tuple[Page, Page]]:
    """Two pages in separate browser contexts: two customers with their own local storage."""
    contexts = [await browser.new_context(), await browser.new_context()]
    try:
        yield await contexts[0].new_page(), await contexts[1].new_page()
    finally:
        for context in contexts:
            await context.close()


async def test_click_reserves_and_second_page_sees_it_live(server: str, browser: Browser) -> None:
    """Clicking a seat reserves it; a second page (another customer) sees it turn taken without reload."""
    async with two_customers(browser) as (alice, bob):
        await alice.goto(f"{server}/?show=tempest")
        await bob.goto(f"{server}/?show=tempest")
        seat_a = alice.locator('button[data-seat="C4"]')
        seat_b = bob.locator('button[data-seat="C4"]')
        await expect(seat_a).to_have_attribute("data-state", "free")
        await expect(seat_b).to_have_attribute("data-state", "free")
        await expect(alice.locator("#legend")).to_contain_text("yours: click to cancel")
        await seat_a.click()
        await expect(seat_a).to_have_attribute("data-state", "mine")
        await expect(alice.locator("#status")).to_contain_text("reserved C4")
        await expect(seat_b).to_have_attribute("data-state", "taken")  # pushed over server-sent events
        await seat_b.click()  # a taken seat cannot be booked by bob, and the page says so
        await expect(seat_b).to_have_attribute("data-state", "taken")
        await expect(bob.locator("#status")).to_contain_text("C4 is taken")
        await expect(bob.locator("#status")).to_have_attribute("data-kind", "error")
        await alice.screenshot(path=str(ROOT / ".pytest_cache" / "seats.png"))
    async with httpx.AsyncClient() as client:
        seats = (await client.get(f"{server}/shows/tempest")).json()["seats"]
    assert seats["C4"] is not None and seats["C4"].startswith("guest-")


async def test_live_updates_resume_after_a_dropped_connection(server: str, browser: Browser) -> None:
    """Event streams cut by the network resume with Last-Event-ID: no reload, no snapshot, no booking missed.

    While the pages are cut off, other customers book; a click on a seat the
    page still shows free fails with the server's reason; once the streams
    are back the pages show every booking made meanwhile; cancelling your own
    seat frees it on both pages.
    """
    async with contextlib.AsyncExitStack() as stack:
        url, proxy = await stack.enter_async_context(proxy_for(server))
        api = await stack.enter_async_context(httpx.AsyncClient(base_url=server))
        alice, bob = pages = await stack.enter_async_context(two_customers(browser))
        for page in pages:
            await page.goto(f"{url}/?show=lear")
            await expect(page.locator("#live")).to_have_attribute("data-state", "live")
            await page.evaluate("window.__loadedOnce = true")
        await alice.locator('button[data-seat="A1"]').click()
        await expect(bob.locator('button[data-seat="A1"]')).to_have_attribute("data-state", "taken")

        proxy.refuse_events = True
        assert proxy.drop_event_streams() == 2
        for page in pages:
            await expect(page.locator("#live")).to_have_attribute("data-state", "reconnecting")
        for i, seat_id in enumerate(["B2", "B3", "C1"]):  # bookings while the pages are cut off
            r = await api.post("/shows/lear/reservations", json={"customer": f"walk-in-{i}", "seats": [seat_id]})
            assert r.status_code == 201
        await bob.locator('button[data-seat="B2"]').click()  # bob's page still shows B2 free
        await expect(bob.locator("#status")).to_contain_text("could not reserve B2")
        await expect(bob.locator("#status")).to_contain_text("already taken")

        proxy.refuse_events = False  # the network is back: EventSource reconnects and sends Last-Event-ID
        for page in pages:
            await expect(page.locator("#live")).to_have_attribute("data-state", "live", timeout=15_000)
            for seat_id in ("B2", "B3", "C1"):
                await expect(page.locator(f'button[data-seat="{seat_id}"]')).to_have_attribute("data-state", "taken")
            assert await page.evaluate("window.__loadedOnce") is True  # not reloaded
            assert await page.evaluate("document.body.dataset.snapshots") == "1"  # resumed, not restarted
            assert int(await page.evaluate("document.body.dataset.reconnects")) >= 1
        assert int(await bob.evaluate("document.body.dataset.events")) >= 4

        mine = alice.locator('button[data-seat="A1"]')
        await expect(mine).to_have_attribute("data-state", "mine")
        await mine.click()  # cancel your own seat
        await expect(alice.locator("#status")).to_contain_text("cancelled A1")
        await expect(mine).to_have_attribute("data-state", "free")
        await expect(bob.locator('button[data-seat="A1"]')).to_have_attribute("data-state", "free")
        await bob.screenshot(path=str(ROOT / ".pytest_cache" / "seats-resumed.png"))
