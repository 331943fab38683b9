"""What one OpenTelemetry span costs in this Python, beside a Conveyor message.

.venv/bin/python benchmarks/otel_span_cost.py [--spans N]

Times, per span, what ``Tracing`` asks of the OpenTelemetry SDK for each
message it handles (a CONSUMER span with the messaging attributes, made
current around the handler, ended with its outcome) and what the OTLP
exporter then does with it (encoding to protobuf), with no network. A no-op
message costs Conveyor about 22 µs on the 2-core machine of
docs/benchmarks.md, so these two figures are what bounds the tracing cost.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

ATTRIBUTES: dict[str, str | int] = {
    "messaging.system": "conveyor",
    "messaging.destination.name": "bench.in",
    "messaging.operation.type": "process",
    "messaging.operation.name": "process",
    "messaging.message.id": "0193abcd-1234-7000-8000-123456789abc",
    "messaging.message.conversation_id": "0193abcd-1234-7000-8000-123456789abc",
    "messaging.consumer.group.name": "bench",
    "conveyor.attempt": 1,
}


class _Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def main(spans: int) -> None:
    kept = _Keep()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(kept))
    tracer = provider.get_tracer("conveyor")

    def one() -> None:
        span = tracer.start_span("process bench.in", kind=SpanKind.CONSUMER, attributes=ATTRIBUTES)
        token = otel_context.attach(trace.set_span_in_context(span))
        otel_context.detach(token)
        span.set_attribute("conveyor.outcome", "applied")
        span.end()

    build = min(timeit.repeat(one, number=spans, repeat=3)) / spans
    batch = kept.spans[:512]
    encode = min(
        timeit.repeat(lambda: encode_spans(batch).SerializeToString(), number=10, repeat=3)
    ) / (10 * len(batch))
    print(f"span built, current, ended: {build * 1e6:6.1f} µs")
    print(f"span encoded for OTLP:      {encode * 1e6:6.1f} µs")
    print(f"together:                   {(build + encode) * 1e6:6.1f} µs per traced message")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spans", type=int, default=20_000)
    main(parser.parse_args().spans)
