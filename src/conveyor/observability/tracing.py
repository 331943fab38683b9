"""OpenTelemetry traces of an app (``pip install 'conveyor[otel]'``).

``Tracing(app)`` is an ``Observer`` that follows the messaging semantic
conventions:

- ``send {topic}`` (PRODUCER) when a message is built: in a handler it is a
  child of the handler's span, in an HTTP request of the request's, and its
  context goes into the message's ``traceparent`` right then, inside the
  business transaction that writes the outbox row, not when a relay sends it;
- ``publish`` (PRODUCER) for each batch the outbox relay sends, linked to
  the spans that built its messages (a relay draining many requests' rows
  belongs to none of their traces);
- ``process {topic}`` (CONSUMER) around each handler call, a child of the
  message's ``traceparent``: one trace follows a request across HTTP, the
  outbox, brokers, processes and saga steps; each attempt is its own span,
  and its outcome (applied, retry, dead letter...) ends it;
- ``POST`` (CLIENT) for each webhook attempt, whose ``traceparent`` header
  carries the trace on to the receiver.

Attributes: ``messaging.system`` (``conveyor``), ``messaging.destination.name``,
``messaging.operation.type``, ``messaging.message.id``,
``messaging.message.conversation_id`` (the correlation id),
``messaging.consumer.group.name``, ``messaging.batch.message_count``,
``error.type``, and ``conveyor.attempt``, ``conveyor.outcome``,
``conveyor.saga.id`` / ``.step`` / ``.phase`` on saga messages.

Without a ``tracer_provider`` one is set up from the standard ``OTEL_*``
variables (OTLP over HTTP to ``OTEL_EXPORTER_OTLP_ENDPOINT``, the service
named ``OTEL_SERVICE_NAME`` or the app's name), unless the process already
has one. ``wrap_asgi(api)`` makes an ASGI app's requests server spans.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from conveyor._drivers import missing_extra

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.propagate import extract, inject
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import Decision, Sampler
    from opentelemetry.trace import (
        Link,
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
    )
except ModuleNotFoundError as exc:
    raise missing_extra(exc, "conveyor.observability.tracing", "otel") from None

from conveyor import __version__
from conveyor.messages import TRACEPARENT, Message, parse_traceparent
from conveyor.runtime import App, Observer, Settlement
from conveyor.runtime._context import Context

__all__ = ["Tracing", "wrap_asgi"]

_SYSTEM = "conveyor"
_OPEN_LIMIT = 10_000  # consumer spans waiting for their outcome, at most


def _default_provider(service: str) -> trace.TracerProvider:
    """The process's provider; a new SDK one exporting OTLP/HTTP if it has none."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    name = os.environ.get("OTEL_SERVICE_NAME") or service
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def _saga_attributes(message: Message) -> dict[str, str]:
    h = message.headers
    out = {}
    for header, attribute in (
        ("saga-id", "conveyor.saga.id"),
        ("saga-step", "conveyor.saga.step"),
        ("saga-phase", "conveyor.saga.phase"),
    ):
        if header in h:
            out[attribute] = h[header]
    return out


