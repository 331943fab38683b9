"""A broker on PostgreSQL (asyncpg): ``postgresql://user@host:port/db?namespace=NAME``.

One row per (group, message) in ``conveyor_queue`` of the namespace (a
schema); a lease is a token plus a visibility time, so a message held by a
killed process is delivered again once the lease runs out. Claims take rows
with ``FOR UPDATE SKIP LOCKED``, so competing consumers never wait on each
other. ``wait`` listens: a publish sends ``NOTIFY`` in its own transaction,
heard once it commits. Times are the client's clock, as with SQLite: keep the
clocks of machines sharing a queue in sync (NTP).

Per-key order: a publish takes a transaction-scoped advisory lock per (topic,
key), so rows of one key are numbered in commit order, and a keyed row is
ready only when no earlier row of its key is left in its queue.

When the store has the same URL (database and namespace), ``bind`` lets the
runtime claim, handle, publish and acknowledge inside the store's
transaction. URL options: see ``conveyor._postgres``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from conveyor._postgres import (
    MESSAGE_COLUMNS,
    Database,
    PostgresBacked,
    PostgresTransaction,
    lock_id,
    message_params,
)
from conveyor._rows import claimed
from conveyor._time import Clock
from conveyor.brokers._protocol import BrokerBinding, Capabilities, Delivery, QueueStats
from conveyor.errors import BrokerError
from conveyor.messages import DEFAULT_MAX_PAYLOAD, Message
from conveyor.store._protocol import Store, Transaction

__all__ = ["PostgresBroker"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conveyor_queue (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    grp TEXT,
    msg_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    type TEXT NOT NULL,
    key TEXT,
    priority INTEGER NOT NULL,
    headers TEXT NOT NULL,
    payload BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    visible_at DOUBLE PRECISION NOT NULL,
    lease TEXT
);
CREATE INDEX IF NOT EXISTS conveyor_queue_ready
    ON conveyor_queue (topic, grp, priority DESC, seq);
CREATE INDEX IF NOT EXISTS conveyor_queue_key
    ON conveyor_queue (topic, grp, key, seq) WHERE key IS NOT NULL;
CREATE TABLE IF NOT EXISTS conveyor_subscriptions (
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    PRIMARY KEY (topic, grp)
);
"""

_INSERT = f"""
INSERT INTO conveyor_queue (grp, {MESSAGE_COLUMNS}, attempt, visible_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                     $6::int[], $7::text[], $8::bytea[], $9::float8[], $10::int[],
                     $11::float8[])
"""

# Ready = visible now and, when keyed, the oldest row of its key in this queue.
_READY = """
    FROM conveyor_queue q
    WHERE q.topic = $1 AND q.grp = $2 AND q.visible_at <= $3
      AND (q.key IS NULL OR NOT EXISTS (
          SELECT 1 FROM conveyor_queue p
          WHERE p.topic = q.topic AND p.grp = q.grp AND p.key = q.key AND p.seq < q.seq))
    ORDER BY q.priority DESC, q.seq
    LIMIT $4
    FOR UPDATE OF q SKIP LOCKED"""

_CLAIM = f"""
WITH picked AS (SELECT q.seq {_READY})
UPDATE conveyor_queue u SET lease = $5, visible_at = $6, attempt = u.attempt + 1
FROM picked WHERE u.seq = picked.seq
RETURNING u.seq, u.attempt, {", ".join(f"u.{c.strip()}" for c in MESSAGE_COLUMNS.split(","))}
"""

_CLAIM_SEQS = f"""
UPDATE conveyor_queue SET lease = $2, visible_at = $3, attempt = attempt + 1
WHERE seq = ANY($1::bigint[])
RETURNING seq, attempt, {MESSAGE_COLUMNS}
"""

_READY_ATTEMPTS = f"SELECT q.seq, q.attempt {_READY}"


