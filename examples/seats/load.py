"""Load driver: hammer the seat service over HTTP, then check its invariants.

    python -m examples.seats.load --clients 200 --seconds 20

Without ``--url`` it starts the service itself (a fresh SQLite store in a
temporary directory, on a free loopback port) and stops it afterwards. While
it runs it prints progress once a second; then throughput and latency
percentiles (p50, p90, p99, per kind of request) and the CPU the driver (and
the service it started) used, and it checks that no seat was sold twice,
that the seats sold equal the ledger, and that every sale got exactly one
confirmation. Exit status 0 means every check passed. ``drive`` is the load
itself, for other programs (``python -m astm.bench`` drives the seat service
and its baseline with it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
from urllib.parse import urlsplit

import anyio
import anyio.abc
import httpx
from anyio.streams.buffered import BufferedByteReceiveStream

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


class HttpConnection:
    """One keep-alive HTTP/1.1 connection: a minimal client for the load loop.

    The customers' requests go through this rather than httpx, so that the
    driver is cheaper than the servers it measures: httpx's connection pool
    scans every connection on every request (its cost grows with the number
    of clients), and with 100 clients the driver took about 7 ms of CPU per
    request, more than the service it drove. This sends a request, reads the
    status line, the headers and a ``Content-Length`` (or chunked) body, and
    nothing else: no redirects, no TLS, no cookies.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._stream: anyio.abc.SocketStream | None = None
        self._buffer: BufferedByteReceiveStream | None = None

    async def connect(self) -> None:
        """Open the connection (a request also opens it when it is not open)."""
        self._stream = await anyio.connect_tcp(self.host, self.port)
        self._buffer = BufferedByteReceiveStream(self._stream)

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
        self._stream = self._buffer = None

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """Send ``method path`` with ``body`` as JSON; returns (status, the response body parsed as JSON)."""
        if self._stream is None:
            await self.connect()
        assert self._stream is not None
        assert self._buffer is not None
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Length: {len(payload)}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        await self._stream.send(head.encode("latin-1") + b"\r\n" + payload)
        lines = (await self._buffer.receive_until(b"\r\n\r\n", 1 << 16)).split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        fields: dict[bytes, bytes] = {}
        for line in lines[1:]:
            field_name, _, field_value = line.partition(b":")
            fields[field_name.strip().lower()] = field_value.strip()
        if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            chunks = []
            while size := int((await self._buffer.receive_until(b"\r\n", 1 << 10)).split(b";")[0], 16):
                chunks.append(await self._buffer.receive_exactly(size))
                await self._buffer.receive_exactly(2)
            while await self._buffer.receive_until(b"\r\n", 1 << 16):
                pass  # trailer fields, up to the empty line
            content = b"".join(chunks)
        else:
            content = await self._buffer.receive_exactly(int(fields.get(b"content-length", b"0")))
        if fields.get(b"connection", b"").lower() == b"close":
            await self.aclose()
        return status, json.loads(content) if content else None


@dataclass
class Outcome:
    """What one run of the load did."""

    counts: Counter[str]
    latencies: Latencies
    #: the length of the window in which customers start requests, in seconds
    seconds: float
    #: requests completed in each second of the window (the last may be part of a second: see ``rates``)
    per_second: list[int]
    #: seconds from the window's start until the last response (the requests in flight at its end included)
    elapsed: float
    #: CPU seconds this process used during the window (how close the driver came to being the bottleneck)
    cpu: float
    #: CPU seconds the server's process used during the window, when its pid was given (Linux), else None
    server_cpu: float | None = None

    @property
    def completed(self) -> int:
        """Requests completed within the window."""
        return sum(self.per_second)

    @property
    def rate(self) -> float:
        """Requests per second completed within the window."""
        return self.completed / self.seconds

    def rates(self) -> list[float]:
        """Requests per second in each second of the window (the last one scaled from its part of a second)."""
        out = [float(n) for n in self.per_second]
        part = self.seconds - (len(out) - 1)
        out[-1] /= part
        return out


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system, every thread) process ``pid`` has used, from /proc; None where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


