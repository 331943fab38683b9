"""Seeing the order system run as separate processes: one trace per order
from the HTTP request through the outbox, Redis and every saga step to the
webhook, exported over OTLP/HTTP to a receiver that decodes the protobuf;
and a real Prometheus scraping the workers and the job API."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conveyor import App, Settings
from tests.namespaces import drop_all
from tests.otlp_receiver import Receiver as SpanReceiver
from tests.otlp_receiver import Span
from tests.prometheus import Prometheus
from tests.servers import REDIS_URL, namespaced
from tests.webhook_receiver import Receiver as WebhookReceiver

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5  # OTLP's SpanKind values


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def processes(specs: list[tuple[list[str], dict[str, str]]], workdir: Path) -> Iterator[None]:
    """Start each (argv, env); on exit SIGTERM them all and wait (each flushes
    its spans as it exits)."""
    started = []
    logs = []
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "OTEL_"))}
    try:
        for i, (argv, env) in enumerate(specs):
            log = (workdir / f"process-{i}.log").open("wb")
            logs.append(log)
            started.append(
                subprocess.Popen(argv, cwd=workdir, env={**base, **env}, stdout=log, stderr=log)
            )
        yield
    finally:
        for proc in started:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in started:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for log in logs:
            log.close()


def _in_trace(spans: list[Span], trace_id: str) -> list[Span]:
    return [s for s in spans if s.trace_id == trace_id]


async def test_one_order_is_one_trace_across_the_processes(tmp_path: Path) -> None:
    """An order placed through the HTTP front (its own process) is one trace:
    the POST's server span, a send and a process span for every saga step
    (handled in two other worker processes, through Redis and each process's
    outbox relay), and the webhook deliveries as client spans, each a child
    of the span that caused it."""
    broker = namespaced(REDIS_URL, prefix="obs")
    store = f"sqlite:///{tmp_path / 'orders.db'}"
    port = _free_port()
    async with WebhookReceiver() as hooks:
        with SpanReceiver() as spans:
            common = {
                "CONVEYOR_BROKER_URL": broker,
                "CONVEYOR_STORE_URL": store,
                "CONVEYOR_IDLE_POLL": "0.05",
                "CONVEYOR_TRACING": "true",
                "OTEL_EXPORTER_OTLP_ENDPOINT": spans.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "200",
                "ORDERS_WEBHOOK_ALLOW": f"127.0.0.1:{hooks.port}",
            }
            conveyor = [
                sys.executable,
                "-m",
                "conveyor",
                "worker",
                "conveyor.examples.orders.run:app",
            ]
            specs = [
                (
                    _front_argv(port),
                    {**common, "OTEL_SERVICE_NAME": "front", "ORDERS_SERVICES": ""},
                ),
                (
                    conveyor,
                    {
                        **common,
                        "OTEL_SERVICE_NAME": "orders",
                        "ORDERS_SERVICES": "orders,inventory",
                    },
                ),
                (
                    conveyor,
                    {
                        **common,
                        "OTEL_SERVICE_NAME": "payments",
                        "ORDERS_SERVICES": "payment,shipping",
                    },
                ),
            ]
            try:
                with processes(specs, tmp_path):
                    order_id = await _place_and_follow(f"http://127.0.0.1:{port}", hooks)
                received = spans.snapshot()
            finally:
                await drop_all([broker])
    [post] = [
        s for s in received if s.kind == SERVER and s.attributes.get("http.route") == "/orders"
    ]
    trace = _in_trace(received, post.trace_id)
    by_id = {s.span_id: s for s in trace}
    services = {s.service for s in trace}
    assert {"front", "orders", "payments"} <= services, services
    for topic in ("inventory.reserve", "payment.charge", "shipping.ship", "shipping.deliver"):
        sends = [s for s in trace if s.kind == PRODUCER and s.name == f"send {topic}"]
        processed = [s for s in trace if s.kind == CONSUMER and s.name == f"process {topic}"]
        assert sends, f"no send span for {topic}"
        assert processed, f"no process span for {topic}"
        for p in processed:
            assert by_id[p.parent_id].name == f"send {topic}"
            assert p.attributes["conveyor.saga.id"] == order_id
    first = next(s for s in trace if s.name == "send inventory.reserve")
    assert _root_of(first, by_id) is post
    webhooks = [s for s in trace if s.kind == CLIENT and s.name == "POST"]
    assert webhooks, "no webhook delivery span"
    assert all(s.attributes.get("http.response.status_code") == 200 for s in webhooks)
    traceparents = {r.headers.get("traceparent", "") for r in hooks.received}
    assert all(t.split("-")[1] == post.trace_id for t in traceparents), traceparents


def _root_of(span: Span, by_id: dict[str, Span]) -> Span:
    while span.parent_id and span.parent_id in by_id:
        span = by_id[span.parent_id]
    return span


def _front_argv(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "conveyor.examples.orders.run:front",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]


async def _until_healthy(http: httpx.AsyncClient) -> None:
    for _ in range(200):  # the front starts within 20 s
        with contextlib.suppress(httpx.TransportError):
            if (await http.get("/healthz")).status_code == 200:
                return
        await asyncio.sleep(0.1)
    raise AssertionError("the front did not start")


async def _until_state(http: httpx.AsyncClient, order_id: str, state: str) -> None:
    seen = None
    for _ in range(600):  # at most 60 s
        seen = (await http.get(f"/orders/{order_id}")).json()["state"]
        if seen == state:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"order {order_id} is {seen}, not {state}")


async def _place_and_follow(url: str, hooks: WebhookReceiver) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        await _until_healthy(http)
        registered = await http.post("/webhooks", json={"url": hooks.url()})
        assert registered.status_code == 201, registered.text
        placed = await http.post(
            "/orders", json={"sku": "mug", "qty": 1}, headers={"Callback-Url": hooks.url()}
        )
        assert placed.status_code == 202, placed.text
        order_id = str(placed.json()["id"])
        await _until_state(http, order_id, "DELIVERED")
        for _ in range(300):  # the webhooks follow the state within 30 s
            if len(hooks.received) >= 4:
                return order_id
            await asyncio.sleep(0.1)
    raise AssertionError(f"order {order_id} was delivered with {len(hooks.received)} webhooks")


async def test_prometheus_sees_the_order_system_work(tmp_path: Path) -> None:
    """A real Prometheus scrapes two order worker processes (``--metrics-port``)
    and ``conveyor serve --metrics --workers 2``: the orders placed through
    the front show as applied messages and completed sagas, the queues drain
    to zero, a malformed command written to a queue shows as one dead letter
    and a dead queue entry, and the jobs posted to either server process
    are counted once in every scrape (multiprocess mode)."""
    broker = namespaced(REDIS_URL, prefix="prom")
    store = f"sqlite:///{tmp_path / 'orders.db'}"
    port, metrics = _free_port(), [_free_port(), _free_port(), _free_port()]
    api_port = _free_port()
    common = {
        "CONVEYOR_BROKER_URL": broker,
        "CONVEYOR_STORE_URL": store,
        "CONVEYOR_IDLE_POLL": "0.05",
    }
    worker = [sys.executable, "-m", "conveyor", "worker", "conveyor.examples.orders.run:app"]
    specs = [
        (_front_argv(port), {**common, "ORDERS_SERVICES": ""}),
        (
            [*worker, "--metrics-port", str(metrics[0])],
            {**common, "ORDERS_SERVICES": "orders,inventory"},
        ),
        (
            [*worker, "--metrics-port", str(metrics[1])],
            {**common, "ORDERS_SERVICES": "payment,shipping"},
        ),
        (
            [
                sys.executable,
                "-m",
                "conveyor",
                "worker",
                "tests.e2e.metrics_jobs_app:app",
                "--metrics-port",
                str(metrics[2]),
            ],
            {**common, "PYTHONPATH": str(ROOT)},
        ),
        (
            [
                sys.executable,
                "-m",
                "conveyor",
                "serve",
                "tests.e2e.metrics_jobs_app:api",
                "--port",
                str(api_port),
                "--workers",
                "2",
                "--metrics",
            ],
            {**common, "PYTHONPATH": str(ROOT)},
        ),
    ]
    orders, submitted = 5, 6
    try:
        with (
            processes(specs, tmp_path),
            Prometheus(
                tmp_path / "prometheus",
                {
                    "workers": [f"127.0.0.1:{p}" for p in metrics],
                    "api": [f"127.0.0.1:{api_port}"],
                },
            ) as prom,
        ):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                await _until_healthy(http)
                ids = []
                for i in range(orders):
                    placed = await http.post("/orders", json={"sku": "mug", "qty": 1 + i % 2})
                    assert placed.status_code == 202, placed.text
                    ids.append(placed.json()["id"])
                for order_id in ids:
                    await _until_state(http, order_id, "DELIVERED")
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{api_port}", timeout=10
            ) as jobs:
                await _until_healthy(jobs)
                for n in range(submitted):
                    # a new connection each: the two server processes share them
                    accepted = await jobs.post(
                        "/jobs/double", json={"n": n}, headers={"Connection": "close"}
                    )
                    assert accepted.status_code == 202, accepted.text
            producer = App("garbage", settings=Settings(broker_url=broker, store_url=store))
            async with producer:
                await producer.publish("inventory.reserve", {"not": "an order"})
            await _until(
                prom,
                'sum(conveyor_dead_letters_total{group="inventory"})',
                1.0,
            )
            await _until(prom, 'max(conveyor_sagas{saga="order",state="COMPLETED"})', orders)
            await _until(prom, 'max(conveyor_queue_messages{group="inventory",state="dead"})', 1.0)
            await _until(
                prom, 'sum(max by (topic, group) (conveyor_queue_messages{state="ready"}))', 0.0
            )
            await _until(prom, "count(up == 1)", 4.0)
            await _until(prom, 'sum(conveyor_jobs_accepted_total{job="api"})', float(submitted))
            await _until(
                prom, 'max(conveyor_jobs{kind="double",status="SUCCEEDED"})', float(submitted)
            )
            applied = prom.value(
                'sum(conveyor_messages_processed_total{topic="shipping.deliver",outcome="applied"})'
            )
            assert applied == orders
            assert prom.value('sum(conveyor_consumers{topic="payment.charge"})') is not None
    finally:
        await drop_all([broker])


async def _until(prom: Prometheus, expr: str, expected: float) -> None:
    """Poll Prometheus (it scrapes every 0.5 s) until ``expr`` is ``expected``;
    at most 60 s."""
    seen: float | None = None
    for _ in range(600):
        seen = prom.value(expr)
        if seen == expected:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{expr} is {seen}, expected {expected}")
