"""The message journal: each message's life, kept in the store for the
operations console (``conveyor.http.AdminAPI``'s search and story).

``Journal(app)`` is an observer: it notes every message published (through
the outbox or straight to the broker) and every settlement (applied,
duplicate, retry with its error, dead letter with its reason, rolled back),
with the message, correlation and trace ids, and the state of the app's
circuit breakers. The notes are buffered in memory (at most ``max_buffer``;
past that they are dropped and counted in ``dropped``) and written by a
periodic task of the worker every ``flush_every`` seconds, in a transaction
of their own, and once more when the worker stops: the journal never slows
or fails a handler's unit of work, and only a crash loses the last
unflushed notes. It is a diagnostic record,
not a guarantee: rows older than ``keep`` are pruned.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from datetime import timedelta

from conveyor._time import seconds
from conveyor.messages import Message, trace_id
from conveyor.resilience import BreakerState, CircuitBreaker
from conveyor.runtime._app import App
from conveyor.runtime._observe import Observer, Settlement
from conveyor.store._protocol import Store

__all__ = ["BREAKERS_SCHEMA", "JOURNAL_SCHEMA", "Journal"]

JOURNAL_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS conveyor_journal (
        at DOUBLE PRECISION NOT NULL,
        msg_id TEXT NOT NULL,
        correlation_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        grp TEXT NOT NULL,
        event TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        error_type TEXT NOT NULL,
        reason TEXT NOT NULL,
        trace_id TEXT NOT NULL,
        idem_key TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS conveyor_journal_corr ON conveyor_journal (correlation_id)",
    "CREATE INDEX IF NOT EXISTS conveyor_journal_msg ON conveyor_journal (msg_id)",
    "CREATE INDEX IF NOT EXISTS conveyor_journal_at ON conveyor_journal (at)",
)
BREAKERS_SCHEMA = """CREATE TABLE IF NOT EXISTS conveyor_breakers (
    name TEXT NOT NULL,
    process TEXT NOT NULL,
    state TEXT NOT NULL,
    open_until DOUBLE PRECISION,
    calls BIGINT NOT NULL,
    failures BIGINT NOT NULL,
    rejections BIGINT NOT NULL,
    opened BIGINT NOT NULL,
    guards TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (name, process)
)"""

_COLUMNS = (
    "at, msg_id, correlation_id, topic, grp, event, attempt, error_type, reason, trace_id, idem_key"
)
Row = tuple[float, str, str, str, str, str, int, str, str, str, str]
_REASON = 500


def _row(at: float, message: Message, group: str, event: str, error: str, reason: str) -> Row:
    return (
        at,
        message.id,
        message.correlation_id,
        message.topic,
        group,
        event,
        message.attempt,
        error,
        reason[:_REASON],
        trace_id(message.traceparent) or "",
        message.idempotency_key or "",
    )


async def create_tables(store: Store) -> None:
    async with store.transaction() as tx:
        for statement in (*JOURNAL_SCHEMA, BREAKERS_SCHEMA):
            await tx.execute(statement)


class Journal(Observer):
    """Keep each message's life and the app's breaker states in the store
    (see the module doc). Made with an app, it registers itself: its
    observer hooks, its tables (``on_connect``) and its flush (``every``)."""

    def __init__(
        self,
        app: App,
        *,
        keep: float | timedelta = timedelta(hours=1),
        flush_every: float | timedelta = 0.5,
        max_buffer: int = 50_000,
    ) -> None:
        self.app = app
        self.keep = seconds(keep)
        self.max_buffer = max_buffer
        self.dropped = 0
        self.process = f"{socket.gethostname()}:{os.getpid()}"
        self._rows: list[Row] = []
        self._pruned = 0.0
        app.observe(self)
        app.on_connect(self._tables)
        # Also once the worker's handlers are done: their last notes too.
        app.every(flush_every, at_stop=True)(self._periodic)

    async def _tables(self, app: App) -> None:
        await create_tables(app.store)

    def _add(self, rows: Sequence[Row]) -> None:
        room = self.max_buffer - len(self._rows)
        if room < len(rows):
            self.dropped += len(rows) - max(room, 0)
            rows = rows[: max(room, 0)]
        self._rows.extend(rows)

    def published(
        self, messages: Sequence[Message], *, via: str, seconds: float, error: BaseException | None
    ) -> None:
        if error is None and via != "relay":
            now = time.time()
            self._add([_row(now, m, "", "published", "", "") for m in messages])

    def settled(self, events: Sequence[Settlement]) -> None:
        now = time.time()
        self._add(
            [
                _row(e.finished or now, e.message, e.group, e.outcome, e.error_type, e.reason)
                for e in events
            ]
        )

    async def flush(self) -> int:
        """Write the buffered notes and the breakers' states now; returns
        how many notes were written."""
        return await self._flush(self.app)

    async def _periodic(self, app: App) -> None:
        await self._flush(app)

    async def _flush(self, app: App) -> int:
        rows, self._rows = self._rows, []
        try:
            await self._write(app, rows)
        except BaseException:
            self._rows, rows = rows, self._rows  # kept for the next turn
            self._add(rows)
            raise
        return len(rows)

    async def _write(self, app: App, rows: list[Row]) -> None:
        now = time.time()
        breakers: dict[str, tuple[CircuitBreaker, list[str]]] = {}
        for handler in app.handlers:
            for breaker in handler.breakers:
                entry = breakers.setdefault(breaker.name, (breaker, []))
                entry[1].append(f"{handler.topic}/{handler.group}")
        async with app.store.transaction() as tx:
            if rows:
                await tx.executemany(
                    f"INSERT INTO conveyor_journal ({_COLUMNS}) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            for name, (breaker, guards) in breakers.items():
                state = breaker.state
                until = now + breaker.retry_after if state is BreakerState.OPEN else None
                await tx.execute(
                    "INSERT INTO conveyor_breakers (name, process, state, open_until, calls, "
                    "failures, rejections, opened, guards, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name, process) DO UPDATE "
                    "SET state = excluded.state, open_until = excluded.open_until, "
                    "calls = excluded.calls, failures = excluded.failures, "
                    "rejections = excluded.rejections, opened = excluded.opened, "
                    "guards = excluded.guards, updated_at = excluded.updated_at",
                    (
                        name,
                        self.process,
                        state.name,
                        until,
                        breaker.calls,
                        breaker.failures,
                        breaker.rejections,
                        breaker.opened,
                        " ".join(sorted(guards)),
                        now,
                    ),
                )
            if now - self._pruned > 60:
                self._pruned = now
                await tx.execute("DELETE FROM conveyor_journal WHERE at < ?", (now - self.keep,))
                await tx.execute(
                    "DELETE FROM conveyor_breakers WHERE updated_at < ?", (now - self.keep,)
                )
