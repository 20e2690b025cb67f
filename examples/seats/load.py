"""Load driver: hammer the seat service over HTTP, then check its invariants.

    python -m examples.seats.load --clients 200 --seconds 20

Without ``--url`` it starts the service itself (a fresh SQLite store in a
temporary directory, on a free loopback port) and stops it afterwards. While
it runs it prints progress once a second; then throughput and latency
percentiles (p50, p90, p99, per kind of request), and it checks that no seat
was sold twice, that the seats sold equal the ledger, and that every sale got
exactly one confirmation. Exit status 0 means every check passed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Latencies:
    """Request latencies in seconds, by kind of request."""

    samples: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, seconds: float) -> None:
        self.samples[kind].append(seconds)

    def all(self) -> list[float]:
        return [x for xs in self.samples.values() for x in xs]


def percentiles(samples: list[float], wanted: tuple[int, ...] = (50, 90, 99)) -> dict[int, float]:
    """The ``wanted`` percentiles of ``samples`` (inclusive method: each lies within the samples' range)."""
    if not samples:
        raise ValueError("no latency samples: no request completed")
    if len(samples) == 1:
        return dict.fromkeys(wanted, samples[0])
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {p: cuts[p - 1] for p in wanted}


def latency_lines(latencies: Latencies) -> list[str]:
    """``latency <kind>: p50 .. ms  p90 .. ms  p99 .. ms  (n requests)``, every kind and then all together."""
    rows = [*sorted(latencies.samples.items()), ("all", latencies.all())]
    out = []
    for kind, xs in rows:
        if xs:
            p = percentiles(xs)
            out.append(
                f"latency {kind}: p50 {p[50] * 1000:.1f} ms  p90 {p[90] * 1000:.1f} ms  "
                f"p99 {p[99] * 1000:.1f} ms  ({len(xs)} requests)"
            )
    return out


async def _wait_up(client: httpx.AsyncClient, deadline: float) -> None:
    while True:
        try:
            if (await client.get("/shows")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the seat service did not start")
        await anyio.sleep(0.1)


async def hammer(
    url: str, clients: int, seconds: float, seed: int = 1, latencies: Latencies | None = None
) -> Counter[str]:
    """Run ``clients`` concurrent customers against ``url`` for ``seconds``; returns outcome counts."""
    counts: Counter[str] = Counter()
    lat = latencies if latencies is not None else Latencies()

    async def post(kind: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
        start = time.perf_counter()
        r = await client.post(path, json=body, headers=headers)
        lat.add(kind, time.perf_counter() - start)
        return r

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        await _wait_up(client, time.monotonic() + 30)
        shows = [s["id"] for s in (await client.get("/shows")).json()["shows"]]
        layout = {sid: list((await client.get(f"/shows/{sid}")).json()["seats"]) for sid in shows}
        stop = time.monotonic() + seconds

        async def customer(n: int) -> None:
            rng = random.Random(seed * 10_000 + n)
            me = f"load-{n}"
            held: list[tuple[str, str]] = []
            while time.monotonic() < stop:
                if held and rng.random() < 0.15:
                    show, seat = held.pop(rng.randrange(len(held)))
                    r = await post("cancel", f"/shows/{show}/cancellations", {"customer": me, "seats": [seat]})
                    counts["cancelled" if r.status_code == 200 else f"cancel {r.status_code}"] += 1
                    continue
                show = rng.choice(shows)
                seats = rng.sample(layout[show], rng.randint(1, 3))
                key = uuid.uuid4().hex
                r = await post(
                    "reserve", f"/shows/{show}/reservations", {"customer": me, "seats": seats}, {"Idempotency-Key": key}
                )
                if r.status_code == 201 and rng.random() < 0.1:
                    # a client retry with the same key: must not book twice
                    again = await post(
                        "replay",
                        f"/shows/{show}/reservations",
                        {"customer": me, "seats": seats},
                        {"Idempotency-Key": key},
                    )
                    counts[
                        "replayed" if again.status_code == 200 and again.json().get("replayed") else "BAD REPLAY"
                    ] += 1
                if r.status_code == 201:
                    held.extend((show, s) for s in seats)
                    counts["reserved"] += 1
                elif r.status_code == 409:
                    counts["conflict"] += 1
                else:
                    counts[f"status {r.status_code}"] += 1

        async def progress() -> None:
            start = time.monotonic()
            while time.monotonic() < stop:
                await anyio.sleep(1)
                done = sum(counts.values())
                print(
                    f"  {time.monotonic() - start:5.1f}s  {done} requests  "
                    f"{counts['reserved']} reserved  {counts['conflict']} taken  {counts['cancelled']} cancelled  "
                    f"({done / (time.monotonic() - start):.0f} req/s)",
                    flush=True,
                )

        async with anyio.create_task_group() as tg:
            tg.start_soon(progress)
            for n in range(clients):
                tg.start_soon(customer, n)
    return counts


async def check(url: str, mail_log: Path) -> list[str]:
    """The invariants; returns the problems found (empty when all hold)."""
    problems = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        shows = [s["id"] for s in (await client.get("/shows")).json()["shows"]]
        ledger_resp = await client.get("/sales")
        t = ledger_resp.headers["x-astm-t"]
        ledger = ledger_resp.json()
        taken = 0
        holders: dict[tuple[str, str], str] = {}
        for sid in shows:
            show = (await client.get(f"/shows/{sid}", headers={"X-Astm-Min-T": t})).json()
            for seat, who in show["seats"].items():
                if who is not None:
                    taken += 1
                    holders[(sid, seat)] = who
    net: Counter[tuple[str, str]] = Counter()
    for e in ledger["entries"]:
        net[(e["show"], e["seat"])] += 1 if e["kind"] == "sale" else -1
    if any(v not in (0, 1) for v in net.values()):
        problems.append("a seat was sold twice (the ledger has two open sales of one seat)")
    if {k for k, v in net.items() if v == 1} != set(holders):
        problems.append("the seat maps and the ledger disagree on which seats are sold")
    if ledger["seats_sold"] != taken:
        problems.append(f"seats sold {taken} != ledger {ledger['seats_sold']}")
    text = await anyio.Path(mail_log).read_text()
    mails = [json.loads(line) for line in text.splitlines() if line.strip()]
    keys = Counter(m["key"] for m in mails)
    if any(n > 1 for n in keys.values()):
        problems.append("a confirmation was sent twice")
    sales = sum(1 for e in ledger["entries"] if e["kind"] == "sale")
    confirmed = sum(len(m["seats"]) for m in mails)
    if confirmed != sales:
        problems.append(f"{sales} seats sold but {confirmed} confirmed")
    return problems


async def settle(url: str, mail_log: Path, expected_sales: int, timeout: float = 10) -> None:
    """Give the outbox a moment to deliver the last confirmations."""
    deadline = time.monotonic() + timeout
    log = anyio.Path(mail_log)
    while time.monotonic() < deadline:
        text = await log.read_text() if await log.exists() else ""
        mails = [json.loads(x) for x in text.splitlines() if x.strip()]
        if sum(len(m["seats"]) for m in mails) >= expected_sales:
            return
        await anyio.sleep(0.1)


async def _banner_url(server: anyio.abc.Process, deadline: float) -> str:
    """Read the service's start banner (printed once it listens) for its URL."""
    assert server.stdout is not None
    seen = b""
    with anyio.fail_after(max(deadline - time.monotonic(), 0.1)):
        async for chunk in server.stdout:
            seen += chunk
            found = re.search(rb"seat service on (http://\S+)", seen)
            if found:
                return found.group(1).decode()
    raise RuntimeError(f"the seat service exited before it listened: {seen.decode(errors='replace')}")


async def run(args: argparse.Namespace) -> int:
    server = None
    tmp = None
    url, mail_log = args.url, Path(args.mail_log) if args.mail_log else None
    if mail_log is None and url is not None:
        print("--mail-log is needed with --url (the service's confirmation log)", file=sys.stderr)
        return 2
    latencies = Latencies()
    try:
        if url is None:
            tmp = tempfile.TemporaryDirectory()
            mail_log = Path(tmp.name) / "mail.log"
            server = await anyio.open_process(
                [sys.executable, "-m", "examples.seats", "--store", f"sqlite:///{tmp.name}/seats.db",
                 "--mail-log", str(mail_log), "--port", "0"],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=None,
            )  # fmt: skip
            url = await _banner_url(server, time.monotonic() + 30)
        assert mail_log is not None
        print(f"load: {args.clients} clients for {args.seconds}s against {url}", flush=True)
        started = time.monotonic()
        counts = await hammer(url, args.clients, args.seconds, latencies=latencies)
        elapsed = time.monotonic() - started
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            sales = sum(1 for e in (await client.get("/sales")).json()["entries"] if e["kind"] == "sale")
        await settle(url, mail_log, sales)
        problems = await check(url, mail_log)
    finally:
        if server is not None:
            server.terminate()
            with anyio.fail_after(30):
                await server.wait()
        if tmp is not None:
            tmp.cleanup()
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    total = len(latencies.all())
    print(f"throughput: {total} requests in {elapsed:.1f}s ({total / elapsed:.0f} req/s)")
    for line in latency_lines(latencies):
        print(line)
    bad = [k for k in counts if k.startswith(("status", "BAD", "cancel 5"))]
    problems += [f"unexpected outcome: {k} x{counts[k]}" for k in bad]
    if problems:
        for p in problems:
            print(f"FAILED: {p}")
        return 1
    print("checks passed: no seat sold twice, seats sold == ledger, one confirmation per sale")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.seats.load", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--url", help="a running service (default: start one)")
    parser.add_argument("--mail-log", help="the running service's confirmation log (with --url)")
    args: Any = parser.parse_args(argv)
    return anyio.run(run, args)


if __name__ == "__main__":
    sys.exit(main())
