"""The embedded default broker: one SQLite file in WAL mode.

Durable across process crashes (power-loss durability needs
``?synchronous=full``), safe for several processes on one machine. One row
per (group, message); a lease is a token plus a visibility time, so a message
held by a killed process is delivered again once the lease runs out.

When the store is the same database, ``bind`` lets the runtime handle,
publish and acknowledge a claimed batch in one transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager

from conveyor._rows import claimed
from conveyor._sqlite import (
    MESSAGE_COLUMNS,
    Database,
    SqliteBacked,
    SqliteTransaction,
    Version,
    message_params,
)
from conveyor._time import Clock
from conveyor.brokers._protocol import BrokerBinding, Capabilities, Delivery, QueueStats
from conveyor.errors import BrokerError
from conveyor.messages import DEFAULT_MAX_PAYLOAD, Message
from conveyor.store._protocol import Store, Transaction

__all__ = ["SqliteBroker"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conveyor_queue (
    seq INTEGER PRIMARY KEY,
    grp TEXT,
    msg_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    type TEXT NOT NULL,
    key TEXT,
    priority INTEGER NOT NULL,
    headers TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    visible_at REAL NOT NULL,
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
) WITHOUT ROWID;
"""

_INSERT = (
    f"INSERT INTO conveyor_queue (grp, {MESSAGE_COLUMNS}, attempt, visible_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

# Ready = visible now and, when keyed, the oldest row of its key in this queue.
_READY = """
    FROM conveyor_queue q
    WHERE q.topic = ? AND q.grp = ? AND q.visible_at <= ?
      AND (q.key IS NULL OR NOT EXISTS (
          SELECT 1 FROM conveyor_queue p
          WHERE p.topic = q.topic AND p.grp = q.grp AND p.key = q.key AND p.seq < q.seq))
    ORDER BY q.priority DESC, q.seq
    LIMIT ?"""

_CLAIM = f"""
UPDATE conveyor_queue SET lease = ?, visible_at = ?, attempt = attempt + 1
WHERE seq IN (SELECT q.seq {_READY})
RETURNING seq, attempt, {MESSAGE_COLUMNS}
"""

_READY_ATTEMPTS = f"SELECT q.attempt {_READY}"


class SqliteBroker(SqliteBacked):
    """Broker on a SQLite file: ``sqlite:///conveyor.db``."""

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
        self._seen: dict[tuple[str, str], Version] = {}
        self._binding = _Binding(self)

    def bind(self, store: Store) -> BrokerBinding | None:
        db = getattr(store, "db", None)
        if isinstance(db, Database) and self._db is not None and db.key == self._db.key:
            return self._binding
        return None

    async def declare(self, topic: str, group: str) -> None:
        async with self._write() as tx:
            added = tx.run(
                "INSERT OR IGNORE INTO conveyor_subscriptions (topic, grp) VALUES (?, ?)",
                (topic, group),
            ).rowcount
            if added:
                tx.run(
                    "UPDATE conveyor_queue SET grp = ? WHERE topic = ? AND grp IS NULL",
                    (group, topic),
                )

    async def publish(self, messages: Sequence[Message]) -> None:
        async with self._write() as tx:
            self._publish(tx, messages)

    async def enqueue(self, group: str, messages: Sequence[Message]) -> None:
        async with self._write() as tx:
            self._enqueue(tx, group, messages)

    async def fetch(
        self, topic: str, group: str, *, max_messages: int, lease: float
    ) -> list[Delivery]:
        async with self._write() as tx:
            return self._claim(tx, topic, group, max_messages, lease)

    async def ack(self, deliveries: Sequence[Delivery]) -> int:
        async with self._write() as tx:
            done = 0
            for delivery in deliveries:
                seq, lease = _receipt(delivery)
                done += tx.run(
                    "DELETE FROM conveyor_queue WHERE seq = ? AND lease = ?", (seq, lease)
                ).rowcount
            return done

    async def nack(self, delivery: Delivery, *, delay: float) -> None:
        async with self._write() as tx:
            self._nack(tx, delivery, delay)

    async def wait(self, topic: str, group: str, timeout: float) -> None:
        key = (topic, group)
        since = self._seen.get(key)
        if since is None:
            since = self.db.version()
        self._seen[key] = await self.db.wait_for_change(since, timeout)

    async def stats(self) -> list[QueueStats]:
        now = self.clock.time()
        rows = self.db.read(
            """
            SELECT topic, COALESCE(grp, ''),
                   SUM(visible_at <= ?),
                   SUM(visible_at > ? AND lease IS NOT NULL),
                   SUM(visible_at > ? AND lease IS NULL),
                   MIN(created_at)
            FROM conveyor_queue GROUP BY topic, grp
            UNION ALL
            SELECT topic, grp, 0, 0, 0, NULL FROM conveyor_subscriptions s
            WHERE NOT EXISTS (SELECT 1 FROM conveyor_queue q
                              WHERE q.topic = s.topic AND q.grp = s.grp)
            ORDER BY 1, 2
            """,
            (now, now, now),
        )
        return [
            QueueStats(
                r[0], r[1], int(r[2]), int(r[3]), int(r[4]), None if r[5] is None else float(r[5])
            )
            for r in rows
        ]

    def _write(self) -> AbstractAsyncContextManager[SqliteTransaction]:
        return self.db.transaction()

    def _publish(self, tx: SqliteTransaction, messages: Sequence[Message]) -> None:
        by_topic: dict[str, list[str | None]] = {}
        rows = []
        now = self.clock.time()
        for message in messages:
            groups = by_topic.get(message.topic)
            if groups is None:
                groups = by_topic[message.topic] = [
                    r[0]
                    for r in tx.run(
                        "SELECT grp FROM conveyor_subscriptions WHERE topic = ?", (message.topic,)
                    )
                ]
            params = message_params(message)
            visible = max(now, message.not_before or 0.0)
            for group in groups or (None,):
                rows.append((group, *params, message.attempt, visible))
        tx.runmany(_INSERT, rows)
        tx.published = True

    def _enqueue(self, tx: SqliteTransaction, group: str, messages: Sequence[Message]) -> None:
        now = self.clock.time()
        tx.runmany(
            _INSERT,
            [
                (group, *message_params(m), m.attempt, max(now, m.not_before or 0.0))
                for m in messages
            ],
        )
        tx.published = True

    def _claim(
        self, tx: SqliteTransaction, topic: str, group: str, limit: int, lease: float
    ) -> list[Delivery]:
        token = uuid.uuid4().hex
        now = self.clock.time()
        rows = tx.run(_CLAIM, (token, now + lease, topic, group, now, limit)).fetchall()
        return claimed(rows, topic=topic, group=group, token=token, queue=self.db.key)

    def _nack(self, tx: SqliteTransaction, delivery: Delivery, delay: float) -> None:
        seq, lease = _receipt(delivery)
        tx.run(
            "UPDATE conveyor_queue SET lease = NULL, visible_at = ? WHERE seq = ? AND lease = ?",
            (self.clock.time() + max(0.0, delay), seq, lease),
        )


def _receipt(delivery: Delivery) -> tuple[int, str]:
    seq, lease = delivery.receipt.split(":", 1)
    return int(seq), lease


def _tx(tx: Transaction) -> SqliteTransaction:
    if not isinstance(tx, SqliteTransaction):
        raise BrokerError("a SQLite broker binding needs a SQLite store transaction")
    return tx


class _Binding:
    """The SQLite broker acting inside a transaction of a store on the same file."""

    def __init__(self, broker: SqliteBroker) -> None:
        self._broker = broker

    async def claim(
        self, tx: Transaction, topic: str, group: str, limit: int, *, lease: float
    ) -> list[Delivery]:
        # A row delivered before (a retry, or one a dead worker held) is claimed
        # alone, and a batch stops short of it: if it kills the worker again,
        # it takes no batch-mate's attempt with it.
        stx = _tx(tx)
        now = self._broker.clock.time()
        attempts = [r[0] for r in stx.run(_READY_ATTEMPTS, (topic, group, now, limit))]
        if not attempts:
            return []
        fresh = next((i for i, a in enumerate(attempts) if a > 0), len(attempts))
        return self._broker._claim(stx, topic, group, fresh or 1, lease)

    async def ack(self, tx: Transaction, deliveries: Sequence[Delivery]) -> None:
        _tx(tx).runmany(
            "DELETE FROM conveyor_queue WHERE seq = ?", [(_receipt(d)[0],) for d in deliveries]
        )

    async def nack(self, tx: Transaction, retries: Sequence[tuple[Delivery, float]]) -> None:
        stx = _tx(tx)
        for delivery, delay in retries:
            self._broker._nack(stx, delivery, delay)

    async def publish(self, tx: Transaction, messages: Sequence[Message]) -> None:
        self._broker._publish(_tx(tx), messages)

    async def enqueue(self, tx: Transaction, group: str, messages: Sequence[Message]) -> None:
        self._broker._enqueue(_tx(tx), group, messages)
