"""A store on PostgreSQL (asyncpg): ``postgresql://user@host:port/db?namespace=NAME``.

The namespace is a schema (created if missing) holding the inbox, outbox and
dead letters and the application's own tables: every connection runs with
``search_path`` set to it. ``Transaction`` SQL is PostgreSQL's with ``?``
placeholders, translated to ``$1..$n`` outside string literals, quoted
identifiers and comments. ``outbox_add`` sends ``NOTIFY`` in the writing
transaction, so a relay in ``wait_outbox`` wakes as soon as it commits.

With a PostgreSQL broker on the same URL, the broker binds to this store and
the whole unit of work (claim aside) is one PostgreSQL transaction. URL
options: see ``conveyor._postgres``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from conveyor._postgres import (
    MESSAGE_COLUMNS,
    PostgresBacked,
    PostgresTransaction,
    message_from_row,
    message_params,
    translate,
)
from conveyor.errors import StoreError
from conveyor.messages import Message
from conveyor.store._protocol import DeadLetterFilter, DeadLetterRecord, OutboxStats, Transaction

__all__ = ["PostgresStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conveyor_inbox (
    grp TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    processed_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (grp, msg_id)
);
CREATE INDEX IF NOT EXISTS conveyor_inbox_age ON conveyor_inbox (processed_at);
CREATE TABLE IF NOT EXISTS conveyor_outbox (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    msg_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    type TEXT NOT NULL,
    key TEXT,
    priority INTEGER NOT NULL,
    headers TEXT NOT NULL,
    payload BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    not_before DOUBLE PRECISION,
    leased_until DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS conveyor_dead (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    grp TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    type TEXT NOT NULL,
    key TEXT,
    priority INTEGER NOT NULL,
    headers TEXT NOT NULL,
    payload BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL,
    error_type TEXT NOT NULL,
    traceback TEXT NOT NULL,
    dead_at DOUBLE PRECISION NOT NULL,
    UNIQUE (grp, msg_id)
);
"""

_OUTBOX = "outbox"


def _tx(tx: Transaction) -> PostgresTransaction:
    if not isinstance(tx, PostgresTransaction):
        raise StoreError("a PostgreSQL store needs its own transaction object")
    return tx


