"""NATS JetStream broker: ``nats://host:4222?namespace=NAME``.

URL: ``nats://[user:password@]host[:port][,host2:port...][?option=value&...]``
(``tls://`` for TLS).
Options (anything else is a ``ConfigError``):

- ``namespace`` (``conveyor``): letters, digits, ``_`` and ``-``; names the
  stream ``conveyor_<namespace>``, whose subjects are ``conveyor.<namespace>.>``.
- ``replicas`` (1): stream and consumer replicas (1-5; clustered servers).
- ``ack_wait`` (1.0 s): the consumers' AckWait, i.e. how soon the server hands a
  crashed client's deliveries to another consumer. Longer leases are kept
  alive by the client (``in_progress``); see below.
- ``max_deliver`` (50): a message delivered more often than this to one group
  is moved to the dead-letter stream ``conveyor_<namespace>_dead`` (subjects
  ``conveyor-dead.<namespace>.<topic>.<group>``) and terminated; 0 turns it
  off. Keep it above every handler's ``max_attempts``: the runtime dead-letters
  into the store first, with the error and traceback.
- ``max_age`` (7 days, at least 60 s): how long the stream keeps a message;
  a message not consumed by then is gone, so keep it above any backlog.
- ``timeout`` (30 s): how long an operation keeps retrying while the server is
  unreachable (the connection reconnects with capped backoff) before it
  raises ``BrokerError``.
- ``connect_timeout`` (5 s): how long the first connection may take in all,
  retries included.
- ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``: with ``tls://`` instead
  of ``nats://``, the CA that signs the server's certificate (default: the
  system's) and a client certificate for servers run with ``--tlsverify``.
- ``creds``: a credentials file (``.creds``: a user JWT and its nkey seed,
  as ``nsc`` writes them) for servers in operator (JWT) mode; ``nkey``: a
  file holding a user's nkey seed (``SU...``) for servers that list the
  user's public key (``authorization { users = [{nkey: U...}] }``). One or
  the other, never both; user and password go in the URL. Credentials the
  server refuses are one ``BrokerError`` at once, not retried.

Topology. One stream per namespace with *limits* retention: a message stays
for ``max_age``, acknowledged or not, like a Kafka topic's retention. (Interest
retention, which deletes a message once every consumer acknowledged it, drops
messages published while a restarting server has restored the stream but not
yet its consumers: nothing is interested in them. Seen on 2.9.) Each (topic,
group) is a durable pull consumer filtered on ``conveyor.<ns>.<topic>.*``; the
last token is ``all`` for a publish and ``g-<hash of group>`` for ``enqueue``
(a replay to one group; the other groups acknowledge and skip it). Messages
published while a topic has no group are kept by a *park* consumer, created
before they are published; the first group declared starts from the beginning
of the stream (``DeliverAll``) and deletes the park consumer, later groups
start with the messages published after them (``DeliverNew``).

Publishing sets ``Nats-Msg-Id`` to the message id, so a publish retried after a
lost reply (or an outbox row relayed twice within the stream's duplicate
window, 2 minutes) is stored once. ``publish`` returns after the server's
acknowledgement: the message is written to the file store. JetStream flushes
that file to disk every ``sync_interval`` (2 minutes by default): a message
survives the crash of any process, the server's included, but not a power loss
or an operating-system crash within that interval.

Leases. AckWait is per consumer while ``fetch`` takes a lease per call, so the
lease is kept client-side: each delivery carries its deadline; while it is
held the client touches it (``+WPI``) so the server redelivers it about when
the lease ends, and a lease shorter than AckWait is handed back with a NAK at
its deadline. An ack, nack or touch after the deadline is never sent: JetStream
acknowledges by stream sequence and would otherwise acknowledge the copy it
redelivered to another consumer. ``attempt`` is JetStream's delivery count.
``nack(delay=...)`` is a NAK with delay. A message published with a delay is
put back (NAK with the remaining delay) when fetched early.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from conveyor._connect import DEFAULT_CONNECT_TIMEOUT, connect_within, keep_trying
from conveyor._time import Clock, SystemClock
from conveyor._tls import TlsFiles, readable_file, tls_failure, tls_files, tls_options
from conveyor._urls import Option, redact, url_options
from conveyor.brokers._kit import malformed_delivery, short_reason
from conveyor.brokers._protocol import Capabilities, Delivery, QueueStats
from conveyor.errors import BrokerError, ConfigError, MessageError
from conveyor.messages import DEFAULT_MAX_PAYLOAD, Message

__all__ = ["NatsBroker"]

log = logging.getLogger("conveyor.brokers.nats")

_T = TypeVar("_T")

_ENVELOPE = "Conveyor-Envelope"
_GROUP = "Conveyor-Group"
_MSG_ID = "Nats-Msg-Id"
_ALL = "all"
_OPTIONS = {
    "namespace": Option(
        "conveyor",
        pattern=re.compile(r"[A-Za-z0-9_-]{1,64}"),
        expect="1-64 letters, digits, '_' or '-'",
    ),
    "replicas": Option(1, int, low=1, high=5),
    "ack_wait": Option(1.0, float, low=0.1),
    "max_deliver": Option(50, int, low=0),
    "max_age": Option(7 * 86400.0, float, low=60.0),
    "timeout": Option(30.0, float, low=0.1),
    "connect_timeout": Option(DEFAULT_CONNECT_TIMEOUT, float, low=0.1),
    "creds": Option(expect="a .creds file"),
    "nkey": Option(expect="a file holding an nkey seed"),
    **tls_options(),
}
# Headers and envelope must fit next to the payload in the server's default
# max_payload (1 MiB).
_MAX_PAYLOAD = DEFAULT_MAX_PAYLOAD - 64 * 1024
_TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.FlushTimeoutError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    asyncio.TimeoutError,
)


class _Transient(Exception):
    """The server did not answer (yet); worth retrying."""


_RETRYABLE: tuple[type[BaseException], ...] = (_Transient, *_TRANSIENT)


@dataclass(frozen=True, slots=True)
class _Config:
    servers: list[str]
    namespace: str
    replicas: int
    ack_wait: float
    max_deliver: int
    max_age: float
    timeout: float
    connect_timeout: float
    tls: TlsFiles
    creds: str | None = None
    nkey: str | None = None


def _parse(url: str) -> _Config:
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"invalid NATS URL {redact(url)!r}: {exc}") from None
    if parts.scheme not in ("nats", "tls") or not parts.netloc:
        raise ConfigError(
            f"invalid NATS URL {redact(url)!r}: expected nats://host:port?namespace=NAME "
            "(tls://host:port for TLS)"
        )
    if parts.path not in ("", "/"):
        raise ConfigError(f"invalid NATS URL {redact(url)!r}: no path expected, got {parts.path!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    prefix = f"{userinfo}@" if userinfo else ""
    servers = [f"{parts.scheme}://{prefix}{h}" for h in hosts.split(",") if h]
    if not servers:
        raise ConfigError(f"invalid NATS URL {redact(url)!r}: no host")
    values = url_options(parts.query, _OPTIONS, url=url, what="NATS")
    return _Config(
        servers=servers,
        namespace=values["namespace"],
        replicas=values["replicas"],
        ack_wait=values["ack_wait"],
        max_deliver=values["max_deliver"],
        max_age=values["max_age"],
        timeout=values["timeout"],
        connect_timeout=values["connect_timeout"],
        tls=tls_files(values, url, schemes=("nats", "tls")),
        **_credentials(values, url),
    )


def _credentials(values: dict[str, Any], url: str) -> dict[str, str | None]:
    """The ``creds`` or ``nkey`` file the URL names, checked to be readable;
    nats-py signs the server's nonce with it through the nkeys package."""
    creds, nkey = values["creds"], values["nkey"]
    if creds is not None and nkey is not None:
        raise ConfigError(f"creds and nkey both in {redact(url)!r}: name one")
    if creds is None and nkey is None:
        return {}
    if importlib.util.find_spec("nkeys") is None:
        raise ConfigError(
            f"creds or nkey in {redact(url)!r} need the nkeys package: pip install 'conveyor[nats]'"
        )
    named = (("creds", creds, "a .creds file"), ("nkey", nkey, "an nkey seed file"))
    return {
        name: readable_file(name, path, url, what=what)
        for name, path, what in named
        if path is not None
    }


