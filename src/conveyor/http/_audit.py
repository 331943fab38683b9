"""The audit log of the operations console: who did what, when, to which
selection, and how many records it changed (table ``conveyor_audit``).

An entry is written in the transaction of the write it records: a bulk
action that runs a batch per transaction inserts its entry with the first
batch and adds each later batch's count in that batch's transaction, so the
log never says more (or less) was done than was committed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from conveyor._time import Clock, SystemClock
from conveyor.messages import uuid7
from conveyor.store._protocol import Store, Transaction

__all__ = ["SCHEMA", "AuditEntry", "AuditLog"]

SCHEMA = """CREATE TABLE IF NOT EXISTS conveyor_audit (
    id TEXT PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    affected BIGINT NOT NULL
)"""

_COLUMNS = "id, at, actor, action, target, affected"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    """One admin action: ``actor`` is the API key's name ("" when keys are
    off), ``target`` the selection it acted on, ``affected`` how many
    records it changed."""

    id: str
    at: float
    actor: str
    action: str
    target: Mapping[str, Any]
    affected: int


class AuditLog:
    """The audit log in ``store``; ids are UUIDv7, so newest-first paging by
    id is paging by time."""

    def __init__(self, store: Store, *, clock: Clock | None = None) -> None:
        self.store = store
        self.clock: Clock = clock or SystemClock()

    async def ensure(self) -> None:
        async with self.store.transaction() as tx:
            await tx.execute(SCHEMA)

    async def record(
        self,
        tx: Transaction,
        *,
        actor: str,
        action: str,
        target: Mapping[str, Any],
        affected: int,
    ) -> str:
        """Insert an entry in ``tx``; returns its id (for ``add``)."""
        entry_id = uuid7()
        await tx.execute(
            f"INSERT INTO conveyor_audit ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (
                entry_id,
                self.clock.time(),
                actor,
                action,
                json.dumps(dict(target), sort_keys=True, default=str),
                affected,
            ),
        )
        return entry_id

    async def add(self, tx: Transaction, entry_id: str, affected: int) -> None:
        """Count ``affected`` more records to entry ``entry_id``, in ``tx``."""
        await tx.execute(
            "UPDATE conveyor_audit SET affected = affected + ? WHERE id = ?",
            (affected, entry_id),
        )

    async def entries(
        self,
        *,
        limit: int = 100,
        before: str | None = None,
        actor: str | None = None,
        action: str | None = None,
    ) -> list[AuditEntry]:
        """Newest first, up to ``limit``, with ids below ``before`` (the last
        id of the previous page)."""
        clauses: list[str] = []
        params: list[object] = []
        for column, value in (("id", before), ("actor", actor), ("action", action)):
            if value is not None:
                clauses.append(f"{column} {'<' if column == 'id' else '='} ?")
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        try:
            rows = await self.store.read(
                f"SELECT {_COLUMNS} FROM conveyor_audit {where}ORDER BY id DESC LIMIT ?",
                (*params, limit),
            )
        except Exception:
            return []  # no admin action yet: the table does not exist
        return [
            AuditEntry(
                id=str(r[0]),
                at=float(r[1]),
                actor=str(r[2]),
                action=str(r[3]),
                target=json.loads(r[4]),
                affected=int(r[5]),
            )
            for r in rows
        ]
