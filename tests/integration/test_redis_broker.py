"""Redis-specific behaviour of the Redis Streams broker: reconnection after
its connections are killed, the delayed-set -> stream move under competing
movers, wake-ups on due retries, and URL validation."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from conveyor import Message
from conveyor.brokers import broker_from_url
from conveyor.brokers.redis import RedisBroker
from conveyor.errors import BrokerError, ConfigError
from conveyor.testing import eventually
from tests.servers import REDIS_URL, namespaced


def _broker(url: str) -> RedisBroker:
    broker = broker_from_url(url)
    assert isinstance(broker, RedisBroker)
    return broker


@pytest.fixture
async def admin() -> AsyncIterator[aioredis.Redis]:
    """A plain client for CLIENT LIST / CLIENT KILL and for reading our keys."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def url(admin: aioredis.Redis) -> AsyncIterator[str]:
    """A fresh namespace; its keys (and only its) are deleted afterwards."""
    url = namespaced(REDIS_URL, prefix="it")
    yield url
    namespace = url.rsplit("namespace=", 1)[1]
    keys = [k async for k in admin.scan_iter(match=f"conveyor:{{{namespace}}}:*")]
    if keys:
        await admin.delete(*keys)


async def _kill_connections(admin: aioredis.Redis, broker: RedisBroker) -> int:
    """Kill every server-side connection of ``broker`` (and no one else's)."""
    clients: list[dict[str, Any]] = await admin.client_list()
    ids = [c["id"] for c in clients if c.get("name") == broker.client_name]
    for client_id in ids:
        await admin.execute_command("CLIENT", "KILL", "ID", client_id)
    return len(ids)


async def test_reconnects_after_its_connections_are_killed(url: str, admin: aioredis.Redis) -> None:
    """With its connections killed by the server, the broker reconnects: fetch,
    ack, publish and a blocked wait all carry on, losing and duplicating nothing."""
    broker, producer = _broker(url), _broker(url)
    await broker.connect()
    await producer.connect()
    try:
        topic, group = "it.reconnect", "g"
        await broker.declare(topic, group)
        sent = [Message.create(topic, {"i": i}) for i in range(10)]
        await producer.publish(sent)
        first = await broker.fetch(topic, group, max_messages=5, lease=60.0)
        assert len(first) == 5

        assert await _kill_connections(admin, broker) >= 1, "no connection of ours to kill"
        assert await broker.ack(first) == 5, "ack after the kill did not count"
        rest = await broker.fetch(topic, group, max_messages=100, lease=60.0)
        assert sorted(d.message.id for d in [*first, *rest]) == sorted(m.id for m in sent)

        await _kill_connections(admin, broker)
        late = Message.create(topic, {"i": "late"})
        await broker.publish([late])
        assert await broker.ack(rest) == 5
        (got_late,) = await broker.fetch(topic, group, max_messages=100, lease=60.0)
        assert got_late.message.id == late.id
        assert await broker.ack([got_late]) == 1

        waiting = asyncio.create_task(broker.wait(topic, group, 30.0))
        await eventually(
            lambda: _blocked(admin, broker), what="the broker blocked in XREAD", timeout=10.0
        )
        await _kill_connections(admin, broker)
        assert not waiting.done() or waiting.exception() is None
        await producer.publish([Message.create(topic, {"i": "after-kill"})])
        await asyncio.wait_for(waiting, 10.0)

        again = await broker.fetch(topic, group, max_messages=100, lease=60.0)
        assert [d.message.payload for d in again] == [b'{"i":"after-kill"}'], (
            "messages lost or duplicated across the reconnections"
        )
        assert await broker.ack(again) == 1
        assert [(s.ready, s.in_flight, s.delayed) for s in await broker.stats()] == [(0, 0, 0)]
    finally:
        await broker.close()
        await producer.close()


async def _blocked(admin: aioredis.Redis, broker: RedisBroker) -> bool:
    clients: list[dict[str, Any]] = await admin.client_list()
    return any(
        c.get("name") == broker.client_name and c.get("cmd") == "xread" and "b" in c["flags"]
        for c in clients
    )


