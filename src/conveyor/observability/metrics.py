"""Prometheus metrics of an app (``pip install 'conveyor[prometheus]'``).

``Metrics(app)`` is an ``Observer``: counters and histograms of what this
process does (published, processed by outcome, handler and queue-wait times,
retries, dead letters, breakers, sagas, jobs, webhooks, HTTP requests).
What the queues hold is not counted in any process: ``Metrics.refresh()``
reads it from the broker and the store (ready / in flight / delayed / dead
per queue, the oldest message, the outbox, sagas and jobs by state, live
consumers from the workers' heartbeats) just before each scrape, so every
process reports the same truth and nothing drifts.

Seconds, never milliseconds; no ids as labels. ``serve(app, metrics, port=)``
serves ``/metrics``, ``/healthz`` (the process runs) and ``/readyz`` (the
broker and the store answer) from the app's own event loop.

Several processes: each worker serves its own port and Prometheus scrapes
them all (``sum by (...)`` gives totals; the queue gauges are the same in
every process, so take ``max by (...)``). ``conveyor serve --workers N``
shares one port between N processes: it uses prometheus-client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``), see docs/observability.md.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from conveyor._drivers import missing_extra

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
    from prometheus_client.utils import floatToGoString
except ModuleNotFoundError as exc:
    raise missing_extra(exc, "conveyor.observability.metrics", "prometheus") from None

from conveyor import __version__
from conveyor._urls import redact
from conveyor.messages import Message
from conveyor.resilience._breaker import BreakerState, CircuitBreaker
from conveyor.runtime import App, DeadLettered, Observer, Settlement
from conveyor.runtime._heartbeat import live_workers

__all__ = ["Metrics", "serve"]

log = logging.getLogger("conveyor.metrics")

# Handler times, waits and latencies: 1 ms to 5 min.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_LONG = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
_ATTEMPTS = (1, 2, 3, 4, 5, 7, 10, 15, 20, 50)
_STATES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class Metrics(Observer):
    """The metrics of ``app``, in ``registry`` (a new one by default); see the
    module doc. Construct it before the app connects: it observes ``app``."""

    def __init__(self, app: App, *, registry: CollectorRegistry | None = None) -> None:
        self.app = app
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        q = ("topic", "group")
        self.published_total = Counter(
            "conveyor_messages_published", "Messages published.", ("topic", "outcome"), registry=r
        )
        self.publish_seconds = Histogram(
            "conveyor_publish_duration_seconds",
            "Time to hand messages to the broker (publish, relay) or the outbox.",
            ("topic", "outcome"),
            buckets=_SECONDS,
            registry=r,
        )
        self.exceptions = Counter(
            "conveyor_handler_exceptions",
            "Handler failures, retried or dead-lettered, by error type.",
            (*q, "error_type"),
            registry=r,
        )
        self.duplicates = Counter(
            "conveyor_inbox_duplicates", "Redeliveries the inbox skipped.", ("group",), registry=r
        )
        self.dead_letters = Counter(
            "conveyor_dead_letters",
            "Dead letters written, by group and error type.",
            ("group", "error_type"),
            registry=r,
        )
        self.relay_lag = Histogram(
            "conveyor_outbox_relay_lag_seconds",
            "From a message's commit to the outbox to the relay publishing it.",
            buckets=_SECONDS,
            registry=r,
        )
        self.breaker_transitions = Counter(
            "conveyor_circuit_transitions",
            "Circuit breaker state changes.",
            ("breaker", "to"),
            registry=r,
        )
        self.rate_limited = Counter(
            "conveyor_rate_limited_seconds",
            "Time consumers waited for rate-limit permits.",
            q,
            registry=r,
        )
        self.paused = Counter(
            "conveyor_consumer_paused_seconds",
            "Time consumers were paused by an open circuit breaker.",
            q,
            registry=r,
        )
        self.shed_count = Counter(
            "conveyor_load_shed", "Publishes refused with Overloaded.", ("topic",), registry=r
        )
        self.saga_finished = Counter(
            "conveyor_saga_finished", "Sagas ended, by outcome.", ("saga", "outcome"), registry=r
        )
        self.saga_seconds = Histogram(
            "conveyor_saga_duration_seconds",
            "From a saga's start to its end.",
            ("saga",),
            buckets=_LONG,
            registry=r,
        )
        self.step_seconds = Histogram(
            "conveyor_saga_step_duration_seconds",
            "From a step's command to its outcome.",
            ("saga", "step", "phase"),
            buckets=_SECONDS,
            registry=r,
        )
        self.saga_timeouts = Counter(
            "conveyor_saga_timeouts", "Steps that timed out.", ("saga", "step"), registry=r
        )
        self.jobs_accepted = Counter(
            "conveyor_jobs_accepted", "Jobs the HTTP API accepted.", ("kind",), registry=r
        )
        self.job_seconds = Histogram(
            "conveyor_job_duration_seconds",
            "From a job's acceptance to its end.",
            ("kind", "status"),
            buckets=_LONG,
            registry=r,
        )
        self.webhooks = Counter(
            "conveyor_webhook_deliveries",
            "Webhook delivery attempts, by outcome.",
            ("outcome",),
            registry=r,
        )
        self.webhook_seconds = Histogram(
            "conveyor_webhook_delivery_duration_seconds",
            "Time of one webhook delivery attempt.",
            buckets=_SECONDS,
            registry=r,
        )
        self.http_seconds = Histogram(
            "conveyor_http_request_duration_seconds",
            "Time to answer an HTTP request of the job API, by route and status.",
            ("route", "method", "status"),
            buckets=_SECONDS,
            registry=r,
        )
        self.info = Gauge(
            "conveyor_worker_info",
            "1, labelled with the version and where this process works.",
            ("version", "app", "broker", "store"),
            registry=r,
        )
        self.heartbeat = Gauge(
            "conveyor_worker_heartbeat_timestamp_seconds",
            "When this process last recorded its heartbeat.",
            registry=r,
        )
        self.consumed = _Consumed()
        r.register(self.consumed)
        self._state = _StateCollector(self)
        r.register(self._state)
        self._watched: set[int] = set()
        app.observe(self)
        app.on_connect(self._connected)

    async def _connected(self, app: App) -> None:
        self.info.labels(
            __version__, app.name, _scheme(app.settings.broker_url), _scheme(app.store.url)
        ).set(1)
        self._watch_breakers()

    def _watch_breakers(self) -> None:
        for breaker in self._breakers():
            if id(breaker) in self._watched:
                continue
            self._watched.add(id(breaker))

            def changed(old: BreakerState, new: BreakerState, name: str = breaker.name) -> None:
                self.breaker_transitions.labels(name, new.name.lower()).inc()

            breaker.on_change(changed)

    def _breakers(self) -> list[CircuitBreaker]:
        seen: dict[int, CircuitBreaker] = {}
        for handler in self.app.handlers:
            for breaker in handler.breakers:
                seen[id(breaker)] = breaker
        return list(seen.values())

    # -- observer hooks ------------------------------------------------------

    def published(
        self, messages: Sequence[Message], *, via: str, seconds: float, error: BaseException | None
    ) -> None:
        outcome = "error" if error is not None else "ok"
        now = time.time()
        by_topic: dict[str, int] = {}
        for message in messages:
            by_topic[message.topic] = by_topic.get(message.topic, 0) + 1
            if via == "relay" and error is None:
                self.relay_lag.observe(max(0.0, now - message.created_at))
        for topic, count in by_topic.items():
            self.published_total.labels(topic, outcome).inc(count)
            if via != "outbox":
                self.publish_seconds.labels(topic, outcome).observe(seconds)

    def fetched(self, topic: str, group: str, *, count: int, seconds: float) -> None:
        if count:
            self.consumed.queue(topic, group).held += count

    def settled(self, events: Sequence[Settlement]) -> None:
        # One batch's events, usually of one queue: the plainest arithmetic
        # that keeps the figures, since every message passes here.
        key: tuple[str, str] | None = None
        q = None
        for e in events:
            if key != (e.topic, e.group) or q is None:
                key = (e.topic, e.group)
                q = self.consumed.queue(*key)
            q.held -= 1
            outcome = e.outcome
            q.outcomes[outcome] = q.outcomes.get(outcome, 0) + 1
            if outcome == "duplicate":
                self.duplicates.labels(e.group).inc()
                continue
            if outcome == "rolled_back":
                continue
            message = e.message
            attempt = message.attempt
            q.attempts[attempt] = q.attempts.get(attempt, 0) + 1
            started, finished = e.started, e.finished
            if started is not None and finished is not None:
                q.handler.observe(finished - started)
                if attempt == 1:
                    created, due = message.created_at, message.not_before
                    wait = started - (due if due is not None and due > created else created)
                    q.wait.observe(wait if wait > 0.0 else 0.0)
                if outcome == "applied":
                    latency = finished - message.created_at
                    q.end_to_end.observe(latency if latency > 0.0 else 0.0)
            if outcome in ("retry", "dead_letter") and e.error_type:
                self.exceptions.labels(e.topic, e.group, e.error_type).inc()

    def dead_lettered(self, dead: Sequence[DeadLettered]) -> None:
        for item in dead:
            self.dead_letters.labels(item.group, item.error_type).inc()

    def waited(self, topic: str, group: str, *, reason: str, seconds: float) -> None:
        counter = self.rate_limited if reason == "rate_limit" else self.paused
        counter.labels(topic, group).inc(seconds)

    def shed(self, topic: str) -> None:
        self.shed_count.labels(topic).inc()

    def beat(self, at: float) -> None:
        self.heartbeat.set(at)

    def saga_changed(self, record: Any, events: Sequence[Any], *, since: float) -> None:
        for event in events:
            if event.type in ("succeeded", "compensated"):
                phase = "forward" if event.type == "succeeded" else "compensate"
                self.step_seconds.labels(record.name, event.step, phase).observe(
                    max(0.0, event.at - since)
                )
            elif event.type == "failed" and event.detail.get("timed_out"):
                self.saga_timeouts.labels(record.name, event.step).inc()
            elif event.type in ("completed", "saga_compensated", "saga_failed"):
                outcome = {"completed": "completed", "saga_compensated": "compensated"}.get(
                    event.type, "failed"
                )
                self.saga_finished.labels(record.name, outcome).inc()
                self.saga_seconds.labels(record.name).observe(
                    max(0.0, event.at - record.created_at)
                )

    def job_accepted(self, kind: str) -> None:
        self.jobs_accepted.labels(kind).inc()

    def job_finished(self, kind: str, *, status: str, seconds: float) -> None:
        self.job_seconds.labels(kind, status).observe(seconds)

    def webhook_attempted(self, *, outcome: str, seconds: float) -> None:
        self.webhooks.labels(outcome).inc()
        self.webhook_seconds.observe(seconds)

    def http_request(self, *, route: str, method: str, status: int, seconds: float) -> None:
        self.http_seconds.labels(route, method, str(status)).observe(seconds)

    # -- state read from the broker and the store ---------------------------

    async def refresh(self) -> None:
        """Read what the queues, the outbox, sagas, jobs and heartbeats hold
        now (the gauges a scrape then reports). A part that cannot be read
        (a table that does not exist yet) is left out of this scrape."""
        app = self.app
        await app.connect()
        self._watch_breakers()
        snapshot: dict[str, list[tuple[dict[str, str], float]]] = {}
        now = time.time()
        queues = snapshot.setdefault("queue_messages", [])
        oldest = snapshot.setdefault("queue_oldest", [])
        for q in await app.broker.stats():
            labels = {"topic": q.topic, "group": q.group}
            for state, value in (
                ("ready", q.ready),
                ("in_flight", q.in_flight),
                ("delayed", q.delayed),
            ):
                queues.append(({**labels, "state": state}, float(value)))
            oldest.append((labels, max(0.0, now - q.oldest) if q.oldest is not None else 0.0))
        for (topic, group), count in (await app.store.dead_letter_counts()).items():
            queues.append(({"topic": topic, "group": group, "state": "dead"}, float(count)))
        outbox = await app.store.outbox_stats()
        snapshot["outbox_pending"] = [({}, float(outbox.pending))]
        age = 0.0 if outbox.oldest_created_at is None else max(0.0, now - outbox.oldest_created_at)
        snapshot["outbox_oldest"] = [({}, age)]
        snapshot["sagas"] = await self._counted(
            "SELECT name, state, COUNT(*) FROM conveyor_sagas GROUP BY name, state",
            ("saga", "state"),
        )
        snapshot["jobs"] = await self._counted(
            "SELECT kind, status, COUNT(*) FROM conveyor_jobs GROUP BY kind, status",
            ("kind", "status"),
        )
        consumers: dict[tuple[str, str], int] = {}
        try:
            for worker in await live_workers(app.store, now=now):
                for topic, group in worker.handlers:
                    consumers[(topic, group)] = consumers.get((topic, group), 0) + 1
        except Exception:
            consumers = {}
        snapshot["consumers"] = [
            ({"topic": t, "group": g}, float(n)) for (t, g), n in sorted(consumers.items())
        ]
        snapshot["circuit"] = [
            ({"breaker": b.name}, float(_STATES[b.state])) for b in self._breakers()
        ]
        paused: dict[tuple[str, str], float] = {}
        for handler in app.handlers:
            closed = all(b.state is BreakerState.CLOSED for b in handler.breakers)
            paused[(handler.topic, handler.group)] = 0.0 if closed else 1.0
        snapshot["paused"] = [({"topic": t, "group": g}, v) for (t, g), v in paused.items()]
        self._state.snapshot = snapshot

    async def _counted(
        self, sql: str, names: tuple[str, str]
    ) -> list[tuple[dict[str, str], float]]:
        try:
            rows = await self.app.store.read(sql)
        except Exception:
            return []  # no such table: this app has no sagas (or jobs)
        return [({names[0]: str(a), names[1]: str(b)}, float(n)) for a, b, n in rows]

    def render(self) -> bytes:
        """The registry in Prometheus' text format (call ``refresh`` first)."""
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            from prometheus_client import multiprocess

            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            merged.register(self.consumed)
            merged.register(self._state)
            return prometheus_client.generate_latest(merged)
        return prometheus_client.generate_latest(self.registry)


