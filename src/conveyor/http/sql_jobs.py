"""A ``JobStore`` on the App's SQL store (SQLite or PostgreSQL).

Tables are created with portable SQL (``CREATE TABLE IF NOT EXISTS``, ``?``
placeholders, TEXT / DOUBLE PRECISION columns). ``accept`` inserts the job
and queues its message through ``App.transaction()``: one transaction with
the store's outbox, so a job is queued if and only if its record commits.

The live state of a running job (RUNNING, progress, note, a cancel request)
is kept apart from the record, in ``conveyor_job_live``, and written in
transactions of its own: the handler's unit of work holds its transaction
open while the job runs. On PostgreSQL that table sits in the same schema
(another pooled connection writes it); on SQLite, whose one writer per file
is the running unit of work, it sits in a companion file next to the
database (``<file>.jobs-live``), so progress and ``DELETE`` never wait for
a running job. A status read merges the two. The final state goes into the
record in the handler's own transaction; before that, the handler claims it
in the live row (committed at once). A cancel and a claim race on that one
row: a cancel that came first wins (the job ends CANCELLED, its result is
dropped), and a cancel that comes after the claim answers the claimed final
state, even while the handler's transaction is still committing.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from conveyor._sqlite import Database
from conveyor._time import Clock, SystemClock
from conveyor.brokers._protocol import TransactionalBroker
from conveyor.errors import ConfigError, ConveyorError, StoreError
from conveyor.http._jobs import (
    CANCELLED,
    FINAL,
    RUNNING,
    SUCCEEDED,
    IdempotencyRecord,
    JobRecord,
    StoredResponse,
)
from conveyor.http._json import json_text
from conveyor.messages import CORRELATION_ID
from conveyor.runtime import App, Session
from conveyor.runtime._context import Publisher
from conveyor.store._protocol import Store, Transaction
from conveyor.store.sqlite import SqliteStore

__all__ = ["SqlJobStore", "read_rows"]

_JOBS = """
CREATE TABLE IF NOT EXISTS conveyor_jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    progress DOUBLE PRECISION,
    note TEXT,
    result TEXT,
    error TEXT,
    callback_url TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION,
    expires_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS conveyor_jobs_expiry ON conveyor_jobs (expires_at);
