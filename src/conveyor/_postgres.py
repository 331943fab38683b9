"""PostgreSQL plumbing shared by the PostgreSQL broker and store (asyncpg).

One ``Database`` per (server, database, user, namespace) per event loop in a
process: a connection pool whose connections all run with ``search_path``
set to the namespace (a schema, created if missing), plus one listening
connection for ``LISTEN``/``NOTIFY`` wake-ups. A broker and a store on the
same URL share it, which is how ``bind`` recognises that one transaction can
hold the whole unit of work.

URL: ``postgresql://user[:password]@host[:port]/database?namespace=NAME``
(also ``postgres://``). Query parameters:

- ``namespace``: the schema holding Conveyor's tables and, for the store, the
  application's own tables (default ``public``); letters, digits and ``_``.
- ``pool_min`` / ``pool_max``: connections kept / allowed (default 1 / 10).
- ``connect_timeout``: seconds the first connection may take in all, retries
  included (default 5); also the wait for each new pooled connection.
- ``reconnect_for``: seconds an operation outside a transaction keeps
  retrying, with capped backoff, while the server is unreachable (default 30).
- ``command_timeout``: seconds one statement may take before it is cancelled
  and fails (default 60): the total timeout on a server, or a network path,
  that stopped answering without closing the connection.
- ``sslmode``: passed to asyncpg as is.

Anything else is a ``ConfigError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import asyncpg

from conveyor._connect import DEFAULT_CONNECT_TIMEOUT, connect_within, keep_trying
from conveyor._rows import MESSAGE_COLUMNS, message_from_row, message_params
from conveyor._time import Clock, SystemClock
from conveyor._tls import LIBPQ, tls_files, tls_options
from conveyor._urls import Option, redact, url_options
from conveyor.errors import ConfigError, ConveyorError, StoreError

__all__ = [
    "MESSAGE_COLUMNS",
    "Database",
    "PgOptions",
    "PostgresBacked",
    "PostgresTransaction",
    "lock_id",
    "message_from_row",
    "message_params",
    "parse_url",
    "translate",
]

T = TypeVar("T")


_NAMESPACE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_DDL = re.compile(r"\s*(CREATE|ALTER|DROP|COMMENT|GRANT)\b", re.IGNORECASE)
_OPTIONS = {
    "namespace": Option(
        "public",
        pattern=_NAMESPACE,
        expect="letters, digits and _ (at most 63, not starting with a digit)",
    ),
    "pool_min": Option(1, int, low=0),
    "pool_max": Option(10, int, low=1),
    "connect_timeout": Option(DEFAULT_CONNECT_TIMEOUT, float, above=0),
    "reconnect_for": Option(30.0, float, above=0),
    "command_timeout": Option(60.0, float, above=0),
    "sslmode": Option(
        None, choices=("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
    ),
    **tls_options(LIBPQ),
}
_PASSTHROUGH = ("sslmode", *LIBPQ)

# Errors that mean the connection or server went away: worth a reconnect.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    # The protocol caught mid-operation by a server that went away
    # ("cannot switch to state ...; another operation is in progress").
    asyncpg.InternalClientError,
)
DRIVER_ERRORS: tuple[type[BaseException], ...] = (asyncpg.PostgresError, *_CONNECTION_ERRORS)
# Worth repeating a whole self-contained operation for.
_TRANSIENT: tuple[type[BaseException], ...] = (
    *_CONNECTION_ERRORS,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)


def closed_transport(exc: BaseException) -> bool:
    """uvloop's word for a connection already gone: a ``RuntimeError``
    ("unable to perform operation on <TCPTransport closed=True>; the handler
    is closed") where asyncio's own loop raises a ``ConnectionError``."""
    return isinstance(exc, RuntimeError) and "handler is closed" in str(exc)


class _Again(Exception):
    """A transient driver error from inside a transaction: run it again."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


_RETRY: tuple[type[BaseException], ...] = (*_TRANSIENT, _Again)
_CLOSE_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *DRIVER_ERRORS)


@dataclass(frozen=True, slots=True)
class PgOptions:
    dsn: str
    namespace: str
    pool_min: int
    pool_max: int
    connect_timeout: float
    reconnect_for: float
    command_timeout: float = 60.0

    @property
    def key(self) -> str:
        """Which database and namespace: equal keys share one transaction."""
        parts = urlsplit(self.dsn)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
        return f"{parts.username}@{host}:{port}{parts.path}#{self.namespace}"

    @property
    def address(self) -> str:
        """host:port/database, for messages (no user, no password)."""
        parts = urlsplit(self.dsn)
        return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"

    @property
    def channel(self) -> str:
        return f"conveyor_{self.namespace}"[:63]


def parse_url(url: str) -> PgOptions:
    """Check a ``postgresql://`` URL and split off Conveyor's own options."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise ConfigError(f"invalid PostgreSQL URL {redact(url)!r}: {exc}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            f"not a PostgreSQL URL: {redact(url)!r} (expected postgresql://user@host:port/database)"
        )
    if not parts.hostname:
        raise ConfigError(f"invalid PostgreSQL URL {redact(url)!r}: no host")
    if parts.path.strip("/") == "" or "/" in parts.path.strip("/"):
        raise ConfigError(f"invalid PostgreSQL URL {redact(url)!r}: name one database, as in /mydb")
    values = url_options(parts.query, _OPTIONS, url=url, what="PostgreSQL")
    if values["pool_min"] > values["pool_max"]:
        raise ConfigError(f"pool_min is larger than pool_max in {redact(url)!r}")
    passthrough = {k: values.pop(k) for k in _PASSTHROUGH}
    passthrough = {k: v for k, v in passthrough.items() if v is not None}
    tls = tls_files(passthrough, url, names=LIBPQ)
    if tls and passthrough.get("sslmode") in ("disable", "allow"):
        raise ConfigError(
            f"sslmode={passthrough['sslmode']} in {redact(url)!r} would not use the TLS files it names"
        )
    dsn = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(passthrough), ""))
    return PgOptions(dsn=dsn, **values)


@lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """``?`` placeholders -> ``$1..$n``, leaving alone every ``?`` inside a
    string literal ('...', E'...', $tag$...$tag$), a quoted identifier or a
    comment."""
    out: list[str] = []
    i, n, count = 0, len(sql), 0
    while i < n:
        c = sql[i]
        if c == "?":
            count += 1
            out.append(f"${count}")
            i += 1
        elif c == "'":
            escapes = i > 0 and sql[i - 1] in "eE" and (i < 2 or not sql[i - 2].isalnum())
            j = i + 1
            while j < n:
                if escapes and sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == "'":
                    if j + 1 < n and sql[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            out.append(sql[i : j + 1])
            i = j + 1
        elif c == '"':
            j = sql.find('"', i + 1)
            j = n - 1 if j < 0 else j
            out.append(sql[i : j + 1])
            i = j + 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            j = n - 1 if j < 0 else j
            out.append(sql[i : j + 1])
            i = j + 1
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            j = n - 2 if j < 0 else j
            out.append(sql[i : j + 2])
            i = j + 2
        elif c == "$" and (m := re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$", sql[i:])):
            tag = m.group(0)
            j = sql.find(tag, i + len(tag))
            end = n if j < 0 else j + len(tag)
            out.append(sql[i:end])
            i = end
        else:
            out.append(c)
            i += 1
    return "".join(out)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset after each use (asyncpg has already rolled back any
    open transaction). Pooled sessions change nothing that outlives a
    transaction — advisory locks are transaction-scoped, LISTEN runs on its
    own connection, search_path is a startup parameter — so asyncpg's
    default reset query would be one more round trip per transaction for
    nothing."""


def lock_id(*parts: str) -> int:
    """A signed 64-bit advisory lock id for ``parts``."""
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    value: int = struct.unpack(">q", digest)[0]
    return value


def _rowcount(status: str) -> int:
    """``INSERT 0 3`` / ``UPDATE 2`` / ``DELETE 1`` -> the row count."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class PostgresTransaction:
    """An open PostgreSQL transaction of a Conveyor store or broker.

    SQL is PostgreSQL's, with ``?`` placeholders as the Transaction protocol
    says: they are translated to ``$1..$n`` (a ``?`` inside a string literal,
    quoted identifier or comment is left alone, so the jsonb ``?`` operator
    cannot be written here: use ``jsonb_exists``). Values must match their
    column types exactly (asyncpg does not coerce a str into an integer).

    Schema changes (``CREATE``, ``ALTER``, ``DROP``...) first take the
    namespace's DDL lock for the rest of the transaction: processes that
    create the same tables at the same moment (``CREATE TABLE IF NOT
    EXISTS`` races on PostgreSQL's catalog) then do it one after another.
    """

    __slots__ = (
        "_ddl_locked",
        "_depth",
        "_pending",
        "_unreleased",
        "conn",
        "database",
        "error",
        "notify",
        "topics",
    )

    def __init__(
        self, database: Database, conn: asyncpg.Connection, error: type[ConveyorError]
    ) -> None:
        self.database = database
        self.conn = conn
        self.error = error
        self._ddl_locked = False
        self._depth = 0
        self._pending: list[str] = []
        self._unreleased: str | None = None
        self.notify: set[str] = set()
        # The broker's per-topic subscriber groups, read once the topic's
        # shared advisory lock is held (no declare can change them until
        # commit): a second publish to the topic in this transaction costs
        # one statement instead of three.
        self.topics: dict[str, list[str | None]] = {}

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; return the number of rows it changed."""
        if not self._ddl_locked and _DDL.match(sql):
            await self._call(
                self.conn.execute,
                "SELECT pg_advisory_xact_lock($1)",
                lock_id("ddl", self.database.options.namespace),
            )
            self._ddl_locked = True
        return _rowcount(await self._call(self.conn.execute, translate(sql), *params))

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> int:
        # asyncpg's executemany reports no count; a loop over one prepared
        # statement does, at the price of a round trip per row.
        if not rows:
            return 0
        statement = await self._call(self.conn.prepare, translate(sql))
        total = 0
        for row in rows:
            await self._call(statement.fetch, *row)
            total += _rowcount(statement.get_statusmsg() or "")
        return total

    async def fetchone(self, sql: str, params: Sequence[object] = ()) -> tuple[Any, ...] | None:
        row = await self._call(self.conn.fetchrow, translate(sql), *params)
        return None if row is None else tuple(row)

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        rows = await self._call(self.conn.fetch, translate(sql), *params)
        return [tuple(r) for r in rows]

    async def run(self, sql: str, *params: object) -> str:
        """Conveyor's own statements: ``$n`` placeholders, no translation."""
        status: str = await self._call(self.conn.execute, sql, *params)
        return status

    async def rows(self, sql: str, *params: object) -> list[asyncpg.Record]:
        result: list[asyncpg.Record] = await self._call(self.conn.fetch, sql, *params)
        return result

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        try:
            if self._pending:
                names, self._pending = self._pending, []
                sql = [f"SAVEPOINT {name}" for name in names]
                if self._unreleased is not None:
                    sql.insert(0, f"RELEASE SAVEPOINT {self._unreleased}")
                    self._unreleased = None
                await self.conn.execute("; ".join(sql))
            return await fn(*args)
        except RuntimeError as exc:
            if not closed_transport(exc):
                raise
            raise self.error(
                f"PostgreSQL {self.database.options.key}: the connection was lost ({exc})"
            ) from ConnectionResetError(str(exc))
        except DRIVER_ERRORS as exc:
            key = self.database.options.key
            if isinstance(exc, TimeoutError):
                limit = self.database.options.command_timeout
                raise self.error(
                    f"PostgreSQL {key}: no answer within command_timeout={limit:g}s"
                ) from exc
            raise self.error(f"PostgreSQL {key}: {exc}") from exc

    @contextlib.asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """Nested scope: an exception inside rolls back only its own writes.

        Opened lazily, with the first statement inside it: a scope that runs
        no statement costs no round trip. A scope that succeeds is released
        together with the opening of the next one (or by ``COMMIT``), so each
        scope that writes costs one extra round trip, not two. Until then its
        writes and any later ones at the outer level share its subtransaction,
        which changes nothing: only a failing scope ever rolls back to its own
        savepoint, and one established after it."""
        self._depth += 1
        name = f"conveyor_sp{self._depth}"
        notify, topics = set(self.notify), dict(self.topics)
        self._pending.append(name)
        try:
            yield
        except BaseException:
            if name in self._pending:
                del self._pending[self._pending.index(name) :]
            else:
                # Also gone: a scope inside still unreleased, and the locks
                # taken inside (forget what they guarded).
                await self.run(f"ROLLBACK TO SAVEPOINT {name}; RELEASE SAVEPOINT {name}")
                self._unreleased = None
                self.notify, self.topics = notify, topics
            raise
        else:
            if name in self._pending:
                del self._pending[self._pending.index(name) :]
            else:
                # Releasing it later also releases a scope inside still unreleased.
                self._unreleased = name
        finally:
            self._depth -= 1


class Database:
    """A pool on one database and namespace, shared in one process and loop."""

    _open: ClassVar[dict[tuple[str, int], Database]] = {}

    def __init__(self, options: PgOptions) -> None:
        self.options = options
        self._refs = 0
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._schemas: set[str] = set()
        self._versions: dict[str, int] = {}
        self._event = asyncio.Event()
        self._listen_task: asyncio.Task[bool] | None = None
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def acquire(cls, url: str, error: type[ConveyorError]) -> Database:
        options = parse_url(url)
        loop = asyncio.get_running_loop()
        slot = (options.key, id(loop))
        db = cls._open.get(slot)
        if db is not None and db._loop is not loop:  # a leaked one of a dead loop
            db = None
        if db is None:
            db = cls(options)
            await db._start(error)
            other = cls._open.get(slot)
            if other is not None and other._loop is loop:  # another task won the race
                await db._stop()
                db = other
            else:
                cls._open[slot] = db
        db._refs += 1
        return db

    async def release(self) -> None:
        self._refs -= 1
        if self._refs <= 0:
            loop = id(asyncio.get_running_loop())
            if Database._open.get((self.options.key, loop)) is self:
                del Database._open[(self.options.key, loop)]
            await self._stop()

    @property
    def key(self) -> str:
        return self.options.key

    async def _start(self, error: type[ConveyorError]) -> None:
        o = self.options
        create = f'CREATE SCHEMA IF NOT EXISTS "{o.namespace}"'

        async def setup() -> asyncpg.Pool:
            # The schema must exist before search_path is worth setting.
            conn = await asyncpg.connect(o.dsn, timeout=o.connect_timeout)
            try:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_id("schema"))
                    await conn.execute(create)
            finally:
                await conn.close()
            pool: asyncpg.Pool = await asyncpg.create_pool(
                o.dsn,
                min_size=o.pool_min,
                max_size=o.pool_max,
                timeout=o.connect_timeout,
                command_timeout=o.command_timeout,
                server_settings={"search_path": f'"{o.namespace}"'},
                reset=_keep_session,
            )
            return pool

        try:
            self._pool = await connect_within(
                setup,
                server="PostgreSQL",
                where=o.address,
                timeout=o.connect_timeout,
                retry_on=_TRANSIENT,
                error=error,
            )
        except asyncpg.PostgresError as exc:  # refused for good: a wrong password, no database
            raise error(f"PostgreSQL at {o.address} refused the connection: {exc}") from exc

    async def _stop(self) -> None:
        pool, self._pool = self._pool, None
        if self._listen_task is not None:
            with contextlib.suppress(BaseException):
                await self._listen_task
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(*DRIVER_ERRORS):
                await listener.close(timeout=2)
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except _CLOSE_ERRORS:
                pool.terminate()  # a connection still busy: cut it

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError(f"PostgreSQL {self.key} is closed")
        return self._pool

    async def retrying(
        self, op: Callable[[], Awaitable[T]], error: type[ConveyorError], what: str
    ) -> T:
        """Run ``op``; while the server is unreachable, retry it with capped
        exponential backoff for up to ``reconnect_for`` seconds. Only for
        operations that are safe to repeat."""

        def give_up(exc: Exception, again: bool) -> BaseException:
            if again:
                cause = exc.error if isinstance(exc, _Again) else exc
                failed = error(
                    f"PostgreSQL {self.key} unreachable for "
                    f"{self.options.reconnect_for:g}s ({what}): {cause}"
                )
                failed.__cause__ = cause
                return failed
            if isinstance(exc, asyncpg.PostgresError):
                return error(f"PostgreSQL {self.key} ({what}): {exc}")
            return exc

        return await keep_trying(
            op,
            within=self.options.reconnect_for,
            transient=lambda exc: isinstance(exc, _RETRY) or closed_transport(exc),
            give_up=give_up,
        )

    async def ensure_schema(self, name: str, ddl: str, error: type[ConveyorError]) -> None:
        if name in self._schemas:
            return

        async def create() -> None:
            async with self.pool.acquire() as conn, conn.transaction():
                # Concurrent CREATE ... IF NOT EXISTS can still collide.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1)", lock_id("ddl", self.options.namespace)
                )
                await conn.execute(ddl)

        await self.retrying(create, error, f"create the {name} tables")
        self._schemas.add(name)

    @contextlib.asynccontextmanager
    async def transaction(self, error: type[ConveyorError]) -> AsyncIterator[PostgresTransaction]:
        """A read-committed transaction; commits on success, rolls back on
        error. The ``NOTIFY`` its writes asked for is sent just before
        ``COMMIT``: PostgreSQL delivers it only once the commit is done."""

        async def begin() -> asyncpg.Connection:
            # A pooled connection may have died with its server: BEGIN finds
            # out, and is safe to try again on a fresh one.
            conn = await self.pool.acquire()
            try:
                await conn.execute("BEGIN")
            except BaseException:
                with contextlib.suppress(*DRIVER_ERRORS):
                    await self.pool.release(conn)
                raise
            return conn

        conn = await self.retrying(begin, error, "begin a transaction")
        try:
            tx = PostgresTransaction(self, conn, error)
            try:
                yield tx
                for payload in sorted(tx.notify):
                    await tx.run("SELECT pg_notify($1, $2)", self.options.channel, payload)
            except BaseException:
                try:
                    await asyncio.shield(conn.execute("ROLLBACK"))
                except BaseException:
                    # The connection is gone (or going): drop it. The error
                    # that got us here is the one to raise, not this one.
                    with contextlib.suppress(*DRIVER_ERRORS):
                        conn.terminate()
                raise
            await tx.run("COMMIT")
        finally:
            with contextlib.suppress(*DRIVER_ERRORS):
                await self.pool.release(conn)

    async def run(
        self,
        error: type[ConveyorError],
        what: str,
        body: Callable[[PostgresTransaction], Awaitable[T]],
    ) -> T:
        """``body`` in a transaction of its own, retried while the server is
        unreachable (only for bodies that are safe to repeat)."""

        async def once() -> T:
            async with self.transaction(error) as tx:
                return await body(tx)

        async def unwrapped() -> T:
            try:
                return await once()
            except ConveyorError as exc:
                if isinstance(exc.__cause__, _TRANSIENT):
                    raise _Again(exc.__cause__) from None
                raise

        return await self.retrying(unwrapped, error, what)

    async def fetch(self, error: type[ConveyorError], sql: str, *params: object) -> list[Any]:
        async def read() -> list[Any]:
            async with self.pool.acquire() as conn:
                rows: list[Any] = await conn.fetch(sql, *params)
                return rows

        return await self.retrying(read, error, "read")

    # -- LISTEN/NOTIFY -------------------------------------------------------

    def version(self, payload: str) -> int:
        return self._versions.get(payload, 0)

    def _heard(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self._versions[payload] = self._versions.get(payload, 0) + 1
        self._event.set()
        self._event = asyncio.Event()

    async def _listening(self) -> bool:
        """Whether the listening connection is up; (re)connects it in a task
        of its own, so a cancelled waiter never leaves a half-open socket."""
        if self._listener is not None and not self._listener.is_closed():
            return True
        if self._pool is None:
            return False
        if self._listen_task is None or self._listen_task.done():
            self._listen_task = asyncio.get_running_loop().create_task(self._listen())
        return await asyncio.shield(self._listen_task)

    async def _listen(self) -> bool:
        try:
            conn = await asyncpg.connect(
                self.options.dsn,
                timeout=self.options.connect_timeout,
                command_timeout=self.options.command_timeout,
            )
        except _CLOSE_ERRORS:
            return False
        try:
            await conn.add_listener(self.options.channel, self._heard)
        except DRIVER_ERRORS:
            conn.terminate()
            return False
        if self._pool is None:  # closed meanwhile
            await conn.close()
            return False
        self._listener = conn
        # Anything may have been published while nobody listened.
        for payload in self._versions:
            self._versions[payload] += 1
        self._event.set()
        self._event = asyncio.Event()
        return True

    async def wait_for(self, payload: str, since: int | None, timeout: float) -> int:
        """Return this process's count of notifications for ``payload`` once it
        differs from ``since`` (None: the count now), or after ``timeout``."""
        listening = await self._listening()
        if since is None:
            since = self.version(payload)
        deadline = time.monotonic() + timeout
        while self.version(payload) == since:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if not listening:  # the server is away: poll at the caller's pace
                await asyncio.sleep(remaining)
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), remaining)
        return self.version(payload)


class PostgresBacked:
    """What the PostgreSQL broker and store share: a URL, a clock and this
    process's ``Database`` for it, with their tables created on connect."""

    role: ClassVar[str]
    schema: ClassVar[str]
    error: ClassVar[type[ConveyorError]]

    def __init__(self, url: str, *, clock: Clock | None = None) -> None:
        self.url = url
        self.options = parse_url(url)
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
        """Connect, create the namespace and the tables. Idempotent."""
        if self._db is None:
            db = await Database.acquire(self.url, self.error)
            try:
                await db.ensure_schema(self.role, self.schema, self.error)
            except BaseException:
                await db.release()
                raise
            self._db = db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.release()
