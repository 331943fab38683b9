"""In-process broker for tests: same semantics as the durable ones, no disk.

``memory://name`` brokers with the same name share their queues within one
process; plain ``memory://`` is private to its instance.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from conveyor._time import Clock, SystemClock
from conveyor.brokers._protocol import Capabilities, Delivery, QueueStats
from conveyor.messages import DEFAULT_MAX_PAYLOAD, Message

__all__ = ["MemoryBroker"]


@dataclass(slots=True)
class _Entry:
    seq: int
    message: Message
    visible_at: float
    attempt: int = 0
    lease: str | None = None


@dataclass(slots=True)
class _State:
    groups: dict[str, list[str]] = field(default_factory=dict)
    queues: dict[tuple[str, str], list[_Entry]] = field(default_factory=dict)
    parked: dict[str, list[Message]] = field(default_factory=dict)
    changed: asyncio.Condition | None = None
    # Shared by every broker on this state: entries order (and receipts name)
    # messages by it, whichever instance enqueued them.
    seq: itertools.count[int] = field(default_factory=itertools.count)


_shared: dict[str, _State] = {}


class MemoryBroker:
    """Queues in a dict; honours leases, delays, priorities and per-key order."""

    capabilities = Capabilities(
        durable=False,
        native_delay=True,
        native_dead_letter=False,
        per_key_ordering=True,
        priorities=True,
        max_payload=DEFAULT_MAX_PAYLOAD,
    )

    def __init__(self, url: str = "memory://", *, clock: Clock | None = None) -> None:
        self.url = url
        self.clock: Clock = clock or SystemClock()
        name = url.removeprefix("memory://")
        self._state = _shared.setdefault(name, _State()) if name else _State()

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _notify(self) -> None:
        cond = self._state.changed
        if cond is not None:
            cond.notify_all()

    async def _notify_async(self) -> None:
        cond = self._state.changed
        if cond is not None:
            async with cond:
                cond.notify_all()

    async def declare(self, topic: str, group: str) -> None:
        groups = self._state.groups.setdefault(topic, [])
        if group in groups:
            return
        groups.append(group)
        self._state.queues.setdefault((topic, group), [])
        parked = self._state.parked.pop(topic, [])
        self._put(group, parked)

    def _put(self, group: str, messages: Sequence[Message]) -> None:
        now = self.clock.time()
        for message in messages:
            queue = self._state.queues.setdefault((message.topic, group), [])
            visible = max(now, message.not_before or 0.0)
            queue.append(_Entry(next(self._state.seq), message, visible, attempt=message.attempt))

    async def publish(self, messages: Sequence[Message]) -> None:
        for message in messages:
            groups = self._state.groups.get(message.topic)
            if not groups:
                self._state.parked.setdefault(message.topic, []).append(message)
            for group in groups or ():
                self._put(group, [message])
        await self._notify_async()

    async def enqueue(self, group: str, messages: Sequence[Message]) -> None:
        self._put(group, messages)
        await self._notify_async()

    async def fetch(
        self, topic: str, group: str, *, max_messages: int, lease: float
    ) -> list[Delivery]:
        queue = self._state.queues.get((topic, group), [])
        now = self.clock.time()
        first_of_key: dict[str, int] = {}
        for entry in queue:
            if entry.message.key is not None:
                first_of_key.setdefault(entry.message.key, entry.seq)
        ready = [
            e
            for e in queue
            if e.visible_at <= now
            and (e.message.key is None or first_of_key[e.message.key] == e.seq)
        ]
        ready.sort(key=lambda e: (-e.message.priority, e.seq))
        out = []
        for entry in ready[:max_messages]:
            entry.attempt += 1
            entry.lease = uuid.uuid4().hex
            entry.visible_at = now + lease
            message = entry.message.with_attempt(entry.attempt)
            out.append(Delivery(message, group, f"{entry.seq}:{entry.lease}"))
        return out

    def _find(self, delivery: Delivery) -> tuple[list[_Entry], _Entry] | None:
        seq, lease = delivery.receipt.split(":", 1)
        queue = self._state.queues.get((delivery.message.topic, delivery.group), [])
        for entry in queue:
            if entry.seq == int(seq):
                return (queue, entry) if entry.lease == lease else None
        return None

    async def ack(self, deliveries: Sequence[Delivery]) -> int:
        done = 0
        for delivery in deliveries:
            found = self._find(delivery)
            if found is not None:
                found[0].remove(found[1])
                done += 1
        await self._notify_async()
        return done

    async def nack(self, delivery: Delivery, *, delay: float) -> None:
        found = self._find(delivery)
        if found is not None:
            entry = found[1]
            entry.lease = None
            entry.visible_at = self.clock.time() + max(0.0, delay)
        await self._notify_async()

    async def wait(self, topic: str, group: str, timeout: float) -> None:
        if self._state.changed is None:
            self._state.changed = asyncio.Condition()
        cond = self._state.changed
        async with cond:
            try:
                await asyncio.wait_for(cond.wait(), timeout)
            except TimeoutError:
                return

    async def stats(self) -> list[QueueStats]:
        now = self.clock.time()
        out = []
        for (topic, group), queue in sorted(self._state.queues.items()):
            in_flight = sum(1 for e in queue if e.lease is not None and e.visible_at > now)
            delayed = sum(1 for e in queue if e.lease is None and e.visible_at > now)
            oldest = min((e.message.created_at for e in queue), default=None)
            out.append(
                QueueStats(
                    topic, group, len(queue) - in_flight - delayed, in_flight, delayed, oldest
                )
            )
        return out
