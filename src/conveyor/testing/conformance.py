"""Conformance checks for brokers and stores: the contract, written once.

Every ``check_*`` is a plain async function that returns when the
implementation keeps one part of the contract and raises ``AssertionError``
(naming what broke) when it does not. Conveyor runs the same checks against
each of its own brokers and stores; a third-party implementation passes them
unchanged or is not a Conveyor broker.

A broker check takes a ``BrokerFactory``: ``make(clock)`` returns a new client,
not yet connected, of one broker namespace. Every client made by one factory
sees the same queues (two clients are two competing consumers, or a consumer
and its replacement after a crash), so give each check a fresh factory: a new
file, a new ``memory://name``, or a server URL. The checks use their own
unique topic and group names and never flush shared state. A store check
takes a ``StoreFactory`` the same way.

Checks that need a capability (``durable``, ``priorities``,
``per_key_ordering``) fail when given a broker that does not declare it;
choose the checks an implementation must pass with ``supported``::

    import pytest
    from conveyor.testing import BROKER_CHECKS, UrlBrokerFactory, supported

    CHECKS = [c for c in BROKER_CHECKS if supported(c, MyBroker.capabilities)]

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    async def test_my_broker(check, tmp_path):
        await check(UrlBrokerFactory(f"mybroker://127.0.0.1/{tmp_path.name}"))

Time: the checks hand the factory a ``FakeClock``. A broker that keeps it
(``broker.clock is clock``) sees leases and delays expire the moment the check
advances it; a broker that keeps time on its server ignores it and the checks
wait for real (a few seconds per check).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import os
import pickle
import random
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, cast

from conveyor._time import Clock, SystemClock
from conveyor.brokers._factory import broker_from_url
from conveyor.brokers._protocol import Broker, Capabilities, Delivery, QueueStats
from conveyor.errors import MessageError, PayloadTooLarge, StoreError
from conveyor.messages import Message
from conveyor.resilience import RetryPolicy
from conveyor.runtime import App, Context
from conveyor.settings import Settings
from conveyor.store._factory import store_from_url
from conveyor.store._protocol import DeadLetterFilter, DeadLetterRecord, Store
from conveyor.testing._clock import FakeClock

__all__ = [
    "BROKER_CHECKS",
    "BrokerCheck",
    "BrokerFactory",
    "STORE_CHECKS",
    "StoreCheck",
    "StoreFactory",
    "UrlBrokerFactory",
    "UrlStoreFactory",
    "check_ack_is_final",
    "check_bad_input",
    "check_competing_consumers",
    "check_dead_letter_after_max_attempts",
    "check_delayed_retry",
    "check_durable_across_kill",
    "check_fan_out",
    "check_inbox",
    "check_outbox_lease",
    "check_parked_until_first_group",
    "check_per_key_order",
    "check_priorities",
    "check_prune_inbox",
    "check_redelivery_after_lease",
    "check_rollback",
    "check_round_trip",
    "check_savepoint",
    "check_stats",
    "check_store_dead_letters",
    "check_wait_wakes_on_publish",
    "required_capabilities",
    "supported",
]

LEASE = 1.0
"""Lease the checks take; expiry is reached by advancing the clock past it."""
DELAY = 1.0
"""Delay the checks ask for on ``nack``."""
HOLD = 600.0
"""Lease for deliveries a check holds while time passes for others."""


class BrokerFactory(Protocol):
    """Returns a new, unconnected client of one broker namespace per call."""

    def __call__(self, clock: Clock) -> Broker: ...


class StoreFactory(Protocol):
    """Returns a new, unconnected client of one store namespace per call."""

    def __call__(self, clock: Clock) -> Store: ...


BrokerCheck = Callable[[BrokerFactory], Awaitable[None]]
StoreCheck = Callable[[StoreFactory], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class UrlBrokerFactory:
    """``broker_from_url(url)``: a picklable factory, so the durability check
    can rebuild it in a child process."""

    url: str

    def __call__(self, clock: Clock) -> Broker:
        return broker_from_url(self.url, clock=clock)


@dataclass(frozen=True, slots=True)
class UrlStoreFactory:
    """``store_from_url(url)``."""

    url: str

    def __call__(self, clock: Clock) -> Store:
        return store_from_url(self.url, clock=clock)


_REQUIRES: dict[Callable[..., Awaitable[None]], frozenset[str]] = {}
_CAPABILITY_FLAGS = frozenset(
    name
    for name, value in inspect.get_annotations(Capabilities, eval_str=True).items()
    if value is bool
)


_Check = TypeVar("_Check", bound=Callable[..., Awaitable[None]])


def _requires(*capabilities: str) -> Callable[[_Check], _Check]:
    unknown = set(capabilities) - _CAPABILITY_FLAGS
    if unknown:
        raise ValueError(f"not a capability flag: {', '.join(sorted(unknown))}")

    def mark(check: _Check) -> _Check:
        _REQUIRES[check] = frozenset(capabilities)
        return check

    return mark


def required_capabilities(check: Callable[..., Awaitable[None]]) -> frozenset[str]:
    """The ``Capabilities`` flags a broker must declare for ``check`` to apply."""
    return _REQUIRES.get(check, frozenset())


def supported(check: Callable[..., Awaitable[None]], capabilities: Capabilities) -> bool:
    """Whether a broker with ``capabilities`` must pass ``check``."""
    return all(getattr(capabilities, name) for name in required_capabilities(check))


def _require(check: Callable[..., Awaitable[None]], broker: Broker) -> None:
    missing = [n for n in required_capabilities(check) if not getattr(broker.capabilities, n)]
    if missing:
        raise AssertionError(
            f"{check.__name__} applies only to brokers whose capabilities declare "
            f"{', '.join(missing)}; {broker.url} does not (select checks with supported())"
        )


class _Rig:
    """The clients one check opens, and the time they run on: a ``FakeClock``
    unless ``real_time``, or unless a client does not keep the clock it is given."""

    def __init__(self, make: Callable[[Clock], object], *, real_time: bool = False) -> None:
        self.fake = FakeClock()
        self.clock: Clock = SystemClock() if real_time else self.fake
        self._make = make
        self._open: list[Broker | Store] = []
        self.clocked = not real_time

    def _track(self, client: Broker | Store) -> None:
        self.clocked = self.clocked and getattr(client, "clock", None) is self.clock
        self._open.append(client)

    async def broker(self) -> Broker:
        broker = cast(Broker, self._make(self.clock))
        await broker.connect()
        self._track(broker)
        return broker

    async def store(self) -> Store:
        store = cast(Store, self._make(self.clock))
        await store.connect()
        self._track(store)
        return store

    async def drop(self, client: Broker | Store) -> None:
        """Close one client as a crashed consumer would leave it: unacknowledged."""
        self._open.remove(client)
        await client.close()

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for every client of this check."""
        self.fake.advance(seconds)
        if not self.clocked:
            await asyncio.sleep(seconds)

    async def aclose(self) -> None:
        while self._open:
            await self._open.pop().close()