class PostgresBroker(PostgresBacked):
    """Broker on PostgreSQL: ``postgresql://user@host:port/db?namespace=NAME``."""

    role = "broker"
    schema = _SCHEMA
    error = BrokerError
    capabilities = Capabilities(
        durable=True,
        native_delay=True,
        native_dead_letter=False,
        per_key_ordering=True,
        priorities=True,
        max_payload=DEFAULT_MAX_PAYLOAD,
    )

    def __init__(self, url: str, *, clock: Clock | None = None) -> None:
        super().__init__(url, clock=clock)
        self._seen: dict[tuple[str, str], int] = {}
        self._binding = _Binding(self)

    def bind(self, store: Store) -> BrokerBinding | None:
        """A binding when ``store`` is a PostgreSQL store on this database and namespace."""
        db = getattr(store, "_db", None)
        if isinstance(db, Database) and self._db is not None and db.key == self._db.key:
            return self._binding
        return None

    async def declare(self, topic: str, group: str) -> None:
        async def body(tx: PostgresTransaction) -> None:
            # Exclusive against publishers of this topic (they lock it shared):
            # a publish either sees the subscription or is adopted below.
            await tx.run("SELECT pg_advisory_xact_lock($1)", lock_id("topic", topic))
            added = await tx.run(
                "INSERT INTO conveyor_subscriptions (topic, grp) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING",
                topic,
                group,
            )
            if added.endswith(" 1"):
                await tx.run(
                    "UPDATE conveyor_queue SET grp = $1 WHERE topic = $2 AND grp IS NULL",
                    group,
                    topic,
                )

        await self.db.run(self.error, "declare", body)

    async def publish(self, messages: Sequence[Message]) -> None:
        if messages:
            await self.db.run(self.error, "publish", lambda tx: self._publish(tx, messages))

    async def enqueue(self, group: str, messages: Sequence[Message]) -> None:
        if messages:
            await self.db.run(self.error, "enqueue", lambda tx: self._enqueue(tx, group, messages))

    async def fetch(
        self, topic: str, group: str, *, max_messages: int, lease: float
    ) -> list[Delivery]:
        return await self.db.run(
            self.error, "fetch", lambda tx: self._claim(tx, topic, group, max_messages, lease)
        )

    async def ack(self, deliveries: Sequence[Delivery]) -> int:
        if not deliveries:
            return 0
        receipts = [_receipt(d) for d in deliveries]

        async def body(tx: PostgresTransaction) -> int:
            status = await tx.run(
                "DELETE FROM conveyor_queue q USING unnest($1::bigint[], $2::text[]) AS d(seq, lease) "
                "WHERE q.seq = d.seq AND q.lease = d.lease",
                [r[0] for r in receipts],
                [r[1] for r in receipts],
            )
            return int(status.rsplit(" ", 1)[-1])

        return await self.db.run(self.error, "ack", body)

    async def nack(self, delivery: Delivery, *, delay: float) -> None:
        await self.db.run(self.error, "nack", lambda tx: self._nack(tx, [(delivery, delay)]))

    async def wait(self, topic: str, group: str, timeout: float) -> None:
        key = (topic, group)
        self._seen[key] = await self.db.wait_for(f"q:{topic}", self._seen.get(key), timeout)

    async def stats(self) -> list[QueueStats]:
        now = self.clock.time()
        rows = await self.db.fetch(
            self.error,
            """
            SELECT topic, COALESCE(grp, ''),
                   COUNT(*) FILTER (WHERE visible_at <= $1),
                   COUNT(*) FILTER (WHERE visible_at > $1 AND lease IS NOT NULL),
                   COUNT(*) FILTER (WHERE visible_at > $1 AND lease IS NULL),
                   MIN(created_at)
            FROM conveyor_queue GROUP BY topic, grp
            UNION ALL
            SELECT topic, grp, 0, 0, 0, NULL FROM conveyor_subscriptions s
            WHERE NOT EXISTS (SELECT 1 FROM conveyor_queue q
                              WHERE q.topic = s.topic AND q.grp = s.grp)
            ORDER BY 1, 2
            """,
            now,
        )
        return [
            QueueStats(
                r[0], r[1], int(r[2]), int(r[3]), int(r[4]), None if r[5] is None else float(r[5])
            )
            for r in rows
        ]

    async def _insert(
        self, tx: PostgresTransaction, rows: list[tuple[object, ...]], topics: set[str]
    ) -> None:
        columns = list(zip(*rows, strict=True))
        await tx.run(_INSERT, *(list(c) for c in columns))
        tx.notify.update(f"q:{t}" for t in topics)

    async def _lock_keys(self, tx: PostgresTransaction, messages: Sequence[Message]) -> None:
        # Rows of one key get their seq while its lock is held, and the lock is
        # released at commit: seq order is commit order within a key.
        keys = sorted({lock_id("key", m.topic, m.key or "") for m in messages if m.key is not None})
        if keys:
            await tx.run(
                "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k ORDER BY k", keys
            )

    async def _publish(self, tx: PostgresTransaction, messages: Sequence[Message]) -> None:
        topics = sorted({m.topic for m in messages})
        new = [t for t in topics if t not in tx.topics]
        if new:
            await tx.run(
                "SELECT pg_advisory_xact_lock_shared(t) FROM unnest($1::bigint[]) AS t ORDER BY t",
                sorted(lock_id("topic", t) for t in new),
            )
        await self._lock_keys(tx, messages)
        if new:
            found: dict[str, list[str | None]] = {t: [] for t in new}
            for topic, group in await tx.rows(
                "SELECT topic, grp FROM conveyor_subscriptions WHERE topic = ANY($1::text[])", new
            ):
                found[topic].append(group)
            tx.topics.update(found)
        groups = tx.topics
        now = self.clock.time()
        rows = []
        for message in messages:
            params = message_params(message)
            visible = max(now, message.not_before or 0.0)
            for group in groups[message.topic] or [None]:
                rows.append((group, *params, message.attempt, visible))
        await self._insert(tx, rows, set(topics))

    async def _enqueue(
        self, tx: PostgresTransaction, group: str, messages: Sequence[Message]
    ) -> None:
        await self._lock_keys(tx, messages)
        now = self.clock.time()
        rows = [
            (group, *message_params(m), m.attempt, max(now, m.not_before or 0.0)) for m in messages
        ]
        await self._insert(tx, rows, {m.topic for m in messages})

    async def _claim(
        self, tx: PostgresTransaction, topic: str, group: str, limit: int, lease: float
    ) -> list[Delivery]:
        token = uuid.uuid4().hex
        now = self.clock.time()
        rows = await tx.rows(_CLAIM, topic, group, now, limit, token, now + lease)
        return claimed(rows, topic=topic, group=group, token=token, queue=self.db.key)

    async def _nack(
        self, tx: PostgresTransaction, retries: Sequence[tuple[Delivery, float]]
    ) -> None:
        if not retries:
            return
        now = self.clock.time()
        receipts = [_receipt(d) for d, _ in retries]
        await tx.run(
            "UPDATE conveyor_queue q SET lease = NULL, visible_at = d.visible_at "
            "FROM unnest($1::bigint[], $2::text[], $3::float8[]) AS d(seq, lease, visible_at) "
            "WHERE q.seq = d.seq AND q.lease = d.lease",
            [r[0] for r in receipts],
            [r[1] for r in receipts],
            [now + max(0.0, delay) for _, delay in retries],
        )
        tx.notify.update(f"q:{d.message.topic}" for d, delay in retries if delay <= 0)


