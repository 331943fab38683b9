"""Saga rows in the store: portable SQL (SQLite and PostgreSQL, ``?`` placeholders)."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import Any

from conveyor.errors import SagaConflict
from conveyor.sagas._history import SagaEvent, SagaRecord
from conveyor.store._protocol import Store, Transaction

__all__ = [
    "SCHEMA",
    "create_tables",
    "due_sagas",
    "find_sagas",
    "insert_saga",
    "list_sagas",
    "load_events",
    "load_saga",
    "read_saga",
    "save_saga",
]

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS conveyor_sagas (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        state TEXT NOT NULL,
        phase TEXT NOT NULL,
        step INTEGER NOT NULL,
        done INTEGER NOT NULL,
        undo INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        token TEXT,
        deadline DOUBLE PRECISION,
        data TEXT NOT NULL,
        error TEXT NOT NULL,
        seq INTEGER NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS conveyor_sagas_state ON conveyor_sagas (state, created_at)",
    "CREATE INDEX IF NOT EXISTS conveyor_sagas_deadline ON conveyor_sagas (deadline)",
    """CREATE TABLE IF NOT EXISTS conveyor_saga_events (
        saga_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        type TEXT NOT NULL,
        step TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        detail TEXT NOT NULL,
        PRIMARY KEY (saga_id, seq)
    )""",
    # A participant's record of each (saga, step) it was asked about: what it
    # replied, or that the step was compensated (or voided) before it ran.
    """CREATE TABLE IF NOT EXISTS conveyor_saga_steps (
        saga_id TEXT NOT NULL,
        step TEXT NOT NULL,
        status TEXT NOT NULL,
        reply TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (saga_id, step)
    )""",
)

_COLUMNS = (
    "id, name, version, state, phase, step, done, undo, attempt, token, deadline, "
    "data, error, seq, created_at, updated_at"
)


async def create_tables(tx: Transaction) -> None:
    for statement in SCHEMA:
        await tx.execute(statement)


def _params(r: SagaRecord) -> list[object]:
    return [
        r.id,
        r.name,
        r.version,
        r.state,
        r.phase,
        r.step,
        r.done,
        r.undo,
        r.attempt,
        r.token,
        r.deadline,
        json.dumps(dict(r.data), separators=(",", ":")),
        r.error,
        r.seq,
        r.created_at,
        r.updated_at,
    ]


def _record(row: Sequence[Any]) -> SagaRecord:
    return SagaRecord(
        id=str(row[0]),
        name=str(row[1]),
        version=int(row[2]),
        state=str(row[3]),
        phase=str(row[4]),
        step=int(row[5]),
        done=int(row[6]),
        undo=int(row[7]),
        attempt=int(row[8]),
        token=None if row[9] is None else str(row[9]),
        deadline=None if row[10] is None else float(row[10]),
        data=json.loads(row[11]),
        error=str(row[12]),
        seq=int(row[13]),
        created_at=float(row[14]),
        updated_at=float(row[15]),
    )


def _event_rows(saga_id: str, events: Sequence[SagaEvent]) -> list[list[object]]:
    return [
        [saga_id, e.seq, e.type, e.step, e.at, json.dumps(dict(e.detail), separators=(",", ":"))]
        for e in events
    ]


async def _append(tx: Transaction, saga_id: str, events: Sequence[SagaEvent]) -> None:
    if events:
        await tx.executemany(
            "INSERT INTO conveyor_saga_events (saga_id, seq, type, step, at, detail) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            _event_rows(saga_id, events),
        )


async def insert_saga(tx: Transaction, record: SagaRecord, events: Sequence[SagaEvent]) -> bool:
    """Store a new saga and its first events; False, writing nothing, if the id
    exists (inserted by a concurrent transaction too: this one waits for it)."""
    inserted = await tx.execute(
        f"INSERT INTO conveyor_sagas ({_COLUMNS}) VALUES ({', '.join('?' * 16)}) "
        "ON CONFLICT (id) DO NOTHING",
        _params(record),
    )
    if inserted != 1:
        return False
    await _append(tx, record.id, events)
    return True


async def save_saga(
    tx: Transaction, before: int, record: SagaRecord, events: Sequence[SagaEvent]
) -> None:
    """Store ``record`` and append ``events`` if the row is still at ``before``;
    otherwise raise ``SagaConflict`` so the message is handled again."""
    params = _params(record)
    sets = ", ".join(f"{c} = ?" for c in _COLUMNS.split(", ")[1:])
    changed = await tx.execute(
        f"UPDATE conveyor_sagas SET {sets} WHERE id = ? AND seq = ?",
        [*params[1:], record.id, before],
    )
    if changed != 1:
        raise SagaConflict(f"saga {record.id} changed under this update; handling it again")
    await _append(tx, record.id, events)


async def due_sagas(
    tx: Transaction, now: float, *, names: Collection[str], limit: int
) -> list[str]:
    """Ids of sagas named in ``names`` awaiting a reply whose deadline has
    passed, earliest first."""
    if not names:
        return []
    marks = ", ".join("?" * len(names))
    rows = await tx.fetchall(
        "SELECT id FROM conveyor_sagas WHERE deadline IS NOT NULL AND deadline <= ? "
        f"AND state IN ('RUNNING', 'COMPENSATING') AND name IN ({marks}) "
        "ORDER BY deadline LIMIT ?",
        [now, *sorted(names), limit],
    )
    return [str(r[0]) for r in rows]


async def load_saga(tx: Transaction, saga_id: str) -> SagaRecord | None:
    row = await tx.fetchone(f"SELECT {_COLUMNS} FROM conveyor_sagas WHERE id = ?", [saga_id])
    return None if row is None else _record(row)


def _event(row: Sequence[Any]) -> SagaEvent:
    return SagaEvent(
        seq=int(row[0]),
        type=str(row[1]),
        step=str(row[2]),
        at=float(row[3]),
        detail=json.loads(row[4]),
    )


async def load_events(tx: Transaction, saga_id: str) -> list[SagaEvent]:
    rows = await tx.fetchall(
        "SELECT seq, type, step, at, detail FROM conveyor_saga_events WHERE saga_id = ? "
        "ORDER BY seq",
        [saga_id],
    )
    return [_event(r) for r in rows]


async def list_sagas(
    store: Store,
    *,
    states: Sequence[str] = (),
    name: str | None = None,
    limit: int = 100,
) -> list[SagaRecord]:
    """Sagas, newest first, filtered by state(s) and name."""
    where: list[str] = []
    params: list[object] = []
    if states:
        where.append(f"state IN ({', '.join('?' * len(states))})")
        params.extend(states)
    if name:
        where.append("name = ?")
        params.append(name)
    sql = f"SELECT {_COLUMNS} FROM conveyor_sagas"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
    async with store.transaction() as tx:
        await create_tables(tx)
        rows = await tx.fetchall(sql, [*params, limit])
    return [_record(r) for r in rows]


async def find_sagas(
    store: Store,
    *,
    states: Sequence[str] = (),
    name: str | None = None,
    created_before: float | None = None,
    stuck_at: float | None = None,
    limit: int = 100,
    after: tuple[float, str] | None = None,
) -> list[SagaRecord]:
    """Sagas newest first, a page at a time: ``after`` is the (created_at,
    id) of the last one of the previous page. ``stuck_at``: only active sagas
    whose awaited reply's deadline is before it (past their step's timeout)."""
    where: list[str] = []
    params: list[object] = []
    if states:
        where.append(f"state IN ({', '.join('?' * len(states))})")
        params.extend(states)
    if name:
        where.append("name = ?")
        params.append(name)
    if created_before is not None:
        where.append("created_at < ?")
        params.append(created_before)
    if stuck_at is not None:
        where.append(
            "state IN ('RUNNING', 'COMPENSATING') AND deadline IS NOT NULL AND deadline < ?"
        )
        params.append(stuck_at)
    if after is not None:
        where.append("(created_at < ? OR (created_at = ? AND id < ?))")
        params.extend([after[0], after[0], after[1]])
    sql = f"SELECT {_COLUMNS} FROM conveyor_sagas"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
    try:
        rows = await store.read(sql, [*params, limit])
    except Exception:
        return []  # no saga yet: the tables do not exist
    return [_record(r) for r in rows]


async def read_saga(store: Store, saga_id: str) -> tuple[SagaRecord, list[SagaEvent]] | None:
    """One saga and its history from committed rows (no write lock); None if unknown."""
    try:
        rows = await store.read(f"SELECT {_COLUMNS} FROM conveyor_sagas WHERE id = ?", [saga_id])
    except Exception:
        return None
    if not rows:
        return None
    events = await store.read(
        "SELECT seq, type, step, at, detail FROM conveyor_saga_events WHERE saga_id = ? "
        "ORDER BY seq",
        [saga_id],
    )
    return _record(rows[0]), [_event(r) for r in events]
