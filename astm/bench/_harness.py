"""The benchmark harness: cases of (subject, baseline) measured in alternating rounds.

Why rounds. The machines these benchmarks run on are shared and noisy: one
disk stall or a neighbour's burst during a baseline measured once beside its
subject turns a ratio into nonsense. So every case measures its subject and
its baseline in ``rounds`` rounds, alternating them as subject, baseline,
baseline, subject, ... (an ABBA order, so a slow drift of the machine weighs on
both sides alike), computes the ratio of each round, and reports the median
ratio with its minimum and maximum: a wide min-max says the figure was noisy,
a narrow one that it is to be trusted.

A case is a pair of round callables. Each one measures one round by itself
(setup it needs per round happens before it starts its clock) and returns its
figure: a rate (higher is better) or a time per operation or a size (the case
says ``lower_is_better``), optionally with named side figures (attempts per
commit, the share of time in gc, a p99) that the row summarizes too. Both
callables run once first as a warm-up, not counted; :class:`Sized` uses that
call to size its rounds. A full garbage collection runs before every call,
outside its clock: otherwise a round pays for collecting what the other side
left young (with pyrsistent's C vectors, whose collection cost grows with
their size, that alone can swing a ratio a hundredfold).

Cases come from *groups*: async generators that create what their cases share
(stores, refs, files, child processes) outside any timed region, yield the
cases one by one, check invariants afterwards and clean up. The runner runs
each yielded case whose name matches ``--only`` before asking for the next one.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import statistics
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

__all__ = [
    "Case",
    "Cases",
    "Config",
    "Derived",
    "GcTimer",
    "Group",
    "Result",
    "Row",
    "Sized",
    "Timed",
    "run_groups",
    "load_average",
    "spread",
]

#: side figures of one round, by name (attempts/commit, gc share, p99, ...)
Figures: TypeAlias = dict[str, float]
#: what a round callable returns: its figure, or its figure and side figures
Result: TypeAlias = float | tuple[float, Figures]
#: one round of a subject or a baseline
Round: TypeAlias = Callable[[], Awaitable[Result]]


@dataclass(frozen=True)
class Config:
    """How a run is made: quick or full, how many rounds, how long a round, which cases."""

    quick: bool = False
    #: rounds per case (each round measures the subject once and the baseline once)
    rounds: int = 5
    #: the length a sized round aims for, in seconds
    seconds: float = 0.3
    #: a regular expression; only cases whose name it matches (searched, case-insensitive) run
    only: str | None = None
    #: print each row to stderr as it is done
    progress: bool = True

    def wants(self, name: str) -> bool:
        """Whether the case called ``name`` is to run."""
        return self.only is None or re.search(self.only, name, re.IGNORECASE) is not None

    def pick(self, full: Any, quick: Any) -> Any:
        """``quick`` in a quick run, else ``full``."""
        return quick if self.quick else full


@dataclass(frozen=True)
class Derived:
    """A second row a case reports from the same rounds: a side figure of the subject against one of the baseline."""

    name: str
    #: the subject's side figure that is this row's astm figure
    subject: str
    #: the baseline's side figure it is compared with
    baseline: str
    unit: str
    target: str = ""
    lower_is_better: bool = False
    note: str = ""


@dataclass
class Case:
    """One row: a subject and its baseline, each measuring one round per call."""

    name: str
    subject: Round
    baseline: Round
    unit: str
    target: str = ""
    #: the figure is a time or a size: lower is better (the ratio is still subject / baseline)
    lower_is_better: bool = False
    #: a fixed remark for the notes column (what the baseline is, ...)
    note: str = ""
    #: how each side figure is printed in the notes (a format spec such as ".3f" or ".1%"; default ".3g")
    formats: dict[str, str] = field(default_factory=dict)
    #: rows derived from the same rounds' side figures
    also: tuple[Derived, ...] = ()
    #: fewer rounds than the run's (for a case whose rounds are costly and whose figure does not drift)
    max_rounds: int | None = None
    #: seconds after which no further round starts, once 3 are done (for a case whose rounds may be long)
    budget: float | None = None
    #: report how long the full collection before each round took (``full gc ms``; before the
    #: baseline's rounds, ``baseline full gc ms``): a pause that a long-running process with the same
    #: live objects takes now and then, and that the rounds here leave out
    gc_pause: bool = False


@dataclass
class Row:
    """One line of the table: medians of astm's and the baseline's figures and of their per-round ratios."""

    case: str
    #: median of astm's figure over the rounds
    astm: float
    #: median of the baseline's figure over the rounds
    baseline: float
    unit: str
    #: median of the per-round ratios astm / baseline
    ratio: float
    ratio_min: float
    ratio_max: float
    target: str
    extra: str = ""
    lower_is_better: bool = False
    #: astm / baseline of each round, in round order
    ratios: list[float] = field(default_factory=list)
    astm_rounds: list[float] = field(default_factory=list)
    baseline_rounds: list[float] = field(default_factory=list)
    #: side figures per round: ``name`` for astm's, ``"baseline " + name`` for the baseline's
    figures: dict[str, list[float]] = field(default_factory=dict)
    #: the 1-minute load average when the row was done (a busy machine explains a wide spread)
    load: float = 0.0
    #: wall seconds the case took, warm-up and setup between rounds included
    seconds: float = 0.0


#: what a group yields: its cases, one by one (an async generator, closed by the runner)
Cases: TypeAlias = AsyncGenerator[Case, None]
#: a group of cases: an async generator over the cases, given the run's configuration
Group: TypeAlias = Callable[[Config], Cases]


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of ``values``."""
    return statistics.median(values), min(values), max(values)


