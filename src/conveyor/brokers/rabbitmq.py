"""RabbitMQ broker (aio-pika): quorum queues, publisher confirms, manual acks.

URL::

    amqp://user:password@host:port/vhost?namespace=NAME&queue_type=quorum&prefetch=256

Options (anything else is a ``ConfigError``):

``namespace``
    Prefix of every exchange and queue this broker creates (default
    ``conveyor``). Clients with the same namespace share the queues.
``queue_type``
    ``quorum`` (default: replicated, durable, counts deliveries) or
    ``classic`` (durable; needed for priorities).
``max_priority``
    ``1``-``255``: classic queues get ``x-max-priority`` and honour
    ``Message.priority`` (clamped to it). Not allowed with quorum queues,
    which do not support priorities on RabbitMQ 3.10. Default ``0`` (off).
``prefetch``
    Upper bound of the consumer prefetch (unacknowledged messages a consumer
    holds, leased or buffered), default ``256``. The prefetch follows the
    largest ``fetch(max_messages=...)`` up to this bound.
``heartbeat``
    AMQP heartbeat in seconds, passed to the connection.
``connect_timeout``
    Seconds the first connection may take in all, retries included (default
    5); also the limit of each reconnection attempt.
``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``
    With ``amqps://``: the CA that signs the server's certificate (default:
    the system's) and a client certificate, for servers with
    ``ssl_options.fail_if_no_peer_cert = true``.

Topology, all durable, in namespace ``ns``:

- ``ns/topic/TOPIC``: a fanout exchange per topic, its alternate exchange
  ``ns/park`` (direct) routes messages no group is bound for yet into
  ``ns/parked/TOPIC``; the first ``declare`` of a group moves them into
  the group's queue (confirmed publish, then ack).
- ``ns/queue/TOPIC/GROUP``: one queue per (topic, group), bound to the
  topic's exchange.
- ``ns/delay/TOPIC/GROUP/MS``: retry queues with a message TTL of ``MS``
  milliseconds that dead-letter back to the group's queue (quorum queues
  use the at-least-once dead-letter strategy). ``nack(delay=)`` rounds the
  delay up to two significant digits (at most 10% longer). Unused delay
  queues delete themselves (``x-expires``). ``ns/later/TOPIC/MS`` does the
  same for messages published with a ``not_before`` in the future, back into
  the topic's exchange.

Publishing returns once RabbitMQ confirmed every message; a nack, an
unroutable return or a lost connection is a ``BrokerError``. Consumers ack
manually, with a bounded prefetch; ``fetch`` hands out what the consumer has
prefetched (with priorities it uses ``basic.get`` instead, one round trip per
message, because a consumer takes messages in arrival order while it has
room). RabbitMQ has no per-message lease, so the lease is kept here: a
delivery not settled within ``lease`` is handed back (quorum: rejected with
requeue, which counts a delivery), and a late ack returns 0. When a client's
connection closes, RabbitMQ hands its unacknowledged messages back at once
(``Capabilities.releases_on_disconnect``); an ack that cannot reach the
server counts 0 for the same reason. ``close()`` first waits (up to 2 s)
until RabbitMQ has no delivery on its way to a consumer, then requeues,
uncounted, what was prefetched but never handed out. After a lost connection
the next call reconnects, waiting up to 5 s between failed attempts.

``attempt`` is the delivery count: the attempts carried in a header (delayed
retries, replays, requeued copies) plus quorum queues' ``x-delivery-count``.
Classic queues only flag a redelivery, so there a message that kills its
consumer repeatedly stays at attempt 2 (use quorum queues for poison-message
protection).

``stats()`` covers the queues this client declared or consumed from: ready
is RabbitMQ's count plus messages prefetched here but not leased, in flight
is this client's leases (other clients' deliveries are not visible without
the management plugin), delayed is the depth of the retry queues this
client used.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import aio_pika
import aio_pika.abc
import pamqp.commands
import pamqp.exceptions
from aio_pika.connection import make_url
from aio_pika.exceptions import AMQPException

from conveyor._connect import DEFAULT_CONNECT_TIMEOUT, connect_within
from conveyor._time import Clock, SystemClock
from conveyor._tls import TlsFiles, tls_files, tls_options
from conveyor._urls import Option, redact, url_options
from conveyor.brokers._kit import malformed_delivery, short_reason
from conveyor.brokers._protocol import Capabilities, Delivery, QueueStats
from conveyor.errors import BrokerError, ConfigError, MessageError
from conveyor.messages import DEFAULT_MAX_PAYLOAD, Message

__all__ = ["RabbitMQBroker"]

_OPTIONS = {
    "namespace": Option(
        "conveyor",
        pattern=re.compile(r"(?!amq\.)[^/]+"),
        expect="a non-empty name without '/' that does not start with 'amq.'",
    ),
    "queue_type": Option("quorum", choices=("quorum", "classic")),
    "max_priority": Option(0, int, low=0, high=255),
    "prefetch": Option(256, int, low=1, high=65535),
    "heartbeat": Option(None, int, low=0, high=65535),
    "connect_timeout": Option(DEFAULT_CONNECT_TIMEOUT, float, above=0),
    **tls_options(),
}
_META = "conveyor"
_CONFIRM_TIMEOUT = 30.0
_REDECLARE_AFTER = 60.0
_SETTLE_TIMEOUT = 2.0
_EXPIRES_MS = 600_000
# aiormq raises RuntimeError for a connection it found closed.
_DRIVER_ERRORS = (
    AMQPException,
    pamqp.exceptions.PAMQPException,
    OSError,
    TimeoutError,
    RuntimeError,
)


@dataclass(frozen=True, slots=True)
class _Config:
    connection_url: str
    namespace: str
    queue_type: str
    max_priority: int
    prefetch: int
    connect_timeout: float
    tls: TlsFiles


def _parse(url: str) -> _Config:
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid RabbitMQ URL {redact(url)!r}: {exc}") from None
    if parts.scheme not in ("amqp", "amqps") or not host:
        raise ConfigError(
            f"invalid RabbitMQ URL {redact(url)!r}: expected amqp://user:pass@host:port/vhost "
            "(amqps:// for TLS)"
        )
    del port
    options = url_options(parts.query, _OPTIONS, url=url, what="RabbitMQ")
    if options["max_priority"] and options["queue_type"] == "quorum":
        raise ConfigError(
            f"max_priority needs queue_type=classic in {redact(url)!r}: "
            "quorum queues do not support priorities"
        )
    heartbeat = options["heartbeat"]
    passthrough = {} if heartbeat is None else {"heartbeat": str(heartbeat)}
    connection_url = urlunsplit(
        (parts.scheme, parts.netloc, parts.path, urlencode(passthrough), "")
    )
    return _Config(
        connection_url,
        options["namespace"],
        options["queue_type"],
        options["max_priority"],
        options["prefetch"],
        options["connect_timeout"],
        tls_files(options, url, schemes=("amqp", "amqps")),
    )


def _int_or(value: object, default: int) -> int:
    try:
        return int(str(value))
    except ValueError:
        return default


def _delay_ms(delay: float) -> int:
    """``delay`` in milliseconds rounded up to two significant digits."""
    ms = max(1, math.ceil(delay * 1000))
    step = int(10 ** max(0, len(str(ms)) - 2))
    return -(-ms // step) * step


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except BrokerError:
        raise
    except _DRIVER_ERRORS as exc:
        raise BrokerError(f"RabbitMQ {what} failed: {exc!r}") from exc


@dataclass(eq=False, slots=True)
class _Consumer:
    topic: str
    group: str
    queue_name: str
    channel: aio_pika.abc.AbstractChannel
    queue: aio_pika.abc.AbstractQueue
    generation: int
    qos: int = 0
    tags: list[str] = field(default_factory=list)
    buffer: deque[aio_pika.abc.AbstractIncomingMessage] = field(default_factory=deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    leased: int = 0
    received: int = 0
    # Delivery tags handed to this channel and not yet acked or rejected:
    # an ack with multiple=True may cover a tag only if none below it is here.
    unsettled: set[int] = field(default_factory=set)

    @property
    def alive(self) -> bool:
        return not self.channel.is_closed

    def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if message.delivery_tag:
            self.unsettled.add(message.delivery_tag)
        self.buffer.append(message)
        self.received += 1
        self.arrived.set()


@dataclass(eq=False, slots=True)
class _Lease:
    consumer: _Consumer
    incoming: aio_pika.abc.AbstractIncomingMessage
    delivery: Delivery
    deadline: float
    timer: asyncio.TimerHandle | None = None


class RabbitMQBroker:
    """Broker on RabbitMQ: ``amqp://user:pass@host:5672/vhost?namespace=NAME``.

    See the module docstring for the options, the topology and the limits.
    """

    def __init__(self, url: str, *, clock: Clock | None = None) -> None:
        self.url = url
        self._config = _parse(url)
        # Delays and redeliveries happen on RabbitMQ's clock, so leases run
        # on real time too; a fake clock passed in is deliberately not kept.
        del clock
        self.clock: Clock = SystemClock()
        self.capabilities = Capabilities(
            durable=True,
            native_delay=True,
            native_dead_letter=False,
            per_key_ordering=False,
            priorities=self._config.max_priority > 0,
            max_payload=DEFAULT_MAX_PAYLOAD,
            releases_on_disconnect=True,
        )
        self._ns = self._config.namespace
        self.connection_name = f"conveyor {self._ns} {uuid.uuid4().hex[:12]}"
        """Shown by ``rabbitmqctl list_connections client_properties``."""
        self._quorum = self._config.queue_type == "quorum"
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._publisher: aio_pika.abc.AbstractChannel | None = None
        self._admin: aio_pika.abc.AbstractChannel | None = None
        self._generation = 0
        self._lock = asyncio.Lock()
        self._failures = 0
        self._next_try = 0.0
        self._topics: set[str] = set()
        self._groups: set[tuple[str, str]] = set()
        self._delay_queues: dict[str, float] = {}
        self._group_delays: dict[tuple[str, str], set[str]] = {}
        self._consumers: dict[tuple[str, str], _Consumer] = {}
        self._leases: dict[str, _Lease] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # names ------------------------------------------------------------

    def _name(self, *parts: str) -> str:
        name = "/".join((self._ns, *parts))
        if len(name.encode()) > 255:
            raise BrokerError(
                f"RabbitMQ name {name[:60]!r}... is over 255 bytes; use a shorter "
                "namespace, topic or group"
            )
        return name

    def _exchange(self, topic: str) -> str:
        return self._name("topic", topic)

    def _queue(self, topic: str, group: str) -> str:
        return self._name("queue", topic, group)

    def _queue_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"x-queue-type": self._config.queue_type}
        if self._config.max_priority:
            args["x-max-priority"] = self._config.max_priority
        return args

    def _delay_args(self, ms: int, exchange: str, routing_key: str) -> dict[str, Any]:
        args: dict[str, Any] = {
            "x-queue-type": self._config.queue_type,
            "x-message-ttl": ms,
            "x-expires": ms + _EXPIRES_MS,
            "x-dead-letter-exchange": exchange,
            "x-dead-letter-routing-key": routing_key,
        }
        if self._quorum:
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
        return args

    # connection -------------------------------------------------------

    async def connect(self) -> None:
        parts = urlsplit(self._config.connection_url)
        await connect_within(
            self._connected,
            server="RabbitMQ",
            where=f"{parts.hostname}:{parts.port or 5672}{parts.path or '/'}",
            timeout=self._config.connect_timeout,
            retry_on=(BrokerError,),
            error=BrokerError,
        )

    async def _connected(self) -> aio_pika.abc.AbstractConnection:
        connection = self._connection
        if connection is not None and not _dead(connection):
            return connection
        async with self._lock:
            connection = self._connection
            if connection is not None and not _dead(connection):
                return connection
            if connection is not None:
                self._connection = None
                self._spawn(_quietly_close(connection))
            self._lost()
            wait = self._next_try - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                connection = await self._open()
            except _DRIVER_ERRORS as exc:
                self._failures += 1
                self._next_try = time.monotonic() + min(0.1 * 2**self._failures, 5.0)
                raise BrokerError(
                    f"cannot connect to RabbitMQ at {self._safe_url()}: {exc!r}"
                ) from exc
            self._failures = 0
            self._connection = connection
            return connection

    async def _open(self) -> aio_pika.abc.AbstractConnection:
        url = self._config.connection_url
        task = asyncio.current_task()
        # Built here rather than by aio_pika.connect so a failed attempt is
        # closed at once: left to the garbage collector, aio_pika's __del__
        # schedules close() wherever it runs, even with no loop to await it.
        connection = aio_pika.Connection(
            make_url(url),
            ssl_context=self._config.tls.context() if url.startswith("amqps:") else None,
            client_properties={"connection_name": self.connection_name},
        )
        try:
            await connection.connect(timeout=self._config.connect_timeout)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await asyncio.shield(connection.close())
            # aiormq closing a connection reset mid-handshake cancels its own
            # tasks, and that CancelledError reaches here: a failed attempt
            # (tried again), unless this task itself is being cancelled.
            if isinstance(exc, asyncio.CancelledError) and not (task is None or task.cancelling()):
                raise ConnectionResetError(
                    f"connection closed during the handshake: {exc!r}"
                ) from exc
            # aiormq's frame reader ends with StopAsyncIteration when the
            # connection closes before the server's first frame.
            if isinstance(exc, StopAsyncIteration):
                raise ConnectionResetError("connection closed during the handshake") from exc
            raise
        return connection

    def _safe_url(self) -> str:
        parts = urlsplit(self._config.connection_url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def _lost(self) -> None:
        """Forget everything tied to the old connection: RabbitMQ hands its
        unacknowledged messages back, so its leases and buffers are void."""
        self._generation += 1
        for lease in self._leases.values():
            if lease.timer is not None:
                lease.timer.cancel()
        self._leases.clear()
        self._consumers.clear()
        self._publisher = None
        self._admin = None

    async def _publisher_channel(self) -> aio_pika.abc.AbstractChannel:
        connection = await self._connected()
        channel = self._publisher
        if channel is None or channel.is_closed:
            with _translated("opening a channel"):
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            self._publisher = channel
        return channel

    async def _admin_channel(self) -> aio_pika.abc.AbstractChannel:
        connection = await self._connected()
        channel = self._admin
        if channel is None or channel.is_closed:
            with _translated("opening a channel"):
                channel = await connection.channel(publisher_confirms=False)
            self._admin = channel
        return channel

    async def close(self) -> None:
        if self._connection is not None and not _dead(self._connection):
            with contextlib.suppress(*_DRIVER_ERRORS, BrokerError):
                await asyncio.wait_for(self._hand_back_prefetched(), 5.0)
        connection, self._connection = self._connection, None
        self._lost()
        for task in list(self._tasks):
            task.cancel()
        if connection is not None and not connection.is_closed:
            await _quietly_close(connection)

    async def _hand_back_prefetched(self) -> None:
        """Requeue what consumers prefetched but never handed out, without
        counting a delivery: a copy carrying the attempts so far is published
        (confirmed), then the original acked. Left to the server, quorum
        queues would count each as a delivery (and a worker restarted a few
        times would dead-letter messages its handlers never saw)."""
        deadline = time.monotonic() + _SETTLE_TIMEOUT
        for consumer in list(self._consumers.values()):
            if not consumer.alive or not consumer.tags:
                continue
            await self._quiesce(consumer, deadline)
            for tag in consumer.tags:
                await consumer.queue.cancel(tag)
            consumer.tags.clear()
            # A round trip on the channel: what was on its way is in the buffer.
            await consumer.channel.set_qos(prefetch_count=consumer.qos)
            await asyncio.sleep(0)
            waiting = list(consumer.buffer)
            consumer.buffer.clear()
            if not waiting:
                continue
            routes, readable = [], []
            for incoming in waiting:
                try:
                    message = self._decode(incoming, consumer.topic)
                except (ValueError, TypeError, MessageError):
                    # Unreadable: back to the queue as it is; the next fetch
                    # hands it out as malformed.
                    await incoming.nack(requeue=True)
                    consumer.unsettled.discard(incoming.delivery_tag)
                    continue
                readable.append(incoming)
                routes.append((self._encode(message, message.attempt - 1), "", consumer.queue_name))
            await self._send(routes)
            for incoming in readable:
                await incoming.ack()
                consumer.unsettled.discard(incoming.delivery_tag)

    async def _quiesce(self, consumer: _Consumer, deadline: float) -> None:
        """Wait until RabbitMQ has nothing on its way to the consumer: its
        prefetch is full (leased or buffered) or its queue has nothing ready.

        A delivery the queue makes while ``basic.cancel`` is under way never
        reaches the client: the server returns it, and a quorum queue counts
        that as a delivery. Acks free prefetch that the queue refills once it
        has applied them, so a consumer that acked just before ``close()``
        has such deliveries on their way."""
        while consumer.leased + len(consumer.buffer) < consumer.qos:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            consumer.arrived.clear()
            if await self._sync(consumer) == 0 and not consumer.arrived.is_set():
                return
            if not consumer.arrived.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(consumer.arrived.wait(), left)

    # topology ---------------------------------------------------------

    async def _ensure_topic(self, topic: str) -> str:
        exchange = self._exchange(topic)
        if topic in self._topics:
            return exchange
        channel = await self._admin_channel()
        park = self._name("park")
        parked = self._name("parked", topic)
        with _translated(f"declaring topic {topic!r}"):
            park_x = await channel.declare_exchange(
                park, aio_pika.ExchangeType.DIRECT, durable=True
            )
            queue = await channel.declare_queue(parked, durable=True, arguments=self._queue_args())
            await queue.bind(park_x, routing_key=topic)
            await channel.declare_exchange(
                exchange,
                aio_pika.ExchangeType.FANOUT,
                durable=True,
                arguments={"alternate-exchange": park},
            )
        self._topics.add(topic)
        return exchange

    async def declare(self, topic: str, group: str) -> None:
        exchange = await self._ensure_topic(topic)
        name = self._queue(topic, group)
        channel = await self._admin_channel()
        with _translated(f"declaring queue {name!r}"):
            queue = await channel.declare_queue(name, durable=True, arguments=self._queue_args())
            await queue.bind(exchange, routing_key=topic)
        self._groups.add((topic, group))
        await self._unpark(topic, name)

    async def _unpark(self, topic: str, target: str) -> None:
        """Move messages parked before any group existed into ``target``:
        publish (confirmed) first, ack after, so a crash can only duplicate."""
        channel = await self._admin_channel()
        publisher = await self._publisher_channel()
        with _translated(f"moving parked messages of {topic!r}"):
            queue = await channel.declare_queue(self._name("parked", topic), passive=True)
            while True:
                taken: list[aio_pika.abc.AbstractIncomingMessage] = []
                for _ in range(100):
                    incoming = await queue.get(no_ack=False, fail=False)
                    if incoming is None:
                        break
                    taken.append(incoming)
                if not taken:
                    return
                await asyncio.gather(
                    *(
                        publisher.default_exchange.publish(
                            _copy(m), target, mandatory=True, timeout=_CONFIRM_TIMEOUT
                        )
                        for m in taken
                    )
                )
                await taken[-1].ack(multiple=True)

    async def _ensure_delay(self, name: str, ms: int, exchange: str, routing_key: str) -> None:
        # Re-declared now and then: x-expires counts from the last declare,
        # and must not delete a queue that still holds messages.
        last = self._delay_queues.get(name)
        if last is not None and time.monotonic() - last < _REDECLARE_AFTER:
            return
        channel = await self._admin_channel()
        with _translated(f"declaring retry queue {name!r}"):
            await channel.declare_queue(
                name, durable=True, arguments=self._delay_args(ms, exchange, routing_key)
            )
        self._delay_queues[name] = time.monotonic()

    # publishing -------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        routes: list[tuple[aio_pika.Message, str, str]] = []
        now = time.time()
        for message in messages:
            exchange = await self._ensure_topic(message.topic)
            body = self._encode(message, message.attempt)
            if message.not_before is not None and message.not_before > now + 0.001:
                ms = _delay_ms(message.not_before - now)
                name = self._name("later", message.topic, str(ms))
                await self._ensure_delay(name, ms, exchange, message.topic)
                routes.append((body, "", name))
            else:
                routes.append((body, exchange, message.topic))
        await self._send(routes, forget_topics={m.topic for m in messages})

    async def enqueue(self, group: str, messages: Sequence[Message]) -> None:
        routes: list[tuple[aio_pika.Message, str, str]] = []
        now = time.time()
        for message in messages:
            target = self._queue(message.topic, group)
            body = self._encode(message, message.attempt)
            if message.not_before is not None and message.not_before > now + 0.001:
                name = await self._group_delay(message.topic, group, message.not_before - now)
                routes.append((body, "", name))
            else:
                routes.append((body, "", target))
        await self._send(routes)

    async def _group_delay(self, topic: str, group: str, delay: float) -> str:
        ms = _delay_ms(delay)
        name = self._name("delay", topic, group, str(ms))
        await self._ensure_delay(name, ms, "", self._queue(topic, group))
        self._group_delays.setdefault((topic, group), set()).add(name)
        return name

    async def _send(
        self,
        routes: Sequence[tuple[aio_pika.Message, str, str]],
        forget_topics: set[str] | None = None,
    ) -> None:
        if not routes:
            return
        channel = await self._publisher_channel()
        exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        try:
            for _, exchange, _ in routes:
                if exchange and exchange not in exchanges:
                    exchanges[exchange] = await channel.get_exchange(exchange, ensure=False)
            results = await asyncio.gather(
                *(
                    (exchanges[exchange] if exchange else channel.default_exchange).publish(
                        body, routing_key, mandatory=True, timeout=_CONFIRM_TIMEOUT
                    )
                    for body, exchange, routing_key in routes
                ),
                return_exceptions=True,
            )
        except _DRIVER_ERRORS as exc:
            results = [exc]
        for result in results:
            if isinstance(result, BaseException):
                # A retry queue may have expired under a stale cache entry.
                self._delay_queues.clear()
                if forget_topics:
                    # A missing exchange closes the channel; declare again next time.
                    self._topics -= forget_topics
                if isinstance(result, _DRIVER_ERRORS):
                    raise BrokerError(f"RabbitMQ did not confirm a publish: {result!r}") from result
                raise result
            if not isinstance(result, pamqp.commands.Basic.Ack):
                raise BrokerError(f"RabbitMQ did not confirm a publish: {result!r}")

    def _encode(self, message: Message, attempts: int) -> aio_pika.Message:
        meta: dict[str, Any] = {
            "topic": message.topic,
            "attempts": attempts,
            "created_at": repr(message.created_at),
            "headers": dict(message.headers),
        }
        if message.key is not None:
            meta["key"] = message.key
        if message.not_before is not None:
            meta["not_before"] = repr(message.not_before)
        priority = None
        if self._config.max_priority:
            priority = max(0, min(message.priority, self._config.max_priority))
        return aio_pika.Message(
            message.payload,
            message_id=message.id,
            type=message.type or None,
            priority=priority,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={_META: meta},
        )

    def _decode(self, incoming: aio_pika.abc.AbstractIncomingMessage, topic: str) -> Message:
        """The message of ``incoming``; ``ValueError``, ``TypeError`` or
        ``MessageError`` when its headers are not what Conveyor writes."""
        headers = incoming.headers or {}
        meta = headers.get(_META)
        if meta is None:
            meta = {}  # a plain AMQP message: its body is the payload
        if not isinstance(meta, Mapping):
            raise ValueError(f"the {_META!r} header is {type(meta).__name__}, not a table")
        if self._quorum:
            returned = int(str(headers.get("x-delivery-count") or 0))
        else:
            returned = 1 if incoming.redelivered else 0
        user = meta.get("headers")
        not_before = meta.get("not_before")
        created = meta.get("created_at")
        return Message(
            topic=str(meta.get("topic", topic)),
            payload=incoming.body,
            id=incoming.message_id or str(uuid.uuid4()),
            type=incoming.type or "",
            key=None if meta.get("key") is None else str(meta["key"]),
            headers={str(k): str(v) for k, v in user.items()} if isinstance(user, Mapping) else {},
            priority=incoming.priority or 0,
            attempt=int(str(meta.get("attempts", 0))) + returned + 1,
            created_at=float(str(created)) if created is not None else time.time(),
            not_before=float(str(not_before)) if not_before is not None else None,
        )

    # consuming --------------------------------------------------------

    async def _consumer(self, topic: str, group: str, want: int) -> _Consumer | None:
        """The live consumer of (topic, group), its prefetch at least ``want``
        (up to the bound); None when the queue does not exist."""
        want = max(1, min(want, self._config.prefetch))
        consumer = self._consumers.get((topic, group))
        if consumer is not None and (not consumer.alive or consumer.generation != self._generation):
            self._drop_consumer(consumer)
            consumer = None
        if consumer is None:
            connection = await self._connected()
            name = self._queue(topic, group)
            try:
                channel = await connection.channel(publisher_confirms=False)
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return None
            except _DRIVER_ERRORS as exc:
                raise BrokerError(f"RabbitMQ consumer of {name!r} failed: {exc!r}") from exc
            consumer = _Consumer(topic, group, name, channel, queue, self._generation)
            self._consumers[(topic, group)] = consumer
            self._groups.add((topic, group))
        if consumer.qos < want and not self._config.max_priority:
            # Per-consumer prefetch is fixed at basic.consume: add a consumer
            # on the same channel for the difference. (Cancelling the old one
            # instead could drop a delivery already on its way to it.)
            with _translated(f"consuming from {consumer.queue_name!r}"):
                await consumer.channel.set_qos(prefetch_count=want - consumer.qos)
                tag = await consumer.queue.consume(_callback(consumer), no_ack=False)
                consumer.tags.append(tag)
                consumer.qos = want
        return consumer

    def _drop_consumer(self, consumer: _Consumer) -> None:
        if self._consumers.get((consumer.topic, consumer.group)) is consumer:
            del self._consumers[(consumer.topic, consumer.group)]
        for receipt, lease in list(self._leases.items()):
            if lease.consumer is consumer:
                if lease.timer is not None:
                    lease.timer.cancel()
                del self._leases[receipt]

    async def _sync(self, consumer: _Consumer) -> int:
        """Ready count of the consumer's queue, consistent with its buffer.

        A round trip on the consumer's channel after the count puts every
        message RabbitMQ handed out before the count in the buffer. A message
        that arrives during the round may or may not be in the count (quorum
        queues apply acks through their log, after a concurrent count), so
        such a round is repeated."""
        count = 0
        for _ in range(5):
            before = consumer.received
            with _translated(f"reading {consumer.queue_name!r}"):
                ok = await consumer.channel.declare_queue(consumer.queue_name, passive=True)
                if consumer.tags:
                    await consumer.channel.set_qos(prefetch_count=consumer.qos)
            await asyncio.sleep(0)
            count = int(ok.declaration_result.message_count or 0)
            if consumer.received == before:
                break
        return count

    async def fetch(
        self, topic: str, group: str, *, max_messages: int, lease: float
    ) -> list[Delivery]:
        consumer = await self._consumer(topic, group, max_messages)
        if consumer is None:
            return []
        out: list[Delivery] = []
        if self._config.max_priority:
            # A consumer takes what arrives while it has room, in arrival
            # order; basic.get takes the highest priority ready right now.
            with _translated(f"getting from {consumer.queue_name!r}"):
                while len(out) < max_messages:
                    incoming = await consumer.queue.get(no_ack=False, fail=False)
                    if incoming is None:
                        break
                    out.append(self._lease(consumer, incoming, lease))
            return out
        deadline = time.monotonic() + 0.5
        while True:
            while consumer.buffer and len(out) < max_messages:
                out.append(self._lease(consumer, consumer.buffer.popleft(), lease))
            if len(out) >= max_messages or consumer.leased + len(consumer.buffer) >= consumer.qos:
                return out
            ready = await self._sync(consumer)
            if consumer.buffer:
                continue
            if ready == 0 or time.monotonic() > deadline:
                return out
            consumer.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    consumer.arrived.wait(), max(0.0, deadline - time.monotonic())
                )

    def _lease(
        self, consumer: _Consumer, incoming: aio_pika.abc.AbstractIncomingMessage, lease: float
    ) -> Delivery:
        receipt = uuid.uuid4().hex
        try:
            delivery = Delivery(self._decode(incoming, consumer.topic), consumer.group, receipt)
        except (ValueError, TypeError, MessageError) as exc:
            # Published by something else with headers Conveyor cannot read:
            # handed out as malformed, so the runtime dead-letters and acks it.
            headers = incoming.headers or {}
            delivery = malformed_delivery(
                topic=consumer.topic,
                group=consumer.group,
                receipt=receipt,
                reason=short_reason(exc),
                where=f"{consumer.queue_name}/{incoming.delivery_tag}",
                id=incoming.message_id,
                payload=incoming.body,
                attempt=_int_or(headers.get("x-delivery-count"), 0) + 1,
            )
        if incoming.delivery_tag:  # also taken by basic.get, on the same channel
            consumer.unsettled.add(incoming.delivery_tag)
        held = _Lease(consumer, incoming, delivery, time.monotonic() + lease)
        held.timer = asyncio.get_running_loop().call_later(lease, self._expire, receipt)
        self._leases[receipt] = held
        consumer.leased += 1
        return delivery

    def _take(self, delivery: Delivery) -> _Lease | None:
        """Remove and return our live lease on ``delivery``, if we still hold it."""
        held = self._leases.pop(delivery.receipt, None)
        if held is None:
            return None
        held.consumer.leased -= 1
        if held.timer is not None:
            held.timer.cancel()
        if not held.consumer.alive or held.consumer.generation != self._generation:
            return None
        if time.monotonic() >= held.deadline:
            self._spawn(self._release(held))
            return None
        return held

    def _expire(self, receipt: str) -> None:
        held = self._leases.pop(receipt, None)
        if held is None:
            return
        held.consumer.leased -= 1
        if held.consumer.alive:
            self._spawn(self._release(held))

    def _spawn(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, held: _Lease) -> None:
        """Hand a delivery back for immediate redelivery, attempt counted."""
        try:
            await self._hand_back(held)
        finally:
            held.consumer.unsettled.discard(held.incoming.delivery_tag)

    async def _hand_back(self, held: _Lease) -> None:
        with contextlib.suppress(*_DRIVER_ERRORS):
            if not self._quorum:
                # Classic queues only flag a redelivery: requeue a copy that
                # carries the attempt instead, when that works.
                message = held.delivery.message
                target = self._queue(held.consumer.topic, held.consumer.group)
                try:
                    await self._send([(self._encode(message, message.attempt), "", target)])
                except BrokerError:
                    pass
                else:
                    await held.incoming.ack()
                    return
            await held.incoming.reject(requeue=True)

    async def ack(self, deliveries: Sequence[Delivery]) -> int:
        """One ``basic.ack`` with ``multiple=True`` for the longest run of
        this batch's delivery tags, per channel, below which nothing else on
        the channel is still unsettled; the others one by one."""
        taken: dict[_Consumer, dict[int, _Lease]] = {}
        done = 0
        for delivery in deliveries:
            held = self._take(delivery)
            if held is None:
                continue
            tag = held.incoming.delivery_tag
            if tag:
                taken.setdefault(held.consumer, {})[tag] = held
                continue
            with contextlib.suppress(*_DRIVER_ERRORS):  # no tag to count on: alone
                await held.incoming.ack()
                done += 1
        for consumer, mine in taken.items():
            others = [t for t in consumer.unsettled if t not in mine]
            below = min(others) if others else None
            run = sorted(t for t in mine if below is None or t < below)
            singles = [t for t in mine if below is not None and t > below]
            if len(run) == 1:
                singles.append(run.pop())
            try:
                if run:
                    await mine[run[-1]].incoming.ack(multiple=True)
                    consumer.unsettled.difference_update(run)
                    done += len(run)
                for tag in singles:
                    await mine[tag].incoming.ack()
                    consumer.unsettled.discard(tag)
                    done += 1
            except _DRIVER_ERRORS:
                # The channel is gone, and with it the leases: RabbitMQ
                # redelivers those messages, and the inbox absorbs the copies.
                continue
        return done

    async def nack(self, delivery: Delivery, *, delay: float) -> None:
        held = self._take(delivery)
        if held is None:
            return
        try:
            await self._nack(held, delivery, delay)
        finally:
            held.consumer.unsettled.discard(held.incoming.delivery_tag)

    async def _nack(self, held: _Lease, delivery: Delivery, delay: float) -> None:
        if delay <= 0:
            if self._quorum:
                with _translated("reject"):
                    await held.incoming.reject(requeue=True)
                return
            target = self._queue(held.consumer.topic, held.consumer.group)
        else:
            target = await self._group_delay(held.consumer.topic, held.consumer.group, delay)
        # The copy is confirmed before the original is acked: a crash in
        # between duplicates the message (the inbox absorbs it), never loses it.
        message = delivery.message
        try:
            await self._send([(self._encode(message, message.attempt), "", target)])
        except BrokerError:
            # Not parked for later: hand it back now rather than leave it
            # unacknowledged on the channel.
            with contextlib.suppress(*_DRIVER_ERRORS):
                await held.incoming.reject(requeue=True)
            raise
        with _translated("ack"):
            await held.incoming.ack()

    async def wait(self, topic: str, group: str, timeout: float) -> None:
        try:
            consumer = await self._consumer(topic, group, 1)
        except BrokerError:
            consumer = None
        if consumer is None:
            await asyncio.sleep(min(timeout, 0.05))
            return
        if self._config.max_priority:
            await self._poll(consumer, timeout)
            return
        if consumer.buffer:
            return
        consumer.arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(consumer.arrived.wait(), timeout)

    async def _poll(self, consumer: _Consumer, timeout: float) -> None:
        """Without a consumer (priority queues): poll the ready count."""
        deadline = time.monotonic() + timeout
        pause = 0.005
        while await self._sync(consumer) == 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 0.1)

    async def stats(self) -> list[QueueStats]:
        out: list[QueueStats] = []
        for topic, group in sorted(self._groups):
            consumer = self._consumers.get((topic, group))
            if consumer is not None and consumer.alive:
                ready = await self._sync(consumer) + len(consumer.buffer)
                in_flight = consumer.leased
            else:
                ready = await self._count(self._queue(topic, group)) or 0
                in_flight = 0
            delayed = 0
            names = self._group_delays.get((topic, group), set())
            for name in sorted(names):
                count = await self._count(name)
                if count is None:
                    names.discard(name)
                    self._delay_queues.pop(name, None)
                else:
                    delayed += count
            out.append(QueueStats(topic, group, ready, in_flight, delayed))
        return out

    async def _count(self, name: str) -> int | None:
        """Ready messages in queue ``name``; None when it does not exist."""
        channel = await self._admin_channel()
        try:
            ok = await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return None
        except _DRIVER_ERRORS as exc:
            raise BrokerError(f"RabbitMQ query of {name!r} failed: {exc!r}") from exc
        return int(ok.declaration_result.message_count or 0)


def _dead(connection: aio_pika.abc.AbstractConnection) -> bool:
    """Closed, or its socket is (aio-pika notices a server's close later)."""
    if connection.is_closed:
        return True
    inner = getattr(getattr(connection, "transport", None), "connection", None)
    return inner is None or bool(getattr(inner, "is_closed", False))


async def _quietly_close(connection: aio_pika.abc.AbstractConnection) -> None:
    """Close, giving up after ``_SETTLE_TIMEOUT``: a server that stopped
    answering never acknowledges the close."""
    with contextlib.suppress(*_DRIVER_ERRORS, TimeoutError):
        async with asyncio.timeout(_SETTLE_TIMEOUT):
            await connection.close()


def _callback(consumer: _Consumer) -> Any:
    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        consumer.on_message(message)

    return on_message


def _copy(incoming: aio_pika.abc.AbstractIncomingMessage) -> aio_pika.Message:
    """The same message, without the headers RabbitMQ added on its way."""
    headers = {k: v for k, v in (incoming.headers or {}).items() if not k.startswith("x-")}
    return aio_pika.Message(
        incoming.body,
        message_id=incoming.message_id,
        type=incoming.type,
        priority=incoming.priority,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers=headers,
    )
