"""RabbitMQ-specific behaviour of the RabbitMQ broker: publisher confirms that
fail loudly, reconnection after the server closes the connection, retry
queues that route back with the attempt increased, per-instance
capabilities, and URL validation. Each test deletes its namespace afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from conveyor import App, Context, Message, Retry, Settings
from conveyor.brokers import broker_from_url
from conveyor.brokers._protocol import Delivery
from conveyor.brokers.rabbitmq import RabbitMQBroker
from conveyor.errors import BrokerError, ConfigError
from conveyor.testing import eventually, running
from tests.rabbitmq_admin import close_connection_named, drop_namespaces, namespace_of
from tests.servers import AMQP_URL, namespaced


def _broker(url: str) -> RabbitMQBroker:
    broker = broker_from_url(url)
    assert isinstance(broker, RabbitMQBroker)
    return broker


@pytest.fixture
async def url() -> AsyncIterator[str]:
    """A fresh namespace; its queues and exchanges (only its) are deleted afterwards."""
    url = namespaced(AMQP_URL, prefix="it")
    yield url
    await drop_namespaces([namespace_of(url)])


@pytest.fixture
async def broker(url: str) -> AsyncIterator[RabbitMQBroker]:
    broker = _broker(url)
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.close()


async def _fetch_one(broker: RabbitMQBroker, topic: str, group: str, timeout: float) -> Delivery:
    got: list[Delivery] = []

    async def arrived() -> bool:
        got.extend(await broker.fetch(topic, group, max_messages=10, lease=60.0))
        return bool(got)

    await eventually(arrived, timeout=timeout)
    assert len(got) == 1, f"expected one delivery, got {len(got)}"
    return got[0]


async def test_unroutable_publish_is_an_error(broker: RabbitMQBroker) -> None:
    """A message RabbitMQ returns (no queue for it) or refuses (its exchange
    is gone) is a BrokerError, and the broker publishes normally afterwards."""
    await broker.declare("orders", "billing")
    with pytest.raises(BrokerError, match="NO_ROUTE"):
        await broker.enqueue("nobody", [Message.create("orders", {"n": 0})])

    exchange = f"{namespace_of(broker.url)}/topic/orders"
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.exchange_delete(exchange)
    finally:
        await connection.close()
    with pytest.raises(BrokerError, match="NOT_FOUND"):
        await broker.publish([Message.create("orders", {"n": 1})])

    # The exchange is declared again (the queue and its binding are not: the
    # group declares itself again, as a worker does when it starts).
    await broker.declare("orders", "billing")
    sent = Message.create("orders", {"n": 2})
    await broker.publish([sent])
    delivery = await _fetch_one(broker, "orders", "billing", timeout=5.0)
    assert delivery.message.id == sent.id
    assert await broker.ack([delivery]) == 1


async def test_reconnects_after_the_server_closes_the_connection(url: str) -> None:
    """When the server drops the connection, the broker reconnects on the next
    call: the held lease is void (a late ack counts 0), the message comes back
    with attempt + 1, nothing is lost, and publishing works again."""
    broker = _broker(url)
    await broker.connect()
    try:
        await broker.declare("jobs", "workers")
        first, second = Message.create("jobs", {"n": 1}), Message.create("jobs", {"n": 2})
        await broker.publish([first, second])
        (held,) = await broker.fetch("jobs", "workers", max_messages=1, lease=60.0)
        assert held.message.attempt == 1

        await asyncio.to_thread(close_connection_named, broker.connection_name)

        got: dict[str, Delivery] = {}

        async def both_back() -> bool:
            try:
                for d in await broker.fetch("jobs", "workers", max_messages=10, lease=60.0):
                    got[d.message.id] = d
            except BrokerError:
                return False  # the call that notices the loss; the next reconnects
            return len(got) == 2

        await eventually(both_back, timeout=15.0)
        assert await broker.ack([held]) == 0, "an ack on the dropped connection counted"
        assert got[held.message.id].message.attempt == 2, "the returned delivery was not counted"
        third = Message.create("jobs", {"n": 3})
        await broker.publish([third])
        assert await broker.ack(list(got.values())) == 2
        delivery = await _fetch_one(broker, "jobs", "workers", timeout=5.0)
        assert delivery.message.id == third.id
        assert await broker.ack([delivery]) == 1
    finally:
        await broker.close()


async def test_retry_queue_routes_back_with_attempt_plus_one(broker: RabbitMQBroker) -> None:
    """nack(delay=) parks a copy in a TTL queue that dead-letters back to the
    group's queue: hidden (and counted as delayed) until the delay passed,
    then delivered with attempt + 1, twice in a row."""
    await broker.declare("mail", "senders")
    sent = Message.create("mail", {"to": "a@example.com"}, key="k", headers={"h": "v"})
    await broker.publish([sent])
    (delivery,) = await broker.fetch("mail", "senders", max_messages=10, lease=60.0)
    for attempt in (2, 3):
        started = time.monotonic()
        await broker.nack(delivery, delay=0.4)
        stats = {(s.topic, s.group): s for s in await broker.stats()}
        assert (stats["mail", "senders"].ready, stats["mail", "senders"].delayed) == (0, 1)
        assert await broker.fetch("mail", "senders", max_messages=10, lease=60.0) == []
        delivery = await _fetch_one(broker, "mail", "senders", timeout=5.0)
        assert time.monotonic() - started >= 0.4, "delivered before its delay"
        assert delivery.message.attempt == attempt
        assert (delivery.message.id, delivery.message.key) == (sent.id, "k")
        assert dict(delivery.message.headers) == {"h": "v"}
        assert delivery.message.payload == sent.payload
    # The retry queue is RabbitMQ's own: a TTL queue dead-lettering to the group.
    ns = namespace_of(broker.url)
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        retry = await channel.declare_queue(f"{ns}/delay/mail/senders/400", passive=True)
        assert retry.declaration_result.message_count == 0
    finally:
        await connection.close()
    assert await broker.ack([delivery]) == 1


async def test_not_before_publishes_through_a_delay_queue(broker: RabbitMQBroker) -> None:
    """A message published with a delay reaches every group only after it."""
    await broker.declare("reminders", "a")
    await broker.declare("reminders", "b")
    started = time.monotonic()
    sent = Message.create("reminders", {"n": 1}, delay=0.5)
    await broker.publish([sent])
    assert await broker.fetch("reminders", "a", max_messages=10, lease=60.0) == []
    for group in ("a", "b"):
        delivery = await _fetch_one(broker, "reminders", group, timeout=5.0)
        assert delivery.message.id == sent.id
        assert delivery.message.attempt == 1
        assert await broker.ack([delivery]) == 1
    assert time.monotonic() - started >= 0.5


async def test_close_hands_back_prefetched_messages_without_counting(url: str) -> None:
    """Messages a consumer prefetched but never handed out are requeued on
    close() with their attempt unchanged; leased ones come back counted.
    close() comes right after the acks: the two messages that refill the
    prefetch are still on their way (the quorum queue sends them once it has
    applied the acks), and RabbitMQ would count them if they met the cancel."""
    first = _broker(url)
    await first.connect()
    try:
        await first.declare("batch", "g")
        await first.publish([Message.create("batch", {"i": i}) for i in range(10)])
        leased = await first.fetch("batch", "g", max_messages=4, lease=60.0)
        assert len(leased) == 4
        assert await first.ack(leased[:2]) == 2  # frees room: two more get prefetched
    finally:
        await first.close()
    second = _broker(url)
    await second.connect()
    try:
        got: list[Delivery] = []

        async def all_back() -> bool:
            got.extend(await second.fetch("batch", "g", max_messages=20, lease=60.0))
            return len(got) >= 8

        await eventually(all_back, timeout=5.0)
        attempts = {d.message.id: d.message.attempt for d in got}
        assert sorted(attempts.values()) == [1] * 6 + [2] * 2
        assert {attempts[d.message.id] for d in leased[2:]} == {2}
        assert await second.ack(got) == 8
    finally:
        await second.close()


async def test_a_worker_retries_through_the_retry_queue_and_forwards_once(
    url: str, tmp_path: Path
) -> None:
    """A worker on RabbitMQ (store: SQLite) retries a failing message through
    the retry queue with attempt 2, applies it once and relays what it sends."""
    app = App(
        "rabbit",
        settings=Settings(
            broker_url=url, store_url=f"sqlite:///{tmp_path / 'store.db'}", idle_poll=0.05
        ),
    )
    attempts: list[int] = []
    forwarded: list[int] = []

    @app.handler("orders", group="billing")
    async def bill(ctx: Context, body: dict[str, int]) -> None:
        attempts.append(ctx.message.attempt)
        if ctx.message.attempt == 1:
            raise Retry(delay=0.3)
        await ctx.publish("billed", {"n": body["n"]})

    @app.handler("billed", group="audit")
    async def audit(ctx: Context, body: dict[str, int]) -> None:
        forwarded.append(body["n"])

    async with app, running(app):
        await app.publish("orders", {"n": 7})
        await eventually(lambda: forwarded == [7], timeout=10.0)

        async def drained() -> bool:
            stats = await app.broker.stats()
            return sum(s.ready + s.in_flight + s.delayed for s in stats) == 0

        await eventually(drained, timeout=5.0)
    assert attempts == [1, 2]
    assert forwarded == [7]


def test_capabilities_follow_the_queue_type() -> None:
    """Quorum queues (the default) declare no priorities; classic queues with
    max_priority do. Both say the server releases deliveries on disconnect."""
    quorum = _broker(AMQP_URL).capabilities
    classic = _broker(f"{AMQP_URL}?queue_type=classic&max_priority=9").capabilities
    assert (quorum.priorities, classic.priorities) == (False, True)
    assert (quorum.durable, quorum.native_delay, quorum.per_key_ordering) == (True, True, False)
    assert (quorum.releases_on_disconnect, classic.releases_on_disconnect) == (True, True)


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("bogus=1", "unknown option 'bogus' in RabbitMQ URL"),
        ("queue_type=stream", "invalid queue_type='stream' in RabbitMQ URL"),
        ("max_priority=5", "max_priority needs queue_type=classic"),
        ("queue_type=classic&max_priority=256", "invalid max_priority='256'"),
        ("prefetch=0", "invalid prefetch='0'"),
        ("prefetch=lots", "invalid prefetch='lots'"),
        ("namespace=amq.x", "invalid namespace='amq.x'"),
        ("namespace=a/b", "invalid namespace='a/b'"),
    ],
)
def test_bad_url_options_are_one_line_config_errors(query: str, needle: str) -> None:
    """An unknown option or a bad value is a one-line ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        broker_from_url(f"{AMQP_URL}?{query}")
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


