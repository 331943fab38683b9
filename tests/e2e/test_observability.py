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

from tests.namespaces import drop_all
from tests.otlp_receiver import Receiver as SpanReceiver
from tests.otlp_receiver import Span
from tests.servers import REDIS_URL, namespaced
from tests.webhook_receiver import Receiver as WebhookReceiver

pytestmark = pytest.mark.slow

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
                    [
                        sys.executable,
                        "-m",
                        "uvicorn",
                        "--factory",
                        "conveyor.examples.orders.run:front",
                        "--port",
                        str(port),
                        "--log-level",
                        "warning",
                    ],
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


async def _place_and_follow(url: str, hooks: WebhookReceiver) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for _ in range(200):  # the front starts within 20 s
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/healthz")).status_code == 200:
                    break
            await asyncio.sleep(0.1)
        registered = await http.post("/webhooks", json={"url": hooks.url()})
        assert registered.status_code == 201, registered.text
        placed = await http.post(
            "/orders", json={"sku": "mug", "qty": 1}, headers={"Callback-Url": hooks.url()}
        )
        assert placed.status_code == 202, placed.text
        order_id = str(placed.json()["id"])
        for _ in range(600):  # at most 60 s
            state = (await http.get(f"/orders/{order_id}")).json()["state"]
            if state == "DELIVERED" and len(hooks.received) >= 4:
                return order_id
            await asyncio.sleep(0.1)
    raise AssertionError(f"order {order_id} is {state} with {len(hooks.received)} webhooks")