async def test_publish_whose_reply_is_lost_is_not_applied_twice(
    url: str, admin: aioredis.Redis
) -> None:
    """When the connection drops after Redis ran a publish but before the reply
    arrived, the retry is recognised and the message is stored once."""
    broker = _broker(url)
    await broker.connect()
    try:
        topic, group = "it.lost-reply", "g"
        await broker.declare(topic, group)
        real = broker._scripts["publish"]
        calls = 0

        async def reply_lost(**kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            result = await real(**kwargs)
            if calls == 1:
                raise RedisConnectionError("connection lost before the reply")
            return result

        broker._scripts["publish"] = reply_lost  # type: ignore[assignment]
        message = Message.create(topic, {"n": 1})
        await broker.publish([message])
        assert calls == 2, "the publish was not retried"
        got = await broker.fetch(topic, group, max_messages=10, lease=60.0)
        assert [d.message.id for d in got] == [message.id], "the retried publish stored a copy"
        for i in range(20):
            await broker.publish([Message.create(topic, {"i": i})])
        assert await admin.scard(broker._calls) <= 1, "call tokens of finished publishes kept"
    finally:
        await broker.close()


async def test_delayed_move_is_atomic_under_competing_movers(
    url: str, admin: aioredis.Redis
) -> None:
    """Two clients moving due messages from the delayed set to the stream at the
    same time move each message exactly once: none lost, none duplicated."""
    count = 400
    a, b = _broker(url), _broker(url)
    await a.connect()
    await b.connect()
    try:
        topic, group = "it.movers", "g"
        await a.declare(topic, group)
        sent = [Message.create(topic, {"i": i}, delay=0.5) for i in range(count)]
        for start in range(0, count, 50):
            await a.publish(sent[start : start + 50])
        (stats,) = await a.stats()
        assert stats.delayed == count, "messages with a delay must wait in the delayed set"
        await eventually(
            lambda: _all_due(a, topic, group, count), what="every message due", timeout=10.0
        )

        async def mover(broker: RedisBroker) -> int:
            moved = 0
            while True:
                n = await broker.promote_due(topic, group, limit=3)
                if n == 0:
                    return moved
                moved += n

        moved = await asyncio.gather(mover(a), mover(b))
        assert sum(moved) == count, f"movers reported {moved}, expected {count} in all"
        assert all(moved), f"one mover never got a turn ({moved}); no competition was tested"
        assert (
            await admin.xlen(f"conveyor:{{{a.namespace}}}:stream:{len(topic)}:{topic}:{group}")
            == count
        )
        got = []
        while batch := await b.fetch(topic, group, max_messages=100, lease=60.0):
            got.extend(batch)
        ids = [d.message.id for d in got]
        assert len(ids) == len(set(ids)), "a message reached the stream twice"
        assert sorted(ids) == sorted(m.id for m in sent), "a message was lost in the move"
        assert {d.message.attempt for d in got} == {1}
    finally:
        await a.close()
        await b.close()


async def _all_due(broker: RedisBroker, topic: str, group: str, count: int) -> bool:
    (stats,) = [s for s in await broker.stats() if (s.topic, s.group) == (topic, group)]
    return stats.ready == count and stats.delayed == 0


async def test_wait_wakes_when_a_retry_falls_due_and_sleeps_otherwise(url: str) -> None:
    """wait() returns when a nacked message's delay ends, not at its timeout; with
    nothing coming it sleeps until the timeout instead of returning at once."""
    broker = _broker(url)
    await broker.connect()
    try:
        topic, group = "it.wait-due", "g"
        await broker.declare(topic, group)
        started = time.monotonic()
        await broker.wait(topic, group, 1.5)
        assert time.monotonic() - started >= 1.4, "wait() returned early with nothing to do"

        await broker.publish([Message.create(topic, {"n": 1})])
        (delivery,) = await broker.fetch(topic, group, max_messages=10, lease=60.0)
        await broker.nack(delivery, delay=0.5)
        assert await broker.fetch(topic, group, max_messages=10, lease=60.0) == []
        started = time.monotonic()
        await broker.wait(topic, group, 20.0)
        assert time.monotonic() - started < 5.0, "wait() slept past the retry's due time"
        (again,) = await broker.fetch(topic, group, max_messages=10, lease=60.0)
        assert (again.message.id, again.message.attempt) == (delivery.message.id, 2)
    finally:
        await broker.close()


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("namespace=ok&bogus=1", "bogus"),
        ("namespace=has space", "namespace"),
        ("namespace=ok&retry_for=soon", "retry_for"),
        ("namespace=ok&socket_timeout=-1", "socket_timeout"),
    ],
)
def test_bad_url_parameter_is_a_config_error(query: str, needle: str) -> None:
    """An unknown or invalid URL parameter is a one-line ConfigError naming it,
    raised when the broker is built, before any connection."""
    with pytest.raises(ConfigError) as info:
        broker_from_url(f"redis://127.0.0.1:6379/0?{query}")
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("redis://127.0.0.1:6379/zero", "database"),
        ("redis://127.0.0.1:port/0", "port"),
        ("redis:///0", "no host"),
    ],
)
def test_bad_url_is_a_config_error(url: str, needle: str) -> None:
    """A malformed Redis URL is a one-line ConfigError."""
    with pytest.raises(ConfigError, match=needle):
        broker_from_url(url)