@contextlib.asynccontextmanager
async def _rig(make: Callable[[Clock], object], *, real_time: bool = False) -> AsyncIterator[_Rig]:
    rig = _Rig(make, real_time=real_time)
    try:
        yield rig
    finally:
        await rig.aclose()


def _names(what: str = "t") -> tuple[str, str]:
    """A topic and a group no other check (or run) uses."""
    tag = uuid.uuid4().hex[:12]
    return f"conformance.{what}.{tag}", f"g{tag}"


async def _fetch(
    broker: Broker, topic: str, group: str, n: int = 100, *, lease: float = HOLD
) -> list[Delivery]:
    return await broker.fetch(topic, group, max_messages=n, lease=lease)


async def _drain(broker: Broker, topic: str, group: str, *, lease: float = HOLD) -> list[Delivery]:
    """Lease everything ready in (topic, group) without acknowledging it."""
    out: list[Delivery] = []
    for _ in range(1000):
        batch = await _fetch(broker, topic, group, lease=lease)
        if not batch:
            return out
        out.extend(batch)
    raise AssertionError(f"fetch from {topic}/{group} never ran dry")


def _ids(deliveries: Sequence[Delivery]) -> list[str]:
    return [d.message.id for d in deliveries]


def _depth(stats: Sequence[QueueStats], topic: str, group: str) -> tuple[int, int, int]:
    """(ready, in_flight, delayed) of one queue; a queue not listed is empty."""
    for s in stats:
        if s.topic == topic and s.group == group:
            return s.ready, s.in_flight, s.delayed
    return 0, 0, 0


def _same_message(got: Message, sent: Message) -> None:
    for name in ("id", "topic", "type", "key", "payload"):
        assert getattr(got, name) == getattr(sent, name), (
            f"message {name} changed in transit: sent {getattr(sent, name)!r}, "
            f"got {getattr(got, name)!r}"
        )
    assert dict(got.headers) == dict(sent.headers), (
        f"headers changed in transit: sent {dict(sent.headers)}, got {dict(got.headers)}"
    )
    assert abs(got.created_at - sent.created_at) < 0.001, "created_at changed in transit"


def _raises(kind: type[BaseException], build: Callable[[], object], what: str) -> BaseException:
    try:
        build()
    except kind as exc:
        return exc
    raise AssertionError(f"{what} did not raise {kind.__name__}")


async def _eventually(
    predicate: Callable[[], Awaitable[bool]], *, timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g}s")
        await asyncio.sleep(0.01)


async def check_round_trip(make: BrokerFactory) -> None:
    """A fetched message is the published one: id, topic, type, key, headers
    and payload (any bytes) intact, ``attempt == 1``, for the fetching group."""
    async with _rig(make) as rig:
        broker = await rig.broker()
        topic, group = _names("round-trip")
        await broker.declare(topic, group)
        sent = [
            Message.create(
                topic,
                {"n": 1, "text": "h\u00e9llo"},
                type="OrderPlaced",
                key="order-1",
                headers={"correlation-id": "c-1", "x-tenant": "acme"},
            ),
            Message(topic=topic, payload=bytes(range(256))),
        ]
        await broker.publish(sent)
        got = await _drain(broker, topic, group)
        assert sorted(_ids(got)) == sorted(m.id for m in sent), "published messages not fetched"
        by_id = {d.message.id: d for d in got}
        for message in sent:
            delivery = by_id[message.id]
            _same_message(delivery.message, message)
            assert delivery.group == group, f"delivery names group {delivery.group!r}"
            assert delivery.message.attempt == 1, "first delivery must have attempt == 1"
        assert await broker.ack(got) == len(sent), "ack did not count the leased deliveries"


async def check_fan_out(make: BrokerFactory) -> None:
    """Every group subscribed to a topic gets every message; acknowledging in
    one group leaves the others' copies alone."""
    async with _rig(make) as rig:
        broker = await rig.broker()
        topic, group = _names("fan-out")
        groups = [f"{group}-{i}" for i in range(3)]
        for g in groups:
            await broker.declare(topic, g)
        batch = [Message.create(topic, {"i": i}) for i in range(4)]
        single = Message.create(topic, {"i": 4})
        await broker.publish(batch)
        await broker.publish([single])
        sent = sorted(m.id for m in [*batch, single])
        fetched = {g: await _drain(broker, topic, g, lease=LEASE) for g in groups}
        for g, deliveries in fetched.items():
            assert sorted(_ids(deliveries)) == sent, f"group {g} did not get every message"
        assert await broker.ack(fetched[groups[0]]) == len(sent)
        await rig.advance(LEASE + 0.5)
        assert await _fetch(broker, topic, groups[0]) == [], "acknowledged messages came back"
        again = await _drain(broker, topic, groups[1])
        assert sorted(_ids(again)) == sent, "another group's ack removed this group's copies"
        assert {d.message.attempt for d in again} == {2}


async def check_competing_consumers(make: BrokerFactory) -> None:
    """Consumers of one group share its messages, whichever client published
    them: each message goes to exactly one consumer, never to both at once,
    and both get some."""
    async with _rig(make) as rig:
        first, second = await rig.broker(), await rig.broker()
        topic, group = _names("compete")
        await first.declare(topic, group)
        await second.declare(topic, group)
        sent = [Message.create(topic, {"i": i}) for i in range(12)]
        for i, message in enumerate(sent):
            await (first if i % 2 else second).publish([message])
        got: dict[int, list[str]] = {0: [], 1: []}
        # Until every message came or 30 s passed: both fetches can come back
        # empty while messages remain (a Kafka rebalance hands partitions
        # over), so an empty round is no end by itself.
        deadline = time.monotonic() + 30
        for _ in range(1000):
            a = await first.fetch(topic, group, max_messages=3, lease=60.0)
            b = await second.fetch(topic, group, max_messages=3, lease=60.0)
            if not a and not b:
                if len(got[0]) + len(got[1]) >= len(sent) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
                continue
            both = set(_ids(a)) & set(_ids(b))
            assert not both, f"two consumers of one group hold {sorted(both)} at once"
            got[0].extend(_ids(a))
            got[1].extend(_ids(b))
            assert await first.ack(a) == len(a)
            assert await second.ack(b) == len(b)
        everything = got[0] + got[1]
        assert len(everything) == len(set(everything)), "a message was delivered twice"
        assert sorted(everything) == sorted(m.id for m in sent), "messages lost"
        assert got[0], "the second consumer got every message"
        assert got[1], "the first consumer got every message"