def _receipt(delivery: Delivery) -> tuple[int, str]:
    seq, lease = delivery.receipt.split(":", 1)
    return int(seq), lease


def _tx(tx: Transaction) -> PostgresTransaction:
    if not isinstance(tx, PostgresTransaction):
        raise BrokerError("a PostgreSQL broker binding needs a PostgreSQL store transaction")
    return tx


class _Binding:
    """The PostgreSQL broker acting inside a transaction of a store on the same
    database and namespace."""

    def __init__(self, broker: PostgresBroker) -> None:
        self._broker = broker

    async def claim(
        self, tx: Transaction, topic: str, group: str, limit: int, *, lease: float
    ) -> list[Delivery]:
        # A row delivered before (a retry, or one a dead worker held) is claimed
        # alone, and a batch stops short of it: if it kills the worker again,
        # it takes no batch-mate's attempt with it. The rows looked at stay
        # locked (SKIP LOCKED for everyone else) until this claim commits.
        ptx = _tx(tx)
        broker = self._broker
        now = broker.clock.time()
        ready = await ptx.rows(_READY_ATTEMPTS, topic, group, now, limit)
        if not ready:
            return []
        attempts = [r[1] for r in ready]
        fresh = next((i for i, a in enumerate(attempts) if a > 0), len(attempts))
        seqs = [r[0] for r in ready[: fresh or 1]]
        token = uuid.uuid4().hex
        rows = await ptx.rows(_CLAIM_SEQS, seqs, token, now + lease)
        return claimed(rows, topic=topic, group=group, token=token, queue=broker.db.key)

    async def ack(self, tx: Transaction, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            await _tx(tx).run(
                "DELETE FROM conveyor_queue WHERE seq = ANY($1::bigint[])",
                [_receipt(d)[0] for d in deliveries],
            )

    async def nack(self, tx: Transaction, retries: Sequence[tuple[Delivery, float]]) -> None:
        await self._broker._nack(_tx(tx), retries)

    async def publish(self, tx: Transaction, messages: Sequence[Message]) -> None:
        if messages:
            await self._broker._publish(_tx(tx), messages)

    async def enqueue(self, tx: Transaction, group: str, messages: Sequence[Message]) -> None:
        if messages:
            await self._broker._enqueue(_tx(tx), group, messages)