def _split(result: Result) -> tuple[float, Figures]:
    if isinstance(result, tuple):
        return float(result[0]), result[1]
    return float(result), {}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def _notes(case: Case, figures: dict[str, list[float]]) -> str:
    parts = [case.note] if case.note else []
    for name, values in figures.items():
        spec = case.formats.get(name.removeprefix("baseline "), ".3g")
        med, lo, hi = spread(values)
        if lo == hi:
            parts.append(f"{name} {med:{spec}}")
        else:
            parts.append(f"{name} {med:{spec}} ({lo:{spec}} to {hi:{spec}})")
    return "; ".join(parts)


def load_average() -> float:
    """The 1-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        return 0.0


async def run_case(case: Case, cfg: Config) -> list[Row]:
    """Warm up, then measure ``case`` in alternating rounds; its row (and derived rows)."""
    started = time.perf_counter()
    rounds = cfg.rounds if case.max_rounds is None else max(1, min(cfg.rounds, case.max_rounds))
    gc.collect()
    await case.subject()  # warm-up (and sizing), not counted
    gc.collect()
    await case.baseline()
    subj: list[float] = []
    base: list[float] = []
    sfig: dict[str, list[float]] = {}
    bfig: dict[str, list[float]] = {}
    for i in range(rounds):
        if case.budget is not None and i >= 3 and time.perf_counter() - started > case.budget:
            break
        # subject, baseline, baseline, subject, ...: a drift of the machine weighs on both sides alike
        for is_subject in (True, False) if i % 2 == 0 else (False, True):
            t0 = time.perf_counter()
            gc.collect()  # each side pays for its own garbage only (before its clock starts)
            pause = time.perf_counter() - t0
            value, figs = _split(await (case.subject if is_subject else case.baseline)())
            if case.gc_pause:
                figs = {**figs, "full gc ms": pause * 1000}
            if is_subject:
                subj.append(value)
                for k, v in figs.items():
                    sfig.setdefault(k, []).append(v)
            else:
                base.append(value)
                for k, v in figs.items():
                    bfig.setdefault(k, []).append(v)
    figures = {**sfig, **{f"baseline {k}": v for k, v in bfig.items()}}
    ratios = [_ratio(s, b) for s, b in zip(subj, base, strict=True)]
    med, lo, hi = spread(ratios)
    load = load_average()
    elapsed = time.perf_counter() - started
    rows = [
        Row(
            case=case.name,
            astm=statistics.median(subj),
            baseline=statistics.median(base),
            unit=case.unit,
            ratio=med,
            ratio_min=lo,
            ratio_max=hi,
            target=case.target,
            extra=_notes(case, {k: v for k, v in figures.items() if not _derived_only(case, k)}),
            lower_is_better=case.lower_is_better,
            ratios=ratios,
            astm_rounds=subj,
            baseline_rounds=base,
            figures=figures,
            load=load,
            seconds=elapsed,
        )
    ]
    for d in case.also:
        s, b = sfig[d.subject], bfig[d.baseline]
        r = [_ratio(x, y) for x, y in zip(s, b, strict=True)]
        dmed, dlo, dhi = spread(r)
        rows.append(
            Row(
                case=d.name,
                astm=statistics.median(s),
                baseline=statistics.median(b),
                unit=d.unit,
                ratio=dmed,
                ratio_min=dlo,
                ratio_max=dhi,
                target=d.target,
                extra=d.note,
                lower_is_better=d.lower_is_better,
                ratios=r,
                astm_rounds=s,
                baseline_rounds=b,
                load=load,
                seconds=0.0,
            )
        )
    return rows


def _derived_only(case: Case, name: str) -> bool:
    """Whether side figure ``name`` is shown by a derived row rather than in the notes."""
    return any(name == d.subject or name == f"baseline {d.baseline}" for d in case.also)


async def run_groups(groups: list[Group], cfg: Config) -> list[Row]:
    """Run every wanted case of every group, in order; the rows."""
    rows: list[Row] = []
    for group in groups:
        async with contextlib.aclosing(group(cfg)) as gen:
            async for case in gen:
                if not cfg.wants(case.name):
                    continue
                done = await run_case(case, cfg)
                rows.extend(done)
                if cfg.progress:
                    for r in done:
                        print(
                            f"  {r.case}: {r.ratio:.3g} ({r.ratio_min:.3g} to {r.ratio_max:.3g}) "
                            f"[{r.seconds:.1f} s, load {r.load:.1f}]",
                            file=sys.stderr,
                            flush=True,
                        )
    return rows


@dataclass
class Timed:
    """What a sized round's body reports: operations done, the seconds they took, side figures."""

    ops: float
    seconds: float
    figures: Figures = field(default_factory=dict)