async def check_ack_is_final(make: BrokerFactory) -> None:
    """An acknowledged message never comes back, not even after its lease would
    have expired, and acknowledging it again is a no-op."""
    async with _rig(make) as rig:
        broker = await rig.broker()
        topic, group = _names("ack")
        await broker.declare(topic, group)
        await broker.publish([Message.create(topic, {"n": 1})])
        deliveries = await _fetch(broker, topic, group, lease=LEASE)
        assert len(deliveries) == 1
        assert await broker.ack(deliveries) == 1
        await rig.advance(LEASE * 3)
        assert await _fetch(broker, topic, group) == [], "an acknowledged message came back"
        other = await rig.broker()
        assert await _fetch(other, topic, group) == [], "another client got an acked message"
        assert await broker.ack(deliveries) == 0, "a second ack of one delivery counted"
        assert _depth(await broker.stats(), topic, group) == (0, 0, 0)


async def check_delayed_retry(make: BrokerFactory) -> None:
    """A nack with a delay hides the message until the delay passes (without
    holding up other messages), then delivers it again with the attempt increased."""
    async with _rig(make) as rig:
        broker = await rig.broker()
        topic, group = _names("delay")
        await broker.declare(topic, group)
        message = Message.create(topic, {"n": 1})
        await broker.publish([message])
        (first,) = await _fetch(broker, topic, group)
        await broker.nack(first, delay=DELAY)
        assert await _fetch(broker, topic, group) == [], "fetched before its delay"
        other = Message.create(topic, {"n": 2})
        await broker.publish([other])
        behind = await _fetch(broker, topic, group)
        assert _ids(behind) == [other.id], "a delayed message held up the one behind it"
        assert await broker.ack(behind) == 1
        await rig.advance(DELAY / 2)
        assert await _fetch(broker, topic, group) == [], "fetched at half its delay"
        await rig.advance(DELAY / 2 + 0.5)
        (again,) = await _fetch(broker, topic, group)
        _same_message(again.message, message)
        assert again.message.attempt == first.message.attempt + 1, "attempt not increased"
        assert await broker.ack([again]) == 1


async def check_redelivery_after_lease(make: BrokerFactory) -> None:
    """A message fetched by a consumer that dies without acknowledging it is
    delivered again, to another consumer, once its lease expires (at once on a
    broker that declares ``releases_on_disconnect``); the dead consumer's late
    ack is a no-op."""
    async with _rig(make) as rig:
        doomed = await rig.broker()
        topic, group = _names("lease")
        await doomed.declare(topic, group)
        message = Message.create(topic, {"n": 1})
        await doomed.publish([message])
        (lost,) = await _fetch(doomed, topic, group, lease=LEASE)
        await rig.drop(doomed)
        survivor = await rig.broker()
        if survivor.capabilities.releases_on_disconnect:
            # The server returns a closed client's deliveries at once, sooner
            # than the lease would: check for exactly that.
            back: list[Delivery] = []

            async def returned() -> bool:
                back.extend(await _fetch(survivor, topic, group, lease=LEASE))
                return bool(back)

            await _eventually(returned, timeout=5.0, what="redelivery after the consumer closed")
            (again,) = back
        else:
            assert await _fetch(survivor, topic, group) == [], "delivered again while leased"
            await rig.advance(LEASE - 0.5)
            assert await _fetch(survivor, topic, group) == [], "delivered again before lease expiry"
            await rig.advance(1.0)
            (again,) = await _fetch(survivor, topic, group, lease=LEASE)
        _same_message(again.message, message)
        assert again.message.attempt == lost.message.attempt + 1, "attempt not increased"
        await rig.advance(LEASE + 0.5)
        (third,) = await _fetch(survivor, topic, group)
        assert third.message.id == message.id
        assert await survivor.ack([again]) == 0, "an ack with an expired lease counted"
        assert await survivor.ack([third]) == 1
        await rig.advance(LEASE + 0.5)
        assert await _fetch(survivor, topic, group) == []


@_requires("per_key_ordering")
async def check_per_key_order(make: BrokerFactory) -> None:
    """Messages with one key are delivered in publish order within a group,
    whichever client published them: the next is not delivered while an earlier
    one is in flight or delayed, even to other consumers; other keys and
    unkeyed messages proceed meanwhile."""
    async with _rig(make) as rig:
        c1, c2 = await rig.broker(), await rig.broker()
        _require(check_per_key_order, c1)
        topic, group = _names("keys")
        await c1.declare(topic, group)
        a1, b1, a2, n1, b2, a3 = (
            Message.create(topic, {"m": name}, key=key)
            for name, key in (
                ("a1", "A"),
                ("b1", "B"),
                ("a2", "A"),
                ("n1", None),
                ("b2", "B"),
                ("a3", "A"),
            )
        )
        for i, message in enumerate([a1, b1, a2, n1, b2, a3]):
            await (c1 if i % 2 else c2).publish([message])
        first = await _fetch(c1, topic, group)
        assert sorted(_ids(first)) == sorted([a1.id, b1.id, n1.id]), (
            "expected the head of each key and the unkeyed message, nothing behind a head"
        )
        held = {d.message.id: d for d in first}
        assert await _fetch(c2, topic, group) == [], "a key's next message overtook one in flight"
        assert await c1.ack([held[b1.id], held[n1.id]]) == 2
        b_next = await _fetch(c2, topic, group)
        assert _ids(b_next) == [b2.id], "B's next message not released after B's head was acked"
        await c1.nack(held[a1.id], delay=DELAY)
        assert await _fetch(c2, topic, group) == [], "a key's next message overtook a delayed one"
        await rig.advance(DELAY + 0.5)
        retried = await _fetch(c2, topic, group, 10)
        assert _ids(retried) == [a1.id], "only the delayed head of A may be delivered"
        assert await c2.ack(retried) == 1
        for expected in (a2, a3):
            (delivery,) = await _fetch(c1, topic, group)
            assert delivery.message.id == expected.id, "key A delivered out of order"
            assert await c1.ack([delivery]) == 1
        assert await c2.ack(b_next) == 1
        assert await _fetch(c1, topic, group) == []
        await _per_key_drain(rig, c1)


