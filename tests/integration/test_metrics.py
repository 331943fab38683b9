"""Prometheus metrics of a running app: counters and histograms of what the
process did, gauges of what the broker and the store hold (read at scrape
time, not counted), and the /metrics, /healthz, /readyz server."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conveyor import App, CircuitBreaker, Context, DeadLetter, Retry, RetryPolicy
from conveyor.observability.metrics import Metrics, serve
from conveyor.sagas import Saga, Sagas, Step
from conveyor.testing import drained, eventually, running
from tests.helpers import PATHS, settings_for


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, frozenset(labels.items())), 0.0)


@pytest.mark.parametrize("path", PATHS)
async def test_counts_follow_what_happened_and_gauges_what_is_stored(
    path: str, tmp_path: Path
) -> None:
    """Five messages: three applied (one after a retry), one dead-lettered,
    one duplicate skipped. The counters say so; before the worker runs the
    queue gauge shows them ready, after it the queue is empty and the dead
    letter is counted from the store."""
    app = App("metered", settings=settings_for(path, tmp_path))
    metrics = Metrics(app)
    tries: dict[int, int] = {}

    @app.handler("in", group="g", retry=RetryPolicy(max_attempts=3, base_delay=0))
    async def handle(ctx: Context, body: dict[str, int]) -> None:
        n = body["n"]
        tries[n] = tries.get(n, 0) + 1
        if n == 2 and tries[n] == 1:
            raise Retry(delay=0)
        if n == 3:
            raise DeadLetter("no threes")

    async with app:
        first = await app.publish("in", {"n": 1})
        for n in (2, 3, 4):
            await app.publish("in", {"n": n})
        await app.broker.publish([first])
        await metrics.refresh()
        assert value(metrics, "conveyor_queue_messages", topic="in", group="g", state="ready") == 5
        await drained(app)
        await metrics.refresh()
    applied = value(
        metrics, "conveyor_messages_processed_total", topic="in", group="g", outcome="applied"
    )
    assert applied == 3
    for outcome, count in (("retry", 1), ("dead_letter", 1), ("duplicate", 1)):
        got = value(
            metrics, "conveyor_messages_processed_total", topic="in", group="g", outcome=outcome
        )
        assert got == count, outcome
    assert value(metrics, "conveyor_messages_published_total", topic="in", outcome="ok") == 4
    assert value(metrics, "conveyor_handler_duration_seconds_count", topic="in", group="g") == 5
    assert value(metrics, "conveyor_dead_letters_total", group="g", error_type="DeadLetter") == 1
    assert value(metrics, "conveyor_inbox_duplicates_total", group="g") == 1
    assert (
        value(
            metrics, "conveyor_handler_exceptions_total", topic="in", group="g", error_type="Retry"
        )
        == 1
    )
    assert value(metrics, "conveyor_queue_messages", topic="in", group="g", state="ready") == 0
    assert value(metrics, "conveyor_queue_messages", topic="in", group="g", state="dead") == 1
    assert value(metrics, "conveyor_outbox_pending") == 0
    assert value(metrics, "conveyor_messages_in_flight", topic="in", group="g") == 0


async def test_breakers_sagas_and_heartbeats_are_reported(tmp_path: Path) -> None:
    """A breaker's state and transitions, sagas by state and their outcome,
    and the live consumers of a queue (from the worker's heartbeat)."""
    app = App("metered", settings=settings_for("bound", tmp_path, heartbeat_interval=0.05))
    metrics = Metrics(app)
    breaker = CircuitBreaker("provider", minimum_calls=1)
    sagas = Sagas(app)
    sagas.register(Saga("trip", steps=[Step("book", command="svc.book")]))

    @sagas.participant("svc.book", group="booking", breakers=[breaker])
    async def book(ctx: Context, data: dict[str, object]) -> None:
        pass

    async with app, running(app):
        async with app.transaction() as s:
            await sagas.start(s, "trip", {}, saga_id="t-1")
        await drained(app)

        async def beating() -> bool:
            await metrics.refresh()
            return value(metrics, "conveyor_consumers", topic="svc.book", group="booking") == 1

        await eventually(beating, what="the worker's heartbeat counted")
        assert value(metrics, "conveyor_circuit_state", breaker="provider") == 0

        @breaker
        async def provider() -> None:
            raise ConnectionError("down")

        with pytest.raises(ConnectionError):
            await provider()
        await metrics.refresh()
        assert value(metrics, "conveyor_circuit_state", breaker="provider") == 2
        assert (
            value(metrics, "conveyor_circuit_transitions_total", breaker="provider", to="open") == 1
        )
        assert value(metrics, "conveyor_consumer_paused", topic="svc.book", group="booking") == 1
    assert value(metrics, "conveyor_sagas", saga="trip", state="COMPLETED") == 1
    assert value(metrics, "conveyor_saga_finished_total", saga="trip", outcome="completed") == 1
    assert (
        value(
            metrics,
            "conveyor_saga_step_duration_seconds_count",
            saga="trip",
            step="book",
            phase="forward",
        )
        == 1
    )
    assert value(metrics, "conveyor_worker_heartbeat_timestamp_seconds") > 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_the_metrics_server_answers_metrics_health_and_readiness(tmp_path: Path) -> None:
    """/metrics in Prometheus' format with fresh queue gauges, /healthz 200,
    /readyz 200 while the store answers and 503 when it does not."""
    app = App("served", settings=settings_for("bound", tmp_path))
    metrics = Metrics(app)

    @app.handler("in", group="g")
    async def handle(ctx: Context) -> None:
        pass

    port = _free_port()
    async with app:
        await app.publish("in", {})
        started = asyncio.Event()
        server = asyncio.create_task(serve(app, metrics, port=port, ready_event=started))
        try:
            await asyncio.wait_for(started.wait(), 10)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                scraped = await http.get("/metrics")
                assert scraped.status_code == 200
                assert (
                    'conveyor_queue_messages{group="g",state="ready",topic="in"} 1.0'
                    in scraped.text
                )
                assert (await http.get("/healthz")).status_code == 200
                assert (await http.get("/readyz")).status_code == 200

                async def broken(sql: str, params: object = ()) -> list[tuple[object, ...]]:
                    raise OSError("store gone")

                app.store.read = broken  # type: ignore[method-assign]
                unready = await http.get("/readyz")
                assert unready.status_code == 503
                assert "store gone" in unready.json()["detail"]
        finally:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)


