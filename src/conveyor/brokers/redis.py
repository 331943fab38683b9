"""Redis Streams broker: ``redis://host:port/db?namespace=NAME``.

Each (topic, consumer group) queue is one stream with one Redis consumer
group; consumers of a Conveyor group compete through ``XREADGROUP`` on it.
``publish`` appends a copy of the message to the stream of every group
declared for its topic, in one Lua script that reads the group list, so a
group gets exactly the messages published after its declaration. A topic
with no group yet gets a *parked* stream, renamed to the first group's
stream when that group is declared.

Every check-and-act runs in a Lua script, on the Redis server's clock
(``TIME``), so processes agree on time whatever their own clocks say:

- ``fetch`` leases what it delivers: a ZSET holds each pending entry's lease
  deadline and a hash its delivery count and lease token. Entries whose
  deadline passed are taken back with ``XCLAIM``; then new ones are read with
  ``XREADGROUP``. ``attempt`` = the envelope's attempt + deliveries.
- ``ack`` removes an entry (``XACK`` + ``XDEL``) only if its lease token is
  still the delivery's: a late ack after a redelivery counts 0.
- ``nack`` moves the entry, attempt counted, into the queue's *delayed* ZSET
  (the envelope in a side hash); ``fetch`` (or ``promote_due``) moves due
  entries back to the stream in one script, so a message is always in
  exactly one of the two.

Acknowledged entries are deleted, so a stream holds only its backlog; there
is no ``MAXLEN`` trimming (it would drop accepted messages). Messages are
delivered oldest first (retries rejoin at the back); ``priority`` and
``key`` travel with the message but order nothing. Dead letters are the
store's: the runtime writes them and then acknowledges the delivery, so the
broker never sees that decision and keeps no dead-letter stream.

URL: ``redis[s]://[[user]:password@]host[:port][/db][?options]``. Options:

``namespace``        prefix of every key (``conveyor:{NAME}:``; the braces
                     keep a namespace in one Redis Cluster hash slot).
                     Letters, digits, ``_.-``; default ``default``.
``password``         instead of the URL's user-info.
``socket_timeout``   seconds a command may take (default 5).
``connect_timeout``  seconds to connect (default 5).
``retry_for``        seconds to keep reconnecting, with capped exponential
                     backoff, before an operation fails with ``BrokerError``
                     (default 30).
``ssl_ca_certs``     over TLS (``rediss://``): the CA file (default: the
                     system's CAs).
``ssl_certfile``,    a client certificate and its key, for servers that
``ssl_keyfile``      require one (``tls-auth-clients yes``).

Durability is the server's: ``publish`` returns once Redis has the message
in memory. It survives a Redis restart only with ``appendonly yes``
(``appendfsync always`` loses nothing, ``everysec`` up to a second), and
replication is asynchronous, so a failover can lose the last writes.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from conveyor._connect import connect_within, keep_trying
from conveyor._redis import RedisConfig, redact
from conveyor._redis import client as redis_client
from conveyor._time import Clock
from conveyor.brokers._kit import malformed_delivery, short_reason
from conveyor.brokers._protocol import Capabilities, Delivery, QueueStats
from conveyor.errors import BrokerError, MessageError
from conveyor.messages import DEFAULT_MAX_PAYLOAD, Message

__all__ = ["RedisBroker"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_GROUP = "conveyor"
# Leases are tracked in our own ZSET, so every client reads as one consumer:
# no consumer list grows with every process that ever ran.
_CONSUMER = "conveyor"
_MOVE_LIMIT = 1000
_WAIT_SLICE = 1.0


def _lua(name: str) -> str:
    """A script of ``redis_lua/``, after the functions they all share."""
    folder = resources.files("conveyor.brokers") / "redis_lua"
    return (folder / "common.lua").read_text() + (folder / f"{name}.lua").read_text()


_SCRIPTS = {
    name: _lua(name)
    for name in (
        "publish",
        "enqueue",
        "declare",
        "fetch",
        "ack",
        "nack",
        "promote",
        "wait_info",
        "stats",
    )
}
"""Every Lua script the broker runs, read once when the module loads."""


def _qkey(prefix: str, kind: str, topic: str, group: str) -> str:
    # Byte length, as Lua's '#' counts it: topic "a:b"/group "c" and topic
    # "a"/group "b:c" must not share a key.
    return f"{prefix}{kind}:{len(topic.encode())}:{topic}:{group}"


def _fields(message: Message) -> list[bytes | str]:
    out: list[bytes | str] = [
        "id",
        message.id,
        "topic",
        message.topic,
        "type",
        message.type,
        "headers",
        json.dumps(dict(message.headers), separators=(",", ":")),
        "payload",
        message.payload,
        "created_at",
        repr(message.created_at),
        "priority",
        str(message.priority),
        "attempt",
        str(message.attempt),
    ]
    if message.key is not None:
        out += ["key", message.key]
    if message.not_before is not None:
        out += ["not_before", repr(message.not_before)]
    return out


def _due_ms(message: Message) -> int:
    return int(message.not_before * 1000) if message.not_before is not None else 0


def _entry_fields(raw: Sequence[object]) -> dict[str, bytes]:
    return {
        _bytes(raw[i]).decode("utf-8", "replace"): _bytes(raw[i + 1])
        for i in range(0, len(raw) - 1, 2)
    }


def _message(f: dict[str, bytes], deliveries: int) -> Message:
    """The message of a stream entry's fields; ``ValueError``, ``KeyError``
    or ``MessageError`` when they are not a Conveyor envelope."""
    key = f.get("key")
    not_before = f.get("not_before")
    headers = json.loads(f["headers"])
    if not isinstance(headers, dict):
        raise ValueError(f"headers are not a JSON object: {f['headers'][:100]!r}")
    return Message(
        id=f["id"].decode(),
        topic=f["topic"].decode(),
        type=f["type"].decode(),
        key=None if key is None else key.decode(),
        headers=headers,
        payload=bytes(f["payload"]),
        created_at=float(f["created_at"]),
        priority=int(f["priority"]),
        attempt=int(f["attempt"]) + deliveries,
        not_before=None if not_before is None else float(not_before),
    )


class _Queue:
    """The keys of one (topic, group) queue."""

    __slots__ = ("data", "delayed", "held", "leases", "member", "stream")

    def __init__(self, prefix: str, topic: str, group: str) -> None:
        self.stream = _qkey(prefix, "stream", topic, group)
        self.leases = _qkey(prefix, "leases", topic, group)
        self.held = _qkey(prefix, "held", topic, group)
        self.delayed = _qkey(prefix, "delayed", topic, group)
        self.data = _qkey(prefix, "data", topic, group)
        self.member = json.dumps([topic, group], ensure_ascii=False)


class RedisBroker:
    """Broker on Redis Streams; see the module docstring for the URL and layout.

    Time (leases, delays) is the Redis server's, not the ``clock`` argument:
    every process then agrees on when a lease runs out.
    """

    capabilities = Capabilities(
        durable=True,
        native_delay=True,
        native_dead_letter=False,
        per_key_ordering=False,
        priorities=False,
        max_payload=DEFAULT_MAX_PAYLOAD,
    )

    def __init__(self, url: str, *, clock: Clock | None = None) -> None:
        self.url = url
        self._config = RedisConfig(url)
        self.namespace = self._config.namespace
        self._prefix = f"conveyor:{{{self.namespace}}}:"
        self.client_name = f"conveyor:{self.namespace}:{uuid.uuid4().hex[:12]}"
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._last: dict[tuple[str, str], bytes] = {}
        self._calls = f"{self._prefix}calls:{self.client_name}"
        self._applied: list[str] = []

    async def connect(self) -> None:
        if self._redis is not None:
            return
        c = self._config
        client = redis_client(
            c,
            client_name=self.client_name,
            # Reconnection is ours (_run): backoff capped, bounded by retry_for.
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        try:
            await connect_within(
                client.ping,
                server="Redis",
                where=f"{c.host}:{c.port}/{c.db}",
                timeout=c.connect_timeout,
                retry_on=(RedisError,),
                error=BrokerError,
            )
        except BaseException:
            await client.aclose()
            raise
        self._redis = client
        for name, source in _SCRIPTS.items():
            self._scripts[name] = client.register_script(source)

    async def close(self) -> None:
        client, self._redis = self._redis, None
        self._scripts.clear()
        if client is not None:
            try:
                await client.aclose()
            except RedisError as exc:
                log.debug("closing Redis connections failed: %s", exc)

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise BrokerError(f"Redis broker {redact(self.url)} is not connected")
        return self._redis

    async def _run(self, what: str, op: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run ``op``, reconnecting with capped backoff while Redis is unreachable.

        Every operation is safe to repeat: publish and enqueue carry a call
        token the scripts remember, ack and nack are keyed by lease token.
        """
        client = self._client()
        lost = (RedisConnectionError, RedisTimeoutError)

        def transient(exc: Exception) -> bool:
            return isinstance(exc, lost) and self._redis is client

        def give_up(exc: Exception, again: bool) -> BaseException:
            if again:
                return BrokerError(
                    f"Redis {what} failed: {self._config.host}:{self._config.port} "
                    f"unreachable for {self._config.retry_for:g}s: {exc}"
                )
            if isinstance(exc, lost):
                return BrokerError(f"Redis broker closed during {what}")
            if isinstance(exc, RedisError):
                return BrokerError(f"Redis {what} failed: {exc}")
            return exc

        def warn(exc: Exception, delay: float) -> None:
            log.warning(
                "Redis %s failed (%s); reconnecting in %.2fs",
                what,
                exc,
                delay,
                extra={"event": "conveyor.broker_reconnect"},
            )

        return await keep_trying(
            lambda: op(client),
            within=self._config.retry_for,
            transient=transient,
            give_up=give_up,
            warn=warn,
        )

    async def _script(
        self, name: str, keys: Sequence[str], args: Sequence[bytes | str | int | float]
    ) -> object:
        script = self._scripts.get(name)
        if script is None:
            raise BrokerError(f"Redis broker {redact(self.url)} is not connected")

        async def call(_: aioredis.Redis) -> object:
            result: object = await script(keys=list(keys), args=list(args))
            return result

        return await self._run(name, call)

    async def _once(self, name: str, args: Sequence[bytes | str | int | float]) -> None:
        """Run script ``name`` once per call (see the Lua ``once()``), handing
        back the tokens of calls that have returned since the last."""
        token = uuid.uuid4().hex
        done, self._applied = self._applied, []
        try:
            await self._script(
                name, [], [self._prefix, self._calls, token, len(done), *done, *args]
            )
        except BaseException:
            self._applied.extend(done)
            raise
        self._applied.append(token)

    def _queue(self, topic: str, group: str) -> _Queue:
        return _Queue(self._prefix, topic, group)

    async def declare(self, topic: str, group: str) -> None:
        q = self._queue(topic, group)
        await self._script("declare", [], [self._prefix, topic, group, q.member])

    async def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        args: list[bytes | str | int | float] = []
        for message in messages:
            fields = _fields(message)
            args += [message.topic, _due_ms(message), len(fields), *fields]
        await self._once("publish", args)

    async def enqueue(self, group: str, messages: Sequence[Message]) -> None:
        by_topic: dict[str, list[Message]] = {}
        for message in messages:
            by_topic.setdefault(message.topic, []).append(message)
        for topic, batch in by_topic.items():
            q = self._queue(topic, group)
            args: list[bytes | str | int | float] = [topic, group, q.member]
            for message in batch:
                fields = _fields(message)
                args += [_due_ms(message), len(fields), *fields]
            await self._once("enqueue", args)

    async def fetch(
        self, topic: str, group: str, *, max_messages: int, lease: float
    ) -> list[Delivery]:
        if max_messages < 1:
            return []
        q = self._queue(topic, group)
        token = uuid.uuid4().hex
        result = await self._script(
            "fetch",
            [q.stream, q.leases, q.held, q.delayed, q.data, self._prefix + "seq"],
            [max_messages, max(1, int(lease * 1000)), token],
        )
        entries, last = _pair(result)
        if last:
            self._last[(topic, group)] = _bytes(last)
        out = []
        for entry in _list(entries):
            entry_id, deliveries, raw = _list(entry)
            receipt = f"{_bytes(entry_id).decode()}:{token}"
            fields = _entry_fields(_list(raw))
            try:
                message = _message(fields, _int(deliveries))
            except (ValueError, KeyError, TypeError, MessageError) as exc:
                out.append(
                    malformed_delivery(
                        topic=topic,
                        group=group,
                        receipt=receipt,
                        reason=short_reason(exc),
                        where=f"{q.stream}/{_bytes(entry_id).decode()}",
                        id=fields.get("id", b"").decode("utf-8", "replace"),
                        payload=fields.get("payload"),
                        attempt=_int(deliveries),
                    )
                )
                continue
            out.append(Delivery(message, group, receipt))
        return out

    async def ack(self, deliveries: Sequence[Delivery]) -> int:
        by_queue: dict[tuple[str, str], list[str]] = {}
        for delivery in deliveries:
            entry_id, token = _receipt(delivery)
            by_queue.setdefault((delivery.message.topic, delivery.group), []).extend(
                [entry_id, token]
            )
        done = 0
        for (topic, group), args in by_queue.items():
            q = self._queue(topic, group)
            done += _int(await self._script("ack", [q.stream, q.leases, q.held], args))
        return done

    async def nack(self, delivery: Delivery, *, delay: float) -> None:
        q = self._queue(delivery.message.topic, delivery.group)
        entry_id, token = _receipt(delivery)
        await self._script(
            "nack",
            [q.stream, q.leases, q.held, q.delayed, q.data, self._prefix + "seq"],
            [entry_id, token, max(0, int(delay * 1000))],
        )

    async def promote_due(self, topic: str, group: str, *, limit: int = _MOVE_LIMIT) -> int:
        """Move up to ``limit`` due delayed messages of a queue into its stream;
        returns how many. ``fetch`` does this itself; any number of clients may
        call it at once (each message moves exactly once)."""
        q = self._queue(topic, group)
        return _int(await self._script("promote", [q.stream, q.delayed, q.data], [limit]))

    async def wait(self, topic: str, group: str, timeout: float) -> None:
        """Block on ``XREAD`` for an entry newer than the last one seen, waking
        early also when a lease runs out or a delayed message falls due."""
        q = self._queue(topic, group)
        key = (topic, group)
        end = time.monotonic() + max(0.0, timeout)
        while True:
            info = await self._script("wait_info", [q.stream, q.leases, q.delayed], [])
            _, next_ms = _pair(info)
            # Without an id from our own fetch, anything in the stream may be
            # new to us: read from the start (one early return at most).
            since = self._last.get(key, b"0-0")
            remaining = end - time.monotonic()
            upcoming = _int(next_ms)
            if upcoming >= 0:
                remaining = min(remaining, upcoming / 1000)
            if remaining <= 0:
                return
            block = max(1, int(min(remaining, _WAIT_SLICE) * 1000))

            async def read(
                client: aioredis.Redis, since: bytes = since, block: int = block
            ) -> object:
                got: object = await client.xread({q.stream: since}, count=1, block=block)
                return got

            got = await self._run("wait", read)
            newest = _newest(got)
            if newest is not None:
                self._last[key] = newest
                return
            self._last[key] = since
            if time.monotonic() >= end:
                return

    async def stats(self) -> list[QueueStats]:
        rows = await self._script("stats", [], [self._prefix])
        out = []
        for row in _list(rows):
            member, ready, in_flight, delayed = _list(row)
            topic, group = json.loads(_bytes(member))
            out.append(QueueStats(topic, group, _int(ready), _int(in_flight), _int(delayed)))
        out.sort(key=lambda s: (s.topic, s.group))
        return out