async def _per_key_drain(rig: _Rig, c1: Broker) -> None:
    """Three consumers take random batches and ack or nack at random: every key
    is still handled strictly in publish order, one message at a time."""
    clients = [c1, await rig.broker(), await rig.broker()]
    topic, group = _names("keys-drain")
    await c1.declare(topic, group)
    rng = random.Random(20240607)
    keys = ["k0", "k1", "k2"]
    order: dict[str | None, list[str]] = {k: [] for k in keys}
    order[None] = []
    sent: list[Message] = []
    for i in range(8):
        for key in [*keys, None] if i % 2 else keys:
            message = Message.create(topic, {"i": i, "key": key}, key=key)
            order[key].append(message.id)
            sent.append(message)
    for start in range(0, len(sent), 5):
        await clients[start % len(clients)].publish(sent[start : start + 5])
    remaining = {m.id for m in sent}
    held: list[tuple[Broker, Delivery]] = []
    for step in range(2000):
        if not remaining:
            break
        client = clients[step % len(clients)]
        for delivery in await client.fetch(
            topic, group, max_messages=rng.randint(1, 4), lease=600.0
        ):
            key = delivery.message.key
            if key is not None:
                busy = [d.message.id for _, d in held if d.message.key == key]
                assert not busy, f"key {key}: two messages in flight at once"
                assert delivery.message.id == order[key][0], f"key {key} delivered out of order"
            held.append((client, delivery))
        rng.shuffle(held)
        cut = rng.randint(0, len(held))
        settle, held = held[:cut], held[cut:]
        for owner, delivery in settle:
            if rng.random() < 0.3:
                await owner.nack(delivery, delay=0.0)
                continue
            assert await owner.ack([delivery]) == 1
            remaining.discard(delivery.message.id)
            key = delivery.message.key
            if key is not None:
                assert order[key].pop(0) == delivery.message.id
    assert not remaining, f"{len(remaining)} keyed messages never delivered"


@_requires("priorities")
async def check_priorities(make: BrokerFactory) -> None:
    """Among ready messages the highest priority goes first, then the oldest;
    a delayed high-priority message does not block lower ones."""
    async with _rig(make) as rig:
        broker = await rig.broker()
        _require(check_priorities, broker)
        topic, group = _names("priority")
        await broker.declare(topic, group)
        low1 = Message.create(topic, {"m": "low1"})
        high = Message.create(topic, {"m": "high"}, priority=9)
        mid = Message.create(topic, {"m": "mid"}, priority=3)
        low2 = Message.create(topic, {"m": "low2"})
        await broker.publish([low1, high, mid])
        await broker.publish([low2])
        one_by_one = [await _fetch(broker, topic, group, 1) for _ in range(4)]
        assert [_ids(b) for b in one_by_one] == [[high.id], [mid.id], [low1.id], [low2.id]], (
            "fetch one at a time must go by priority, then publish order"
        )
        assert await broker.ack([d for b in one_by_one for d in b]) == 4
        x = Message.create(topic, {"m": "x"})
        y = Message.create(topic, {"m": "y"}, priority=5)
        z = Message.create(topic, {"m": "z"}, priority=5)
        await broker.publish([x, y, z])
        batch = await _fetch(broker, topic, group, 10)
        assert _ids(batch) == [y.id, z.id, x.id], "a batch must come in priority order"
        assert await broker.ack(batch) == 3
        top = Message.create(topic, {"m": "top"}, priority=7)
        bottom = Message.create(topic, {"m": "bottom"})
        await broker.publish([top, bottom])
        (taken,) = await _fetch(broker, topic, group, 1)
        assert taken.message.id == top.id
        await broker.nack(taken, delay=DELAY)
        assert _ids(await _fetch(broker, topic, group, 1)) == [bottom.id], (
            "a delayed high-priority message blocked a ready one"
        )
        await rig.advance(DELAY + 0.5)
        assert _ids(await _fetch(broker, topic, group, 1)) == [top.id]


async def check_parked_until_first_group(make: BrokerFactory) -> None:
    """Messages published before any group subscribed are kept and delivered to
    the first group declared; later messages reach every group."""
    async with _rig(make) as rig:
        producer, consumer = await rig.broker(), await rig.broker()
        topic, group = _names("parked")
        early = [Message.create(topic, {"i": i}) for i in range(3)]
        await producer.publish(early)
        await consumer.declare(topic, group)
        got = await _drain(consumer, topic, group)
        assert sorted(_ids(got)) == sorted(m.id for m in early), (
            "messages published before the first subscription were lost"
        )
        assert await consumer.ack(got) == len(early)
        second = f"{group}-late"
        await consumer.declare(topic, second)
        late = Message.create(topic, {"i": 3})
        await producer.publish([late])
        assert _ids(await _drain(consumer, topic, group)) == [late.id]
        assert late.id in _ids(await _drain(consumer, topic, second))


async def check_stats(make: BrokerFactory) -> None:
    """``stats()`` counts each queue's ready, in-flight (leased) and delayed
    messages as they are fetched, nacked, acked and their leases expire."""
    async with _rig(make) as rig:
        broker = await rig.broker()
        topic, group = _names("stats")
        idle = f"{group}-idle"
        await broker.declare(topic, group)
        await broker.declare(topic, idle)

        async def depth() -> tuple[int, int, int]:
            return _depth(await broker.stats(), topic, group)

        await broker.publish([Message.create(topic, {"i": i}) for i in range(5)])
        assert await depth() == (5, 0, 0), "after publishing 5"
        taken = await _fetch(broker, topic, group, 2)
        assert await depth() == (3, 2, 0), "after leasing 2"
        await broker.nack(taken[0], delay=DELAY)
        assert await depth() == (3, 1, 1), "after nacking 1 with a delay"
        await broker.ack([taken[1]])
        assert await depth() == (3, 0, 1), "after acking 1"
        await rig.advance(DELAY + 0.5)
        assert await depth() == (4, 0, 0), "after the delay passed"
        taken = await _fetch(broker, topic, group, 4, lease=LEASE)
        assert len(taken) == 4
        await broker.ack(taken[1:])
        assert await depth() == (0, 1, 0), "after leasing 4 and acking 3"
        await rig.advance(LEASE + 0.5)
        assert await depth() == (1, 0, 0), "after the lease expired"
        assert _depth(await broker.stats(), topic, idle) == (5, 0, 0), (
            "another group's queue must be counted on its own"
        )


