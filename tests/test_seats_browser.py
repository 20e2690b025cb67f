"""The live page in a real browser: Debian's chromium driven by Playwright (headless)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package", pytrace=False)
    pytest.skip("Debian's chromium is not installed here (apt-get install chromium)", allow_module_level=True)

from playwright.async_api import async_playwright, expect  # noqa: E402


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.seats", "--store", f"sqlite:///{tmp_path / 's.db'}",
         "--mail-log", str(tmp_path / "mail.log"), "--port", str(port)],
        cwd=ROOT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/shows").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the seat service did not start"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


async def test_click_reserves_and_second_page_sees_it_live(server: str) -> None:
    """Clicking a seat reserves it; a second page (another customer) sees it turn taken without reload."""
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        try:
            alice = await (await browser.new_context()).new_page()
            bob = await (await browser.new_context()).new_page()
            await alice.goto(f"{server}/?show=tempest")
            await bob.goto(f"{server}/?show=tempest")
            seat_a = alice.locator('button[data-seat="C4"]')
            seat_b = bob.locator('button[data-seat="C4"]')
            await expect(seat_a).to_have_attribute("data-state", "free")
            await expect(seat_b).to_have_attribute("data-state", "free")
            await seat_a.click()
            await expect(seat_a).to_have_attribute("data-state", "mine")
            await expect(alice.locator("#status")).to_contain_text("reserved C4")
            await expect(seat_b).to_have_attribute("data-state", "taken")  # pushed over server-sent events
            await seat_b.click()  # a taken seat cannot be booked by bob
            await expect(seat_b).to_have_attribute("data-state", "taken")
            await alice.screenshot(path=str(ROOT / ".pytest_cache" / "seats.png"))
        finally:
            await browser.close()
    async with httpx.AsyncClient() as client:
        seats = (await client.get(f"{server}/shows/tempest")).json()["seats"]
    assert seats["C4"] is not None and seats["C4"].startswith("guest-")
