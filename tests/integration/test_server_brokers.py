"""Real worker processes on every server broker: three of them in one group
share the load, and a broker restarted mid-stream loses nothing and applies
nothing twice.

The workers are ``crash_app.py``: each ``work`` message inserts a row into
``effects`` (with the worker's pid) and publishes to ``applied``, whose
handler inserts a row into ``downstream``; neither table has a unique key,
so a message applied twice shows up as a duplicate row.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import Message
from conveyor.brokers import broker_from_url
from conveyor.store import store_from_url
from conveyor.testing._kafka import start_kafka
from tests.integration.crash_app import TABLES
from tests.namespaces import drop_all
from tests.servers import (
    AMQP_URL,
    NATS_URL,
    POSTGRES_URL,
    REDIS_URL,
    KafkaRestartable,
    NatsServer,
    RedisServer,
    Restartable,
    SharedPostgres,
    SharedRabbitMQ,
    kafka_url,
    namespaced,
)

pytestmark = pytest.mark.slow

APP = Path(__file__).with_name("crash_app.py")

SHARED: dict[str, Callable[[], str]] = {
    "postgres": lambda: POSTGRES_URL,
    "redis": lambda: REDIS_URL,
    "rabbitmq": lambda: AMQP_URL,
    "nats": lambda: NATS_URL,
    "kafka": kafka_url,
}

RESTARTABLE: dict[str, Callable[[Path], Restartable]] = {
    "postgres": lambda tmp: SharedPostgres(),
    "redis": RedisServer,
    "rabbitmq": lambda tmp: SharedRabbitMQ(),
    "nats": NatsServer,
    "kafka": KafkaRestartable,
}


def store_for(broker_url: str, tmp_path: Path) -> str:
    """The broker's own database when it is PostgreSQL (one transaction per
    unit of work), else a SQLite file that no broker restart touches."""
    if broker_url.startswith("postgresql:"):
        return broker_url
    return f"sqlite:///{tmp_path / 'store.db'}"


async def rows(store_url: str, sql: str) -> list[tuple[Any, ...]]:
    store = store_from_url(store_url)
    await store.connect()
    try:
        async with store.transaction() as tx:
            return await tx.fetchall(sql)
    finally:
        await store.close()


async def count(store_url: str, sql: str) -> int:
    return int((await rows(store_url, sql))[0][0])


async def prepare(broker_url: str, store_url: str, n: int) -> None:
    """Create the effect tables and durably publish ``n`` messages."""
    store = store_from_url(store_url)
    await store.connect()
    try:
        async with store.transaction() as tx:
            for table in TABLES:
                await tx.execute(table)
    finally:
        await store.close()
    broker = broker_from_url(broker_url)
    await broker.connect()
    try:
        await broker.declare("work", "apply")
        for start in range(0, n, 500):
            await broker.publish(
                [Message.create("work", {"n": i}) for i in range(start, min(n, start + 500))]
            )
    finally:
        await broker.close()


async def pending(broker_url: str) -> int:
    broker = broker_from_url(broker_url)
    await broker.connect()
    try:
        return sum(s.ready + s.in_flight + s.delayed for s in await broker.stats())
    finally:
        await broker.close()


async def settled(broker_url: str, store_url: str, n: int) -> bool:
    """Every message applied and forwarded, nothing left to deliver or relay."""
    with contextlib.suppress(Exception):  # a server that is coming back up
        return (
            await count(store_url, "SELECT COUNT(*) FROM effects") >= n
            and await count(store_url, "SELECT COUNT(*) FROM downstream") >= n
            and await count(store_url, "SELECT COUNT(*) FROM conveyor_outbox") == 0
            and await pending(broker_url) == 0
        )
    return False


async def assert_exactly_once(store_url: str, n: int) -> None:
    for table in ("effects", "downstream"):
        got = await rows(
            store_url, f"SELECT COUNT(*), COUNT(DISTINCT msg_id), COUNT(DISTINCT n) FROM {table}"
        )
        assert [tuple(r) for r in got] == [(n, n, n)], f"{table}: (rows, ids, numbers)"
    assert await count(store_url, "SELECT COUNT(*) FROM conveyor_dead") == 0


class Workers:
    """``crash_app.py`` processes, their output kept in log files."""

    def __init__(self, tmp_path: Path, broker_url: str, store_url: str) -> None:
        self.tmp_path = tmp_path
        self.urls = (broker_url, store_url)
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, *args: str) -> Path:
        tag = uuid.uuid4().hex[:8]
        log, ready = self.tmp_path / f"worker-{tag}.log", self.tmp_path / f"ready-{tag}"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(APP), *self.urls, "--ready", str(ready), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.procs.append((proc, log))
        return ready

    def output(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')}" for _, log in self.procs
        )

    def alive(self) -> None:
        for proc, log in self.procs:
            assert proc.poll() is None, f"worker exited early:\n{log.read_text(errors='replace')}"

    def terminate(self) -> list[int]:
        for proc, _ in self.procs:
            proc.send_signal(signal.SIGTERM)
        return [proc.wait(timeout=60) for proc, _ in self.procs]

    def kill(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@contextlib.contextmanager
def workers(tmp_path: Path, broker_url: str, store_url: str) -> Iterator[Workers]:
    running = Workers(tmp_path, broker_url, store_url)
    try:
        yield running
    finally:
        running.kill()


async def until(
    predicate: Callable[[], Any],
    *,
    timeout: float,
    what: str,
    procs: Workers,
    urls: tuple[str, str] | None = None,
) -> None:
    """Poll ``predicate`` until true; fail with the workers' output (and, given
    the broker and store URLs, how far the run got) otherwise."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        procs.alive()
        if time.monotonic() > deadline:
            state = ""
            if urls is not None:
                with contextlib.suppress(Exception):
                    state = (
                        f"effects {await count(urls[1], 'SELECT COUNT(*) FROM effects')}, "
                        f"downstream {await count(urls[1], 'SELECT COUNT(*) FROM downstream')}, "
                        f"outbox {await count(urls[1], 'SELECT COUNT(*) FROM conveyor_outbox')}, "
                        f"pending {await pending(urls[0])}\n"
                    )
            raise AssertionError(f"{what} not reached within {timeout:g}s\n{state}{procs.output()}")
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def dropped_after(*urls: str) -> AsyncIterator[None]:
    """Delete what the test's namespaces created on shared servers, afterwards."""
    try:
        yield
    finally:
        await drop_all(urls)


