"""Seeing Conveyor run: structured logs, Prometheus metrics and
OpenTelemetry traces, all fed by the runtime's observer hooks. See
docs/observability.md.

Metrics need ``pip install 'conveyor[prometheus]'`` and tracing
``pip install 'conveyor[otel]'``; without them nothing of either is imported.
"""

from conveyor.observability._logs import FORMATS, ContextFilter, configure_logging

__all__ = ["FORMATS", "ContextFilter", "configure_logging"]