_FAMILIES = {
    "queue_messages": (
        "conveyor_queue_messages",
        "Messages in each queue, by state (from the broker and the store).",
        ("topic", "group", "state"),
    ),
    "queue_oldest": (
        "conveyor_queue_oldest_age_seconds",
        "Age of the oldest message in each queue (0: empty, or the broker cannot tell).",
        ("topic", "group"),
    ),
    "outbox_pending": ("conveyor_outbox_pending", "Committed outbox rows not yet published.", ()),
    "outbox_oldest": (
        "conveyor_outbox_oldest_age_seconds",
        "Age of the oldest outbox row not yet published (0: none).",
        (),
    ),
    "sagas": ("conveyor_sagas", "Saga instances, by name and state.", ("saga", "state")),
    "jobs": ("conveyor_jobs", "HTTP jobs kept, by kind and status.", ("kind", "status")),
    "consumers": (
        "conveyor_consumers",
        "Live workers (by heartbeat) running a handler of each queue.",
        ("topic", "group"),
    ),
    "circuit": (
        "conveyor_circuit_state",
        "Circuit breakers of this process: 0 closed, 1 half-open, 2 open.",
        ("breaker",),
    ),
    "paused": (
        "conveyor_consumer_paused",
        "1 while a consumer of this process is paused by a breaker that is not closed.",
        ("topic", "group"),
    ),
}


