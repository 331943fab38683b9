"""The Broker contract.

A broker keeps one queue per (topic, consumer group): every group subscribed
to a topic gets every message published after it was declared; consumers in
one group compete. Delivery is at-least-once: a fetched message is leased,
and if it is neither acknowledged nor nacked before the lease expires it is
delivered again with ``attempt`` increased.

Implementations are checked by ``conveyor.testing.conformance``; that suite,
not inheritance, is the contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from conveyor.messages import Message
from conveyor.store._protocol import Store, Transaction

__all__ = [
    "Broker",
    "BrokerBinding",
    "Capabilities",
    "DeadLetterSink",
    "Delivery",
    "QueueStats",
    "TransactionalBroker",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Capabilities:
    """What a broker does natively; the runtime emulates or refuses the rest."""

    durable: bool
    native_delay: bool
    native_dead_letter: bool
    per_key_ordering: bool
    priorities: bool
    max_payload: int
    releases_on_disconnect: bool = False
    """The server hands a client's unacknowledged deliveries back as soon as
    its connection closes (RabbitMQ), instead of when their lease expires."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery of a message to a consumer group.

    ``receipt`` identifies this delivery (and its lease) to the broker that
    made it; it is meaningless to any other broker. A broker never fails a
    fetch, nor keeps re-leasing an entry, because one entry is unreadable: it
    hands it out with ``malformed`` set (``brokers._kit.malformed_delivery``).
    """

    message: Message
    group: str
    receipt: str
    malformed: str | None = None
    """Why the entry could not be read as a Conveyor message, for an entry
    written by something else or corrupted; ``message`` then holds what could
    be kept of it. The runtime dead-letters such a delivery at once."""


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Depth of one (topic, group) queue. ``oldest`` is when the oldest
    message still in it was published (epoch seconds), where the broker can
    tell (SQLite, PostgreSQL, memory); None otherwise or when it is empty."""

    topic: str
    group: str
    ready: int
    in_flight: int
    delayed: int
    oldest: float | None = None


class Broker(Protocol):
    """A durable (or, for tests, in-memory) message broker."""

    url: str
    capabilities: Capabilities

    async def connect(self) -> None:
        """Open connections and create what is missing. Idempotent."""
        ...

    async def close(self) -> None:
        """Release connections. Unacknowledged deliveries are redelivered later."""
        ...

    async def declare(self, topic: str, group: str) -> None:
        """Subscribe ``group`` to ``topic``. Idempotent. Messages published to a
        topic before any group was declared are kept for the first group."""
        ...

    async def publish(self, messages: Sequence[Message]) -> None:
        """Durably enqueue ``messages`` for every group of their topic.
        Returns only once the broker has them (survives a crash of any process)."""
        ...

    async def enqueue(self, group: str, messages: Sequence[Message]) -> None:
        """Enqueue ``messages`` for ``group`` only (dead-letter replay)."""
        ...

    async def fetch(
        self, topic: str, group: str, *, max_messages: int, lease: float
    ) -> list[Delivery]:
        """Lease up to ``max_messages`` ready messages, highest priority first,
        then oldest first. A message whose key has an earlier message still in
        this group's queue is not ready (per-key order)."""
        ...

    async def ack(self, deliveries: Sequence[Delivery]) -> int:
        """Remove deliveries for good; returns how many were still leased by us.
        Acknowledging a delivery whose lease was lost is a no-op."""
        ...

    async def nack(self, delivery: Delivery, *, delay: float) -> None:
        """Release a delivery to be delivered again to its group after ``delay``."""
        ...

    async def wait(self, topic: str, group: str, timeout: float) -> None:
        """Return early when new messages may be ready, else after ``timeout``."""
        ...

    async def stats(self) -> list[QueueStats]:
        """Depth per (topic, group)."""
        ...


@runtime_checkable
class DeadLetterSink(Protocol):
    """A broker that also keeps dead letters of its own (Kafka's dead-letter
    topic), besides the store's.

    The runtime calls ``dead_letter`` after the store transaction that wrote
    the dead letter committed and before it acknowledges ``delivery``: at
    least once per dead letter (again if the worker dies before the ack). A
    failure is logged and ignored; the store's dead letter is the record.
    """

    async def dead_letter(self, delivery: Delivery, *, reason: str, error_type: str) -> None: ...


@runtime_checkable
class TransactionalBroker(Protocol):
    """A broker that can act inside a store transaction on the same database.

    When ``bind(store)`` returns a binding, the runtime claims, acknowledges,
    retries and publishes inside the store's transaction, so the whole unit of
    work is one commit.
    """

    def bind(self, store: Store) -> BrokerBinding | None: ...


class BrokerBinding(Protocol):
    async def claim(
        self, tx: Transaction, topic: str, group: str, limit: int, *, lease: float
    ) -> list[Delivery]:
        """Lease up to ``limit`` ready messages and count the attempt. The
        runtime commits ``tx`` before handling them, so a worker that dies
        holding them still used up an attempt."""
        ...

    async def ack(self, tx: Transaction, deliveries: Sequence[Delivery]) -> None:
        """Remove claimed ``deliveries`` for good when ``tx`` commits (one
        statement for a whole batch)."""
        ...

    async def nack(self, tx: Transaction, retries: Sequence[tuple[Delivery, float]]) -> None:
        """Release each ``(delivery, delay)`` to be delivered again after its
        delay once ``tx`` commits."""
        ...

    async def publish(self, tx: Transaction, messages: Sequence[Message]) -> None: ...

    async def enqueue(self, tx: Transaction, group: str, messages: Sequence[Message]) -> None: ...
