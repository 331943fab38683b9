"""The embedded default store: SQLite (WAL). Shares its connection with a
SQLite broker on the same file, so one commit covers the whole unit of work."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from conveyor._sqlite import (
    MESSAGE_COLUMNS,
    SqliteBacked,
    SqliteTransaction,
    message_from_row,
    message_params,
)
from conveyor.errors import StoreError
from conveyor.messages import Message
from conveyor.store._protocol import DeadLetterFilter, DeadLetterRecord, OutboxStats, Transaction

__all__ = ["SqliteStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conveyor_inbox (
    grp TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    processed_at REAL NOT NULL,
    PRIMARY KEY (grp, msg_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS conveyor_inbox_age ON conveyor_inbox (processed_at);
CREATE TABLE IF NOT EXISTS conveyor_outbox (
    seq INTEGER PRIMARY KEY,
    msg_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    type TEXT NOT NULL,
    key TEXT,
    priority INTEGER NOT NULL,
    headers TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    not_before REAL,
    leased_until REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS conveyor_dead (
    id INTEGER PRIMARY KEY,
    grp TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    type TEXT NOT NULL,
    key TEXT,
    priority INTEGER NOT NULL,
    headers TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL,
    error_type TEXT NOT NULL,
    traceback TEXT NOT NULL,
    dead_at REAL NOT NULL,
    UNIQUE (grp, msg_id)
);
"""


def _tx(tx: Transaction) -> SqliteTransaction:
    if not isinstance(tx, SqliteTransaction):
        raise StoreError("a SQLite store needs its own transaction object")
    return tx


class SqliteStore(SqliteBacked):
    """Store on a SQLite file: ``sqlite:///conveyor.db``."""

    role = "store"
    schema = _SCHEMA
    error = StoreError

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with self.db.transaction() as tx:
            yield tx

    async def read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self.db.read(sql, params)

    async def inbox_add(self, tx: Transaction, group: str, message_id: str) -> bool:
        cur = _tx(tx).run(
            "INSERT OR IGNORE INTO conveyor_inbox (grp, msg_id, processed_at) VALUES (?, ?, ?)",
            (group, message_id, self.clock.time()),
        )
        return cur.rowcount == 1

    async def inbox_seen(self, tx: Transaction, group: str, message_ids: Sequence[str]) -> set[str]:
        stx = _tx(tx)
        seen: set[str] = set()
        ids = list(message_ids)
        for i in range(0, len(ids), 500):  # below SQLite's bound-parameter limit
            chunk = ids[i : i + 500]
            seen.update(
                r[0]
                for r in stx.run(
                    "SELECT msg_id FROM conveyor_inbox WHERE grp = ? "
                    f"AND msg_id IN ({', '.join('?' * len(chunk))})",
                    (group, *chunk),
                )
            )
        return seen

    async def inbox_add_many(self, tx: Transaction, group: str, message_ids: Sequence[str]) -> None:
        now = self.clock.time()
        try:
            _tx(tx).runmany(
                "INSERT INTO conveyor_inbox (grp, msg_id, processed_at) VALUES (?, ?, ?)",
                [(group, i, now) for i in message_ids],
            )
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"inbox of {group!r}: a message id is already recorded") from exc

    async def outbox_add(self, tx: Transaction, messages: Sequence[Message]) -> None:
        stx = _tx(tx)
        stx.runmany(
            f"INSERT INTO conveyor_outbox ({MESSAGE_COLUMNS}, not_before) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(*message_params(m), m.not_before) for m in messages],
        )
        stx.published = True

    async def outbox_claim(self, *, limit: int, lease: float) -> list[tuple[int, Message]]:
        now = self.clock.time()
        async with self.db.transaction() as tx:
            rows = tx.run(
                f"""UPDATE conveyor_outbox SET leased_until = ?
                WHERE seq IN (SELECT seq FROM conveyor_outbox WHERE leased_until <= ?
                              ORDER BY seq LIMIT ?)
                RETURNING seq, not_before, {MESSAGE_COLUMNS}""",
                (now + lease, now, limit),
            ).fetchall()
        rows.sort()
        out = []
        for row in rows:
            message = message_from_row(row[2:])
            if row[1] is not None:
                object.__setattr__(message, "not_before", row[1])
            out.append((int(row[0]), message))
        return out

    async def outbox_done(self, ids: Sequence[int]) -> None:
        async with self.db.transaction() as tx:
            tx.runmany("DELETE FROM conveyor_outbox WHERE seq = ?", [(i,) for i in ids])

    async def wait_outbox(self, timeout: float) -> None:
        await self.db.wait_for_change(self.db.version(), timeout)

    async def outbox_stats(self) -> OutboxStats:
        [(count, oldest)] = self.db.read("SELECT COUNT(*), MIN(created_at) FROM conveyor_outbox")
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
        _tx(tx).run(
            f"INSERT OR REPLACE INTO conveyor_dead (grp, {MESSAGE_COLUMNS}, attempts, reason, "
            "error_type, traceback, dead_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                group,
                *message_params(message),
                message.attempt,
                reason,
                error_type,
                traceback,
                self.clock.time(),
            ),
        )

    async def dead_letters(
        self, where: DeadLetterFilter | None = None, *, limit: int = 1000, after: int = 0
    ) -> list[DeadLetterRecord]:
        clause, params = _where(where, after)
        rows = self.db.read(
            f"SELECT id, grp, attempts, reason, error_type, traceback, dead_at, "
            f"{MESSAGE_COLUMNS} FROM conveyor_dead {clause} ORDER BY id LIMIT ?",
            (*params, limit),
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
                message=message_from_row(r[7:], int(r[2])),
            )
            for r in rows
        ]

    async def delete_dead_letters(self, tx: Transaction, ids: Sequence[int]) -> int:
        cur = _tx(tx).runmany("DELETE FROM conveyor_dead WHERE id = ?", [(i,) for i in ids])
        return cur.rowcount

    async def dead_letter_count(self, where: DeadLetterFilter | None = None) -> int:
        clause, params = _where(where)
        [(count,)] = self.db.read(f"SELECT COUNT(*) FROM conveyor_dead {clause}", params)
        return int(count)

    async def dead_letter_counts(self) -> dict[tuple[str, str], int]:
        rows = self.db.read("SELECT topic, grp, COUNT(*) FROM conveyor_dead GROUP BY topic, grp")
        return {(r[0], r[1]): int(r[2]) for r in rows}

    async def prune_inbox(self, *, older_than: float) -> int:
        async with self.db.transaction() as tx:
            return tx.run(
                "DELETE FROM conveyor_inbox WHERE processed_at < ?", (older_than,)
            ).rowcount


def _where(where: DeadLetterFilter | None, after: int = 0) -> tuple[str, tuple[object, ...]]:
    clauses: list[str] = ["id > ?"]
    params: list[object] = [after]
    if where is None:
        return "WHERE id > ?", (after,)
    if where.ids is not None:
        ids = list(where.ids) or [-1]
        clauses.append(f"id IN ({', '.join('?' * len(ids))})")
        params.extend(ids)
    for column, op, value in (
        ("grp", "=", where.group),
        ("topic", "=", where.topic),
        ("error_type", "=", where.error_type),
        ("dead_at", ">=", where.dead_since),
        ("dead_at", "<", where.dead_before),
    ):
        if value is not None:
            clauses.append(f"{column} {op} ?")
            params.append(value)
    if where.reason_contains is not None:
        clauses.append("instr(reason, ?) > 0")
        params.append(where.reason_contains)
    return "WHERE " + " AND ".join(clauses), tuple(params)