class _StateCollector(Collector):
    """The gauges ``Metrics.refresh`` read from the broker and the store."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.snapshot: dict[str, list[tuple[dict[str, str], float]]] = {}

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for key, (name, doc, labels) in _FAMILIES.items():
            family = GaugeMetricFamily(name, doc, labels=list(labels))
            for values, value in self.snapshot.get(key, []):
                family.add_metric([values[label] for label in labels], value)
            yield family


class _Buckets:
    """A histogram's counts, kept by the event loop's one thread (no lock):
    ``observe`` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), float(cumulative)))  # type: ignore[no-untyped-call]
        family.add_metric(labels, buckets, self.total)


class _Queue:
    """What this process did with the messages of one (topic, group)."""

    __slots__ = ("attempts", "end_to_end", "handler", "held", "outcomes", "wait")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}
        self.handler = _Buckets(_SECONDS)
        self.wait = _Buckets(_SECONDS)
        self.end_to_end = _Buckets(_SECONDS)
        self.attempts: dict[int, int] = {}
        """Messages settled, by the attempt they were settled at."""
        self.held = 0
        """Messages fetched and not settled yet: being handled or waiting
        in this process's prefetched batch."""

    def attempt_buckets(self) -> _Buckets:
        buckets = _Buckets(_ATTEMPTS)
        for attempt, count in self.attempts.items():
            buckets.counts[bisect.bisect_left(_ATTEMPTS, attempt)] += count
            buckets.total += attempt * count
        return buckets