async def test_the_job_api_serves_its_metrics(tmp_path: Path) -> None:
    """``JobAPI(metrics=True)`` answers ``GET /metrics``: each request by its
    route template and status, jobs accepted and finished by kind, and the
    jobs the store holds by status."""
    from tests.http_jobs import build

    b = build(settings_for("bound", tmp_path), metrics=True)
    async with b.api, b.client() as client:
        accepted = await client.post("/jobs/square", json={"n": 3})
        assert accepted.status_code == 202
        job = accepted.json()["status_url"]
        async with running(b.app):

            async def done() -> bool:
                return (await client.get(job)).json()["status"] == "SUCCEEDED"

            await eventually(done, what="the job succeeded")
        answer = await client.get("/metrics")
    await b.app.close()
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    found = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }

    def got(name: str, **labels: str) -> float:
        return found.get((name, frozenset(labels.items())), 0.0)

    assert got("conveyor_jobs_accepted_total", kind="square") == 1
    assert got("conveyor_job_duration_seconds_count", kind="square", status="SUCCEEDED") == 1
    assert got("conveyor_jobs", kind="square", status="SUCCEEDED") == 1
    assert (
        got(
            "conveyor_http_request_duration_seconds_count",
            route="/jobs/square",
            method="POST",
            status="202",
        )
        == 1
    )
    assert (
        got(
            "conveyor_http_request_duration_seconds_count",
            route="/jobs/square/{job_id}",
            method="GET",
            status="200",
        )
        >= 1
    )


async def test_a_job_api_without_metrics_has_no_metrics_route(tmp_path: Path) -> None:
    from tests.http_jobs import build

    b = build(settings_for("bound", tmp_path))
    async with b.api, b.client() as client:
        assert (await client.get("/metrics")).status_code == 404
    await b.app.close()