async def check_bad_input(make: BrokerFactory) -> None:
    """Malformed messages are refused with ``MessageError`` before reaching the
    broker; a payload of exactly the broker's ``max_payload`` goes through."""
    async with _rig(make) as rig:
        broker = await rig.broker()
        topic, group = _names("input")
        _raises(MessageError, lambda: Message(topic="", payload=b"x"), "an empty topic")
        _raises(
            MessageError,
            lambda: Message(topic=topic, payload="text"),  # type: ignore[arg-type]
            "a str payload",
        )
        _raises(
            MessageError,
            lambda: Message(topic=topic, payload=b"", headers={"n": 1}),  # type: ignore[dict-item]
            "a non-str header value",
        )
        limit = broker.capabilities.max_payload
        error = _raises(
            PayloadTooLarge,
            lambda: Message.create(topic, b"x" * (limit + 1), max_payload=limit),
            "a payload over max_payload",
        )
        assert str(limit) in str(error), "the error must name the limit"
        await broker.declare(topic, group)
        largest = Message.create(topic, os.urandom(limit), max_payload=limit)
        await broker.publish([largest])
        (delivery,) = await _fetch(broker, topic, group)
        assert delivery.message.payload == largest.payload, "a max_payload message was altered"


async def check_wait_wakes_on_publish(make: BrokerFactory) -> None:
    """``wait`` returns soon after another client publishes, long before its timeout."""
    async with _rig(make) as rig:
        waiter, producer = await rig.broker(), await rig.broker()
        topic, group = _names("wait")
        await waiter.declare(topic, group)
        started = time.monotonic()
        waiting = asyncio.create_task(waiter.wait(topic, group, 30.0))
        for _ in range(5):
            await asyncio.sleep(0)
        await producer.publish([Message.create(topic, {"n": 1})])
        try:
            await asyncio.wait_for(waiting, 5.0)
        except TimeoutError:
            raise AssertionError("wait() did not return within 5s of a publish") from None
        assert time.monotonic() - started < 5.0
        assert len(await _fetch(waiter, topic, group)) == 1


_CHILD = "from conveyor.testing.conformance import _publish_then_die; _publish_then_die()"


@_requires("durable")
async def check_durable_across_kill(make: BrokerFactory, *, count: int = 50) -> None:
    """Messages are durable once ``publish`` returns: a process that publishes
    them and is killed with SIGKILL right after loses none. ``make`` must be
    picklable (it is rebuilt in the child), e.g. ``UrlBrokerFactory``."""
    # The child publishes on the real clock, so the parent reads on it too.
    async with _rig(make, real_time=True) as rig:
        broker = await rig.broker()
        _require(check_durable_across_kill, broker)
        topic, group = _names("durable")
        await broker.declare(topic, group)
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        job = base64.b64encode(pickle.dumps((make, topic, count)))
        try:
            out, err = await asyncio.wait_for(child.communicate(job), 60.0)
        except TimeoutError:
            child.kill()
            await child.wait()
            raise AssertionError("the publishing child did not finish within 60s") from None
        assert child.returncode == -signal.SIGKILL, (
            f"publisher exited with {child.returncode}, not SIGKILL: {err.decode()[-2000:]}"
        )
        sent = out.decode().split()
        assert len(sent) == count, f"publisher reported {len(sent)} ids"
        survivor = await rig.broker()
        got = await _drain(survivor, topic, group)
        missing = set(sent) - set(_ids(got))
        assert not missing, f"{len(missing)} of {count} published messages lost on SIGKILL"
        assert sorted(_ids(got)) == sorted(sent)


def _publish_then_die() -> None:
    """Child of ``check_durable_across_kill``: publish one by one, print the ids
    first, and SIGKILL this process the moment the last ``publish`` returns."""
    make, topic, count = pickle.loads(base64.b64decode(sys.stdin.buffer.read()))

    async def run() -> None:
        broker: Broker = make(SystemClock())
        await broker.connect()
        messages = [Message.create(topic, {"i": i}) for i in range(count)]
        sys.stdout.write(" ".join(m.id for m in messages))
        sys.stdout.flush()
        for message in messages:
            await broker.publish([message])
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(run())


class _AlwaysFails(Exception):
    pass


async def check_dead_letter_after_max_attempts(
    make: BrokerFactory, store: StoreFactory | None = None
) -> None:
    """Run by a worker, a message whose handler always fails is tried
    ``max_attempts`` times, then kept as exactly one dead letter carrying the
    error type, traceback, attempts and a reason, and leaves the queue.

    ``store`` defaults to a SQLite store in a temporary directory; pass one on
    the broker's own database to check the single-transaction path."""
    with tempfile.TemporaryDirectory() as tmp:
        make_store = store or UrlStoreFactory(f"sqlite:///{Path(tmp) / 'store.db'}")
        clock = SystemClock()
        broker, dead_store = make(clock), make_store(clock)
        topic, group = _names("dead")
        app = App(
            "conformance",
            settings=Settings(
                broker_url=broker.url, store_url=dead_store.url, idle_poll=0.01, lease=30.0
            ),
            broker=broker,
            store=dead_store,
        )
        attempts: list[int] = []

        @app.handler(topic, group=group, retry=RetryPolicy(max_attempts=3, base_delay=0))
        async def always_fails(ctx: Context, body: bytes) -> None:
            attempts.append(ctx.message.attempt)
            raise _AlwaysFails(f"attempt {ctx.message.attempt} failed")

        async def dead() -> list[DeadLetterRecord]:
            return await dead_store.dead_letters(DeadLetterFilter(group=group))

        async def settled() -> bool:
            return len(await dead()) == 1 and _depth(await broker.stats(), topic, group) == (
                0,
                0,
                0,
            )

        async with app:
            sent = await app.publish(topic, {"order": 1})
            worker = app.worker(grace_period=5.0)
            running = asyncio.create_task(worker.run())
            try:
                await _eventually(settled, timeout=20.0, what="one dead letter and an empty queue")
            finally:
                worker.stop()
                await asyncio.wait_for(running, 10.0)
            records = await dead()
        assert attempts == [1, 2, 3], f"handler ran for attempts {attempts}, expected [1, 2, 3]"
        assert len(records) == 1, f"{len(records)} dead letters, expected 1"
        (record,) = records
        _same_message(record.message, sent)
        assert record.group == group
        assert record.attempts == 3, f"attempts recorded as {record.attempts}"
        assert record.error_type == f"{_AlwaysFails.__module__}.{_AlwaysFails.__qualname__}", (
            f"error type recorded as {record.error_type!r}"
        )
        assert "Traceback" in record.traceback, "no traceback recorded"
        assert "attempt 3 failed" in record.traceback, "the traceback is not the last failure's"
        assert record.reason.strip(), "no reason recorded"