_CONSUMED = (
    ("handler", "conveyor_handler_duration_seconds", "Time a handler ran."),
    (
        "wait",
        "conveyor_queue_wait_seconds",
        "From visible (published, or due) to the handler starting, first attempts.",
    ),
    ("end_to_end", "conveyor_end_to_end_latency_seconds", "From published to applied."),
)


class _Consumed(Collector):
    """The consume side's counters and histograms, per (topic, group): every
    message settled touches them, so they are plain numbers the event loop
    adds to (prometheus-client's metrics take a lock and a label lookup per
    call, several microseconds a message) and become metric families only
    when scraped."""

    def __init__(self) -> None:
        self.queues: dict[tuple[str, str], _Queue] = {}

    def queue(self, topic: str, group: str) -> _Queue:
        q = self.queues.get((topic, group))
        if q is None:
            q = self.queues[(topic, group)] = _Queue()
        return q

    def collect(self) -> Iterable[Metric]:
        labels = ["topic", "group"]
        processed = CounterMetricFamily(
            "conveyor_messages_processed",
            "Messages settled, by outcome.",
            labels=[*labels, "outcome"],
        )
        held = GaugeMetricFamily(
            "conveyor_messages_in_flight",
            "Messages this process fetched and has not settled yet (handling, or prefetched).",
            labels=labels,
        )
        histograms = {
            attr: HistogramMetricFamily(name, doc, labels=labels) for attr, name, doc in _CONSUMED
        }
        attempts = HistogramMetricFamily(
            "conveyor_delivery_attempt",
            "The attempt at which messages were settled.",
            labels=labels,
        )
        for (topic, group), q in sorted(self.queues.items()):
            for outcome, count in sorted(q.outcomes.items()):
                processed.add_metric([topic, group, outcome], float(count))
            held.add_metric([topic, group], float(max(q.held, 0)))
            for attr, family in histograms.items():
                getattr(q, attr).add_to(family, [topic, group])
            q.attempt_buckets().add_to(attempts, [topic, group])
        yield processed
        yield held
        yield from histograms.values()
        yield attempts