def _receipt(delivery: Delivery) -> tuple[str, str]:
    entry_id, _, token = delivery.receipt.partition(":")
    if not token:
        raise BrokerError(f"not a Redis broker receipt: {delivery.receipt!r}")
    return entry_id, token


def _list(value: object) -> list[object]:
    if isinstance(value, tuple):
        return list(value)
    if not isinstance(value, list):
        raise BrokerError(f"unexpected reply from Redis: {value!r:.200}")
    return value


def _pair(value: object) -> tuple[object, object]:
    items = _list(value)
    if len(items) != 2:
        raise BrokerError(f"unexpected reply from Redis: {value!r:.200}")
    return items[0], items[1]


def _int(value: object) -> int:
    if not isinstance(value, int):
        raise BrokerError(f"unexpected reply from Redis: {value!r:.200}")
    return value


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise BrokerError(f"unexpected reply from Redis: {value!r:.200}")
    return value


def _newest(reply: object) -> bytes | None:
    """The newest entry id in an ``XREAD`` reply (RESP2 list or RESP3 dict)."""
    if not reply:
        return None
    if isinstance(reply, dict):
        streams = [_list(v) for v in reply.values()]
    else:
        streams = [_list(_list(s)[1]) for s in _list(reply)]
    ids = [_bytes(_list(e)[0]) for entries in streams for e in entries]
    return max(ids, key=lambda i: tuple(int(p) for p in i.split(b"-"))) if ids else None