Injector = Callable[[Broker, str, str], Awaitable[list[str]]]
"""``await inject(broker, topic, group)`` writes entries into ``broker``'s
queue of (topic, group) with the broker's own driver, as another program
might: each one unreadable as a Conveyor message (a field missing, text
where a number belongs, headers that are not an object...). Each entry has
an id of its own where the broker's format has one. It returns one short
description per entry written."""


async def check_malformed_entries(
    make: BrokerFactory, inject: Injector, store: StoreFactory | None = None
) -> None:
    """Entries written straight into the broker by something else, which do
    not read as Conveyor messages, become dead letters whose reason says why
    (error type ``MalformedMessage``), with their payload kept; they never
    stop the queue: the good messages published before and after them are
    all handled, once, and the queue ends empty.

    ``inject`` writes the entries (see ``Injector``): writing raw entries
    takes the broker's own driver, so each broker's test supplies its own."""
    with tempfile.TemporaryDirectory() as tmp:
        make_store = store or UrlStoreFactory(f"sqlite:///{Path(tmp) / 'store.db'}")
        clock = SystemClock()
        broker, dead_store = make(clock), make_store(clock)
        topic, group = _names("malformed")
        app = App(
            "conformance",
            settings=Settings(
                broker_url=broker.url, store_url=dead_store.url, idle_poll=0.01, lease=30.0
            ),
            broker=broker,
            store=dead_store,
        )
        handled: list[int] = []

        @app.handler(topic, group=group, retry=RetryPolicy(max_attempts=3, base_delay=0))
        async def good(ctx: Context, body: dict[str, int]) -> None:
            handled.append(body["i"])

        async with app:
            await app.broker.publish([Message.create(topic, {"i": i}) for i in range(10)])
            kinds = await inject(app.broker, topic, group)
            await app.broker.publish([Message.create(topic, {"i": i}) for i in range(10, 20)])

            async def dead() -> list[DeadLetterRecord]:
                return await dead_store.dead_letters(DeadLetterFilter(group=group))

            async def settled() -> bool:
                return (
                    len(handled) >= 20
                    and len(await dead()) >= len(kinds)
                    and _depth(await broker.stats(), topic, group) == (0, 0, 0)
                )

            worker = app.worker(grace_period=5.0)
            running = asyncio.create_task(worker.run())
            try:
                await _eventually(
                    settled, timeout=60.0, what=f"20 good messages and {len(kinds)} dead letters"
                )
            finally:
                worker.stop()
                await asyncio.wait_for(running, 10.0)
            records = await dead()
        assert kinds, "the injector wrote nothing"
        assert sorted(handled) == list(range(20)), f"good messages handled: {sorted(handled)}"
        assert len(records) == len(kinds), (
            f"{len(records)} dead letters for {len(kinds)} malformed entries ({kinds})"
        )
        prefix = "malformed message: "
        for record in records:
            assert record.error_type == "MalformedMessage", record.error_type
            assert record.reason.startswith(prefix), record.reason
            assert len(record.reason) > len(prefix) + 5, f"no reason given: {record.reason!r}"
            assert record.message.topic == topic


BROKER_CHECKS: tuple[BrokerCheck, ...] = (
    check_round_trip,
    check_fan_out,
    check_competing_consumers,
    check_ack_is_final,
    check_delayed_retry,
    check_redelivery_after_lease,
    check_per_key_order,
    check_priorities,
    check_parked_until_first_group,
    check_stats,
    check_bad_input,
    check_wait_wakes_on_publish,
    check_durable_across_kill,
    check_dead_letter_after_max_attempts,
)
"""Every broker check; filter with ``supported(check, capabilities)``."""


class _Rollback(Exception):
    pass


