"""SQLite plumbing shared by the SQLite broker and store.

One ``Database`` per file per process: a single connection in autocommit mode
(transactions are explicit), WAL journal, and an asyncio lock that serialises
this process's transactions. ``BEGIN IMMEDIATE`` is retried asynchronously
while another process holds the write lock, so a busy database never blocks
the event loop. Statements run on the event-loop thread: once the write lock
is held they do not wait on anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar
from urllib.parse import urlsplit

from conveyor._connect import keep_trying
from conveyor._inotify import DirectoryWatch
from conveyor._rows import MESSAGE_COLUMNS, message_from_row, message_params
from conveyor._time import Clock, SystemClock
from conveyor._urls import Option, redact, url_options
from conveyor.errors import ConfigError, ConveyorError, StoreError
from conveyor.resilience._retry import RetryPolicy

__all__ = [
    "MESSAGE_COLUMNS",
    "Database",
    "SqliteBacked",
    "SqliteTransaction",
    "message_from_row",
    "message_params",
]

_SYNCHRONOUS = {"off": "OFF", "normal": "NORMAL", "full": "FULL", "extra": "EXTRA"}
# Another process holds the write lock: wait for it in short steps.
_LOCKED = RetryPolicy(max_attempts=1, base_delay=0.0002, max_delay=0.002)


def _busy(exc: Exception) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )


_OPTIONS = {
    "synchronous": Option(
        "normal",
        pattern=re.compile("(?i)" + "|".join(_SYNCHRONOUS)),
        expect=f"one of {', '.join(_SYNCHRONOUS)}",
    ),
}
# Polling, where the kernel cannot tell of writes: fast after a change, slower when idle.
_FIRST_POLL = 0.002
_MAX_POLL = 0.05
# After a change, waiters poll for this long before they go back to waiting
# on the kernel: under traffic a poll every 2 ms is cheaper than a callback
# for every single write of another process.
_BUSY_WINDOW = 0.1
Version = tuple[int, int]
_databases: dict[str, Database] = {}
_current: contextvars.ContextVar[SqliteTransaction | None] = contextvars.ContextVar(
    "conveyor_sqlite_tx", default=None
)


def parse_url(url: str) -> tuple[str, str]:
    """``sqlite:///relative.db``, ``sqlite:////abs.db``, ``sqlite://:memory:`` ->
    (path, synchronous pragma)."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"invalid SQLite URL {redact(url)!r}: {exc}") from None
    if parts.scheme != "sqlite":
        raise ConfigError(f"not a SQLite URL: {redact(url)!r} (expected sqlite:///path/to/file.db)")
    if parts.netloc == ":memory:" or parts.path in ("/:memory:", ""):
        path = ":memory:"
    else:
        if parts.netloc:
            raise ConfigError(
                f"invalid SQLite URL {redact(url)!r}: use sqlite:///relative.db or sqlite:////abs.db"
            )
        path = parts.path[1:]
        if not path:
            raise ConfigError(f"invalid SQLite URL {redact(url)!r}: no file path")
    options = url_options(parts.query, _OPTIONS, url=url, what="SQLite")
    sync = options["synchronous"].lower()
    return path, _SYNCHRONOUS[sync]


class SqliteTransaction:
    """A write transaction on a SQLite database (``?`` placeholders)."""

    __slots__ = ("_conn", "_depth", "_pending", "database", "published")

    def __init__(self, database: Database) -> None:
        self.database = database
        self._conn = database.conn
        self._depth = 0
        self._pending: list[str] = []
        self.published = False

    def _open(self) -> None:
        """Establish the savepoints entered but not yet needed: a statement
        is about to run inside them."""
        for name in self._pending:
            self._conn.execute(f"SAVEPOINT {name}")
        self._pending.clear()

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; return the number of rows it changed."""
        if self._pending:
            self._open()
        return self._conn.execute(sql, params).rowcount

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> int:
        if self._pending:
            self._open()
        return self._conn.executemany(sql, rows).rowcount

    async def fetchone(self, sql: str, params: Sequence[object] = ()) -> tuple[Any, ...] | None:
        if self._pending:
            self._open()
        row: tuple[Any, ...] | None = self._conn.execute(sql, params).fetchone()
        return row

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        if self._pending:
            self._open()
        return self._conn.execute(sql, params).fetchall()

    def run(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        """Synchronous form for Conveyor's own hot paths."""
        if self._pending:
            self._open()
        return self._conn.execute(sql, params)

    def runmany(self, sql: str, rows: Sequence[Sequence[object]]) -> sqlite3.Cursor:
        if self._pending:
            self._open()
        return self._conn.executemany(sql, rows)

    def savepoint(self) -> _Savepoint:
        """Nested scope: an exception inside rolls back only its own writes.

        Established lazily, just before the first statement inside it: a
        scope that runs no statement (a handler that writes nothing) costs
        neither SAVEPOINT nor RELEASE."""
        return _Savepoint(self)


