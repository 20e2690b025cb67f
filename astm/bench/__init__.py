"""Benchmarks: ``python -m astm.bench`` measures each case against a baseline, in alternating rounds.

The machines these run on are shared and noisy, so no figure is taken from a
single measurement: each case measures astm (the subject) and its baseline in
``--rounds`` rounds (5 by default), alternating subject, baseline, baseline,
subject, ..., and each row shows the median of the per-round ratios astm /
baseline with their minimum and maximum, beside the median figures of both
sides. A wide min-max means that case was noisy in this run. Setup (stores,
refs, files, worker processes) happens outside the timed regions, and both
sides of a case run once as an uncounted warm-up.

``--quick`` runs every case small and short (a smoke test, used by the test
suite); ``--only PATTERN`` runs the cases whose name matches the regular
expression; ``--json`` prints the rows, with every round's figures; ``--plot``
draws the median ratios with their min-max as a chart. The PostgreSQL cases
use ``ASTM_BENCH_POSTGRES_DSN`` or a throwaway cluster when PostgreSQL's
programs are installed, and are left out otherwise.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import sys
from contextlib import aclosing
from dataclasses import asdict

import anyio

import astm
from astm._gc import DEFAULT_THRESHOLD

from ._core import core
from ._effects import effects
from ._engine import engine
from ._harness import Cases, Config, Group, Row, load_average, run_groups
from ._pg_scale import pg_scale
from ._postgres import postgres
from ._seats import seats
from ._sqlite import sqlite
from ._values import value_sizes

__all__ = ["Config", "Row", "main", "plot", "run_all"]


async def _memory_values(cfg: Config) -> Cases:
    """The value-size cases on the in-memory store."""
    async with aclosing(value_sizes(astm.Store(), "memory", cfg)) as gen:
        async for case in gen:
            yield case


#: every group of cases, in table order
GROUPS: list[Group] = [core, engine, effects, _memory_values, sqlite, postgres, pg_scale, seats]


def run_all(
    quick: bool = False,
    *,
    rounds: int | None = None,
    seconds: float | None = None,
    only: str | None = None,
    progress: bool = False,
) -> list[Row]:
    """Run every case (or those matching ``only``) and return the rows.

    ``rounds`` defaults to 5 (3 when ``quick``); ``seconds``, the length a
    round aims for, to 0.3 (0.01 when ``quick``).
    """
    cfg = Config(
        quick=quick,
        rounds=rounds if rounds is not None else (3 if quick else 5),
        seconds=seconds if seconds is not None else (0.01 if quick else 0.3),
        only=only,
        progress=progress,
    )

    async def main() -> list[Row]:
        return await run_groups(GROUPS, cfg)

    return astm.run(main)


def plot(rows: list[Row], path: str) -> None:
    """Draw each case's median ratio to its baseline with min-max error bars (log scale) as a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.ratio > 0 and r.ratio_min > 0][::-1]
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(shown) + 1.4))
    labels = [r.case for r in shown]
    ratios = [r.ratio for r in shown]
    err = [[r.ratio - r.ratio_min for r in shown], [r.ratio_max - r.ratio for r in shown]]
    colors = ["#c1844a" if r.lower_is_better else "#4a7fc1" for r in shown]
    ax.barh(labels, ratios, color=colors, xerr=err, ecolor="#222", capsize=2, error_kw={"linewidth": 0.8})
    ax.axvline(1.0, color="#444", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("astm / baseline: median of the rounds, min to max (log scale; orange: lower is better)")
    ax.tick_params(axis="y", labelsize=7)
    for y, r in enumerate(shown):
        ax.text(r.ratio_max, y, f" {r.ratio:.3g}", va="center", fontsize=7)
    ax.set_title("python -m astm.bench")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _fmt_ratio(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def table(rows: list[Row]) -> str:
    """The rows as an aligned text table."""
    header = ("case", "astm", "baseline", "unit", "ratio", "min to max", "target", "notes")
    lines = [header] + [
        (
            r.case,
            _fmt(r.astm),
            _fmt(r.baseline),
            r.unit + (" (lower is better)" if r.lower_is_better else ""),
            _fmt_ratio(r.ratio),
            f"{_fmt_ratio(r.ratio_min)} to {_fmt_ratio(r.ratio_max)}",
            r.target,
            r.extra,
        )
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _environment(cfg_rounds: int) -> str:
    loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    engine = "compiled engine" if astm.compiled else "pure-Python engine"
    return (
        f"python {platform.python_version()}, {loop} event loop, {engine}, {os.cpu_count()} CPUs, "
        f"gc threshold {DEFAULT_THRESHOLD} while cases run (astm.run; CPython's default {gc.get_threshold()[0]}), "
        f"{cfg_rounds} rounds per case, load average {load_average():.2f}"
    )


def _worker(argv: list[str]) -> int:
    """Run one of the worker processes that the multi-process cases start."""
    from ._engine import engine_worker
    from ._pg_scale import pg_scale_worker
    from ._postgres import pg_worker
    from ._seats import load_worker

    if argv[0] == "--seats-load":
        anyio.run(load_worker)
    elif argv[0] == "--pg-worker":
        astm.run(pg_worker, argv[1])
    elif argv[0] == "--pg-scale-worker":
        astm.run(pg_scale_worker, argv[1])
    else:
        astm.run(engine_worker, float(argv[1]))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m astm.bench``: run the cases and print the table (or JSON)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in ("--pg-worker", "--pg-scale-worker", "--engine-worker", "--seats-load"):
        return _worker(argv)
    parser = argparse.ArgumentParser(
        prog="python -m astm.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small, short runs (a smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per case (default 5; 3 with --quick)")
    parser.add_argument(
        "--seconds", type=float, default=None, help="the length a round aims for (default 0.3; 0.01 with --quick)"
    )
    parser.add_argument("--only", metavar="PATTERN", help="run only the cases whose name matches this regex")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON, with every round's figures")
    parser.add_argument(
        "--plot", nargs="?", const="docs/performance.png", metavar="PNG", help="also draw the ratios as a chart"
    )
    parser.add_argument("--quiet", action="store_true", help="do not print each row to stderr as it is done")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 5)
    if not args.quiet:
        print(_environment(rounds), file=sys.stderr, flush=True)
    rows = run_all(args.quick, rounds=rounds, seconds=args.seconds, only=args.only, progress=not args.quiet)
    if args.plot and rows:
        plot(rows, args.plot)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2, ensure_ascii=False))
        return 0
    print(_environment(rounds))
    print(table(rows))
    return 0
