"""The NATS JetStream broker's own promises, on the shared server (127.0.0.1:4222):
publish de-duplication by ``Nats-Msg-Id``, the ``max_deliver`` dead-letter
stream, reconnecting after the connection drops, and URL checking.

Each test uses a fresh namespace and deletes its streams (and so their
consumers) at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import nats.js.errors
import pytest

from conveyor.brokers import Delivery, broker_from_url
from conveyor.brokers.nats import NatsBroker
from conveyor.errors import BrokerError, ConfigError
from conveyor.messages import Message
from tests.servers import NATS_URL


async def _eventually(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g}s")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _namespace() -> AsyncIterator[str]:
    """A fresh namespace; its streams are deleted afterwards."""
    namespace = f"it{uuid.uuid4().hex[:12]}"
    try:
        yield namespace
    finally:
        nc = await nats.connect(NATS_URL)
        try:
            js = nc.jetstream()
            for stream in (f"conveyor_{namespace}", f"conveyor_{namespace}_dead"):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_stream(stream)
        finally:
            await nc.close()


@contextlib.asynccontextmanager
async def _broker(url: str) -> AsyncIterator[NatsBroker]:
    broker = broker_from_url(url)
    assert isinstance(broker, NatsBroker)
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.close()


async def _drain(broker: NatsBroker, topic: str, group: str) -> list[str]:
    ids: list[str] = []
    while batch := await broker.fetch(topic, group, max_messages=50, lease=60.0):
        ids.extend(d.message.id for d in batch)
        assert await broker.ack(batch) == len(batch)
    return ids


async def test_republished_message_is_stored_once() -> None:
    """Publishing one message twice (a retry, or an outbox row relayed twice),
    from one client or two, delivers it once per group."""
    async with _namespace() as ns:
        url = f"{NATS_URL}?namespace={ns}"
        async with _broker(url) as first, _broker(url) as second:
            topic, group = "orders.placed", "billing"
            await first.declare(topic, group)
            message = Message.create(topic, {"order": 1})
            other = Message.create(topic, {"order": 2})
            await first.publish([message])
            await first.publish([message])
            await second.publish([message, other])
            assert sorted(await _drain(first, topic, group)) == sorted([message.id, other.id])
            assert await first.fetch(topic, group, max_messages=10, lease=1.0) == []


async def test_replay_reaches_only_its_group_even_twice() -> None:
    """``enqueue`` delivers to one group only, and a second replay of the same
    message is not mistaken for a duplicate publish."""
    async with _namespace() as ns, _broker(f"{NATS_URL}?namespace={ns}") as broker:
        topic = "orders.placed"
        await broker.declare(topic, "a")
        await broker.declare(topic, "b")
        message = Message.create(topic, {"order": 1})
        await broker.enqueue("a", [message])
        assert await _drain(broker, topic, "b") == []
        assert await _drain(broker, topic, "a") == [message.id]
        await broker.enqueue("a", [message])
        assert await _drain(broker, topic, "a") == [message.id]


async def test_over_max_deliver_goes_to_the_dead_letter_stream() -> None:
    """A message delivered ``max_deliver`` times without an ack is moved to the
    dead-letter stream, intact and naming its group, and leaves the queue;
    other groups keep their copy."""
    async with _namespace() as ns, _broker(f"{NATS_URL}?namespace={ns}&max_deliver=2") as broker:
        topic, group, other = "jobs", "workers", "audit"
        await broker.declare(topic, group)
        await broker.declare(topic, other)
        message = Message.create(topic, {"job": 1}, key="k", headers={"correlation-id": "c"})
        await broker.publish([message])
        for attempt in (1, 2):
            (delivery,) = await broker.fetch(topic, group, max_messages=10, lease=60.0)
            assert delivery.message.attempt == attempt
            await broker.nack(delivery, delay=0.0)
        assert await broker.fetch(topic, group, max_messages=10, lease=60.0) == []
        dead = await broker.dead_letters()
        assert [(g, m.id) for g, m in dead] == [(group, message.id)]
        (_, copy) = dead[0]
        assert (copy.payload, copy.key, dict(copy.headers)) == (
            message.payload,
            message.key,
            dict(message.headers),
        )

        async def settled() -> bool:
            depth = {(s.topic, s.group): s for s in await broker.stats()}
            mine, theirs = depth[(topic, group)], depth[(topic, other)]
            return (mine.ready, mine.in_flight, theirs.ready) == (0, 0, 1)

        await _eventually(settled, 5.0, "the dead message leaving its queue only")
        assert await _drain(broker, topic, other) == [message.id]


async def test_stale_ack_does_not_ack_the_redelivered_copy() -> None:
    """An ack sent after the lease ran out is not sent: JetStream would take it
    for the copy it redelivered meanwhile, which must stay leased."""
    async with _namespace() as ns:
        url = f"{NATS_URL}?namespace={ns}&ack_wait=0.5"
        async with _broker(url) as slow, _broker(url) as fast:
            topic, group = "jobs", "workers"
            await slow.declare(topic, group)
            await slow.publish([Message.create(topic, {"job": 1})])
            (late,) = await slow.fetch(topic, group, max_messages=1, lease=0.5)
            held: list[Delivery] = []

            async def redelivered() -> bool:
                held.extend(await fast.fetch(topic, group, max_messages=1, lease=60.0))
                return bool(held)

            await _eventually(redelivered, 5.0, "redelivery after the lease")
            assert await slow.ack([late]) == 0
            await asyncio.sleep(1.5)  # several AckWaits: the copy must still be held
            stats = {(s.topic, s.group): s for s in await fast.stats()}[(topic, group)]
            assert (stats.ready, stats.in_flight) == (0, 1)
            assert await fast.ack(held) == 1


class _Proxy:
    """A TCP proxy to the NATS server that the test can take down (cutting
    every connection and refusing new ones) and bring back on the same port."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def up(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        task = asyncio.create_task(self._serve(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 4222)
        self.writers.append(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        """Drop every proxied connection; new ones are still accepted."""
        writers, self.writers = self.writers, []
        for writer in writers:
            writer.close()
        for writer in writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def down(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        await self.cut()


async def test_reconnects_after_the_connection_drops() -> None:
    """When the connection drops (and stays down a moment), publish, fetch and
    ack wait for the reconnection and then succeed: nothing lost, nothing twice."""
    proxy = _Proxy()
    port = await proxy.up()
    try:
        async with _namespace() as ns, _broker(f"nats://127.0.0.1:{port}?namespace={ns}") as broker:
            topic, group = "jobs", "workers"
            await broker.declare(topic, group)
            before = Message.create(topic, {"n": 1})
            await broker.publish([before])
            (held,) = await broker.fetch(topic, group, max_messages=10, lease=60.0)

            await proxy.down()
            during = Message.create(topic, {"n": 2})
            publishing = asyncio.create_task(broker.publish([during]))
            await asyncio.sleep(1.0)
            assert not publishing.done(), "publish returned while the server was unreachable"
            await proxy.up()
            await asyncio.wait_for(publishing, 20.0)

            assert await broker.ack([held]) == 1
            assert await _drain(broker, topic, group) == [during.id]
            after = Message.create(topic, {"n": 3})
            await proxy.cut()
            await broker.publish([after])
            await broker.publish([after])
            assert await _drain(broker, topic, group) == [after.id]
    finally:
        await proxy.down()


async def test_unreachable_server_is_a_broker_error() -> None:
    """Connecting to a port where nothing listens raises BrokerError, not a driver error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    broker = broker_from_url(f"nats://127.0.0.1:{port}?namespace=x&timeout=1")
    with pytest.raises(BrokerError, match="cannot connect to NATS"):
        await broker.connect()


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("?bogus=1", "unknown option 'bogus' in NATS URL"),
        ("?namespace=a.b", "invalid namespace='a.b' in NATS URL"),
        ("?replicas=two", "invalid replicas='two'"),
        (
            "?replicas=9",
            "invalid replicas='9' in NATS URL 'nats://127.0.0.1:4222?replicas=9': expected an integer from 1 to 5",
        ),
        (
            "?ack_wait=0",
            "invalid ack_wait='0' in NATS URL 'nats://127.0.0.1:4222?ack_wait=0': expected seconds >= 0.1",
        ),
        ("?max_deliver=-1", "invalid max_deliver='-1'"),
        ("/path", "no path expected"),
    ],
)
def test_bad_url_is_one_config_error(query: str, needle: str) -> None:
    """A bad NATS URL parameter is a one-line ConfigError naming it, raised
    when the broker is built (before any connection)."""
    with pytest.raises(ConfigError) as info:
        broker_from_url(f"nats://127.0.0.1:4222{query}")
    assert needle in str(info.value)
    assert "\n" not in str(info.value)
