"""Worker heartbeats in the store: who is consuming what, right now.

Every worker writes a row of ``conveyor_workers`` when it starts and again
every ``heartbeat_interval`` seconds (id, app, host, pid, its handlers'
(topic, group) pairs, when it started, when it was last seen, how many
messages it is handling and has handled), and deletes it when it stops
gracefully. A worker is *live* while its last beat is younger than three
of its intervals: a queue with no live consumer can then be told apart from
a slow one (``conveyor workers``, the ``conveyor_consumers`` gauge).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from conveyor.store._protocol import Store

__all__ = ["SCHEMA", "WorkerInfo", "beat", "forget", "live_workers", "workers"]

SCHEMA = """CREATE TABLE IF NOT EXISTS conveyor_workers (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    handlers TEXT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL,
    beat_every DOUBLE PRECISION NOT NULL,
    in_flight INTEGER NOT NULL,
    processed BIGINT NOT NULL
)"""

_COLUMNS = "id, app, host, pid, handlers, started_at, last_seen, beat_every, in_flight, processed"


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerInfo:
    """One worker process as its last heartbeat left it."""

    id: str
    app: str
    host: str
    pid: int
    handlers: tuple[tuple[str, str], ...]
    started_at: float
    last_seen: float
    beat_every: float
    in_flight: int
    processed: int

    def live(self, now: float) -> bool:
        """Whether it beat within three of its intervals."""
        return now - self.last_seen <= 3 * self.beat_every

    @classmethod
    def of_this_process(
        cls, *, id: str, app: str, handlers: Sequence[tuple[str, str]], started_at: float
    ) -> WorkerInfo:
        return cls(
            id=id,
            app=app,
            host=socket.gethostname(),
            pid=os.getpid(),
            handlers=tuple(handlers),
            started_at=started_at,
            last_seen=started_at,
            beat_every=0.0,
            in_flight=0,
            processed=0,
        )


async def beat(store: Store, info: WorkerInfo) -> None:
    """Write ``info`` (creating the table the first time)."""
    values = (
        info.id,
        info.app,
        info.host,
        info.pid,
        json.dumps([list(h) for h in info.handlers]),
        info.started_at,
        info.last_seen,
        info.beat_every,
        info.in_flight,
        info.processed,
    )
    async with store.transaction() as tx:
        await tx.execute(SCHEMA)
        await tx.execute(
            f"INSERT INTO conveyor_workers ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen, "
            "beat_every = excluded.beat_every, in_flight = excluded.in_flight, "
            "processed = excluded.processed, handlers = excluded.handlers",
            values,
        )


async def forget(store: Store, worker_id: str) -> None:
    """Remove a worker that stopped; its row would otherwise go stale."""
    async with store.transaction() as tx:
        await tx.execute(SCHEMA)
        await tx.execute("DELETE FROM conveyor_workers WHERE id = ?", (worker_id,))


async def workers(store: Store) -> list[WorkerInfo]:
    """Every row, newest beat first (an empty list when no worker ever beat)."""
    try:
        rows = await store.read(f"SELECT {_COLUMNS} FROM conveyor_workers ORDER BY last_seen DESC")
    except Exception:
        return []  # the table does not exist yet
    out = []
    for r in rows:
        out.append(
            WorkerInfo(
                id=str(r[0]),
                app=str(r[1]),
                host=str(r[2]),
                pid=int(r[3]),
                handlers=tuple((str(t), str(g)) for t, g in json.loads(r[4])),
                started_at=float(r[5]),
                last_seen=float(r[6]),
                beat_every=float(r[7]),
                in_flight=int(r[8]),
                processed=int(r[9]),
            )
        )
    return out


async def live_workers(store: Store, *, now: float | None = None) -> list[WorkerInfo]:
    """The workers that beat recently (see ``WorkerInfo.live``)."""
    moment = time.time() if now is None else now
    return [w for w in await workers(store) if w.live(moment)]