@contextlib.asynccontextmanager
async def _user_table(store: Store) -> AsyncIterator[str]:
    """A table of the application's own, unique to this check."""
    name = f"conformance_{uuid.uuid4().hex[:12]}"
    async with store.transaction() as tx:
        await tx.execute(f"CREATE TABLE {name} (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
    try:
        yield name
    finally:
        async with store.transaction() as tx:
            await tx.execute(f"DROP TABLE {name}")


async def _claim_ours(store: Store, topic: str, limit: int = 10_000) -> list[tuple[int, Message]]:
    return [
        (i, m) for i, m in await store.outbox_claim(limit=limit, lease=LEASE) if m.topic == topic
    ]


async def check_inbox(make: StoreFactory) -> None:
    """``inbox_add`` is True the first time a group records a message id and
    False after, in the same or a later transaction; groups are independent.
    ``inbox_seen`` reports the recorded ids among those asked, committed or
    in the transaction; ``inbox_add_many`` records ids, and raises
    ``StoreError`` for an id already recorded (the transaction then rolls
    back, leaving none of its ids recorded)."""
    async with _rig(make) as rig:
        store = await rig.store()
        _, group = _names()
        message_id = str(uuid.uuid4())
        async with store.transaction() as tx:
            assert await store.inbox_add(tx, group, message_id) is True, "first record"
            assert await store.inbox_add(tx, group, message_id) is False, "same transaction"
            assert await store.inbox_add(tx, f"{group}-other", message_id) is True, (
                "another group's record must be independent"
            )
        async with store.transaction() as tx:
            assert await store.inbox_add(tx, group, message_id) is False, "later transaction"
            assert await store.inbox_add(tx, group, str(uuid.uuid4())) is True
        batch = [str(uuid.uuid4()) for _ in range(3)]
        async with store.transaction() as tx:
            assert await store.inbox_seen(tx, group, []) == set()
            assert await store.inbox_seen(tx, group, [*batch, message_id]) == {message_id}
            await store.inbox_add_many(tx, group, batch[:2])
            await store.inbox_add_many(tx, group, [])
            assert await store.inbox_seen(tx, group, batch) == set(batch[:2]), "same transaction"
            assert await store.inbox_seen(tx, f"{group}-other", batch) == set(), "other group"
        async with store.transaction() as tx:
            assert await store.inbox_seen(tx, group, batch) == set(batch[:2]), "committed"
            assert await store.inbox_add(tx, group, batch[0]) is False, "recorded by add_many"
        try:
            async with store.transaction() as tx:
                await store.inbox_add_many(tx, group, [batch[2], batch[1]])
        except StoreError:
            pass
        else:
            raise AssertionError("inbox_add_many recorded an id a second time")
        async with store.transaction() as tx:
            assert await store.inbox_seen(tx, group, batch) == set(batch[:2]), (
                "a failed inbox_add_many left a record"
            )


async def check_rollback(make: StoreFactory) -> None:
    """A transaction that raises leaves nothing behind: inbox, outbox, dead
    letters and the application's rows all roll back; the error propagates.
    ``read`` sees committed rows only."""
    async with _rig(make) as rig:
        store = await rig.store()
        topic, group = _names("rollback")
        message = Message.create(topic, {"n": 1})
        async with _user_table(store) as table:
            try:
                async with store.transaction() as tx:
                    assert await store.inbox_add(tx, group, message.id)
                    await store.outbox_add(tx, [message])
                    await store.dead_letter(
                        tx,
                        group=group,
                        message=message,
                        reason="r",
                        error_type="E",
                        traceback="",
                    )
                    await tx.execute(f"INSERT INTO {table} (k, v) VALUES (?, ?)", ("a", 1))
                    raise _Rollback
            except _Rollback:
                pass
            else:
                raise AssertionError("the transaction swallowed the exception raised in it")
            assert await store.read(f"SELECT k FROM {table}") == [], "read sees a rolled-back row"
            async with store.transaction() as tx:
                assert await tx.fetchall(f"SELECT k FROM {table}") == [], "user row kept"
                assert await store.inbox_add(tx, group, message.id), "inbox record kept"
                await tx.execute(f"INSERT INTO {table} (k, v) VALUES (?, ?)", ("b", 2))
            assert await store.read(f"SELECT k, v FROM {table} WHERE k = ?", ["b"]) == [("b", 2)], (
                "read does not see a committed row"
            )
            assert await _claim_ours(store, topic) == [], "outbox row kept"
            assert await store.dead_letters(DeadLetterFilter(topic=topic)) == [], "dead letter kept"


async def check_savepoint(make: StoreFactory) -> None:
    """A savepoint that raises undoes only its own writes (rows, inbox, outbox);
    the enclosing transaction, and savepoints that succeed, keep theirs."""
    async with _rig(make) as rig:
        store = await rig.store()
        topic, group = _names("savepoint")
        inside = Message.create(topic, {"where": "inside"})
        after = Message.create(topic, {"where": "after"})
        async with _user_table(store) as table:
            insert = f"INSERT INTO {table} (k, v) VALUES (?, ?)"
            async with store.transaction() as tx:
                await tx.execute(insert, ("before", 1))
                try:
                    async with tx.savepoint():
                        await tx.execute(insert, ("inside", 2))
                        await store.inbox_add(tx, group, inside.id)
                        await store.outbox_add(tx, [inside])
                        raise _Rollback
                except _Rollback:
                    pass
                async with tx.savepoint():
                    await tx.execute(insert, ("kept", 3))
                    try:
                        async with tx.savepoint():
                            await tx.execute(insert, ("nested", 4))
                            raise _Rollback
                    except _Rollback:
                        pass
                await tx.execute(insert, ("after", 5))
                await store.outbox_add(tx, [after])
                try:  # a scope after one that succeeded undoes only its own writes
                    async with tx.savepoint():
                        await tx.execute(insert, ("late", 6))
                        raise _Rollback
                except _Rollback:
                    pass
                try:  # a scope that ran nothing
                    async with tx.savepoint():
                        raise _Rollback
                except _Rollback:
                    pass
                async with tx.savepoint():
                    pass
                async with tx.savepoint():
                    await tx.execute(insert, ("last", 7))
            async with store.transaction() as tx:
                rows = await tx.fetchall(f"SELECT k FROM {table} ORDER BY v")
                assert [r[0] for r in rows] == ["before", "kept", "after", "last"], (
                    f"rows after savepoints: {rows}"
                )
                assert await store.inbox_add(tx, group, inside.id), "rolled-back inbox record kept"
            ours = [m.id for _, m in await _claim_ours(store, topic)]
            assert ours == [after.id], "outbox must hold only the message outside the savepoint"


async def check_outbox_lease(make: StoreFactory) -> None:
    """Committed outbox rows come back intact, in order, from ``outbox_claim``,
    which leases them: a second claim gets none until the lease expires, and
    ``outbox_done`` removes them for good. ``limit`` is honoured;
    ``outbox_stats`` counts the rows waiting, leased or not."""
    async with _rig(make) as rig:
        store = await rig.store()
        topic, _ = _names("outbox")
        sent = [
            Message.create(topic, {"i": 0}, type="T", key="k", headers={"correlation-id": "c"}),
            Message.create(topic, {"i": 1}),
            Message.create(topic, {"i": 2}, delay=30.0, priority=4),
        ]
        before = (await store.outbox_stats()).pending
        async with store.transaction() as tx:
            await store.outbox_add(tx, sent[:2])
        async with store.transaction() as tx:
            await store.outbox_add(tx, sent[2:])
        stats = await store.outbox_stats()
        assert stats.pending == before + 3, f"outbox_stats counts {stats.pending - before} of 3"
        assert stats.oldest_created_at is not None, "outbox_stats has no oldest row"
        assert stats.oldest_created_at <= sent[0].created_at, "outbox_stats' oldest is too new"
        first = await _claim_ours(store, topic)
        assert [m.id for _, m in first] == [m.id for m in sent], "claim lost or reordered rows"
        for (_, got), message in zip(first, sent, strict=True):
            _same_message(got, message)
            assert got.not_before == message.not_before, "not_before changed in the outbox"
            assert got.priority == message.priority, "priority changed in the outbox"
        assert await _claim_ours(store, topic) == [], "rows claimed twice within their lease"
        await rig.advance(LEASE - 0.5)
        assert await _claim_ours(store, topic) == [], "rows claimed again before lease expiry"
        await rig.advance(1.0)
        again = await _claim_ours(store, topic)
        assert [i for i, _ in again] == [i for i, _ in first], "expired rows not claimable again"
        await store.outbox_done([i for i, _ in again])
        assert (await store.outbox_stats()).pending == before, "outbox_done left rows counted"
        await rig.advance(LEASE + 0.5)
        assert await _claim_ours(store, topic) == [], "rows came back after outbox_done"
        more = [Message.create(topic, {"i": i}) for i in range(3, 6)]
        async with store.transaction() as tx:
            await store.outbox_add(tx, more)
        limited = await store.outbox_claim(limit=2, lease=LEASE)
        assert len(limited) == 2, f"outbox_claim(limit=2) returned {len(limited)} rows"
        rest = await _claim_ours(store, topic)
        assert sorted(m.id for _, m in [*limited, *rest]) == sorted(m.id for m in more)
        await store.outbox_done([i for i, _ in [*limited, *rest]])


async def check_store_dead_letters(make: StoreFactory) -> None:
    """Dead letters keep message, reason, error type, traceback, attempts and
    time; filter by group, topic, error type, ids, text in the reason and
    time; page by id with ``after`` and count; one record per (group,
    message id), replaced on a second write; delete and count per (topic, group)."""
    async with _rig(make) as rig:
        store = await rig.store()
        topic, group = _names("dlq")
        other_topic, other_group = f"{topic}-b", f"{group}-b"
        mine = {topic, other_topic}
        m1 = Message.create(topic, {"n": 1}, key="k1", type="T", headers={"h": "v"})
        m2 = Message.create(topic, {"n": 2})
        m3 = Message.create(other_topic, {"n": 3})

        async def put(group: str, message: Message, error: str, attempt: int = 3) -> None:
            async with store.transaction() as tx:
                await store.dead_letter(
                    tx,
                    group=group,
                    message=message.with_attempt(attempt),
                    reason=f"{error} on {message.id}",
                    error_type=error,
                    traceback=f"Traceback: {error}",
                )

        async def select(where: DeadLetterFilter | None = None) -> list[DeadLetterRecord]:
            return [r for r in await store.dead_letters(where) if r.message.topic in mine]

        async def keys(where: DeadLetterFilter | None = None) -> list[tuple[str, str]]:
            return sorted((r.group, r.message.id) for r in await select(where))

        async def counts() -> dict[tuple[str, str], int]:
            return {k: v for k, v in (await store.dead_letter_counts()).items() if k[0] in mine}

        await put(group, m1, "E1")
        await put(other_group, m1, "E2")
        await put(group, m2, "E1")
        await put(group, m3, "E3")
        assert await keys() == sorted(
            [(group, m1.id), (other_group, m1.id), (group, m2.id), (group, m3.id)]
        ), "dead letters lost or merged across groups"
        assert await keys(DeadLetterFilter(group=group)) == sorted(
            [(group, m1.id), (group, m2.id), (group, m3.id)]
        ), "filter by group"
        assert await keys(DeadLetterFilter(topic=other_topic)) == [(group, m3.id)], "by topic"
        assert await keys(DeadLetterFilter(error_type="E1")) == sorted(
            [(group, m1.id), (group, m2.id)]
        ), "filter by error type"
        assert await keys(DeadLetterFilter(error_type="E1", topic=other_topic)) == [], (
            "filters must all match"
        )
        picked = [r.id for r in await select(DeadLetterFilter(group=group))][:2]
        by_ids = await select(DeadLetterFilter(ids=picked))
        assert sorted(r.id for r in by_ids) == sorted(picked), "filter by ids"
        assert await select(DeadLetterFilter(ids=[])) == [], "an empty id list matches nothing"
        assert len(await store.dead_letters(DeadLetterFilter(group=group), limit=1)) == 1, "limit"
        ours = DeadLetterFilter(group=group)
        assert await store.dead_letter_count(ours) == 3, "dead_letter_count"
        pages: list[int] = []
        after = 0
        while page := await store.dead_letters(ours, limit=2, after=after):
            assert len(page) <= 2, "a page over its limit"
            pages += [r.id for r in page]
            after = page[-1].id
        assert pages == sorted(r.id for r in await select(ours)), "paging with after lost rows"
        assert await keys(DeadLetterFilter(reason_contains=f"on {m2.id}")) == [(group, m2.id)], (
            "filter by text in the reason"
        )
        assert await store.dead_letter_count(DeadLetterFilter(reason_contains="E1 on")) >= 2
        dead_at = (await select(ours))[0].dead_at
        assert await keys(DeadLetterFilter(group=group, dead_before=dead_at - 1)) == [], "before"
        assert len(await keys(DeadLetterFilter(group=group, dead_since=dead_at - 1))) == 3, (
            "filter by time"
        )

        (kept,) = [r for r in await select(DeadLetterFilter(group=group)) if r.message.id == m1.id]
        _same_message(kept.message, m1)
        assert (kept.reason, kept.error_type, kept.traceback, kept.attempts) == (
            f"E1 on {m1.id}",
            "E1",
            "Traceback: E1",
            3,
        ), "a dead letter's details changed"
        if rig.clocked:
            assert kept.dead_at == rig.clock.time(), "dead_at is not the store clock's time"

        await put(group, m1, "E9", attempt=5)
        replaced = [r for r in await select(DeadLetterFilter(group=group)) if r.message.id == m1.id]
        assert len(replaced) == 1, "a second dead letter for one (group, id) must replace the first"
        assert (replaced[0].error_type, replaced[0].attempts) == ("E9", 5), "not replaced"
        assert await keys(DeadLetterFilter(group=other_group)) == [(other_group, m1.id)]
        assert await counts() == {
            (topic, group): 2,
            (topic, other_group): 1,
            (other_topic, group): 1,
        }

        doomed = [r.id for r in await select(DeadLetterFilter(topic=topic))]
        async with store.transaction() as tx:
            assert await store.delete_dead_letters(tx, doomed) == 3, "delete count"
        async with store.transaction() as tx:
            assert await store.delete_dead_letters(tx, doomed) == 0, "deleted twice"
        assert await keys() == [(group, m3.id)], "delete removed the wrong records"
        assert await counts() == {(other_topic, group): 1}


async def check_prune_inbox(make: StoreFactory) -> None:
    """``prune_inbox`` forgets records older than the cut-off and keeps newer ones."""
    async with _rig(make) as rig:
        store = await rig.store()
        _, group = _names()
        old, new = str(uuid.uuid4()), str(uuid.uuid4())
        start = rig.clock.time()
        async with store.transaction() as tx:
            assert await store.inbox_add(tx, group, old)
        await rig.advance(3.0)
        async with store.transaction() as tx:
            assert await store.inbox_add(tx, group, new)
        assert await store.prune_inbox(older_than=start + 1.5) >= 1, "nothing pruned"
        async with store.transaction() as tx:
            assert await store.inbox_add(tx, group, old), "an old record survived pruning"
            assert not await store.inbox_add(tx, group, new), "a new record was pruned"


STORE_CHECKS: tuple[StoreCheck, ...] = (
    check_inbox,
    check_rollback,
    check_savepoint,
    check_outbox_lease,
    check_store_dead_letters,
    check_prune_inbox,
)
"""Every store check."""