class PostgresStore(PostgresBacked):
    """Store on PostgreSQL: ``postgresql://user@host:port/db?namespace=NAME``."""

    role = "store"
    schema = _SCHEMA
    error = StoreError

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """A read-committed transaction; commits when the block exits normally."""
        async with self.db.transaction(self.error) as tx:
            yield tx

    async def read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        rows = await self.db.fetch(self.error, translate(sql), *params)
        return [tuple(r) for r in rows]

    async def inbox_add(self, tx: Transaction, group: str, message_id: str) -> bool:
        status = await _tx(tx).run(
            "INSERT INTO conveyor_inbox (grp, msg_id, processed_at) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING",
            group,
            message_id,
            self.clock.time(),
        )
        return status.endswith(" 1")

    async def inbox_seen(self, tx: Transaction, group: str, message_ids: Sequence[str]) -> set[str]:
        if not message_ids:
            return set()
        # One index probe per id, whatever the table's statistics say: with
        # "msg_id = ANY($2)" a young inbox (not analyzed yet) gets a plan that
        # scans every row of the group.
        rows = await _tx(tx).rows(
            "SELECT i.msg_id FROM unnest($2::text[]) AS u(id) CROSS JOIN LATERAL "
            "(SELECT msg_id FROM conveyor_inbox WHERE grp = $1 AND msg_id = u.id LIMIT 1) i",
            group,
            list(message_ids),
        )
        return {r[0] for r in rows}

    async def inbox_add_many(self, tx: Transaction, group: str, message_ids: Sequence[str]) -> None:
        if message_ids:
            await _tx(tx).run(
                "INSERT INTO conveyor_inbox (grp, msg_id, processed_at) "
                "SELECT $1, unnest($2::text[]), $3",
                group,
                list(message_ids),
                self.clock.time(),
            )

    async def outbox_add(self, tx: Transaction, messages: Sequence[Message]) -> None:
        if not messages:
            return
        ptx = _tx(tx)
        columns = list(zip(*[(*message_params(m), m.not_before) for m in messages], strict=True))
        await ptx.run(
            f"INSERT INTO conveyor_outbox ({MESSAGE_COLUMNS}, not_before) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], "
            "$6::text[], $7::bytea[], $8::float8[], $9::float8[])",
            *(list(c) for c in columns),
        )
        ptx.notify.add(_OUTBOX)

    async def outbox_claim(self, *, limit: int, lease: float) -> list[tuple[int, Message]]:
        now = self.clock.time()

        async def body(tx: PostgresTransaction) -> list[tuple[int, Message]]:
            rows = await tx.rows(
                f"""UPDATE conveyor_outbox SET leased_until = $1
                WHERE seq IN (SELECT seq FROM conveyor_outbox WHERE leased_until <= $2
                              ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED)
                RETURNING seq, not_before, {MESSAGE_COLUMNS}""",
                now + lease,
                now,
                limit,
            )
            out = []
            for row in sorted(rows, key=lambda r: int(r[0])):
                message = message_from_row(tuple(row)[2:])
                if row[1] is not None:
                    object.__setattr__(message, "not_before", row[1])
                out.append((int(row[0]), message))
            return out

        return await self.db.run(self.error, "outbox claim", body)

    async def outbox_done(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        seqs = list(ids)

        async def body(tx: PostgresTransaction) -> None:
            await tx.run("DELETE FROM conveyor_outbox WHERE seq = ANY($1::bigint[])", seqs)

        await self.db.run(self.error, "outbox done", body)

    async def wait_outbox(self, timeout: float) -> None:
        await self.db.wait_for(_OUTBOX, None, timeout)

    async def outbox_stats(self) -> OutboxStats:
        [(count, oldest)] = await self.db.fetch(
            self.error, "SELECT COUNT(*), MIN(created_at) FROM conveyor_outbox"
        )
        return OutboxStats(int(count), None if oldest is None else float(oldest))

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
        await _tx(tx).run(
            f"INSERT INTO conveyor_dead (grp, {MESSAGE_COLUMNS}, attempts, reason, "
            "error_type, traceback, dead_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) "
            "ON CONFLICT (grp, msg_id) DO UPDATE SET topic = EXCLUDED.topic, "
            "type = EXCLUDED.type, key = EXCLUDED.key, priority = EXCLUDED.priority, "
            "headers = EXCLUDED.headers, payload = EXCLUDED.payload, "
            "created_at = EXCLUDED.created_at, attempts = EXCLUDED.attempts, "
            "reason = EXCLUDED.reason, error_type = EXCLUDED.error_type, "
            "traceback = EXCLUDED.traceback, dead_at = EXCLUDED.dead_at",
            group,
            *message_params(message),
            message.attempt,
            reason,
            error_type,
            traceback,
            self.clock.time(),
        )

    async def dead_letters(
        self, where: DeadLetterFilter | None = None, *, limit: int = 1000, after: int = 0
    ) -> list[DeadLetterRecord]:
        clause, params = _where(where, after)
        rows = await self.db.fetch(
            self.error,
            f"SELECT id, grp, attempts, reason, error_type, traceback, dead_at, "
            f"{MESSAGE_COLUMNS} FROM conveyor_dead {clause} ORDER BY id LIMIT ${len(params) + 1}",
            *params,
            limit,
        )
        return [
            DeadLetterRecord(
                id=int(r[0]),
                group=r[1],
                attempts=int(r[2]),
                reason=r[3],
                error_type=r[4],
                traceback=r[5],
                dead_at=float(r[6]),
                message=message_from_row(tuple(r)[7:], int(r[2])),
            )
            for r in rows
        ]

    async def delete_dead_letters(self, tx: Transaction, ids: Sequence[int]) -> int:
        if not ids:
            return 0
        status = await _tx(tx).run(
            "DELETE FROM conveyor_dead WHERE id = ANY($1::bigint[])", [int(i) for i in ids]
        )
        return int(status.rsplit(" ", 1)[-1])

    async def dead_letter_count(self, where: DeadLetterFilter | None = None) -> int:
        clause, params = _where(where)
        [(count,)] = await self.db.fetch(
            self.error, f"SELECT COUNT(*) FROM conveyor_dead {clause}", *params
        )
        return int(count)

    async def dead_letter_counts(self) -> dict[tuple[str, str], int]:
        rows = await self.db.fetch(
            self.error, "SELECT topic, grp, COUNT(*) FROM conveyor_dead GROUP BY topic, grp"
        )
        return {(r[0], r[1]): int(r[2]) for r in rows}

    async def prune_inbox(self, *, older_than: float) -> int:
        async def body(tx: PostgresTransaction) -> int:
            status = await tx.run("DELETE FROM conveyor_inbox WHERE processed_at < $1", older_than)
            return int(status.rsplit(" ", 1)[-1])

        return await self.db.run(self.error, "prune inbox", body)


def _where(where: DeadLetterFilter | None, after: int = 0) -> tuple[str, tuple[object, ...]]:
    params: list[object] = [after]
    clauses: list[str] = ["id > $1"]
    if where is None:
        return "WHERE id > $1", (after,)
    if where.ids is not None:
        params.append([int(i) for i in where.ids])
        clauses.append(f"id = ANY(${len(params)}::bigint[])")
    for column, op, value in (
        ("grp", "=", where.group),
        ("topic", "=", where.topic),
        ("error_type", "=", where.error_type),
        ("dead_at", ">=", where.dead_since),
        ("dead_at", "<", where.dead_before),
    ):
        if value is not None:
            params.append(value)
            clauses.append(f"{column} {op} ${len(params)}")
    if where.reason_contains is not None:
        params.append(where.reason_contains)
        clauses.append(f"strpos(reason, ${len(params)}) > 0")
    return "WHERE " + " AND ".join(clauses), tuple(params)