async def test_building_does_not_connect_and_a_dead_server_is_a_broker_error() -> None:
    """Building never connects; connecting to nothing is a BrokerError that
    names the server without its password."""
    broker = _broker("amqp://guest:secret@127.0.0.1:1/?namespace=nowhere")
    with pytest.raises(BrokerError, match=r"127\.0\.0\.1:1") as info:
        await broker.connect()
    assert "secret" not in str(info.value)
    await broker.close()


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_batched_ack_never_covers_a_delivery_still_held(
    url: str, queue_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch is acked with one ``multiple=True`` ack up to the first tag
    still held on the channel; what is held (or being handed back) is never
    acked with it: after the connection drops, exactly those come back."""
    url = f"{url}&queue_type={queue_type}"
    calls: list[bool] = []
    original = aio_pika.IncomingMessage.ack

    async def spy(self: aio_pika.IncomingMessage, multiple: bool = False) -> None:
        calls.append(multiple)
        await original(self, multiple=multiple)

    monkeypatch.setattr(aio_pika.IncomingMessage, "ack", spy)
    sent = [Message.create("batch", {"n": n}) for n in range(8)]
    broker = _broker(url)
    await broker.connect()
    try:
        await broker.declare("batch", "g")
        await broker.publish(sent)
        got: list[Delivery] = []

        async def all_arrived() -> bool:
            got.extend(await broker.fetch("batch", "g", max_messages=8, lease=60.0))
            return len(got) == 8

        await eventually(all_arrived, timeout=10.0)
        by_n = {d.message.payload: d for d in got}
        ordered = [by_n[m.payload] for m in sent]
        held = {ordered[2].message.id, ordered[6].message.id}
        # 0, 1 below the first held one (2): one multiple ack; 3, 4, 5, 7 one by one.
        assert await broker.ack([d for d in ordered if d.message.id not in held]) == 6
        assert calls.count(True) == 1
        assert calls.count(False) == 4
    finally:
        await broker.close()  # the held two go back to the queue
    again = _broker(url)
    await again.connect()
    try:
        back: list[Delivery] = []

        async def returned() -> bool:
            back.extend(await again.fetch("batch", "g", max_messages=8, lease=60.0))
            return len(back) >= 2

        await eventually(returned, timeout=10.0)
        assert {d.message.id for d in back} == held
        assert await again.ack(back) == 2
    finally:
        await again.close()