class _Savepoint:
    """``async with tx.savepoint():`` (a plain class: cheaper per message
    than a generator-based context manager)."""

    __slots__ = ("_name", "_tx")

    def __init__(self, tx: SqliteTransaction) -> None:
        self._tx = tx
        self._name = ""

    async def __aenter__(self) -> None:
        tx = self._tx
        tx._depth += 1
        self._name = f"sp{tx._depth}"
        tx._pending.append(self._name)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tx, name = self._tx, self._name
        tx._depth -= 1
        pending = tx._pending
        if name in pending:  # nothing ran inside: nothing to undo or release
            del pending[pending.index(name) :]
            return
        if exc_type is not None:
            tx._conn.execute(f"ROLLBACK TO {name}")
        tx._conn.execute(f"RELEASE {name}")


class Database:
    """One SQLite file shared by every broker and store of this process."""

    watch_changes: ClassVar[bool] = True
    """Learn of other processes' commits from the kernel (inotify) where it
    can; False polls ``data_version`` instead (the fallback elsewhere)."""

    def __init__(self, path: str, synchronous: str) -> None:
        self.path = path
        self.synchronous = synchronous
        self._refs = 0
        self._lock: asyncio.Lock | None = None
        self._schemas: set[str] = set()
        self._closing = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self._local_seq = 0
        self._last_seen = -1
        self._wal_name = f"{Path(path).name}-wal"
        self._watch: DirectoryWatch | None = None
        self._busy_until = 0.0
        self._watch_wanted = self.watch_changes
        try:
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=0
            )
            self.conn.execute("PRAGMA busy_timeout=0")
            if path != ":memory:":
                self._wal()
                # Checkpoints run on a background thread: an automatic one
                # would copy the log into the file (and fsync) inside whichever
                # commit crossed the threshold, on the event loop.
                self.conn.execute("PRAGMA wal_autocheckpoint=0")
                self._checkpointer = threading.Thread(
                    target=self._checkpoint_loop, name="conveyor-sqlite-checkpoint", daemon=True
                )
                self._checkpointer.start()
            self.conn.execute(f"PRAGMA synchronous={synchronous}")
            self.conn.execute("PRAGMA temp_store=MEMORY")
            self.conn.execute("PRAGMA cache_size=-16000")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite database {path!r}: {exc}") from exc

    def _wal(self) -> None:
        """Switch to WAL. On a new file several processes starting at once
        race for this (it needs the write lock, and waits are off): retry,
        blocking, for up to 10 s; only start-up pays for it."""
        deadline = time.monotonic() + 10.0
        while True:
            try:
                self.conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @classmethod
    def acquire(cls, url: str) -> Database:
        path, sync = parse_url(url)
        key = path if path == ":memory:" else str(Path(path).resolve())
        db = _databases.get(key)
        if db is None:
            db = _databases[key] = cls(path, sync)
        db._refs += 1
        return db

    def release(self) -> None:
        self._refs -= 1
        if self._refs <= 0:
            _databases.pop(self.key, None)
            self._closing.set()
            if self._checkpointer is not None:
                self._checkpointer.join()
            if self._watch is not None:
                self._watch.close()
                self._watch = None
            self.conn.close()

    def _checkpoint_loop(self, interval: float = 0.2) -> None:
        """PASSIVE checkpoints never block readers or writers; a busy one is
        simply tried again next time. Any process with the file open runs one."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0)
        try:
            while not self._closing.wait(interval):
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    @property
    def key(self) -> str:
        return self.path if self.path == ":memory:" else str(Path(self.path).resolve())

    def ensure_schema(self, name: str, ddl: str) -> None:
        if name in self._schemas:
            return
        for attempt in range(200):
            try:
                self.conn.executescript(ddl)
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 199:
                    raise StoreError(f"cannot create tables in {self.path!r}: {exc}") from exc
                time.sleep(0.01)
        self._schemas.add(name)

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def current(self) -> SqliteTransaction | None:
        tx = _current.get()
        return tx if tx is not None and tx.database is self else None

    @contextlib.asynccontextmanager
    async def transaction(self, *, deadline: float = 30.0) -> AsyncIterator[SqliteTransaction]:
        """An immediate (write) transaction; commits on success, rolls back on error."""
        if self.current() is not None:
            raise StoreError(
                "a transaction is already open on this database in this task; "
                "inside a handler use ctx.tx and ctx.publish()"
            )
        async with self.lock:
            await self._begin(deadline)
            tx = SqliteTransaction(self)
            token = _current.set(tx)
            try:
                yield tx
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            else:
                try:
                    self.conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    self.conn.execute("ROLLBACK")
                    raise StoreError(f"commit failed on {self.path!r}: {exc}") from exc
            finally:
                _current.reset(token)
        if tx.published:
            self.notify()

    async def _begin(self, deadline: float) -> None:
        try:
            self.conn.execute("BEGIN IMMEDIATE")  # nearly always at once
            return
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                raise StoreError(f"cannot begin a transaction on {self.path!r}: {exc}") from exc

        async def begin() -> None:
            self.conn.execute("BEGIN IMMEDIATE")

        def give_up(exc: Exception, again: bool) -> BaseException:
            if again:
                return StoreError(
                    f"SQLite database {self.path!r} stayed locked for {deadline:.0f}s"
                )
            if isinstance(exc, sqlite3.OperationalError):
                return StoreError(f"cannot begin a transaction on {self.path!r}: {exc}")
            return exc

        await keep_trying(
            begin,
            within=deadline,
            transient=_busy,
            give_up=give_up,
            policy=_LOCKED,
        )

    def read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """A consistent read outside any transaction (WAL readers never wait)."""
        for attempt in range(100):
            try:
                return self.conn.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 99:
                    raise StoreError(f"read failed on {self.path!r}: {exc}") from exc
                time.sleep(0.005)
        raise AssertionError("unreachable")

    def notify(self) -> None:
        """Wake this process's waiters: something was published here."""
        self._local_seq += 1
        self._wake()

    def data_version(self) -> int:
        """Changes whenever another connection (process) commits."""
        row = self.conn.execute("PRAGMA data_version").fetchone()
        return int(row[0])

    def version(self) -> Version:
        """What ``wait_for_change`` compares: commits by other processes and
        publishes by this one."""
        return (self.data_version(), self._local_seq)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _on_files_changed(self, names: set[str]) -> None:
        # Another process's commit appends to the WAL; this process's own do
        # too, but leave data_version alone, so they wake nobody.
        if self._wal_name in names and self._waiters:
            version = self.data_version()
            if version != self._last_seen:
                self._last_seen = version
                self._wake()

    def _watching(self) -> bool:
        """Whether commits of other processes wake waiters (inotify on the
        file's directory); else waiters poll ``data_version``."""
        if self.path == ":memory:" or not self._watch_wanted:
            return False
        if self._watch is None:
            folder = str(Path(self.path).resolve().parent)
            self._watch = DirectoryWatch.open(folder, self._on_files_changed)
            if self._watch is None:
                self._watch_wanted = False
                return False
        self._watch.attach()
        return True

    async def wait_for_change(self, since: Version, timeout: float) -> Version:
        """Return when another process commits, this process publishes (the
        version differs from ``since``), or ``timeout`` passes.

        Idle, this costs nothing: on Linux the kernel says when another
        process writes the database's log (inotify), and nothing runs until
        then. While changes keep coming (for 100 ms after the last one)
        waiters poll ``data_version`` every 2 ms instead, with the watch set
        aside: under traffic that is cheaper than a callback per write, and
        it batches what a fetch takes. Without inotify they poll all the
        time, every 2 ms after a change, backing off to 50 ms when idle."""
        version = self.version()
        if version != since:
            return version
        deadline = time.monotonic() + timeout
        poll = _FIRST_POLL
        while True:
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                return self.version()
            busy = now < self._busy_until
            if busy:
                if self._watch is not None:
                    self._watch.detach()
                wait = min(_FIRST_POLL, remaining)
            elif self._watching():
                wait = remaining
            else:
                wait = min(poll, remaining)
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            self._last_seen = version[0]
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter, wait)
            finally:
                self._waiters.discard(waiter)
            version = self.version()
            if version != since:
                self._busy_until = time.monotonic() + _BUSY_WINDOW
                return version
            poll = min(poll * 2, _MAX_POLL)


class SqliteBacked:
    """What the SQLite broker and store share: a URL, a clock and this
    process's ``Database`` for the file, with their tables created on connect."""

    role: ClassVar[str]
    schema: ClassVar[str]
    error: ClassVar[type[ConveyorError]]

    def __init__(self, url: str, *, clock: Clock | None = None) -> None:
        self.url = url
        self.clock: Clock = clock or SystemClock()
        self._db: Database | None = None

    @property
    def db(self) -> Database:
        if self._db is None:
            raise self.error(
                f"{self.role} {redact(self.url)} is not connected; call connect() first"
            )
        return self._db

    async def connect(self) -> None:
        """Open the file and create the tables. Idempotent."""
        if self._db is None:
            db = Database.acquire(self.url)
            try:
                db.ensure_schema(self.role, self.schema)
            except StoreError as exc:
                db.release()
                raise self.error(str(exc)) from exc
            self._db = db

    async def close(self) -> None:
        if self._db is not None:
            self._db.release()
            self._db = None
