"""Operations on queues and dead letters shared by the CLI and the HTTP API."""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.brokers._protocol import TransactionalBroker
from conveyor.runtime._app import App
from conveyor.store._protocol import DeadLetterFilter

__all__ = ["QueueRow", "purge_dead_letters", "queue_overview", "replay_dead_letters"]


@dataclass(frozen=True, slots=True)
class QueueRow:
    topic: str
    group: str
    ready: int
    in_flight: int
    delayed: int
    dead: int


async def queue_overview(app: App) -> list[QueueRow]:
    """Depth, in flight, delayed and dead per (topic, group)."""
    await app.connect()
    dead = await app.store.dead_letter_counts()
    rows = {
        (s.topic, s.group): QueueRow(s.topic, s.group, s.ready, s.in_flight, s.delayed, 0)
        for s in await app.broker.stats()
    }
    for (topic, group), count in dead.items():
        row = rows.get((topic, group), QueueRow(topic, group, 0, 0, 0, 0))
        rows[(topic, group)] = QueueRow(topic, group, row.ready, row.in_flight, row.delayed, count)
    return [rows[k] for k in sorted(rows)]


async def replay_dead_letters(app: App, where: DeadLetterFilter, *, limit: int = 100_000) -> int:
    """Send matching dead letters back to their group, keeping their message
    ids, so the inbox still refuses anything the group already applied. Each
    record is removed from the dead-letter queue as it is re-enqueued."""
    await app.connect()
    records = await app.store.dead_letters(where, limit=limit)
    broker, store = app.broker, app.store
    binding = broker.bind(store) if isinstance(broker, TransactionalBroker) else None
    for record in records:
        message = record.message.with_attempt(0)
        if binding is not None:
            async with store.transaction() as tx:
                await binding.enqueue(tx, record.group, [message])
                await store.delete_dead_letters(tx, [record.id])
        else:
            # Enqueue first: a crash in between leaves a duplicate the inbox
            # absorbs, never a lost message.
            await broker.enqueue(record.group, [message])
            async with store.transaction() as tx:
                await store.delete_dead_letters(tx, [record.id])
    return len(records)


async def purge_dead_letters(app: App, where: DeadLetterFilter) -> int:
    """Delete matching dead letters for good; returns how many."""
    await app.connect()
    records = await app.store.dead_letters(where, limit=10_000_000)
    async with app.store.transaction() as tx:
        return await app.store.delete_dead_letters(tx, [r.id for r in records])