@pytest.mark.parametrize("name", list(SHARED))
async def test_three_workers_share_a_group_and_apply_every_message_once(
    name: str, tmp_path: Path
) -> None:
    n = 1500
    with contextlib.ExitStack() as stack:
        if name == "kafka":
            # A broker of its own: the session's Tansu has served every
            # conformance group by now, and its rebalances slow down.
            kafka = start_kafka()
            stack.callback(kafka.stop)
            broker_url = namespaced(kafka.url)
        else:
            broker_url = namespaced(SHARED[name]())
        store_url = broker_url if name == "postgres" else namespaced(POSTGRES_URL)
        async with dropped_after(broker_url, store_url):
            await prepare(broker_url, store_url, 0)
            with workers(tmp_path, broker_url, store_url) as procs:
                ready = [procs.start("--delay", "0.004") for _ in range(3)]

                async def all_ready() -> bool:
                    return all(r.exists() for r in ready)

                await until(all_ready, timeout=60, what="three workers connected", procs=procs)
                await prepare(broker_url, store_url, n)

                async def done() -> bool:
                    return await settled(broker_url, store_url, n)

                await until(
                    done,
                    timeout=180,
                    what="all messages applied",
                    procs=procs,
                    urls=(broker_url, store_url),
                )
                assert procs.terminate() == [0, 0, 0]
            await assert_exactly_once(store_url, n)
            shares = dict(await rows(store_url, "SELECT pid, COUNT(*) FROM effects GROUP BY pid"))
            assert len(shares) == 3, f"not every worker took part: {shares}"
            assert min(shares.values()) >= n * 0.15, f"one worker got too small a share: {shares}"


@pytest.mark.parametrize("name", list(RESTARTABLE))
async def test_broker_restart_mid_stream_applies_every_message_once(
    name: str, tmp_path: Path
) -> None:
    # Tansu on S3 lists a partition's objects (one per record) on every
    # fetch, so its fetches slow down with the log's length.
    n = 300 if name == "kafka" else 3000
    server = RESTARTABLE[name](tmp_path)
    server.start()
    try:
        broker_url = namespaced(server.url)
        store_url = store_for(broker_url, tmp_path)
        async with dropped_after(broker_url, store_url):
            await prepare(broker_url, store_url, n)
            with workers(tmp_path, broker_url, store_url) as procs:
                procs.start("--delay", "0.002")

                async def a_third() -> bool:
                    return await count(store_url, "SELECT COUNT(*) FROM effects") >= n // 3

                await until(a_third, timeout=120, what="a third applied", procs=procs)
                server.stop()
                server.start()

                async def done() -> bool:
                    return await settled(broker_url, store_url, n)

                await until(
                    done,
                    timeout=240,
                    what="all applied after restart",
                    procs=procs,
                    urls=(broker_url, store_url),
                )
                assert procs.terminate() == [0]
            await assert_exactly_once(store_url, n)
    finally:
        server.close()
