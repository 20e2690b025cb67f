"""OpenTelemetry spans and metrics, when ``opentelemetry-api`` is installed; nothing otherwise.

Each finished transaction becomes one span, ``astm.transaction``, recorded
when it ends (its start time is the transaction's), with the attempts it
took, the refs it conflicted on, its ``t`` and how long it waited for
durability. Metrics: ``astm.commits``, ``astm.attempts``, ``astm.conflicts``
(by ref), ``astm.durable_wait`` (seconds), and per store the outbox backlog
and dead letters (``astm.outbox.pending``, ``astm.outbox.dead``).

Without ``opentelemetry-api`` the engine pays one flag test per transaction,
and with it but no SDK configured (the API's own no-op providers) one clock
read: nothing is recorded until the application sets a tracer or meter
provider (``opentelemetry.sdk``), which is looked for once a second.
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING, Any

__all__ = ["ON", "active", "record", "watch_store"]

if TYPE_CHECKING:
    from ._store import Store

try:
    from opentelemetry import metrics, trace
except ImportError:  # pragma: no cover - an optional dependency
    ON = False
else:
    ON = True


class _Instruments:
    """The tracer and meters, got once the first time they are needed (after the app set its providers)."""

    def __init__(self) -> None:
        self.tracer = trace.get_tracer("astm")
        meter = metrics.get_meter("astm")
        self.commits = meter.create_counter("astm.commits", description="transactions that committed")
        self.attempts = meter.create_counter("astm.attempts", description="body runs, retries included")
        self.conflicts = meter.create_counter("astm.conflicts", description="attempts a ref's conflict ended")
        self.durable_wait = meter.create_histogram(
            "astm.durable_wait", unit="s", description="time a commit waited to be durable"
        )
        self.stores: weakref.WeakSet[Store] = weakref.WeakSet()
        meter.create_observable_gauge(
            "astm.outbox.pending", [self._pending], description="outbox entries committed and not yet delivered"
        )
        meter.create_observable_gauge("astm.outbox.dead", [self._dead], description="outbox dead letters")

    def _pending(self, options: Any) -> list[Any]:
        return [metrics.Observation(n, {"store": s.url}) for s in list(self.stores) if (n := _count(s, False)) >= 0]

    def _dead(self, options: Any) -> list[Any]:
        return [metrics.Observation(n, {"store": s.url}) for s in list(self.stores) if (n := _count(s, True)) >= 0]


_instruments: _Instruments | None = None
_next_look = 0.0
_active = False


def active() -> bool:
    """Whether the application configured a tracer or meter provider (looked at once a second)."""
    global _next_look, _active
    now = time.monotonic()
    if now >= _next_look:
        _next_look = now + 1.0
        _active = _configured(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider)) or (
            _configured(
                metrics.get_meter_provider(), (metrics._internal._ProxyMeterProvider, metrics.NoOpMeterProvider)
            )
        )
    return _active


def _configured(provider: object, defaults: tuple[type, ...]) -> bool:
    return not isinstance(provider, defaults)


def _get() -> _Instruments:
    global _instruments
    if _instruments is None:
        _instruments = _Instruments()
    return _instruments


def _count(store: Store, dead: bool) -> int:
    """An outbox count a gauge can read without waiting (-1 where only the database knows)."""
    storage: Any = store.outbox._storage
    if dead:
        return len(storage.dead_now()) if hasattr(storage, "dead_now") else -1
    return int(storage.pending_now()) if hasattr(storage, "pending_now") else -1


def watch_store(store: Store) -> None:
    """Report this store's outbox in the gauges."""
    if ON:
        _get().stores.add(store)


def record(
    store: Store,
    started_ns: int,
    attempts: int,
    conflicts: dict[str, int] | None,
    t: int | None,
    durable_wait: float,
    error: BaseException | None,
) -> None:
    """One finished transaction: its span and its counts."""
    ins = _get()
    attrs: dict[str, Any] = {"astm.store": store.url, "astm.attempts": attempts}
    if t is not None:
        attrs["astm.t"] = t
    if conflicts:
        attrs["astm.conflicts"] = sorted(conflicts)
    if durable_wait:
        attrs["astm.durable_wait"] = durable_wait
    span = ins.tracer.start_span("astm.transaction", start_time=started_ns, attributes=attrs)
    if error is not None:
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
    span.end()
    base = {"store": store.url}
    ins.attempts.add(attempts, base)
    if t is not None:
        ins.commits.add(1, base)
        if durable_wait:
            ins.durable_wait.record(durable_wait, base)
    if conflicts:
        for name, n in conflicts.items():
            ins.conflicts.add(n, {**base, "ref": name})
