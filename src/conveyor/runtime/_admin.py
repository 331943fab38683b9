"""Operations on queues and dead letters shared by the CLI and the HTTP API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from conveyor.brokers._protocol import TransactionalBroker
from conveyor.messages import Message
from conveyor.runtime._app import App
from conveyor.store._protocol import DeadLetterFilter, DeadLetterRecord, Transaction

__all__ = [
    "QueueRow",
    "iter_dead_letters",
    "purge_dead_letters",
    "queue_overview",
    "replay_dead_letters",
]


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


_BATCH = 500


async def iter_dead_letters(
    app: App, where: DeadLetterFilter | None = None, *, limit: int | None = None, after: int = 0
) -> AsyncIterator[DeadLetterRecord]:
    """Matching dead letters by id, fetched ``_BATCH`` at a time: memory stays
    flat however many there are. ``limit`` None: all of them."""
    await app.connect()
    seen = 0
    while limit is None or seen < limit:
        size = _BATCH if limit is None else min(_BATCH, limit - seen)
        page = await app.store.dead_letters(where, limit=size, after=after)
        for record in page:
            yield record
        seen += len(page)
        if len(page) < size:
            return
        after = page[-1].id


Keep = Callable[[DeadLetterRecord], bool]
"""Which of the matching dead letters to act on (a test ``where`` cannot
express, such as a traceback frame); None: all of them."""
Batch = Callable[[Transaction, Sequence[DeadLetterRecord]], Awaitable[None]]
"""Called in each batch's transaction with the records it removes (the
console writes its audit entry there)."""


async def _batches(
    app: App, where: DeadLetterFilter | None, limit: int | None, keep: Keep | None
) -> AsyncIterator[list[DeadLetterRecord]]:
    """Matching dead letters a batch at a time, at most ``limit`` of them and
    at most what matched when it began: a message that dies again while a
    replay runs is a new dead letter, not one to replay round and round."""
    store = app.store
    total = await store.dead_letter_count(where)
    cap = total if limit is None else min(limit, total)
    done, scanned, after = 0, 0, 0
    while done < cap and scanned < total:
        size = min(_BATCH, total - scanned) if keep is not None else min(_BATCH, cap - done)
        page = await store.dead_letters(where, limit=size, after=after)
        if not page:
            return
        scanned += len(page)
        after = page[-1].id
        chosen = [r for r in page if keep is None or keep(r)][: cap - done]
        if chosen:
            done += len(chosen)
            yield chosen


async def replay_dead_letters(
    app: App,
    where: DeadLetterFilter | None,
    *,
    limit: int | None = None,
    keep: Keep | None = None,
    each_batch: Batch | None = None,
) -> int:
    """Send matching dead letters back to their group, keeping their message
    ids, so the inbox still refuses anything the group already applied. Each
    record is removed from the dead-letter queue as it is re-enqueued, a batch
    at a time (constant memory); returns how many."""
    await app.connect()
    broker, store = app.broker, app.store
    binding = broker.bind(store) if isinstance(broker, TransactionalBroker) else None
    done = 0
    async for page in _batches(app, where, limit, keep):
        by_group: dict[str, list[Message]] = {}
        for record in page:
            by_group.setdefault(record.group, []).append(record.message.with_attempt(0))
        ids = [r.id for r in page]
        if binding is not None:
            async with store.transaction() as tx:
                for group, messages in by_group.items():
                    await binding.enqueue(tx, group, messages)
                await store.delete_dead_letters(tx, ids)
                if each_batch is not None:
                    await each_batch(tx, page)
        else:
            # Enqueue first: a crash in between leaves a duplicate the inbox
            # absorbs, never a lost message.
            for group, messages in by_group.items():
                await broker.enqueue(group, messages)
            async with store.transaction() as tx:
                await store.delete_dead_letters(tx, ids)
                if each_batch is not None:
                    await each_batch(tx, page)
        done += len(page)
    return done


async def purge_dead_letters(
    app: App,
    where: DeadLetterFilter | None,
    *,
    limit: int | None = None,
    keep: Keep | None = None,
    each_batch: Batch | None = None,
) -> int:
    """Delete matching dead letters for good, a batch at a time; returns how many."""
    await app.connect()
    store = app.store
    done = 0
    async for page in _batches(app, where, limit, keep):
        async with store.transaction() as tx:
            deleted = await store.delete_dead_letters(tx, [r.id for r in page])
            if each_batch is not None:
                await each_batch(tx, page)
        done += deleted
    return done