def test_password_is_not_echoed_in_errors() -> None:
    """A ConfigError about a URL does not print its password."""
    with pytest.raises(ConfigError) as info:
        broker_from_url("redis://user:s3cret@127.0.0.1:6379/0?bogus=1")
    assert "s3cret" not in str(info.value)


async def test_unreachable_server_is_a_broker_error() -> None:
    """Connecting to a port where no Redis listens raises BrokerError naming it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    broker = _broker(f"redis://127.0.0.1:{port}/0?namespace=x&connect_timeout=1")
    with pytest.raises(BrokerError, match=str(port)):
        await broker.connect()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _PrivateRedis:
    """A redis-server of this test only, on a free port, persisting to an
    append-only file fsynced on every write."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return
            assert time.monotonic() < deadline, "the private redis-server did not start"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[_PrivateRedis]:
    server = _PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def test_survives_a_server_kill_and_restart(private_redis: _PrivateRedis) -> None:
    """A Redis killed with SIGKILL and restarted (AOF, appendfsync always) while a
    client publishes: publish reconnects with backoff and every message is
    there exactly once; a lease taken before the crash is still honoured."""
    broker = _broker(f"redis://127.0.0.1:{private_redis.port}/0?namespace=restart")
    await broker.connect()
    try:
        topic, group = "it.restart", "g"
        await broker.declare(topic, group)
        first = Message.create(topic, {"i": "first"})
        await broker.publish([first])
        (held,) = await broker.fetch(topic, group, max_messages=10, lease=60.0)
        sent: list[str] = []

        async def produce() -> None:
            for i in range(200):
                message = Message.create(topic, {"i": i})
                await broker.publish([message])
                sent.append(message.id)

        producing = asyncio.create_task(produce())
        await eventually(lambda: len(sent) >= 50, what="50 messages published")
        private_redis.kill()
        private_redis.start()
        await asyncio.wait_for(producing, 60.0)

        assert await broker.ack([held]) == 1, "the lease taken before the crash was lost"
        got: list[str] = []
        while batch := await broker.fetch(topic, group, max_messages=100, lease=60.0):
            got.extend(d.message.id for d in batch)
            assert await broker.ack(batch) == len(batch)
        assert len(got) == len(set(got)), "a message was stored twice across the restart"
        assert sorted(got) == sorted(sent), "messages lost across the restart"
    finally:
        await broker.close()


async def test_enqueue_reaches_one_group_only(url: str) -> None:
    """enqueue() (dead-letter replay) puts a message, same id and attempt count,
    on one group's queue; the topic's other groups do not get it."""
    broker = _broker(url)
    await broker.connect()
    try:
        topic = "it.enqueue"
        await broker.declare(topic, "a")
        await broker.declare(topic, "b")
        replayed = Message.create(topic, {"n": 1}).with_attempt(3)
        await broker.enqueue("a", [replayed])
        (got,) = await broker.fetch(topic, "a", max_messages=10, lease=60.0)
        assert (got.message.id, got.message.attempt) == (replayed.id, 4)
        assert await broker.fetch(topic, "b", max_messages=10, lease=60.0) == []
        assert await broker.ack([got]) == 1
    finally:
        await broker.close()