class Tracing(Observer):
    """Spans of ``app``'s messages; see the module doc."""

    def __init__(self, app: App, *, tracer_provider: trace.TracerProvider | None = None) -> None:
        self.app = app
        self.provider = tracer_provider or _default_provider(app.name)
        self.tracer = self.provider.get_tracer("conveyor", __version__)
        # The SDK's sampler, asked before a consumer span's attributes are
        # built: most messages of a sampled-down system cost no span at all.
        self._sampler: Sampler | None = getattr(self.provider, "sampler", None)
        self._open: dict[tuple[str, str, int], trace.Span] = {}
        app.observe(self)

    def outgoing(self, message: Message, *, parent: str | None) -> Mapping[str, str] | None:
        # A child of the span running now (a handler's, an HTTP request's);
        # else of the trace the message was sent in, else a new trace.
        context = None
        if not trace.get_current_span().get_span_context().is_valid and parent is not None:
            context = self._context_of(parent, message.headers)[0]
        span = self.tracer.start_span(
            f"send {message.topic}",
            context=context,
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": _SYSTEM,
                "messaging.destination.name": message.topic,
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
                "messaging.message.id": message.id,
                "messaging.message.conversation_id": message.correlation_id,
                **_saga_attributes(message),
            },
        )
        carrier: dict[str, str] = {}
        inject(carrier, context=trace.set_span_in_context(span))
        span.end()
        return carrier

    def published(
        self, messages: Sequence[Message], *, via: str, seconds: float, error: BaseException | None
    ) -> None:
        if via != "relay" or not messages:
            return
        links = []
        for message in messages:
            context = trace.get_current_span(extract(dict(message.headers))).get_span_context()
            if context.is_valid:
                links.append(Link(context))
        span = self.tracer.start_span(
            "publish",
            kind=SpanKind.PRODUCER,
            links=links,
            attributes={
                "messaging.system": _SYSTEM,
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.batch.message_count": len(messages),
                "conveyor.via": "relay",
            },
        )
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, str(error)))
            span.set_attribute("error.type", type(error).__qualname__)
        span.end()

    def _context_of(
        self, traceparent: str | None, headers: Mapping[str, str]
    ) -> tuple[otel_context.Context, int | None]:
        """The context a span in the trace of ``traceparent`` continues, and
        its trace id (None: a root). Conveyor's own ``traceparent`` is read
        directly; with ``tracestate`` or ``baggage`` the propagators read it."""
        if "tracestate" in headers or "baggage" in headers:
            parent = extract({**headers, TRACEPARENT: traceparent or ""})
            context = trace.get_current_span(parent).get_span_context()
            return parent, context.trace_id if context.is_valid else None
        parsed = parse_traceparent(traceparent)
        if parsed is None or parsed[0] == "0" * 32 or parsed[1] == "0" * 16:
            return otel_context.Context(), None
        trace_id, span_id, flags = (int(part, 16) for part in parsed)
        remote = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
        return trace.set_span_in_context(NonRecordingSpan(remote), otel_context.Context()), trace_id

    @contextlib.contextmanager
    def consuming(self, ctx: Context) -> Iterator[None]:
        message = ctx.message
        parent, trace_id = self._context_of(message.traceparent, message.headers)
        name = f"process {message.topic}"
        if (
            trace_id is not None
            and self._sampler is not None
            and self._sampler.should_sample(parent, trace_id, name, SpanKind.CONSUMER).decision
            is Decision.DROP
        ):
            # Not sampled: no span to build, but what the handler sends stays
            # in the message's trace.
            token = otel_context.attach(parent)
            try:
                yield
            finally:
                otel_context.detach(token)
            return
        span = self.tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": _SYSTEM,
                "messaging.destination.name": message.topic,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.message.id": message.id,
                "messaging.message.conversation_id": message.correlation_id,
                "messaging.consumer.group.name": ctx.group,
                "conveyor.attempt": message.attempt,
                **_saga_attributes(message),
            },
        )
        key = (ctx.group, message.id, message.attempt)
        if len(self._open) >= _OPEN_LIMIT:
            self._open.pop(next(iter(self._open))).end()
        self._open[key] = span
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield
        except BaseException as exc:
            span.record_exception(exc)
            raise
        finally:
            otel_context.detach(token)

    def settled(self, events: Sequence[Settlement]) -> None:
        for event in events:
            span = self._open.pop((event.group, event.message.id, event.message.attempt), None)
            if span is None:
                continue
            span.set_attribute("conveyor.outcome", event.outcome)
            if event.outcome in ("retry", "dead_letter", "rolled_back"):
                if event.error_type:
                    span.set_attribute("error.type", event.error_type)
                span.set_status(Status(StatusCode.ERROR, event.reason or event.outcome))
            span.end()

    @contextlib.contextmanager
    def calling(
        self,
        cause: Message,
        *,
        method: str,
        url: str,
        headers: dict[str, str],
        result: dict[str, object],
    ) -> Iterator[None]:
        span = self.tracer.start_span(
            method,
            context=extract(dict(cause.headers)),
            kind=SpanKind.CLIENT,
            attributes={"http.request.method": method, "url.full": url},
        )
        inject(headers, context=trace.set_span_in_context(span))
        try:
            yield
        finally:
            status = result.get("status")
            if isinstance(status, int):
                span.set_attribute("http.response.status_code", status)
            if result.get("outcome") not in (None, "delivered"):
                span.set_status(Status(StatusCode.ERROR, str(result.get("error") or "")))
            span.end()

    def shutdown(self) -> None:
        """Flush what is buffered (the SDK provider's, when it is one)."""
        shutdown = getattr(self.provider, "force_flush", None)
        if shutdown is not None:
            shutdown()


def wrap_asgi(asgi_app: Any, *, tracer_provider: trace.TracerProvider | None = None) -> Any:
    """``asgi_app`` with each HTTP request a SERVER span (OpenTelemetry's ASGI
    middleware); what a request publishes is in its trace."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(asgi_app, tracer_provider=tracer_provider)