async def drive(
    url: str, clients: int, seconds: float, *, seed: int = 1, progress: bool = True, server_pid: int | None = None
) -> Outcome:
    """Run ``clients`` concurrent customers against ``url`` for ``seconds``; what they did, and how fast.

    Each customer books 1 to 3 random seats of a random show (with an
    Idempotency-Key; one in ten successful bookings is sent again with the
    same key, and must be replayed), and cancels one of its seats instead
    with probability 0.15. Every customer opens its connection before the
    window starts, and starts no request once it is over.
    """
    counts: Counter[str] = Counter()
    lat = Latencies()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await _wait_up(client, time.monotonic() + 30)
        shows = [s["id"] for s in (await client.get("/shows")).json()["shows"]]
        layout = {sid: list((await client.get(f"/shows/{sid}")).json()["seats"]) for sid in shows}
    conns = [HttpConnection(host, port) for _ in range(clients)]
    async with anyio.create_task_group() as tg:
        for c in conns:
            tg.start_soon(c.connect)
    per_second = [0] * max(1, math.ceil(seconds))
    start = time.monotonic()
    stop = start + seconds
    last = start

    async def post(
        conn: HttpConnection, kind: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        nonlocal last
        t0 = time.perf_counter()
        with anyio.fail_after(30):
            answer = await conn.request("POST", path, body, headers)
        lat.add(kind, time.perf_counter() - t0)
        last = time.monotonic()
        if last < stop:
            per_second[int(last - start)] += 1
        return answer

    async def customer(n: int) -> None:
        conn = conns[n]
        rng = random.Random(seed * 10_000 + n)
        me = f"load-{n}"
        held: list[tuple[str, str]] = []
        try:
            while time.monotonic() < stop:
                if held and rng.random() < 0.15:
                    show, seat = held.pop(rng.randrange(len(held)))
                    status, _ = await post(
                        conn, "cancel", f"/shows/{show}/cancellations", {"customer": me, "seats": [seat]}
                    )
                    counts["cancelled" if status == 200 else f"cancel {status}"] += 1
                    continue
                show = rng.choice(shows)
                seats = rng.sample(layout[show], rng.randint(1, 3))
                key = {"Idempotency-Key": uuid.uuid4().hex}
                path = f"/shows/{show}/reservations"
                status, _ = await post(conn, "reserve", path, {"customer": me, "seats": seats}, key)
                if status == 201 and rng.random() < 0.1:
                    # a client retry with the same key: must not book twice
                    again, answer = await post(conn, "replay", path, {"customer": me, "seats": seats}, key)
                    replayed = again == 200 and isinstance(answer, dict) and answer.get("replayed")
                    counts["replayed" if replayed else "BAD REPLAY"] += 1
                if status == 201:
                    held.extend((show, s) for s in seats)
                    counts["reserved"] += 1
                elif status == 409:
                    counts["conflict"] += 1
                else:
                    counts[f"status {status}"] += 1
        finally:
            await conn.aclose()

    async def report() -> None:
        while time.monotonic() < stop:
            await anyio.sleep(1)
            done = sum(counts.values())
            print(
                f"  {time.monotonic() - start:5.1f}s  {done} requests  "
                f"{counts['reserved']} reserved  {counts['conflict']} taken  {counts['cancelled']} cancelled  "
                f"({done / (time.monotonic() - start):.0f} req/s)",
                flush=True,
            )

    cpu = 0.0
    server: float | None = None

    async def window() -> None:
        nonlocal cpu, server
        cpu0 = time.process_time()
        server0 = None if server_pid is None else process_cpu(server_pid)
        await anyio.sleep_until(stop)
        cpu = time.process_time() - cpu0
        now = None if server_pid is None else process_cpu(server_pid)
        server = None if now is None or server0 is None else now - server0

    async with anyio.create_task_group() as tg:
        tg.start_soon(window)
        if progress:
            tg.start_soon(report)
        for n in range(clients):
            tg.start_soon(customer, n)
    return Outcome(counts, lat, seconds, per_second, last - start, cpu, server)


async def hammer(
    url: str, clients: int, seconds: float, seed: int = 1, latencies: Latencies | None = None
) -> Counter[str]:
    """Run ``clients`` concurrent customers against ``url`` for ``seconds``; returns outcome counts (see drive)."""
    outcome = await drive(url, clients, seconds, seed=seed)
    if latencies is not None:
        for kind, xs in outcome.latencies.samples.items():
            latencies.samples[kind].extend(xs)
    return outcome.counts


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
        outcome = await drive(url, args.clients, args.seconds, server_pid=None if server is None else server.pid)
        counts, latencies, elapsed = outcome.counts, outcome.latencies, outcome.elapsed
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
    cpu = f"cpu: the driver {outcome.cpu / outcome.seconds:.0%} of a core"
    if outcome.server_cpu is not None:
        cpu += f", the service {outcome.server_cpu / outcome.seconds:.0%}"
    print(f"{cpu} (of {os.cpu_count()})")
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