def _scheme(url: str) -> str:
    return redact(url).split("://", 1)[0]


async def ready(app: App, timeout: float = 2.0) -> str | None:
    """None when the broker and the store answer within ``timeout``, else why not."""
    try:
        async with asyncio.timeout(timeout):
            await app.broker.stats()
            await app.store.read("SELECT 1")
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def asgi(app: App, metrics: Metrics) -> Callable[..., Awaitable[None]]:
    """An ASGI app answering ``/metrics``, ``/healthz`` and ``/readyz``."""

    async def respond(send: Any, status: int, body: bytes, content_type: str) -> None:
        headers = [(b"content-type", content_type.encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def application(scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path = scope.get("path", "")
        if path == "/metrics":
            try:
                await asyncio.wait_for(metrics.refresh(), 10)
            except Exception as exc:  # the counters are still worth serving
                log.warning(
                    "queue state unreadable for this scrape: %r",
                    exc,
                    extra={"event": "conveyor.metrics_refresh_failed"},
                )
            await respond(send, 200, metrics.render(), prometheus_client.CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            await respond(send, 200, b'{"status":"ok"}', "application/json")
        elif path == "/readyz":
            problem = await ready(app)
            body = json.dumps(
                {"status": "ok" if problem is None else "unavailable", "detail": problem}
            )
            await respond(send, 200 if problem is None else 503, body.encode(), "application/json")
        else:
            await respond(send, 404, b'{"status":"not found"}', "application/json")

    return application


async def serve(
    app: App,
    metrics: Metrics,
    *,
    port: int,
    host: str = "127.0.0.1",
    ready_event: asyncio.Event | None = None,
) -> None:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port``
    until cancelled, in this event loop (uvicorn, no signal handlers of its
    own: the worker's shut it down)."""
    import uvicorn

    config = uvicorn.Config(
        asgi(app, metrics), host=host, port=port, log_config=None, access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        from conveyor.errors import ConfigError

        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    try:
        # What uvicorn's own serve() does first, without its signal handlers.
        config.load()
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        if ready_event is not None:
            ready_event.set()
        await asyncio.Future()  # until the worker cancels it
    finally:
        server.should_exit = True
        await server.shutdown()
        sock.close()
