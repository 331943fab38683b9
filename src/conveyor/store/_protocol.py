"""The Store contract: one local transaction holding the inbox, the outbox,
dead letters and the application's own tables."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from conveyor.messages import Message

__all__ = ["DeadLetterFilter", "DeadLetterRecord", "OutboxStats", "Store", "Transaction"]


class Transaction(Protocol):
    """An open store transaction; SQL uses the store's own dialect and ``?``
    placeholders. Valid only inside the ``async with`` that opened it."""

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; return the number of rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> int: ...

    async def fetchone(self, sql: str, params: Sequence[object] = ()) -> tuple[Any, ...] | None: ...

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]: ...

    def savepoint(self) -> AbstractAsyncContextManager[None]:
        """A nested scope whose writes roll back alone if it raises."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetterRecord:
    """A message that will not be retried, with why and when."""

    id: int
    group: str
    message: Message
    reason: str
    error_type: str
    traceback: str
    attempts: int
    dead_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetterFilter:
    """Select dead letters; every given field must match (None matches all)."""

    ids: Sequence[int] | None = None
    group: str | None = None
    topic: str | None = None
    error_type: str | None = None
    reason_contains: str | None = None
    """Text the reason holds (case-sensitive substring)."""
    dead_since: float | None = None
    """Dead at or after this time (epoch seconds)."""
    dead_before: float | None = None
    """Dead before this time (epoch seconds)."""


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Committed outbox rows not yet published, and when the oldest was written."""

    pending: int
    oldest_created_at: float | None


class Store(Protocol):
    """Transactional state: inbox, outbox, dead letters and user tables."""

    url: str

    async def connect(self) -> None:
        """Open the database and create Conveyor's tables. Idempotent."""
        ...

    async def close(self) -> None: ...

    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """A write transaction: commits when the block exits normally."""
        ...

    async def read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Committed rows, outside any transaction of the caller's: it takes
        no write lock (SQLite's WAL readers never wait), so it may run while
        a handler elsewhere holds one. ``?`` placeholders, as everywhere."""
        ...

    async def inbox_add(self, tx: Transaction, group: str, message_id: str) -> bool:
        """Record that ``group`` processed ``message_id``; False if it already had."""
        ...

    async def inbox_seen(self, tx: Transaction, group: str, message_ids: Sequence[str]) -> set[str]:
        """Which of ``message_ids`` ``group`` has recorded (committed, or in ``tx``)."""
        ...

    async def inbox_add_many(self, tx: Transaction, group: str, message_ids: Sequence[str]) -> None:
        """Record that ``group`` processed ``message_ids`` (one statement). Raises
        ``StoreError`` if one is already recorded, say by a concurrent
        transaction that committed the same message first: ``tx`` must then
        roll back, so nothing is applied twice."""
        ...

    async def outbox_add(self, tx: Transaction, messages: Sequence[Message]) -> None:
        """Queue messages to be published once ``tx`` commits."""
        ...

    async def outbox_claim(self, *, limit: int, lease: float) -> list[tuple[int, Message]]:
        """Lease committed outbox rows for publishing (the relay)."""
        ...

    async def outbox_done(self, ids: Sequence[int]) -> None: ...

    async def wait_outbox(self, timeout: float) -> None:
        """Return early when outbox rows may have been committed."""
        ...

    async def outbox_stats(self) -> OutboxStats:
        """How many committed rows wait to be published (leased or not)."""
        ...

    async def dead_letter(
        self,
        tx: Transaction,
        *,
        group: str,
        message: Message,
        reason: str,
        error_type: str,
        traceback: str,
    ) -> None:
        """Keep ``message`` as dead for ``group`` (one record per group and id)."""
        ...

    async def dead_letters(
        self, where: DeadLetterFilter | None = None, *, limit: int = 1000, after: int = 0
    ) -> list[DeadLetterRecord]:
        """Up to ``limit`` matching dead letters whose id is above ``after``,
        by id (oldest first): page on with ``after`` = the last id seen."""
        ...

    async def dead_letter_count(self, where: DeadLetterFilter | None = None) -> int:
        """How many dead letters match."""
        ...

    async def delete_dead_letters(self, tx: Transaction, ids: Sequence[int]) -> int: ...

    async def dead_letter_counts(self) -> dict[tuple[str, str], int]:
        """Dead letters per (topic, group)."""
        ...

    async def prune_inbox(self, *, older_than: float) -> int:
        """Forget inbox records older than ``older_than`` (epoch seconds)."""
        ...