CREATE TABLE IF NOT EXISTS conveyor_idempotency (
    owner TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    response TEXT,
    lease_until DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (owner, idem_key)
);
CREATE INDEX IF NOT EXISTS conveyor_idempotency_expiry ON conveyor_idempotency (expires_at);
"""

_LIVE = """
CREATE TABLE IF NOT EXISTS conveyor_job_live (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    progress DOUBLE PRECISION,
    note TEXT,
    updated_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS conveyor_job_live_expiry ON conveyor_job_live (expires_at);
"""

_COLUMNS = (
    "id, kind, owner, status, progress, note, result, error, callback_url, "
    "created_at, updated_at, finished_at, expires_at"
)
# A live row outlives any sensible silence of a running job; it is refreshed
# on every progress report and deleted once past this.
_LIVE_KEEP = 24 * 3600.0
_FINAL_SQL = ", ".join(f"'{s}'" for s in sorted(FINAL))


async def read_rows(store: Store, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    """Committed rows, without taking a write lock (``Store.read``)."""
    return await store.read(sql, params)


class SqlJobStore:
    """Job records in the App's store (SQLite or PostgreSQL); see the module doc.

    ``clock`` stamps records and decides expiry (inject a ``FakeClock`` in tests).
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self._app: App | None = None
        self._store: Store | None = None
        self._live_db: Database | None = None

    @property
    def app(self) -> App:
        if self._app is None:
            raise StoreError("the job store is not connected; use it through Jobs(app)")
        return self._app

    async def connect(self, app: App) -> None:
        store = app.store
        if self._app is app and self._store is store:
            return
        await self.close()  # the app was given other settings since: start afresh
        statements = [s for s in (_JOBS + _LIVE).split(";") if s.strip()]
        if isinstance(store, SqliteStore):
            store.db.ensure_schema("jobs", _JOBS)
            path = store.db.path
            if path == ":memory:":
                raise ConfigError(
                    "job records need a SQLite file (progress goes to a companion file); "
                    "use sqlite:///path/to/file.db"
                )
            live = Database.acquire(f"sqlite:///{path}.jobs-live")
            live.ensure_schema("jobs-live", _LIVE)
            self._live_db = live
        else:
            async with store.transaction() as tx:
                for statement in statements:
                    await tx.execute(statement)
        # What App.transaction() does, resolved once: the broker's binding to
        # this store is fixed, and resolving it costs a path look-up on SQLite.
        broker = app.broker
        binding = broker.bind(store) if isinstance(broker, TransactionalBroker) else None
        self._publisher: Publisher = binding.publish if binding is not None else store.outbox_add
        self._store = store
        self._app = app

    async def close(self) -> None:
        if self._live_db is not None:
            self._live_db.release()
            self._live_db = None
        self._app = None

    async def ping(self) -> None:
        await self._read("SELECT 1")
        if self._live_db is not None:
            self._live_db.read("SELECT 1")

    async def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        try:
            return await read_rows(self.app.store, sql, params)
        except ConveyorError:
            raise
        except Exception as exc:
            raise StoreError(f"job store read failed: {exc}") from exc

    async def _live_read(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        if self._live_db is not None:
            return self._live_db.read(sql, params)
        return await self._read(sql, params)

    @contextlib.asynccontextmanager
    async def _live_tx(self) -> AsyncIterator[Transaction]:
        if self._live_db is not None:
            async with self._live_db.transaction() as tx:
                yield tx
        else:
            async with self.app.store.transaction() as tx:
                yield tx

    async def begin_idempotent(
        self, owner: str, key: str, fingerprint: str, *, lease: float, keep: float
    ) -> IdempotencyRecord | None:
        now = self.clock.time()
        async with self.app.store.transaction() as tx:
            taken = await tx.execute(
                "INSERT INTO conveyor_idempotency "
                "(owner, idem_key, fingerprint, response, lease_until, expires_at) "
                "VALUES (?, ?, ?, NULL, ?, ?) ON CONFLICT (owner, idem_key) DO NOTHING",
                (owner, key, fingerprint, now + lease, now + keep),
            )
            if taken:
                return None
            row = await tx.fetchone(
                "SELECT fingerprint, response, lease_until, expires_at FROM conveyor_idempotency "
                "WHERE owner = ? AND idem_key = ?",
                (owner, key),
            )
            if row is None:  # pragma: no cover - deleted between the two statements
                return None
            fp, response, lease_until, expires_at = row
            if expires_at <= now or (response is None and lease_until <= now):
                # Expired, or its request died before it created the job: take it over.
                await tx.execute(
                    "UPDATE conveyor_idempotency SET fingerprint = ?, response = NULL, "
                    "lease_until = ?, expires_at = ? WHERE owner = ? AND idem_key = ?",
                    (fingerprint, now + lease, now + keep, owner, key),
                )
                return None
        return IdempotencyRecord(
            owner=owner,
            key=key,
            fingerprint=fp,
            response=None if response is None else StoredResponse.from_json(response),
            lease_until=float(lease_until),
            expires_at=float(expires_at),
        )

    async def release_idempotent(self, owner: str, key: str) -> None:
        async with self.app.store.transaction() as tx:
            await tx.execute(
                "DELETE FROM conveyor_idempotency WHERE owner = ? AND idem_key = ? "
                "AND response IS NULL",
                (owner, key),
            )

    async def accept(
        self,
        record: JobRecord,
        *,
        topic: str,
        payload: Mapping[str, object],
        idempotency: tuple[str, StoredResponse, float] | None = None,
    ) -> None:
        app = self.app
        started = time.perf_counter()
        async with app.store.transaction() as tx:
            session = Session(tx, self._publisher, app.outbound, app.store)
            await session.execute(
                f"INSERT INTO conveyor_jobs ({_COLUMNS}) "
                "VALUES (?, ?, ?, ?, NULL, NULL, NULL, NULL, ?, ?, ?, NULL, NULL)",
                (
                    record.id,
                    record.kind,
                    record.owner,
                    record.status,
                    record.callback_url,
                    record.created_at,
                    record.updated_at,
                ),
            )
            # The job id is its messages' correlation id: the console's
            # search and every log line of the job find them by it.
            message = await session.publish(
                topic, dict(payload), type="conveyor.job", headers={CORRELATION_ID: record.id}
            )
            if idempotency is not None:
                key, response, keep = idempotency
                await session.execute(
                    "UPDATE conveyor_idempotency SET response = ?, expires_at = ? "
                    "WHERE owner = ? AND idem_key = ?",
                    (response.to_json(), self.clock.time() + keep, record.owner, key),
                )
        if app.observers:
            app.observers.published([message], via="outbox", seconds=time.perf_counter() - started)

    async def get(self, job_id: str) -> JobRecord | None:
        rows = await self._read(f"SELECT {_COLUMNS} FROM conveyor_jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        record = _record(rows[0])
        now = self.clock.time()
        if record.finished:
            return None if record.expires_at is not None and record.expires_at <= now else record
        live = await self._live_read(
            "SELECT state, progress, note, updated_at, expires_at FROM conveyor_job_live "
            "WHERE id = ?",
            (job_id,),
        )
        if not live:
            return record
        state, progress, note, updated_at, expires_at = live[0]
        if state == CANCELLED:
            if expires_at <= now:
                return None
            return _with(
                record,
                status=CANCELLED,
                progress=progress,
                note=note,
                updated_at=updated_at,
                finished_at=updated_at,
                expires_at=expires_at,
            )
        return _with(record, status=RUNNING, progress=progress, note=note, updated_at=updated_at)

    async def mark_running(self, job_id: str) -> bool:
        now = self.clock.time()
        async with self._live_tx() as tx:
            row = await tx.fetchone("SELECT state FROM conveyor_job_live WHERE id = ?", (job_id,))
            if row is not None and row[0] == CANCELLED:
                return False
            await tx.execute(
                "INSERT INTO conveyor_job_live (id, state, progress, note, updated_at, expires_at) "
                "VALUES (?, ?, NULL, NULL, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "state = excluded.state, updated_at = excluded.updated_at, "
                "expires_at = excluded.expires_at",
                (job_id, RUNNING, now, now + _LIVE_KEEP),
            )
        return True

    async def set_progress(self, job_id: str, progress: float, note: str | None) -> None:
        now = self.clock.time()
        async with self._live_tx() as tx:
            await tx.execute(
                "UPDATE conveyor_job_live SET progress = ?, note = ?, updated_at = ?, "
                "expires_at = ? WHERE id = ? AND state = ?",
                (float(progress), note, now, now + _LIVE_KEEP, job_id, RUNNING),
            )

    async def cancel(self, job_id: str, *, ttl: float) -> JobRecord | None:
        record = await self.get(job_id)
        if record is None or record.finished:
            return record
        now = self.clock.time()
        async with self._live_tx() as tx:
            # The live row decides between a cancel and the handler's final
            # state: whichever writes it first wins (see ``finish``).
            await tx.execute(
                "INSERT INTO conveyor_job_live (id, state, progress, note, updated_at, expires_at) "
                "VALUES (?, ?, NULL, NULL, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "state = excluded.state, updated_at = excluded.updated_at, "
                "expires_at = excluded.expires_at "
                f"WHERE conveyor_job_live.state NOT IN ({_FINAL_SQL})",
                (job_id, CANCELLED, now, now + ttl),
            )
            row = await tx.fetchone("SELECT state FROM conveyor_job_live WHERE id = ?", (job_id,))
        current = await self.get(job_id)
        if current is not None and not current.finished and row is not None and row[0] in FINAL:
            # The handler recorded its final state first; its transaction
            # is committing: that state stands and is the answer.
            return _with(current, status=row[0])
        return current

    async def is_cancelled(self, job_id: str) -> bool:
        rows = await self._live_read("SELECT state FROM conveyor_job_live WHERE id = ?", (job_id,))
        return bool(rows) and rows[0][0] == CANCELLED

    async def finish(
        self,
        session: Session,
        job_id: str,
        *,
        status: str,
        result: object = None,
        error: str | None = None,
        ttl: float,
    ) -> JobRecord | None:
        now = self.clock.time()
        async with self._live_tx() as tx:
            # Claim the final state in the live row, committed at once, before
            # this transaction commits: a cancel that came first wins (the job
            # is CANCELLED), a cancel that comes later finds the claim and
            # answers this state.
            await tx.execute(
                "INSERT INTO conveyor_job_live (id, state, progress, note, updated_at, expires_at) "
                "VALUES (?, ?, NULL, NULL, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "state = excluded.state, updated_at = excluded.updated_at "
                "WHERE conveyor_job_live.state <> ?",
                (job_id, status, now, now + _LIVE_KEEP, CANCELLED),
            )
            live = await tx.fetchone(
                "SELECT state, progress, note FROM conveyor_job_live WHERE id = ?", (job_id,)
            )
        state, progress, note = live if live is not None else (status, None, None)
        if state == CANCELLED:
            status, result, error = CANCELLED, None, None
        if status == SUCCEEDED:
            progress = 1.0
        changed = await session.execute(
            "UPDATE conveyor_jobs SET status = ?, progress = ?, note = ?, result = ?, "
            "error = ?, updated_at = ?, finished_at = ?, expires_at = ? "
            f"WHERE id = ? AND status NOT IN ({_FINAL_SQL})",
            (
                status,
                progress,
                note,
                None if result is None else json_text(result),
                error,
                now,
                now,
                now + ttl,
                job_id,
            ),
        )
        if not changed:
            return None
        row = await session.fetchone(
            f"SELECT {_COLUMNS} FROM conveyor_jobs WHERE id = ?", (job_id,)
        )
        return None if row is None else _record(row)

    async def prune(self) -> int:
        now = self.clock.time()
        async with self.app.store.transaction() as tx:
            count = await tx.execute(
                "DELETE FROM conveyor_jobs WHERE expires_at IS NOT NULL AND expires_at <= ?",
                (now,),
            )
            count += await tx.execute(
                "DELETE FROM conveyor_idempotency WHERE expires_at <= ?", (now,)
            )
        async with self._live_tx() as tx:
            count += await tx.execute("DELETE FROM conveyor_job_live WHERE expires_at <= ?", (now,))
        return count

    async def relay(self) -> int:
        """Nothing to do: the App's outbox relay publishes accepted jobs."""
        return 0


def _record(row: Sequence[Any]) -> JobRecord:
    (
        id_,
        kind,
        owner,
        status,
        progress,
        note,
        result,
        error,
        callback_url,
        created_at,
        updated_at,
        finished_at,
        expires_at,
    ) = row
    return JobRecord(
        id=id_,
        kind=kind,
        owner=owner,
        status=status,
        progress=progress,
        note=note,
        result=None if result is None else json.loads(result),
        error=error,
        callback_url=callback_url,
        created_at=created_at,
        updated_at=updated_at,
        finished_at=finished_at,
        expires_at=expires_at,
    )


def _with(record: JobRecord, **changes: Any) -> JobRecord:
    from dataclasses import replace

    return replace(record, **changes)
