"""The end-to-end case: the seat service over HTTP against the same API on a dict, a lock and sqlite3.

The subject is the real seat service (``examples/seats``: FastAPI on
``astm.web``, an embedded SQLite store); the baseline is
:mod:`astm.bench._seats_baseline`, the same HTTP API as a plain Starlette app
keeping its state in dicts under one ``asyncio.Lock`` with one sqlite3
commit (``journal_mode=WAL``, ``synchronous=FULL``, on its event loop) per
booking. Each runs in its own process under uvicorn with the same settings,
on a loopback port, on a fresh file and with one fresh show every round, so
every round measures a show from its first sale on.

The load is the seat service's own load generator
(:func:`examples.seats.load.drive`), in a third process kept alive between
rounds: a fixed number of customers, each on its own keep-alive connection,
booking 1 to 3 random seats (with an Idempotency-Key, one success in ten sent
again and replayed), cancelling one of theirs with probability 0.15. As the
show fills, more bookings hit taken seats (409, which write nothing) and the
sales ledger grows with every sale and refund. After every round the
generator's invariant checks run against the server (no seat sold twice, the
seat map and the ledger agree, one confirmation per sale); any failure, like
any unexpected status, counts as an error.

A round is subject then baseline or baseline then subject, alternating, like
every case. Each side's figures: requests/s completed in the window,
latency percentiles, the rate in the window's first and last second and
their ratio (flat is about 1, and the baseline's own ratio says what the
changing mix of requests does to it), the share of the show sold at the end,
and the CPU share of one core the load generator and the server used (on a
2-core machine the generator, the server and its writer thread share the
cores: the generator's share says how much it took from the server).
``ASTM_BENCH_SEATS_SECONDS`` sets the length of a counted round (default 5 s,
1 s with ``--quick``), ``ASTM_BENCH_SEATS_CLIENTS`` the number of customers
(default 100, 20 with ``--quick``), and ``ASTM_BENCH_SEATS_BASELINE_THREAD=1``
has the baseline commit in a worker thread instead of on its event loop (the
loop then serves other requests through each fsync, at the cost of two
thread hand-offs per booking: slower here).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from ._child import Child, command, reply
from ._harness import Case, Cases, Config, Derived, Result

__all__ = ["ROOT", "available", "load_worker", "seats"]

#: the repository the bench runs from (examples/ is beside astm/ in a clone, not in an installed package)
ROOT = Path(__file__).resolve().parents[2]


def available() -> str | None:
    """Why the case cannot run here (None when it can): it needs a clone's examples/ and the web extra."""
    if not (ROOT / "examples" / "seats" / "app.py").exists():
        return "examples/seats is not here (the case runs from a clone of the repository)"
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "starlette", "httpx") if importlib.util.find_spec(m) is None]
    return f"missing {', '.join(missing)} (install the web extra)" if missing else None