class Sized:
    """A round callable of ``n`` operations, ``n`` sized on the first (warm-up) call to last about ``seconds``.

    ``body(n)`` does its per-round setup, starts its clock, runs ``n``
    operations (or ``n`` per task, ...), stops the clock and returns a
    :class:`Timed` (or just the elapsed seconds, meaning ``n`` operations). The
    figure is operations per second. Sizing keeps the fast side of a case (a
    plain dict under a lock) from being measured over a few milliseconds, where
    one hiccup of the machine is half the figure, while the slow side takes
    the same wall time.
    """

    def __init__(
        self,
        body: Callable[[int], Awaitable[Timed | float]],
        seconds: float,
        *,
        start: int = 10,
        granule: int = 1,
        limit: int = 10_000_000,
    ) -> None:
        self.body = body
        self.seconds = seconds
        self.n = max(granule, start // granule * granule)
        self.granule = granule
        self.limit = limit
        self._sized = False

    async def _once(self, n: int) -> Timed:
        out = await self.body(n)
        return out if isinstance(out, Timed) else Timed(n, out)

    async def __call__(self) -> Result:
        if not self._sized:
            # warm-up: grow n tenfold until a call is long enough to size from; if the very first call is,
            # size from a second one (a first call may carry one-time costs: sized from it, a case would run
            # rounds of a single operation)
            first = True
            while True:
                done = await self._once(self.n)
                if done.seconds >= self.seconds / 10 or self.n * 10 > self.limit:
                    if first:
                        done = await self._once(self.n)
                    break
                self.n *= 10
                first = False
            want = int(self.n * self.seconds / done.seconds) if done.seconds > 0 else self.limit
            self.n = max(self.granule, min(self.limit, want) // self.granule * self.granule)
            self._sized = True
            return done.ops / done.seconds, done.figures
        done = await self._once(self.n)
        return done.ops / done.seconds, done.figures


class GcTimer:
    """Times the garbage collector's collections through ``gc.callbacks`` while installed (``with GcTimer()``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = 0
        self._start = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.collections += 1

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)
