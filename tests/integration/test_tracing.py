"""OpenTelemetry spans of a running app, in one process (the cross-process
trace through the order system is in tests/e2e/test_observability.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from conveyor import App, Context, Retry
from conveyor.observability import ContextFilter
from conveyor.observability.tracing import Tracing
from conveyor.testing import drained
from tests.helpers import PATHS, settings_for


def traced(app: App) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    Tracing(app, tracer_provider=provider)
    return exporter


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


@pytest.mark.parametrize("path", PATHS)
async def test_a_message_and_what_its_handler_sends_are_one_trace(
    path: str, tmp_path: Path
) -> None:
    """send a -> process a -> send b -> process b, each the parent of the
    next, in one trace; on the generic path the relay's publish span links
    to the send span of what it relayed and is in no request's trace; the
    retried attempt is a span of its own with its outcome."""
    app = App("traced", settings=settings_for(path, tmp_path))
    exporter = traced(app)

    @app.handler("a", group="ga")
    async def a(ctx: Context, body: dict[str, int]) -> None:
        if ctx.attempt == 1:
            raise Retry(delay=0)
        await ctx.publish("b", {})

    @app.handler("b", group="gb")
    async def b(ctx: Context) -> None:
        pass

    async with app:
        await app.publish("a", {"n": 1})
        await drained(app)
    spans = exporter.get_finished_spans()
    [send_a], [send_b], [process_b] = (
        named(spans, "send a"),
        named(spans, "send b"),
        named(spans, "process b"),
    )
    tries = sorted(named(spans, "process a"), key=lambda s: s.attributes["conveyor.attempt"])
    assert [t.attributes["conveyor.outcome"] for t in tries] == ["retry", "applied"]
    trace = send_a.context.trace_id
    assert {s.context.trace_id for s in (*tries, send_b, process_b)} == {trace}
    assert all(t.parent.span_id == send_a.context.span_id for t in tries)
    assert send_b.parent.span_id == tries[1].context.span_id
    assert process_b.parent.span_id == send_b.context.span_id
    assert send_a.kind is SpanKind.PRODUCER
    assert process_b.kind is SpanKind.CONSUMER
    attrs = process_b.attributes
    assert attrs["messaging.destination.name"] == "b"
    assert attrs["messaging.consumer.group.name"] == "gb"
    assert attrs["messaging.operation.type"] == "process"
    relays = named(spans, "publish")
    if path == "bound":
        assert relays == []
    else:
        linked = {link.context.span_id for r in relays for link in r.links}
        assert send_b.context.span_id in linked
        assert all(r.context.trace_id != trace for r in relays)


async def test_a_record_written_in_a_handler_carries_its_span(tmp_path: Path) -> None:
    """A log record a handler writes carries the trace and span id of the
    handler's own span."""
    app = App("logged", settings=settings_for("bound", tmp_path))
    exporter = traced(app)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    keep.addFilter(ContextFilter())
    logger = logging.getLogger("conveyor.handler")
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    try:

        @app.handler("a", group="ga")
        async def a(ctx: Context) -> None:
            ctx.log.info("inside")

        async with app:
            await app.publish("a", {})
            await drained(app)
    finally:
        logger.removeHandler(keep)
    [process] = named(exporter.get_finished_spans(), "process a")
    [record] = [r for r in records if r.getMessage() == "inside"]
    assert record.trace_id == f"{process.context.trace_id:032x}"
    assert record.span_id == f"{process.context.span_id:016x}"
    assert record.group == "ga"


async def test_an_unsampled_message_costs_no_span_and_keeps_its_trace(tmp_path: Path) -> None:
    """With a sampler that drops every trace, handling a message builds no
    span, yet what its handler sends stays in the message's trace; a message
    carrying ``tracestate`` is read through the propagators and continues
    its trace the same way."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = App("unsampled", settings=settings_for(PATHS[0], tmp_path))
    tracing = Tracing(app, tracer_provider=provider)
    seen: list[str | None] = []

    @app.handler("a", group="ga")
    async def a(ctx: Context) -> None:
        await ctx.publish("b", {})

    @app.handler("b", group="gb")
    async def b(ctx: Context) -> None:
        seen.append(ctx.message.traceparent)

    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    async with app:
        await app.publish("a", {}, headers={"traceparent": parent})
        await app.publish("a", {}, headers={"traceparent": parent, "tracestate": "v=1"})
        await drained(app)
    assert exporter.get_finished_spans() == ()
    assert tracing._open == {}
    assert len(seen) == 2
    for traceparent in seen:
        assert traceparent is not None
        assert traceparent.split("-")[1] == "0af7651916cd43dd8448eb211c80319c"


async def test_a_traceparent_the_sender_set_is_the_send_spans_parent(tmp_path: Path) -> None:
    """A message published outside any span with a ``traceparent`` of the
    caller's joins that trace: its send span is a child of the caller's span."""
    app = App("joined", settings=settings_for(PATHS[0], tmp_path))
    exporter = traced(app)

    @app.handler("a", group="ga")
    async def a(ctx: Context) -> None:
        pass

    async with app:
        await app.publish(
            "a",
            {},
            headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        )
        await drained(app)
    [send] = named(exporter.get_finished_spans(), "send a")
    [process] = named(exporter.get_finished_spans(), "process a")
    assert f"{send.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert send.parent is not None
    assert f"{send.parent.span_id:016x}" == "b7ad6b7169203331"
    assert process.parent is not None
    assert process.parent.span_id == send.context.span_id


async def test_a_job_runs_in_the_trace_of_the_request_that_submitted_it(tmp_path: Path) -> None:
    """``JobAPI(tracing=True)``: the POST is a SERVER span, the job's message
    is sent in it and handled in its trace."""
    from tests.http_jobs import build

    b = build(settings_for("bound", tmp_path))
    exporter = traced(b.app)
    from conveyor.http import JobAPI

    api = JobAPI(b.jobs, tracing=True, rate_limit=None)
    b.api = api
    async with api, b.client() as client:
        accepted = await client.post("/jobs/square", json={"n": 4})
        assert accepted.status_code == 202
        await drained(b.app)
    await b.app.close()
    spans = exporter.get_finished_spans()
    [server] = [s for s in spans if s.kind is SpanKind.SERVER and "POST" in s.name]
    [send] = named(spans, f"send {b.jobs.kinds['square'].topic}")
    [process] = named(spans, f"process {b.jobs.kinds['square'].topic}")
    assert send.context.trace_id == server.context.trace_id
    assert process.context.trace_id == server.context.trace_id
    assert process.parent is not None
    assert process.parent.span_id == send.context.span_id
