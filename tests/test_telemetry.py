"""OpenTelemetry: a span per transaction and the store's metrics, checked with the SDK's in-memory exporters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

import astm

otel_sdk = pytest.importorskip("opentelemetry.sdk")

from opentelemetry import metrics, trace  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

Key = tuple[int, int]


@pytest.fixture(scope="module")
def otel() -> tuple[InMemorySpanExporter, InMemoryMetricReader]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return exporter, reader


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out.setdefault(m.name, []).extend(m.data.data_points)
    return out


async def test_a_span_per_transaction_with_its_conflicts(
    otel: tuple[InMemorySpanExporter, InMemoryMetricReader], tmp_path: Path
) -> None:
    """Each transaction is one span with its attempts, conflicting refs, t and durability wait; metrics count."""
    exporter, reader = otel
    exporter.clear()
    astm._telemetry._next_look = 0.0  # look for the providers this fixture set now, not in a second
    async with astm.Store(f"sqlite:///{tmp_path / 's.db'}") as store:
        r = store.ref("hot", 0)
        go = anyio.Event()

        async def slow() -> None:
            v = r.get()
            await go.wait()  # another commit lands meanwhile: this attempt conflicts
            r.set(v + 1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(store.atomically, slow)
            await anyio.sleep(0.01)
            await store.atomically(lambda: r.alter(lambda v: v + 10))
            go.set()
        spans = [s for s in exporter.get_finished_spans() if s.name == "astm.transaction"]
        assert len(spans) == 2
        retried = max(spans, key=lambda s: int(s.attributes["astm.attempts"]))  # type: ignore[index, arg-type]
        assert retried.attributes is not None
        assert retried.attributes["astm.attempts"] == 2 and list(retried.attributes["astm.conflicts"]) == ["hot"]  # type: ignore[arg-type]
        assert retried.attributes["astm.t"] == 2 and retried.attributes["astm.durable_wait"] > 0  # type: ignore[operator]
        assert retried.start_time is not None and retried.end_time is not None
        assert retried.end_time > retried.start_time

        @store.effect("never", max_attempts=1)
        async def never(payload: int, *, key: Key) -> None:
            raise ConnectionError("down")

        await store.atomically(lambda: never.enqueue(1))
        await store.outbox.drain()
        points = _points(reader)
        mine = {"store": store.url}
        assert sum(p.value for p in points["astm.commits"] if p.attributes == mine) >= 3
        assert sum(p.value for p in points["astm.conflicts"] if p.attributes == {**mine, "ref": "hot"}) == 1
        assert [p.value for p in points["astm.outbox.dead"] if p.attributes == mine] == [1]
        assert any(p.count >= 3 for p in points["astm.durable_wait"] if p.attributes == mine)


async def test_a_failed_transaction_is_an_error_span(otel: tuple[InMemorySpanExporter, InMemoryMetricReader]) -> None:
    """A transaction that raises ends as a span with error status and the exception recorded."""
    exporter, _ = otel
    exporter.clear()
    astm._telemetry._next_look = 0.0
    store = astm.Store()
    r = store.ref("r", 1, validator=lambda v: v > 0)
    with pytest.raises(astm.ValidationError):
        await store.atomically(lambda: r.set(-1))
    [span] = exporter.get_finished_spans()
    assert span.status.status_code == trace.StatusCode.ERROR
    assert any(e.name == "exception" for e in span.events)