def _digest(*parts: str, size: int = 20) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:size]


def _valid_tokens(topic: str) -> bool:
    tokens = topic.split(".")
    return not tokens[0].startswith("~") and all(
        t and t not in ("*", ">") and not any(c.isspace() or c in "*>" for c in t) for t in tokens
    )


def _topic_tokens(topic: str) -> str:
    """The topic as subject tokens: itself when it is a valid subject, else one
    ``~``-prefixed token (valid topics never start with ``~``)."""
    if _valid_tokens(topic):
        return topic
    return "~" + topic.encode().hex()


class _LeaseOver(Exception):
    """The lease ran out before an ack got through: the message comes back."""


@dataclass(slots=True)
class _Lease:
    reply: str
    queue: tuple[str, str]
    sseq: int
    deadline: float  # monotonic
    touched: float  # monotonic, last time the server's AckWait restarted
    short: bool  # lease shorter than AckWait: hand back with a NAK at the deadline


class NatsBroker:
    """JetStream broker; see the module docstring for URL options and semantics."""

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
        self._config = _parse(url)
        # Leases and delays run on the server's clock, so an injected (fake)
        # clock cannot move them; keep the real one.
        self.clock: Clock = SystemClock()
        ns = self._config.namespace
        self._stream = f"conveyor_{ns}"
        self._dead_stream = f"conveyor_{ns}_dead"
        self._prefix = f"conveyor.{ns}"
        self._notify_prefix = f"conveyor-notify.{ns}"
        self._dead_prefix = f"conveyor-dead.{ns}"
        self._nc: Client | None = None
        self._held: dict[str, _Lease] = {}
        # Per queue: stream sequence -> wall-clock time it is due again, for
        # deliveries this client handed back (stats only).
        self._released: dict[tuple[str, str], dict[int, float]] = {}
        self._settled: OrderedDict[str, None] = OrderedDict()
        self._declared: set[tuple[str, str]] = set()
        self._routable: set[str] = set()
        self._notify_subs: dict[str, Subscription] = {}
        self._news: dict[str, int] = {}
        self._seen: dict[tuple[str, str], int] = {}
        self._changed = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()
        self._refused: asyncio.Future[Exception] | None = None

    # connection

    async def connect(self) -> None:
        async with self._connecting:
            if self._nc is not None and not self._nc.is_closed:
                return
            # With unlimited reconnects nats-py also retries the first
            # connection forever: connect_within bounds it.
            nc = await connect_within(
                self._open,
                server="NATS",
                where=", ".join(self._hosts()),
                timeout=self._config.connect_timeout,
                retry_on=(nats.errors.Error, OSError),
                error=BrokerError,
            )
            self._nc = nc
            try:
                await self._retrying("create the streams", self._ensure_streams)
            except BaseException:
                self._nc = None
                with contextlib.suppress(Exception):
                    await nc.close()
                raise
            self._keeper = asyncio.create_task(self._keep_leases())

    async def _open(self) -> Client:
        # nats-py keeps trying a first connection whose TLS handshake fails
        # and only tells error_cb: a certificate problem (it stays wrong)
        # ends the attempt here, for connect_within to report at once.
        refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
        self._refused = refused
        opening = asyncio.ensure_future(self._connect_client())
        waiting: set[asyncio.Future[Any]] = {opening, refused}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            opening.cancel()
            raise
        if opening.done():
            return opening.result()
        opening.cancel()
        with contextlib.suppress(BaseException):
            await opening
        raise refused.result()

    async def _connect_client(self) -> Client:
        tls = self._config.tls
        return await nats.connect(
            servers=self._config.servers,
            tls=tls.context() if self._config.servers[0].startswith("tls:") else None,
            name=f"conveyor {self._config.namespace}",
            user_credentials=self._config.creds,
            nkeys_seed=self._config.nkey,
            connect_timeout=min(5.0, self._config.timeout),
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )

    def _hosts(self) -> list[str]:
        return [urlsplit(s).netloc.rpartition("@")[2] for s in self._config.servers]

    def _redacted(self) -> list[str]:
        return [redact(s) for s in self._config.servers]

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        nc, self._nc = self._nc, None
        self._held.clear()
        self._notify_subs.clear()
        self._declared.clear()
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS connection error: %r", exc, extra={"event": "conveyor.broker_error"})
        refused = self._refused
        if refused is None or refused.done():
            return
        if tls_failure(exc) is not None:
            refused.set_result(exc)
        elif isinstance(exc, nats.errors.AuthorizationError) or (
            isinstance(exc, nats.errors.Error) and "authorization violation" in str(exc).lower()
        ):  # nats-py passes the server's -ERR on as a plain Error
            refused.set_result(
                BrokerError(
                    f"cannot connect to NATS at {', '.join(self._hosts())}: the server refused "
                    "this client's credentials (authorization violation); check the user and "
                    "password, creds or nkey the URL names"
                )
            )

    async def _on_disconnected(self) -> None:
        if self._nc is None:  # closing
            return
        log.warning(
            "disconnected from NATS; reconnecting", extra={"event": "conveyor.broker_disconnected"}
        )

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS", extra={"event": "conveyor.broker_reconnected"})

    @property
    def _client(self) -> Client:
        if self._nc is None:
            raise BrokerError(f"NATS broker {self._redacted()[0]} is not connected; call connect()")
        return self._nc

    async def _retrying(self, what: str, op: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``op``, retrying with capped backoff while the server is away."""

        def give_up(exc: Exception, again: bool) -> BaseException:
            if again:
                return BrokerError(
                    f"NATS did not answer for {self._config.timeout:g}s trying to {what}: {exc!r}"
                )
            if isinstance(exc, nats.errors.ConnectionClosedError):
                return BrokerError(f"cannot {what}: the NATS connection is closed")
            if isinstance(exc, nats.errors.Error):
                return BrokerError(f"NATS refused to {what}: {exc!r}")
            return exc

        return await keep_trying(
            op,
            within=self._config.timeout,
            transient=lambda exc: isinstance(exc, _RETRYABLE),
            give_up=give_up,
        )

    async def _ensure_streams(self) -> None:
        js = self._client.jetstream()
        ns = self._config.namespace
        main = StreamConfig(
            name=self._stream,
            description=f"Conveyor namespace {ns}",
            subjects=[f"{self._prefix}.>"],
            retention=RetentionPolicy.LIMITS,
            max_age=self._config.max_age,
            storage=StorageType.FILE,
            num_replicas=self._config.replicas,
            duplicate_window=120.0,
            republish=RePublish(
                src=f"{self._prefix}.>", dest=f"{self._notify_prefix}.>", headers_only=True
            ),
        )
        dead = StreamConfig(
            name=self._dead_stream,
            description=f"Conveyor namespace {ns}: messages over max_deliver",
            subjects=[f"{self._dead_prefix}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=self._config.replicas,
        )
        for config in (main, dead):
            assert config.name is not None
            try:
                await js.stream_info(config.name)
            except nats.js.errors.NotFoundError:
                try:
                    await js.add_stream(config)
                except nats.js.errors.BadRequestError:
                    # Created by another client meanwhile.
                    await js.stream_info(config.name)

    # naming

    def _consumer(self, topic: str, group: str) -> str:
        return f"c_{_digest(topic, group)}"

    def _park(self, topic: str) -> str:
        return f"p_{_digest(topic)}"

    def _filter(self, topic: str) -> str:
        return f"{self._prefix}.{_topic_tokens(topic)}.*"

    def _subject(self, topic: str, target: str) -> str:
        return f"{self._prefix}.{_topic_tokens(topic)}.{target}"

    @staticmethod
    def _target(group: str) -> str:
        return f"g-{_digest(group, size=16)}"

    # subscriptions

    async def _consumer_exists(self, name: str) -> bool:
        try:
            await self._client.jetstream().consumer_info(self._stream, name)
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def _consumer_infos(self) -> list[tuple[dict[str, str], int, int]]:
        """(description, num_pending, num_ack_pending) of every consumer."""
        js = self._client.jetstream()
        out: list[tuple[dict[str, str], int, int]] = []
        while True:
            page = await js.consumers_info(self._stream, offset=len(out))
            for info in page:
                try:
                    about = json.loads(info.config.description or "")
                except ValueError:
                    about = {}
                if not isinstance(about, dict):
                    about = {}
                out.append((about, info.num_pending or 0, info.num_ack_pending or 0))
            if len(page) < 256:
                return out

    async def _has_group(self, topic: str) -> bool:
        return any(
            about.get("topic") == topic and "group" in about
            for about, _, _ in await self._consumer_infos()
        )

    async def declare(self, topic: str, group: str) -> None:
        if (topic, group) in self._declared:
            return
        await self._watch(topic)
        await self._retrying(
            f"declare group {group!r} on {topic!r}", lambda: self._declare(topic, group)
        )
        self._declared.add((topic, group))

    async def _declare(self, topic: str, group: str) -> None:
        js = self._client.jetstream()
        name, park = self._consumer(topic, group), self._park(topic)
        parked = await self._consumer_exists(park)
        if not await self._consumer_exists(name):
            config = ConsumerConfig(
                durable_name=name,
                description=json.dumps({"topic": topic, "group": group}),
                deliver_policy=DeliverPolicy.ALL if parked else DeliverPolicy.NEW,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self._config.ack_wait,
                max_deliver=-1,
                max_ack_pending=-1,
                filter_subject=self._filter(topic),
                num_replicas=self._config.replicas,
            )
            try:
                await js.add_consumer(self._stream, config)
            except nats.js.errors.BadRequestError:
                # Declared by another client at the same time.
                if not await self._consumer_exists(name):
                    raise
        if parked:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_consumer(self._stream, park)
        self._routable.add(topic)

    async def _make_routable(self, topic: str) -> None:
        """Make sure a message published to ``topic`` now is kept: by a group
        or, while there is none, by the topic's park consumer."""
        if await self._has_group(topic):
            return
        js = self._client.jetstream()
        park = self._park(topic)
        config = ConsumerConfig(
            durable_name=park,
            description=json.dumps({"topic": topic, "park": "1"}),
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            max_deliver=-1,
            filter_subject=self._filter(topic),
            num_replicas=self._config.replicas,
        )
        with contextlib.suppress(nats.js.errors.BadRequestError):
            await js.add_consumer(self._stream, config)
        # A group declared while the park consumer was created did not see it
        # and started after the messages it would keep: it alone keeps them.
        if await self._has_group(topic):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_consumer(self._stream, park)

    # publishing

    def _encode(self, message: Message) -> tuple[bytes, dict[str, str]]:
        envelope = json.dumps(message.envelope(), separators=(",", ":"))
        return message.payload, {_ENVELOPE: envelope}

    async def _put(self, subject: str, message: Message, msg_id: str) -> None:
        payload, headers = self._encode(message)
        headers[_MSG_ID] = msg_id
        js = self._client.jetstream()

        async def once() -> None:
            try:
                await js.publish(subject, payload, headers=headers, timeout=2.0)
            except nats.errors.MaxPayloadError as exc:
                raise BrokerError(
                    f"message {message.id} is too large for this NATS server: {exc}"
                ) from exc

        # The same Nats-Msg-Id on every try: a publish whose reply was lost is
        # stored once.
        await self._retrying(f"publish {message.id} to {message.topic!r}", once)

    async def publish(self, messages: Sequence[Message]) -> None:
        for message in messages:
            if message.topic not in self._routable:
                await self._retrying(
                    f"publish to {message.topic!r}",
                    functools.partial(self._make_routable, message.topic),
                )
                self._routable.add(message.topic)
            await self._put(self._subject(message.topic, _ALL), message, message.id)

    async def enqueue(self, group: str, messages: Sequence[Message]) -> None:
        # A fresh de-duplication id per call: replaying the same message twice
        # must not be mistaken for a retried publish of the first replay.
        token = _digest(group, str(time.time_ns()), str(id(messages)), size=12)
        for message in messages:
            await self._put(
                self._subject(message.topic, self._target(group)),
                message,
                f"{message.id}:{token}",
            )

    # consuming

    async def _hand_back(self, msg: Msg) -> None:
        """A delivery nobody will see (its pull gave up): NAK it now rather
        than let it wait out AckWait."""
        if msg.reply and "Status" not in (msg.headers or {}):
            with contextlib.suppress(Exception):
                await self._client.publish(msg.reply, b"-NAK")

    async def _pull(self, topic: str, group: str, batch: int) -> list[Msg] | None:
        """Up to ``batch`` deliveries; None when the group was never declared."""
        nc = self._client
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def received(msg: Msg) -> None:
            queue.put_nowait(msg)

        # JetStream keeps the stream subject on a delivery, so a pull's replies
        # are told apart by their subscription: one inbox per pull.
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=received)
        out: list[Msg] = []
        try:
            request = json.dumps({"batch": batch, "no_wait": True}).encode()
            await nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{self._stream}.{self._consumer(topic, group)}",
                request,
                reply=inbox,
            )
            while len(out) < batch:
                try:
                    msg = await asyncio.wait_for(queue.get(), 5.0)
                except TimeoutError:
                    if out:
                        return out
                    raise _Transient("no answer to a pull request") from None
                status = (msg.headers or {}).get("Status")
                if status is None:
                    out.append(msg)
                    continue
                if status == "503":
                    if out:
                        return out
                    if not await self._consumer_exists(self._consumer(topic, group)):
                        return None
                    raise _Transient("no responders for a pull request")
                if status in ("404", "408", "409"):
                    return out
                raise BrokerError(f"NATS answered a pull with status {status}: {msg.headers}")
            return out
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            while not queue.empty():
                await self._hand_back(queue.get_nowait())

    async def fetch(
        self, topic: str, group: str, *, max_messages: int, lease: float
    ) -> list[Delivery]:
        out: list[Delivery] = []
        for _ in range(10):
            want = max_messages - len(out)
            msgs = await self._retrying(
                f"fetch from {topic!r} for {group!r}",
                functools.partial(self._pull, topic, group, want),
            )
            if not msgs:
                return out
            skipped = 0
            for msg in msgs:
                delivery = await self._accept(topic, group, msg, lease)
                if delivery is None:
                    skipped += 1
                else:
                    out.append(delivery)
            if not skipped or len(out) >= max_messages:
                return out
        return out

    async def _accept(self, topic: str, group: str, msg: Msg, lease: float) -> Delivery | None:
        """The delivery ``msg`` makes for this group, or None when it is not
        for this group (yet): another group's replay, not due, over max_deliver."""
        meta = msg.metadata
        sseq = meta.sequence.stream if meta.sequence is not None else 0
        delivered = meta.num_delivered or 1
        queue = (topic, group)
        self._released.get(queue, {}).pop(sseq, None)
        target = msg.subject.rsplit(".", 1)[-1]
        if target != _ALL and target != self._target(group):
            await self._reply(msg.reply, b"+TERM")
            return None
        malformed: str | None = None
        try:
            message = self._decode(msg)
        except (ValueError, KeyError, TypeError, MessageError) as exc:
            # Delivered as malformed: the runtime dead-letters it in the store
            # (with `conveyor dlq`), then acknowledges it.
            malformed = short_reason(exc)
            message = malformed_delivery(
                topic=topic,
                group=group,
                receipt="",
                reason=malformed,
                where=f"{self._stream}/{sseq}",
                payload=bytes(msg.data),
                headers=dict(msg.headers or {}),
                attempt=delivered,
            ).message
        now = time.time()
        if (
            malformed is None
            and message.not_before is not None
            and message.not_before > now + 0.005
        ):
            due = message.not_before
            await self._reply(msg.reply, _nak(due - now))
            self._released.setdefault(queue, {})[sseq] = due
            return None
        if (
            message.not_before is not None
            and delivered > 1
            and meta.timestamp is not None
            and message.not_before > meta.timestamp.timestamp() + 0.001
        ):
            # A message published with a delay was (very likely) put back once
            # when fetched early; that was not an attempt.
            delivered -= 1
        if self._config.max_deliver and delivered > self._config.max_deliver:
            await self._dead(msg, group)
            return None
        mono = time.monotonic()
        self._held[msg.reply] = _Lease(
            reply=msg.reply,
            queue=queue,
            sseq=sseq,
            deadline=mono + lease,
            touched=mono,
            short=lease < self._config.ack_wait - 0.25,
        )
        receipt = f"{msg.reply}|{now + lease!r}"
        return Delivery(message.with_attempt(delivered), group, receipt, malformed=malformed)

    def _decode(self, msg: Msg) -> Message:
        envelope = json.loads((msg.headers or {})[_ENVELOPE])
        if not isinstance(envelope, dict):
            raise ValueError("the envelope is not a JSON object")
        return Message.from_envelope(envelope, bytes(msg.data))

    async def _dead(self, msg: Msg, group: str) -> None:
        """Copy ``msg`` to the dead-letter stream, then terminate it (a crash
        in between redelivers it; the copy is de-duplicated)."""
        meta = msg.metadata
        sseq = meta.sequence.stream if meta.sequence is not None else 0
        headers = dict(msg.headers or {})
        headers[_GROUP] = group
        headers[_MSG_ID] = f"{sseq}:{self._target(group)}"
        subject = msg.subject.replace(self._prefix, self._dead_prefix, 1)
        subject = f"{subject.rsplit('.', 1)[0]}.{self._target(group)}"
        js = self._client.jetstream()
        await self._retrying(
            "move a message to the dead-letter stream",
            lambda: js.publish(subject, msg.data, headers=headers, timeout=2.0),
        )
        log.warning(
            "moved stream message %s to %s after %s deliveries to %s",
            sseq,
            self._dead_stream,
            meta.num_delivered,
            group,
            extra={"event": "conveyor.broker_dead_lettered"},
        )
        await self._reply(msg.reply, b"+TERM")

    async def dead_letters(self, limit: int = 100) -> list[tuple[str, Message]]:
        """(group, message) of the first ``limit`` messages moved to the
        dead-letter stream for going over ``max_deliver``."""
        js = self._client.jetstream()
        out: list[tuple[str, Message]] = []
        seq = 1
        while len(out) < limit:
            try:
                raw = await js.get_msg(
                    self._dead_stream, seq, subject=f"{self._dead_prefix}.>", next=True
                )
            except nats.js.errors.NotFoundError:
                return out
            except nats.errors.Error as exc:
                raise BrokerError(f"cannot read the dead-letter stream: {exc!r}") from exc
            headers = dict(raw.headers or {})
            msg = Msg(
                self._client, subject=raw.subject or "", data=raw.data or b"", headers=headers
            )
            out.append((headers.get(_GROUP, ""), self._decode(msg)))
            seq = (raw.seq or seq) + 1
        return out

    async def _reply(self, subject: str, body: bytes) -> None:
        """Send an acknowledgement and wait until the server has applied it."""

        async def once() -> None:
            await self._client.request(subject, body, timeout=2.0)

        await self._retrying("acknowledge a delivery", once)

    def _claim(self, receipt: str) -> _Lease | None:
        """Take the lease a receipt names if this client still holds it."""
        reply = receipt.split("|", 1)[0]
        if reply in self._settled:
            return None
        lease = self._held.pop(reply, None)
        if lease is not None and time.monotonic() >= lease.deadline:
            self._release(lease, time.time())
            return None
        self._settled[reply] = None
        while len(self._settled) > 100_000:
            self._settled.popitem(last=False)
        if lease is None:
            # Another client's delivery: only the deadline in the receipt says
            # whether its lease still holds.
            try:
                remaining = float(receipt.partition("|")[2]) - time.time()
            except ValueError:
                return None
            if remaining <= 0:
                return None
            return _Lease(reply, ("", ""), 0, time.monotonic() + remaining, 0.0, False)
        return lease

    def _release(self, lease: _Lease, due: float) -> None:
        if lease.queue[0]:
            self._released.setdefault(lease.queue, {})[lease.sseq] = due

    async def ack(self, deliveries: Sequence[Delivery]) -> int:
        leases = [lease for d in deliveries if (lease := self._claim(d.receipt)) is not None]

        async def one(lease: _Lease) -> int:
            # Retry only while the lease holds: a later ack would acknowledge
            # a redelivered copy.
            async def send() -> None:
                remaining = lease.deadline - time.monotonic()
                if remaining <= 0:
                    raise _LeaseOver
                await self._client.request(lease.reply, b"+ACK", timeout=min(2.0, remaining))

            def give_up(exc: Exception, again: bool) -> BaseException:
                if isinstance(exc, nats.errors.Error) and not again:
                    return BrokerError(f"NATS refused an ack: {exc!r}")
                return _LeaseOver() if again else exc

            try:
                await keep_trying(
                    send,
                    within=max(0.0, lease.deadline - time.monotonic()),
                    transient=lambda exc: isinstance(exc, _TRANSIENT),
                    give_up=give_up,
                )
            except _LeaseOver:
                return 0
            return 1

        return sum(await asyncio.gather(*(one(lease) for lease in leases)))

    async def nack(self, delivery: Delivery, *, delay: float) -> None:
        lease = self._claim(delivery.receipt)
        if lease is None:
            return
        delay = max(0.0, delay)
        await self._reply(lease.reply, _nak(delay))
        self._release(lease, time.time() + delay)
        if delay == 0:
            self._bump(delivery.message.topic)

    async def _keep_leases(self) -> None:
        """Touch long leases so the server waits for them, hand short ones back
        at their deadline, forget expired ones."""
        wait = self._config.ack_wait
        tick = min(0.25, wait / 4)
        while True:
            await asyncio.sleep(tick)
            nc = self._nc
            if nc is None or not nc.is_connected:
                continue
            now = time.monotonic()
            for reply, lease in list(self._held.items()):
                try:
                    if now >= lease.deadline:
                        del self._held[reply]
                        if lease.short:
                            await nc.publish(reply, b"-NAK")
                            self._bump(lease.queue[0])
                        self._release(lease, time.time())
                    elif (
                        not lease.short
                        and lease.touched + wait < lease.deadline
                        and now - lease.touched >= wait / 3
                    ):
                        await nc.publish(reply, b"+WPI")
                        lease.touched = now
                except nats.errors.Error:
                    break

    # waiting and stats

    async def _watch(self, topic: str) -> None:
        if topic in self._notify_subs:
            return

        async def on_news(_: Msg) -> None:
            self._bump(topic)

        subject = f"{self._notify_prefix}.{_topic_tokens(topic)}.*"

        async def subscribe() -> Subscription:
            sub = await self._client.subscribe(subject, cb=on_news)
            await self._client.flush(timeout=2)
            return sub

        self._notify_subs[topic] = await self._retrying(f"watch {topic!r}", subscribe)

    def _bump(self, topic: str) -> None:
        self._news[topic] = self._news.get(topic, 0) + 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, topic: str, group: str, timeout: float) -> None:
        await self._watch(topic)
        key = (topic, group)
        deadline = time.monotonic() + timeout
        while True:
            news = self._news.get(topic, 0)
            if self._seen.get(key, news) != news:
                self._seen[key] = news
                return
            self._seen[key] = news
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def stats(self) -> list[QueueStats]:
        """Per (topic, group): ``ready`` counts undelivered messages, plus those
        this client handed back; ``in_flight`` the server's unacknowledged
        deliveries less those; ``delayed`` only this client's delayed nacks
        (the server does not tell a delayed NAK from a lease)."""
        infos = await self._retrying("read consumer stats", self._consumer_infos)
        now = time.time()
        mono = time.monotonic()
        for lease in list(self._held.values()):
            if mono >= lease.deadline:
                self._released.setdefault(lease.queue, {})[lease.sseq] = now
        out = []
        for about, pending, unacked in infos:
            topic, group = about.get("topic"), about.get("group")
            if not isinstance(topic, str) or not isinstance(group, str):
                continue
            released = self._released.get((topic, group), {})
            delayed = min(unacked, sum(1 for due in released.values() if due > now))
            back = min(unacked - delayed, sum(1 for due in released.values() if due <= now))
            out.append(QueueStats(topic, group, pending + back, unacked - delayed - back, delayed))
        out.sort(key=lambda s: (s.topic, s.group))
        return out


def _nak(delay: float) -> bytes:
    if delay <= 0:
        return b"-NAK"
    return b"-NAK " + json.dumps({"delay": int(delay * 1_000_000_000)}).encode()
