"""Log records as people and machines read them.

``configure_logging(level=, format=)`` (the CLI calls it; a library never
configures logging) sends every record to stderr through structlog's
stdlib formatter: ``text`` for a terminal (``key=value`` after the message),
``json`` for a collector (one JSON object per line). Either way each record
carries

- ``event``: the stable event name Conveyor's records have
  (``conveyor.retry_scheduled``, ``conveyor.dead_lettered``...; ``log`` for
  records without one), ``message`` the text, ``level``, ``logger`` and
  ``timestamp`` (ISO 8601, UTC);
- where known: ``message_id``, ``correlation_id``, ``causation_id``,
  ``topic``, ``group``, ``attempt``, ``saga_id``, ``job_id`` (from the message
  being handled, also in records a handler writes through ``ctx.log`` or any
  logger), and ``trace_id`` / ``span_id`` of the current OpenTelemetry span,
  else the trace id of the message's ``traceparent``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from conveyor.errors import ConfigError
from conveyor.runtime._context import handling

__all__ = ["FORMATS", "ContextFilter", "configure_logging"]

FORMATS = ("text", "json")
# Drivers log their own view of failures Conveyor reports in its own words
# (a refused connection, a reconnect); below DEBUG they are kept quiet.
_DRIVER_LOGGERS = ("aio_pika", "aiormq", "aiokafka", "nats", "asyncpg", "redis", "httpx")
_MARK = "_conveyor_handler"


def _current_span() -> tuple[str, str] | None:
    """(trace id, span id) of the current OpenTelemetry span, if any."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


class ContextFilter(logging.Filter):
    """Adds the ids of the message being handled (``handling``) and of the
    current span to every record that does not carry them already."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = handling.get()
        for name, value in (current.log_fields() if current else {}).items():
            if not hasattr(record, name) and value is not None:
                setattr(record, name, value)
        span = _current_span()
        if span is not None:
            record.trace_id, record.span_id = span
        return True


def _message(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog calls the text ``event``; here ``event`` is the stable name."""
    event["message"] = event.pop("event")
    return event


def _event(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(event.get("event"), str) or not event["event"]:
        event["event"] = "log"
    return event


def configure_logging(
    *, level: str = "INFO", format: str = "text", stream: TextIO | None = None
) -> None:
    """Log to ``stream`` (stderr) at ``level`` in ``format`` (``text`` or
    ``json``); calling it again replaces Conveyor's handler. Driver loggers
    stay quiet unless ``level`` is DEBUG."""
    if format not in FORMATS:
        raise ConfigError(f"unknown log format {format!r}; use one of {', '.join(FORMATS)}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ConfigError(f"unknown log level {level!r}")
    shared: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _message,
        structlog.stdlib.ExtraAdder(),
        _event,
    ]
    if format == "json":
        renderer: Any = structlog.processors.JSONRenderer(default=str)
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=(stream or sys.stderr).isatty(),
            event_key="message",
            pad_event_to=0,
            # No frame locals: they may hold secrets (a URL's password, an
            # API key), and rendering large ones took a worker's CPU for
            # minutes per record when a broker kept failing.
            exception_formatter=structlog.dev.RichTracebackFormatter(
                show_locals=False, max_frames=30
            ),
        )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter())
    setattr(handler, _MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _DRIVER_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if numeric <= logging.DEBUG else 100)