def _env() -> dict[str, str]:
    """The children's environment: this one, with the repository first on the import path."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


async def _banner_url(proc: anyio.abc.Process, pattern: bytes, timeout: float = 60) -> str:
    assert proc.stdout is not None
    seen = b""
    with anyio.fail_after(timeout):
        async for chunk in proc.stdout:
            seen += chunk
            found = re.search(pattern + rb" on (http://\S+)", seen)
            if found:
                return found.group(1).decode()
    raise RuntimeError(f"the server exited before it listened: {seen.decode(errors='replace')}")


class _Side:
    """One side of the case: starts its server on a fresh file per call, has the load driven at it, stops it."""

    def __init__(
        self,
        label: str,
        argv: Callable[[str, str], list[str]],
        banner: bytes,
        load: Child,
        clients: int,
        seconds: float,
        warmup: float,
        capacity: int,
        progress: bool,
    ) -> None:
        self.label, self.argv, self.banner, self.load = label, argv, banner, load
        self.clients, self.seconds, self.warmup, self.capacity = clients, seconds, warmup, capacity
        self.progress = progress
        self.calls = 0
        self.problems: list[str] = []

    async def __call__(self) -> Result:
        self.calls += 1
        seconds = self.warmup if self.calls == 1 else self.seconds
        with tempfile.TemporaryDirectory(prefix="astm-bench-seats-") as tmp:
            mail_log = f"{tmp}/mail.log"
            proc = await anyio.open_process(
                self.argv(tmp, mail_log), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=None
            )
            try:
                url = await _banner_url(proc, self.banner)
                ask = {"url": url, "mail_log": mail_log, "clients": self.clients, "seconds": seconds,
                       "seed": self.calls, "server_pid": proc.pid}  # fmt: skip
                got = json.loads(await self.load.ask(json.dumps(ask)))
            finally:
                proc.terminate()
                with anyio.move_on_after(30) as scope:
                    await proc.wait()
                if scope.cancelled_caught:  # pragma: no cover - a stuck server
                    proc.kill()
                    await proc.wait()
        errors = got["problems"]
        if errors:
            self.problems += [f"{self.label} round {self.calls}: {p}" for p in errors]
            print(f"  seats, {self.label}: {'; '.join(errors)}", file=sys.stderr, flush=True)
        rates: list[float] = got["rates"]
        if self.progress:
            curve = " ".join(f"{r:.0f}" for r in rates)
            print(
                f"  seats, {self.label}{' (warm-up)' if self.calls == 1 else ''}: {got['rate']:.0f} req/s, "
                f"per second {curve}; p50 {got['p50'] * 1000:.1f} ms p99 {got['p99'] * 1000:.1f} ms; "
                f"sold {got['sold'] / self.capacity:.0%}; cpu load {got['cpu']:.0%} server {got['server_cpu']:.0%}; "
                f"{', '.join(f'{k} {v}' for k, v in sorted(got['counts'].items()))}",
                file=sys.stderr,
                flush=True,
            )
        first, last = rates[0], rates[-1] if len(rates) > 1 else rates[0]
        figures = {
            "p50 ms": got["p50"] * 1000,
            "p90 ms": got["p90"] * 1000,
            "p99 ms": got["p99"] * 1000,
            "first s req/s": first,
            "last s req/s": last,
            "last/first": last / first if first else 0.0,
            "sold": got["sold"] / self.capacity,
            "load cpu": got["cpu"],
            "server cpu": got["server_cpu"],
            "errors": float(len(errors)),
        }
        return got["rate"], figures


async def seats(cfg: Config) -> Cases:
    """The seat service against the dict + lock + sqlite3 baseline, over HTTP, as the show sells."""
    clients = int(os.environ.get("ASTM_BENCH_SEATS_CLIENTS", cfg.pick(100, 20)))
    rows, cols = cfg.pick((26, 300), (10, 20))
    capacity = rows * cols
    seconds = float(os.environ.get("ASTM_BENCH_SEATS_SECONDS", cfg.pick(5.0, 1.0)))
    name = f"seat service over HTTP, {clients} clients, a show of {capacity:,} seats"
    names = [name, *(f"{name}: {x}" for x in ("p50 latency", "p99 latency", "req/s in the round's last second"))]
    if not any(cfg.wants(n) for n in names):
        return
    why = available()
    if why is not None:
        if cfg.progress:
            print(f"  {name}: left out, {why}", file=sys.stderr, flush=True)
        return
    show = f"bench:Bench night:{rows}:{cols}"

    def subject_argv(tmp: str, mail_log: str) -> list[str]:
        return [sys.executable, "-m", "examples.seats", "--store", f"sqlite:///{tmp}/seats.db",
                "--mail-log", mail_log, "--port", "0", "--show", show]  # fmt: skip

    in_thread = os.environ.get("ASTM_BENCH_SEATS_BASELINE_THREAD", "") not in ("", "0")

    def baseline_argv(tmp: str, mail_log: str) -> list[str]:
        return [sys.executable, "-m", "astm.bench._seats_baseline", "--db", f"{tmp}/baseline.db",
                "--mail-log", mail_log, "--port", "0", "--show", show,
                *(["--commit-in-thread"] if in_thread else [])]  # fmt: skip

    load = await Child.start("--seats-load", env=_env())
    try:
        warmup = cfg.pick(1.0, 0.3)
        subject = _Side("astm", subject_argv, rb"seat service", load, clients, seconds, warmup, capacity, cfg.progress)
        baseline = _Side("baseline", baseline_argv, rb"seat baseline", load, clients, seconds, warmup, capacity,
                         cfg.progress)  # fmt: skip
        yield Case(
            name,
            subject,
            baseline,
            "req/s",
            ">= 0.7",
            note="baseline: Starlette, dicts under one asyncio.Lock, one sqlite3 WAL FULL commit per booking "
            f"({'in a worker thread' if in_thread else 'on the event loop'}); {seconds:g} s rounds on a fresh show",
            formats={
                "sold": ".0%",
                "load cpu": ".0%",
                "server cpu": ".0%",
                "errors": ".0f",
                "last/first": ".2f",
                "p90 ms": ".1f",
                "first s req/s": ".0f",
                "last s req/s": ".0f",
            },
            also=(
                Derived(names[1], "p50 ms", "p50 ms", "ms", lower_is_better=True),
                Derived(names[2], "p99 ms", "p99 ms", "ms", lower_is_better=True),
                Derived(
                    names[3],
                    "last s req/s",
                    "last s req/s",
                    "req/s",
                    target=">= 0.7, flat",
                    note="the show at its fullest; flat: astm's last/first (in the first row's notes) near 1",
                ),
            ),
        )
    finally:
        await load.close()
    problems = subject.problems + baseline.problems
    if problems:
        raise AssertionError("the seat case's checks failed: " + "; ".join(problems))


async def load_worker() -> None:
    """The load generator's process: each command (a JSON line) is one round against a server; answers JSON."""
    sys.path.insert(0, str(ROOT))
    import httpx

    from examples.seats.load import check, drive, percentiles, settle

    reply("ready")
    while line := await command():
        ask: dict[str, Any] = json.loads(line)
        outcome = await drive(
            ask["url"], ask["clients"], ask["seconds"], seed=ask["seed"], progress=False, server_pid=ask["server_pid"]
        )
        async with httpx.AsyncClient(base_url=ask["url"], timeout=60) as client:
            ledger = (await client.get("/sales")).json()
        sales = sum(1 for e in ledger["entries"] if e["kind"] == "sale")
        await settle(ask["url"], Path(ask["mail_log"]), sales)
        problems = await check(ask["url"], Path(ask["mail_log"]))
        bad = [k for k in outcome.counts if k.startswith(("status", "BAD", "cancel 5"))]
        problems += [f"unexpected outcome: {k} x{outcome.counts[k]}" for k in bad]
        p = percentiles(outcome.latencies.all())
        reply(
            json.dumps(
                {
                    "rate": outcome.rate,
                    "rates": outcome.rates(),
                    "p50": p[50],
                    "p90": p[90],
                    "p99": p[99],
                    "counts": dict(outcome.counts),
                    "sold": ledger["seats_sold"],
                    "cpu": outcome.cpu / outcome.seconds,
                    "server_cpu": (outcome.server_cpu or 0.0) / outcome.seconds,
                    "problems": problems,
                }
            )
        )
