"""Kafka broker (aiokafka): ``kafka://[user:password@]host:port[,host:port]?namespace=NAME``.

Each (topic, group) queue is one Kafka consumer group (``NAME|topic|group``)
reading two Kafka topics: the topic's main log ``NAME.topic``, shared by
every group, and the group's own retry log ``NAME.__retry.group.topic``.
Messages are partitioned by key (murmur2, as Kafka's default partitioner),
so one key's messages keep their order within a partition; unkeyed messages
go round-robin. Consumers of one group compete through Kafka's group
rebalancing: a partition belongs to one consumer at a time, so a group needs
at least two partitions for two consumers to share work.

Kafka has no per-message acknowledgement or lease; this module emulates the
contract on top of committed offsets:

- ``fetch`` reads the consumer's partitions up to their end (so whatever was
  published before the call is visible), then leases ready records client-
  side. ``attempt`` = the attempt carried in the envelope + deliveries made
  by this consumer; an expired lease is delivered again with attempt + 1.
- ``ack`` marks records done and commits, per partition, the offset below
  the first record not yet done. It counts the deliveries whose lease is
  still ours; after a rebalance took the partition away that is 0.
- ``nack(delay>0)`` produces a copy (attempt counted, not-before = now +
  delay) to the group's retry log and marks the original done; whichever
  consumer owns that retry partition delivers it when due, without holding
  up the main log. ``nack(delay<=0)`` releases the record locally.
- A client joins a queue's consumer group on its first ``fetch`` or
  ``wait`` (``declare`` joins nothing). When a rebalance revokes partitions,
  this consumer delivers nothing more and waits up to ``rebalance_wait`` for
  its deliveries in flight to be settled (their acks still count); then,
  as on ``close``, it hands off what it still holds: records already
  delivered (or delayed) are copied to the retry log with their attempt and
  lease deadline, and the offsets committed, so the next owner neither
  delivers them while leased nor restarts their attempt count.
- A consumer that dies without closing (``kill -9``) commits nothing more:
  after the session timeout its partitions go to another consumer, which
  delivers every record after the last committed offset again. ``attempt``
  for such a re-read is the envelope's attempt + 1 (the dead consumer's
  deliveries are unknown), so a message that kills every consumer is never
  dead-lettered by attempt count alone; the runtime's inbox still applies
  it at most once.
- Every group gets every message published after it was declared: the
  first group declared for a topic (recorded in ``NAME.__groups``) starts
  at the beginning of the log, so messages published before any group are
  kept for it; a later group starts at the end of the log.
- ``priority`` travels with the message but orders nothing; per-key order
  holds in a partition but not across a retry (a nacked message goes to the
  retry log while the key's next message proceeds).
- Dead letters are the store's (the runtime writes them, with traceback and
  replay); a copy also goes to the group's dead-letter topic
  ``NAME.__dead.group.topic`` (``DeadLetterSink``): the message with its
  envelope and the headers ``reason`` and ``error_type``, at least once.
- Time for leases and delays is the injected clock's; all consumers of a
  group must agree on it (they do when their hosts are NTP-synchronised).

URL options:

``namespace``           prefix of every topic and group (letters, digits,
                        ``._-``; default ``conveyor``).
``partitions``          partitions of the topics this broker creates
                        (default 3); existing topics keep theirs.
``replication``         replication factor of created topics (default 1).
``session_timeout``     seconds without heartbeat before a consumer is
                        declared dead and its partitions reassigned
                        (default 10).
``heartbeat_interval``  seconds between heartbeats; rebalances are noticed
                        this fast (default 1).
``buffer``              records read ahead per partition (default 1000).
``rebalance_wait``      seconds a rebalance waits for this consumer's
                        deliveries in flight to be acknowledged before it
                        hands them off (default 30).
``retry_for``           seconds to keep retrying a failing operation, with
                        capped exponential backoff, before it fails with
                        ``BrokerError`` (default 30).
``connect_timeout``     seconds the first connection may take in all,
                        retries included (default 5).
``security_protocol``   ``PLAINTEXT`` (default), ``SSL``, ``SASL_PLAINTEXT``
                        or ``SASL_SSL``, as Kafka's ``security.protocol``.
``sasl_mechanism``      ``PLAIN`` (default), ``SCRAM-SHA-256`` or
                        ``SCRAM-SHA-512``; the user name and password are
                        the URL's (``kafka://user:password@host:port``).
``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``: with ``SSL`` or
                        ``SASL_SSL``, the CA that signed the brokers'
                        certificates (default: the system's) and a client
                        certificate for brokers that require one
                        (``ssl.client.auth=required``).

The first connection checks TLS and SASL once, directly, before the
clients start: aiokafka's bootstrap logs a refused certificate or password
and tries again, so without the check a wrong CA or password would end,
after ``connect_timeout``, as "unable to bootstrap". A certificate or
credentials the server refuses is one error at once, never retried.

Durability is the cluster's: ``publish`` waits for ``acks=all``, sending
one record per produce request within a partition (in order) and partitions
in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    CommitFailedError,
    IllegalSaslStateError,
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
)
from aiokafka.partitioner import murmur2

from conveyor._connect import DEFAULT_CONNECT_TIMEOUT, connect_within, keep_trying
from conveyor._time import Clock, SystemClock
from conveyor._tls import PYTHON, TlsFiles, tls_files, tls_options
from conveyor._urls import Option, redact, url_options
from conveyor.brokers._kit import malformed_delivery, short_reason
from conveyor.brokers._protocol import Capabilities, Delivery, QueueStats
from conveyor.errors import BrokerError, ConfigError, MessageError
from conveyor.messages import Message

__all__ = ["KafkaBroker"]

log = logging.getLogger(__name__)

T = TypeVar("T")

ENVELOPE = "conveyor"
"""The Kafka header holding the envelope (JSON) of a Conveyor message."""
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_OPTIONS = {
    "namespace": Option("conveyor", pattern=_NAME, expect="letters, digits, '._-'"),
    "partitions": Option(3, int, low=1),
    "replication": Option(1, int, low=1),
    "session_timeout": Option(10.0, float, low=0.1),
    "heartbeat_interval": Option(1.0, float, low=0.01),
    "buffer": Option(1000, int, low=1),
    "rebalance_wait": Option(30.0, float, low=0.0),
    "retry_for": Option(30.0, float, low=0.0),
    "connect_timeout": Option(DEFAULT_CONNECT_TIMEOUT, float, low=0.1),
    "security_protocol": Option(
        "PLAINTEXT", choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
    ),
    "sasl_mechanism": Option(None, choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")),
    **tls_options(),
}
# Kafka's default message.max.bytes is 1048588 for a whole record batch; leave
# room for the key and the envelope header.
_MAX_PAYLOAD = 1_000_000


@dataclass(frozen=True, slots=True)
class _Config:
    servers: list[str]
    namespace: str
    partitions: int
    replication: int
    session_timeout: float
    heartbeat_interval: float
    buffer: int
    rebalance_wait: float
    retry_for: float
    connect_timeout: float
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    tls: TlsFiles = field(default_factory=TlsFiles)

    def security(self) -> dict[str, Any]:
        """aiokafka's keyword arguments for TLS and SASL (one SSL context,
        made here, for every client of the broker)."""
        options: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = self.tls.context()
        if self.security_protocol.startswith("SASL_"):
            options.update(
                sasl_mechanism=self.sasl_mechanism or "PLAIN",
                sasl_plain_username=self.username,
                sasl_plain_password=self.password,
            )
        return options


def _parse(url: str) -> _Config:
    safe = redact(url)
    if not url.startswith("kafka://"):
        raise ConfigError(f"not a Kafka URL: {safe!r} (expected kafka://host:port)")
    rest = url.removeprefix("kafka://")
    netloc, _, query = rest.partition("?")
    netloc = netloc.rstrip("/")
    userinfo, at, netloc = netloc.rpartition("@")
    if "/" in netloc or "@" in netloc or (at and not userinfo):
        raise ConfigError(
            f"invalid Kafka URL {safe!r}: expected "
            "kafka://[user:password@]host:port[,host:port][?options]"
        )
    servers = []
    for server in netloc.split(","):
        host, sep, port = server.rpartition(":")
        if not sep:
            host, port = server, "9092"
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"invalid Kafka URL {safe!r}: {server!r} is not host:port (127.0.0.1:9092)"
            )
        servers.append(f"{host}:{port}")
    values = url_options(query, _OPTIONS, url=url, what="Kafka")
    tls = tls_files({n: values.pop(n) for n in PYTHON}, url)
    protocol = values["security_protocol"]
    sasl = protocol.startswith("SASL_")
    if tls and protocol not in ("SSL", "SASL_SSL"):
        raise ConfigError(
            f"TLS options in {safe!r} need security_protocol=SSL or SASL_SSL (now {protocol})"
        )
    if userinfo and not sasl:
        raise ConfigError(
            f"a user name in {safe!r} needs security_protocol=SASL_SSL "
            f"(or SASL_PLAINTEXT; now {protocol})"
        )
    if sasl and not userinfo:
        raise ConfigError(
            f"security_protocol={protocol} in {safe!r} needs a user name and password: "
            "kafka://user:password@host:port"
        )
    if values["sasl_mechanism"] is not None and not sasl:
        raise ConfigError(f"sasl_mechanism in {safe!r} needs security_protocol=SASL_SSL")
    user, _, password = userinfo.partition(":")
    config = _Config(
        servers=servers,
        **values,
        username=unquote(user) if userinfo else None,
        password=unquote(password) if userinfo else None,
        tls=tls,
    )
    if config.heartbeat_interval >= config.session_timeout:
        raise ConfigError(
            f"invalid Kafka URL {safe!r}: heartbeat_interval must be below session_timeout"
        )
    return config


def _retriable(exc: BaseException) -> bool:
    return isinstance(exc, KafkaConnectionError | OSError | TimeoutError) or bool(
        getattr(exc, "retriable", False)
    )


# -- the envelope -----------------------------------------------------------


def _encode(message: Message, *, attempt: int, due: float | None) -> list[tuple[str, bytes]]:
    envelope = {**message.envelope(), "attempt": attempt, "due": due}
    return [(ENVELOPE, json.dumps(envelope, separators=(",", ":")).encode())]


def _decode(topic: str, record: Any) -> tuple[Message, int, float | None, str | None]:
    """The message in ``record``, the attempts already made, when it is due,
    and why its envelope is unreadable (None when it is fine).

    A record without an envelope (written by another Kafka client) becomes a
    message whose id is derived from its position, so redeliveries of it
    dedupe. A record whose envelope is there but malformed is delivered as
    malformed (the runtime dead-letters it), with its payload kept."""
    headers = dict(record.headers or ())
    key = None if record.key is None else bytes(record.key).decode("utf-8", "replace")
    payload = b"" if record.value is None else bytes(record.value)
    raw = headers.get(ENVELOPE)
    where = f"{record.topic}/{record.partition}/{record.offset}"
    if raw is not None:
        try:
            env = json.loads(raw)
            if not isinstance(env, dict):
                raise ValueError(f"the envelope is not a JSON object: {bytes(raw)[:100]!r}")
            return (*_from_envelope(env, key, payload), None)
        except (ValueError, KeyError, TypeError, MessageError) as exc:
            bad = malformed_delivery(
                topic=topic,
                group="",
                receipt="",
                reason=short_reason(exc),
                where=where,
                payload=payload,
            )
            return bad.message, 0, None, bad.malformed
    ident = uuid.uuid5(uuid.NAMESPACE_URL, where)
    text = {k: bytes(v).decode("utf-8", "replace") for k, v in headers.items()}
    message = Message(
        topic=topic,
        payload=payload,
        id=str(ident),
        key=key,
        headers=text,
        created_at=record.timestamp / 1000.0,
    )
    return message, 0, None, None


def _from_envelope(
    env: dict[str, Any], key: str | None, payload: bytes
) -> tuple[Message, int, float | None]:
    message = Message.from_envelope({**env, "key": key}, payload)
    due = env.get("due")
    if due is None:
        due = message.not_before
    return message, int(env["attempt"]), due


# -- one queue: a Kafka consumer group's view in this client ------------------


@dataclass(slots=True)
class _Record:
    tp: TopicPartition
    offset: int
    message: Message
    base: int
    visible_at: float
    deliveries: int = 0
    lease: str | None = None
    done: bool = False
    malformed: str | None = None


@dataclass(slots=True)
class _Partition:
    records: dict[int, _Record] = field(default_factory=dict)
    read_to: int | None = None
    committed: int | None = None


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, queue: _Queue) -> None:
        self.queue = queue

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.queue.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.queue.assigned(set(assigned))


class _Queue:
    def __init__(self, broker: KafkaBroker, topic: str, group: str) -> None:
        self.broker = broker
        self.topic = topic
        self.group = group
        self.main = broker._main(topic)
        self.retry = broker._retry(topic, group)
        self.group_id = broker._group_id(topic, group)
        self.parts: dict[TopicPartition, _Partition] = {}
        self.settled = asyncio.Event()
        self.changed = asyncio.Event()
        self.revoking = False
        self.lock = asyncio.Lock()
        self.commit_lock = asyncio.Lock()
        self.consumer: Any = None

    async def start(self) -> None:
        cfg = self.broker.config
        consumer = AIOKafkaConsumer(
            bootstrap_servers=cfg.servers,
            **self.broker.security,
            group_id=self.group_id,
            client_id=f"conveyor-{self.broker._client_id}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(cfg.session_timeout * 1000),
            heartbeat_interval_ms=int(cfg.heartbeat_interval * 1000),
            max_partition_fetch_bytes=2 * 1024 * 1024,
            fetch_max_wait_ms=100,
            retry_backoff_ms=100,
        )
        await consumer.start()
        try:
            consumer.subscribe([self.main, self.retry], listener=_Listener(self))
        except BaseException:
            await consumer.stop()
            raise
        self.consumer = consumer

    async def stop(self) -> None:
        consumer = self.consumer
        if consumer is None:
            return
        try:
            with contextlib.suppress(BrokerError, KafkaError, OSError):
                await self.handoff(set(self.parts))
        finally:
            self.consumer = None
            self.parts.clear()
            self.settled.clear()
            # aiokafka leaves the group only from generation 1 on, and some
            # Kafka-compatible brokers (Tansu) start at 0: without the
            # LeaveGroup the rest of the group waits a session timeout.
            coordinator = getattr(consumer, "_coordinator", None)
            if coordinator is not None and getattr(coordinator, "generation", -1) == 0:
                coordinator.generation = 1
            with contextlib.suppress(KafkaError, OSError):
                await consumer.stop()

    # rebalance callbacks (run by aiokafka's coordinator task)

    def assigned(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self.parts.setdefault(tp, _Partition())
        self.settled.set()

    async def revoked(self, tps: set[TopicPartition]) -> None:
        # Cooperate with the rebalance: deliver nothing more, give the
        # deliveries in flight up to ``rebalance_wait`` to be settled (their
        # acks still count), then hand off the rest and commit.
        self.settled.clear()
        self.revoking = True
        try:
            deadline = time.monotonic() + self.broker.config.rebalance_wait
            while self.held(tps) and time.monotonic() < deadline:
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.1)
            await self.handoff(tps & set(self.parts))
        except (BrokerError, KafkaError, OSError) as exc:
            # The next owner re-reads from the last commit: at-least-once.
            log.warning(
                "handing off %s/%s on rebalance failed: %s",
                self.topic,
                self.group,
                exc,
                extra={"event": "conveyor.kafka_handoff_failed"},
            )
        finally:
            self.revoking = False
            for tp in tps:
                self.parts.pop(tp, None)

    def held(self, tps: set[TopicPartition]) -> bool:
        """Whether a delivery from ``tps`` is leased and its lease still runs."""
        now = self.broker.clock.time()
        return any(
            not r.done and r.lease is not None and r.visible_at > now
            for tp in tps
            if tp in self.parts
            for r in self.parts[tp].records.values()
        )

    async def handoff(self, tps: set[TopicPartition]) -> None:
        """Copy what this consumer delivered (or delayed) to the retry log, with
        its attempt and lease deadline, then commit past it, so the next owner
        keeps both; records never delivered are re-read from the commit."""
        now = self.broker.clock.time()
        copies: list[tuple[_Record, float | None]] = []
        for tp in tps:
            part = self.parts.get(tp)
            if part is None:
                continue
            for record in part.records.values():
                if record.done:
                    continue
                if record.deliveries or record.visible_at > now:
                    due = record.visible_at if record.visible_at > now else None
                    copies.append((record, due))
        if copies:
            await self.broker._produce_retry(
                self.retry,
                [(r.message, r.base + r.deliveries, due, r.tp.partition) for r, due in copies],
            )
            for record, _ in copies:
                record.done = True
                record.lease = None
        await self.commit(tps)

    # reading

    async def ensure_assigned(self, timeout: float) -> bool:
        if self.settled.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.settled.wait(), timeout)
        return self.settled.is_set()

    def _add(self, tp: TopicPartition, records: Sequence[Any]) -> None:
        part = self.parts.get(tp)
        if part is None:
            return
        for record in records:
            if record.offset in part.records or (
                part.read_to is not None and record.offset < part.read_to
            ):
                continue
            message, base, due, malformed = _decode(self.topic, record)
            part.records[record.offset] = _Record(
                tp,
                record.offset,
                message,
                base,
                due if due is not None else 0.0,
                malformed=malformed,
            )
            part.read_to = record.offset + 1

    async def poll(self, timeout: float) -> bool:
        """Read whatever arrives within ``timeout``; True if anything did."""
        if self.consumer is None or not self.settled.is_set():
            return False
        room = [
            tp for tp, part in self.parts.items() if self._pending(part) < self.broker.config.buffer
        ]
        if not room:
            await asyncio.sleep(timeout)
            return False
        try:
            batch = await self.consumer.getmany(*room, timeout_ms=int(timeout * 1000))
        except IllegalStateError:  # a rebalance took a partition meanwhile
            return False
        for tp, records in batch.items():
            self._add(tp, records)
        return any(batch.values())

    @staticmethod
    def _pending(part: _Partition) -> int:
        return sum(1 for r in part.records.values() if not r.done)

    async def catch_up(self, deadline: float) -> None:
        """Read every partition we own up to its end offset (or ``buffer``)."""
        if not await self.ensure_assigned(max(0.0, deadline - time.monotonic())):
            return
        tps = list(self.parts)
        if not tps:
            return
        # Asked on another connection: this consumer's own may be busy with
        # a fetch the server holds open.
        ends = await self.broker._end_offsets(tps)
        while time.monotonic() < deadline and self.settled.is_set():
            try:
                behind = []
                for tp in tps:
                    part = self.parts.get(tp)
                    if part is None or self._pending(part) >= self.broker.config.buffer:
                        continue
                    if await self.consumer.position(tp) < ends[tp]:
                        behind.append(tp)
                if not behind:
                    return
                batch = await self.consumer.getmany(*behind, timeout_ms=100)
            except IllegalStateError:  # a rebalance took a partition meanwhile
                return
            for tp, records in batch.items():
                self._add(tp, records)

    def ready(self, now: float) -> list[_Record]:
        out = [
            r
            for part in self.parts.values()
            for r in part.records.values()
            if not r.done and r.visible_at <= now
        ]
        out.sort(key=lambda r: (r.message.created_at, r.tp.topic != self.main, r.offset))
        return out

    def next_due(self) -> float | None:
        times = [
            r.visible_at
            for part in self.parts.values()
            for r in part.records.values()
            if not r.done
        ]
        return min(times) if times else None

    def find(self, receipt: str) -> _Record | None:
        try:
            topic, partition, offset, lease = receipt.rsplit("|", 3)
            tp = TopicPartition(topic, int(partition))
            part = self.parts.get(tp)
            record = None if part is None else part.records.get(int(offset))
        except ValueError:
            return None
        if record is None or record.done or record.lease != lease:
            return None
        return record

    async def commit(self, tps: set[TopicPartition]) -> None:
        # One commit at a time: concurrent acks must not let an older offset
        # overtake a newer one.
        async with self.commit_lock:
            await self._commit(tps)

    async def _commit(self, tps: set[TopicPartition]) -> None:
        offsets = {}
        for tp in tps:
            part = self.parts.get(tp)
            if part is None or part.read_to is None:
                continue
            open_ = [o for o, r in part.records.items() if not r.done]
            upto = min(open_) if open_ else part.read_to
            for offset in [o for o in part.records if o < upto]:
                del part.records[offset]
            if upto != part.committed:
                offsets[tp] = upto
        if offsets and self.consumer is not None:
            await self.consumer.commit(offsets)
            for tp, upto in offsets.items():
                if tp in self.parts:
                    self.parts[tp].committed = upto


class KafkaBroker:
    """Kafka through aiokafka; see the module docstring for the semantics."""

    capabilities = Capabilities(
        durable=True,
        native_delay=True,
        native_dead_letter=False,
        per_key_ordering=False,
        priorities=False,
        max_payload=_MAX_PAYLOAD,
    )

    def __init__(self, url: str, *, clock: Clock | None = None) -> None:
        self.url = url
        self.config = _parse(url)
        self.security = self.config.security()
        """TLS and SASL keyword arguments of every aiokafka client made here."""
        self.clock: Clock = clock or SystemClock()
        self._client_id = uuid.uuid4().hex[:8]
        self._producer: Any = None
        self._admin: Any = None
        self._registry_reader: Any = None
        self._registry: dict[str, list[str]] = {}
        self._registry_lock = asyncio.Lock()
        self._queues: dict[tuple[str, str], _Queue] = {}
        self._declared: set[tuple[str, str]] = set()
        self._partitions: dict[str, int] = {}
        self._round_robin = itertools.count()
        self._connect_lock = asyncio.Lock()

    # names

    def _check(self, what: str, name: str) -> None:
        if not _NAME.fullmatch(name):
            raise BrokerError(
                f"{what} {name!r} cannot name a Kafka topic: use letters, digits and '._-'"
            )

    def _main(self, topic: str) -> str:
        self._check("topic", topic)
        return f"{self.config.namespace}.{topic}"

    def _retry(self, topic: str, group: str) -> str:
        self._check("group", group)
        self._check("topic", topic)
        return f"{self.config.namespace}.__retry.{group}.{topic}"

    def _dead(self, topic: str, group: str) -> str:
        self._check("group", group)
        self._check("topic", topic)
        return f"{self.config.namespace}.__dead.{group}.{topic}"

    @property
    def _registry_topic(self) -> str:
        return f"{self.config.namespace}.__groups"

    # plumbing

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op``, retrying transient failures with capped backoff for
        ``retry_for`` seconds; a driver error becomes ``BrokerError``."""

        def give_up(exc: Exception, again: bool) -> BaseException:
            if isinstance(exc, TimeoutError | KafkaError | OSError):
                return BrokerError(f"Kafka {what} failed: {exc!r}")
            return exc

        def warn(exc: Exception, delay: float) -> None:
            log.warning(
                "Kafka %s failed (%s); retrying",
                what,
                exc,
                extra={"event": "conveyor.broker_retry"},
            )

        return await keep_trying(
            op, within=self.config.retry_for, transient=_retriable, give_up=give_up, warn=warn
        )

    async def _check_credentials(self) -> None:
        """One connection to the first broker, made directly, when TLS or
        SASL is on: aiokafka's bootstrap logs a refused certificate or
        password and tries again, so its own error would only say that it
        could not bootstrap. A certificate problem reaches ``connect_within``
        as the SSL error; refused credentials are a ``BrokerError`` at once."""
        if self.config.security_protocol == "PLAINTEXT":
            return
        cfg = self.config
        host, _, port = cfg.servers[0].rpartition(":")
        try:
            conn = await create_conn(
                host,
                int(port),
                client_id=f"conveyor-{self._client_id}",
                request_timeout_ms=int(cfg.connect_timeout * 1000),
                **self.security,
            )
        except (
            SaslAuthenticationFailed,
            UnsupportedSaslMechanismError,
            IllegalSaslStateError,
            # aiokafka's SCRAM client reads a refusal ("e=unknown-user") as
            # a malformed answer and fails on the missing proof
            KeyError,
            ValueError,
        ) as exc:
            why = "" if isinstance(exc, KeyError | ValueError) else f" ({short_reason(exc)})"
            raise BrokerError(
                f"cannot connect to Kafka at {cfg.servers[0]}: the server refused "
                f"{cfg.sasl_mechanism or 'PLAIN'} authentication as {cfg.username!r}{why}"
            ) from exc
        conn.close()

    async def connect(self) -> None:
        async with self._connect_lock:
            if self._producer is not None:
                return
            cfg = self.config

            async def start() -> None:
                await self._check_credentials()
                producer = AIOKafkaProducer(
                    bootstrap_servers=cfg.servers,
                    **self.security,
                    client_id=f"conveyor-{self._client_id}",
                    acks="all",
                    max_request_size=2 * 1024 * 1024,
                    linger_ms=0,
                )
                admin = AIOKafkaAdminClient(
                    bootstrap_servers=cfg.servers,
                    **self.security,
                    client_id=f"conveyor-{self._client_id}",
                )
                try:
                    await producer.start()
                    await admin.start()
                except BaseException:
                    with contextlib.suppress(Exception):
                        await producer.stop()
                    with contextlib.suppress(Exception):
                        await admin.close()
                    raise
                self._producer, self._admin = producer, admin

            await connect_within(
                start,
                server="Kafka",
                where=",".join(cfg.servers),
                timeout=cfg.connect_timeout,
                retry_on=(KafkaError, OSError),
                error=BrokerError,
            )

    async def _ready(self) -> None:
        if self._producer is None:
            await self.connect()

    async def close(self) -> None:
        queues, self._queues = list(self._queues.values()), {}
        for queue in queues:
            await queue.stop()
        reader, self._registry_reader = self._registry_reader, None
        producer, self._producer = self._producer, None
        admin, self._admin = self._admin, None
        with contextlib.suppress(KafkaError, OSError):
            if reader is not None:
                await reader.stop()
        with contextlib.suppress(KafkaError, OSError):
            if producer is not None:
                await producer.stop()
        with contextlib.suppress(KafkaError, OSError):
            if admin is not None:
                await admin.close()

    async def _ensure_topic(self, name: str, partitions: int | None = None) -> int:
        """Create ``name`` if missing; its partition count."""
        if name in self._partitions:
            return self._partitions[name]
        await self._ready()

        async def create() -> None:
            topic = NewTopic(
                name,
                num_partitions=partitions or self.config.partitions,
                replication_factor=self.config.replication,
            )
            with contextlib.suppress(TopicAlreadyExistsError):
                await self._admin.create_topics([topic])

        await self._call(f"create topic {name}", create)

        async def count() -> int:
            found = await self._producer.partitions_for(name)
            if not found:
                raise KafkaConnectionError(f"no metadata for {name}")
            return len(found)

        self._partitions[name] = n = await self._call(f"metadata of {name}", count)
        return n

    def _partition(self, key: str | None, n: int) -> int:
        if key is None:
            return next(self._round_robin) % n
        hashed: int = murmur2(key.encode())
        return (hashed & 0x7FFFFFFF) % n

    async def _send(self, items: Sequence[tuple[str, int, bytes | None, bytes, Any]]) -> None:
        # One record per produce batch: some Kafka-compatible brokers (Tansu)
        # answer ListOffsets with the last batch's base offset + 1, which
        # would make every depth count short. Partitions go in parallel;
        # records of one partition in order, each acknowledged before the next.
        lanes: dict[tuple[str, int], list[tuple[bytes | None, bytes, Any]]] = {}
        for topic, partition, key, value, headers in items:
            lanes.setdefault((topic, partition), []).append((key, value, headers))

        async def lane(
            topic: str, partition: int, records: list[tuple[bytes | None, bytes, Any]]
        ) -> None:
            for key, value, headers in records:
                await self._producer.send_and_wait(
                    topic, value=value, key=key, partition=partition, headers=headers
                )

        async def send() -> None:
            await asyncio.gather(*(lane(t, p, r) for (t, p), r in lanes.items()))

        await self._call("produce", send)

    async def _produce_retry(
        self, retry_topic: str, items: Sequence[tuple[Message, int, float | None, int]]
    ) -> None:
        n = await self._ensure_topic(retry_topic)
        await self._send(
            [
                (
                    retry_topic,
                    partition % n,
                    None if m.key is None else m.key.encode(),
                    m.payload,
                    _encode(m, attempt=attempt, due=due),
                )
                for m, attempt, due, partition in items
            ]
        )

    # the protocol

    async def declare(self, topic: str, group: str) -> None:
        if (topic, group) in self._declared:
            return
        await self._ready()
        main = self._main(topic)
        await self._ensure_topic(main)
        await self._ensure_topic(self._retry(topic, group))
        groups = await self._read_registry()
        if group not in groups.get(topic, []):
            await self._ensure_topic(self._registry_topic, 1)
            await self._send(
                [
                    (
                        self._registry_topic,
                        0,
                        topic.encode(),
                        json.dumps({"topic": topic, "group": group}).encode(),
                        [],
                    )
                ]
            )
            groups = await self._read_registry()
        if groups.get(topic, [group])[0] == group:
            self._declared.add((topic, group))
            return
        # A later group starts at the end of the log: it gets what is
        # published after its declaration, not the backlog of the others.
        # Committed before any member joins, outside a generation.
        group_id = self._group_id(topic, group)

        async def start_at_end() -> None:
            n = await self._ensure_topic(main)
            tps = [TopicPartition(main, i) for i in range(n)]
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.config.servers,
                **self.security,
                client_id=f"conveyor-{self._client_id}",
                group_id=group_id,
                enable_auto_commit=False,
            )
            await consumer.start()
            try:
                consumer.assign(tps)
                ends = await consumer.end_offsets(tps)
                fresh = {tp: ends[tp] for tp in tps if await consumer.committed(tp) is None}
                if fresh:
                    # Fails only if the group already has members, which
                    # means it was declared (and started) before.
                    with contextlib.suppress(CommitFailedError):
                        await consumer.commit(fresh)
            finally:
                await consumer.stop()

        await self._call("declare", start_at_end)
        self._declared.add((topic, group))

    def _group_id(self, topic: str, group: str) -> str:
        return f"{self.config.namespace}|{topic}|{group}"

    async def _read_registry(self) -> dict[str, list[str]]:
        await self._ensure_topic(self._registry_topic, 1)
        tp = TopicPartition(self._registry_topic, 0)

        async def read() -> None:
            reader = await self._reader()
            end = (await reader.end_offsets([tp]))[tp]
            deadline = time.monotonic() + 10.0
            # Paused between reads: a fetch waiting on the server would hold
            # up the offset requests this client also sends (_end_offsets).
            reader.resume(tp)
            try:
                while await reader.position(tp) < end:
                    if time.monotonic() > deadline:
                        raise BrokerError("Kafka: reading the group registry timed out")
                    batch = await reader.getmany(tp, timeout_ms=200)
                    for record in batch.get(tp, []):
                        entry = json.loads(record.value)
                        groups = self._registry.setdefault(entry["topic"], [])
                        if entry["group"] not in groups:
                            groups.append(entry["group"])
            finally:
                reader.pause(tp)

        async with self._registry_lock:
            await self._call("read group registry", read)
        return self._registry

    async def _reader(self) -> Any:
        """A consumer outside any group: reads the registry, asks for offsets."""
        if self._registry_reader is None:
            tp = TopicPartition(self._registry_topic, 0)
            reader = AIOKafkaConsumer(
                bootstrap_servers=self.config.servers,
                **self.security,
                client_id=f"conveyor-{self._client_id}",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                retry_backoff_ms=20,
            )
            await reader.start()
            reader.assign([tp])
            reader.pause(tp)
            await reader.seek_to_beginning(tp)
            self._registry_reader = reader
        return self._registry_reader

    async def _queue(self, topic: str, group: str) -> _Queue:
        queue = self._queues.get((topic, group))
        if queue is not None:
            return queue
        await self._ready()
        await self._ensure_topic(self._main(topic))
        await self._ensure_topic(self._retry(topic, group))
        queue = _Queue(self, topic, group)
        await self._call("start consumer", queue.start)
        self._queues[(topic, group)] = queue
        return queue

    async def publish(self, messages: Sequence[Message]) -> None:
        await self._ready()
        items = []
        for message in messages:
            name = self._main(message.topic)
            n = await self._ensure_topic(name)
            items.append(
                (
                    name,
                    self._partition(message.key, n),
                    None if message.key is None else message.key.encode(),
                    message.payload,
                    _encode(message, attempt=message.attempt, due=None),
                )
            )
        if items:
            await self._send(items)

    async def enqueue(self, group: str, messages: Sequence[Message]) -> None:
        await self._ready()
        by_topic: dict[str, list[tuple[Message, int, float | None, int]]] = {}
        for message in messages:
            n = await self._ensure_topic(self._retry(message.topic, group))
            by_topic.setdefault(self._retry(message.topic, group), []).append(
                (message, message.attempt, None, self._partition(message.key, n))
            )
        for retry_topic, items in by_topic.items():
            await self._produce_retry(retry_topic, items)

    async def fetch(
        self, topic: str, group: str, *, max_messages: int, lease: float
    ) -> list[Delivery]:
        queue = await self._queue(topic, group)
        # While a rebalance waits for our deliveries to settle, deliver
        # nothing; while we join, wait a while, not forever: the group may be
        # waiting on deliveries this very caller holds.
        if queue.revoking or not await queue.ensure_assigned(self.config.session_timeout):
            return []
        async with queue.lock:
            wait = self.config.session_timeout
            now = self.clock.time()
            if len(queue.ready(now)) < max_messages:
                await self._call("fetch", lambda: queue.catch_up(time.monotonic() + wait))
                now = self.clock.time()
            out = []
            for record in queue.ready(now)[:max_messages]:
                record.deliveries += 1
                record.lease = uuid.uuid4().hex
                record.visible_at = now + lease
                message = record.message.with_attempt(record.base + record.deliveries)
                receipt = f"{record.tp.topic}|{record.tp.partition}|{record.offset}|{record.lease}"
                out.append(Delivery(message, group, receipt, malformed=record.malformed))
            return out

    async def ack(self, deliveries: Sequence[Delivery]) -> int:
        done = 0
        touched: dict[_Queue, set[TopicPartition]] = {}
        for delivery in deliveries:
            queue = self._queues.get((delivery.message.topic, delivery.group))
            record = None if queue is None else queue.find(delivery.receipt)
            if queue is None or record is None:
                continue
            record.done = True
            record.lease = None
            touched.setdefault(queue, set()).add(record.tp)
            done += 1
        for queue, tps in touched.items():
            queue.changed.set()
            await self._commit(queue, tps)
        return done

    async def _commit(self, queue: _Queue, tps: set[TopicPartition]) -> None:
        try:
            await self._call("commit", lambda: queue.commit(tps))
        except BrokerError as exc:
            # A rebalance took the partition: its next owner re-reads from the
            # last commit (at-least-once), and our handoff has committed what
            # it could. Nothing is lost, so this is not the caller's error.
            if not isinstance(exc.__cause__, CommitFailedError | IllegalStateError):
                raise
            log.info(
                "commit of %s/%s lost to a rebalance",
                queue.topic,
                queue.group,
                extra={"event": "conveyor.kafka_commit_lost"},
            )

    async def nack(self, delivery: Delivery, *, delay: float) -> None:
        queue = self._queues.get((delivery.message.topic, delivery.group))
        record = None if queue is None else queue.find(delivery.receipt)
        if queue is None or record is None:
            return
        now = self.clock.time()
        queue.changed.set()
        if delay <= 0:
            record.lease = None
            record.visible_at = now
            return
        await queue.broker._produce_retry(
            queue.retry,
            [(record.message, record.base + record.deliveries, now + delay, record.tp.partition)],
        )
        record.done = True
        record.lease = None
        await self._commit(queue, {record.tp})

    async def dead_letter(self, delivery: Delivery, *, reason: str, error_type: str) -> None:
        """Copy a dead-lettered delivery to ``NAME.__dead.group.topic`` (keyed
        as the original, ``acks=all``); the store keeps the dead letter itself."""
        message = delivery.message
        name = self._dead(message.topic, delivery.group)
        n = await self._ensure_topic(name)
        headers = [
            *_encode(message, attempt=message.attempt, due=None),
            ("reason", reason.encode()),
            ("error_type", error_type.encode()),
        ]
        await self._send(
            [
                (
                    name,
                    self._partition(message.key, n),
                    None if message.key is None else message.key.encode(),
                    message.payload,
                    headers,
                )
            ]
        )

    async def wait(self, topic: str, group: str, timeout: float) -> None:
        queue = await self._queue(topic, group)
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            now = self.clock.time()
            due = queue.next_due()
            if due is not None and due <= now:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            step = min(left, 0.5)
            if due is not None:
                step = min(step, max(0.01, due - now))
            if not queue.settled.is_set():
                await queue.ensure_assigned(step)
                continue
            async with queue.lock:
                got = await self._call("poll", functools.partial(queue.poll, step))
            if got:
                return

    async def stats(self) -> list[QueueStats]:
        await self._ready()
        registry = await self._read_registry()
        out = []
        for topic in sorted(registry):
            for group in sorted(registry[topic]):
                out.append(await self._stats(topic, group))
        return out

    async def _stats(self, topic: str, group: str) -> QueueStats:
        queue = self._queues.get((topic, group))
        if queue is None or not queue.settled.is_set():
            return QueueStats(topic, group, await self._lag(topic, group, None), 0, 0)
        async with queue.lock:
            wait = self.config.session_timeout
            await self._call("stats", lambda: queue.catch_up(time.monotonic() + wait))
            now = self.clock.time()
            ready = in_flight = delayed = 0
            for part in queue.parts.values():
                for record in part.records.values():
                    if record.done:
                        continue
                    if record.visible_at <= now:
                        ready += 1
                    elif record.lease is not None:
                        in_flight += 1
                    else:
                        delayed += 1
            ready += await self._lag(topic, group, queue)
        return QueueStats(topic, group, ready, in_flight, delayed)

    async def _lag(self, topic: str, group: str, queue: _Queue | None) -> int:
        """Records of the queue's logs not read by ``queue`` (all, if None)."""
        names = [self._main(topic), self._retry(topic, group)]
        group_id = self._group_id(topic, group)

        async def lag() -> int:
            tps: list[TopicPartition] = []
            for name in names:
                n = await self._ensure_topic(name)
                tps.extend(TopicPartition(name, i) for i in range(n))
            committed = await self._admin.list_consumer_group_offsets(group_id, partitions=tps)
            ends = await self._end_offsets(tps)
            total = 0
            for tp in tps:
                part = None if queue is None else queue.parts.get(tp)
                if part is not None and part.read_to is not None:
                    start = part.read_to
                else:
                    meta = committed.get(tp)
                    start = meta.offset if meta is not None and meta.offset >= 0 else 0
                total += max(0, ends[tp] - start)
            return total

        return await self._call("stats", lag)

    async def _end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        await self._ensure_topic(self._registry_topic, 1)
        reader = await self._reader()
        ends: dict[TopicPartition, int] = await reader.end_offsets(tps)
        return ends
