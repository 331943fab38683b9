"""The layout version of Conveyor's tables in a store's database.

One number, ``LAYOUT``, names the layout of every table this Conveyor
creates in the store's database (its own, the SQL broker's on the same
database, sagas, jobs, keys, the console's); ``conveyor_schema`` records the
layout a database is at. ``ensure_layout`` runs when an App connects, in one
store transaction (on PostgreSQL its first statement takes the namespace's
DDL lock, on SQLite the transaction holds the write lock), so concurrent
starts migrate once:

- recorded layout newer than ``LAYOUT``: refused in one line (a newer
  Conveyor migrated it; this one might misread it);
- older, or not recorded (a database from before versions were recorded,
  or a new one): the upgrades after it run, then ``LAYOUT`` is recorded;
  with ``migrate=False`` (``CONVEYOR_MIGRATE=false``) it is refused instead,
  for ``conveyor migrate`` to run first;
- equal: nothing.

Every upgrade is additive (new tables, new columns with defaults), so
processes of the previous release keep working beside the new ones during a
rolling upgrade; each is idempotent, because a database whose layout was
never recorded may already have some of them. Tables created afresh are
created at the current layout by their own ``CREATE TABLE IF NOT EXISTS``.

A migration tool (alembic, yoyo-migrations) was considered: both bring a
second database driver stack (SQLAlchemy or DB-API drivers beside asyncpg
and sqlite3) for what is here a short list of additive statements run in
the store's own transaction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from conveyor.errors import StoreError
from conveyor.store._protocol import Store, Transaction

__all__ = ["LAYOUT", "LayoutError", "ensure_layout", "recorded_layout"]

LAYOUT = 2
"""1: the tables as they were before layouts were recorded;
2: ``conveyor_api_keys.scopes`` (``jobs``, ``admin:read``, ``admin:write``)."""

_TABLE = (
    "CREATE TABLE IF NOT EXISTS conveyor_schema ("
    "id INTEGER PRIMARY KEY, layout INTEGER NOT NULL, migrated_at DOUBLE PRECISION NOT NULL)"
)


class LayoutError(StoreError):
    """The database's layout is one this Conveyor will not use or change."""


async def _has_column(tx: Transaction, table: str, column: str) -> bool | None:
    """Whether ``table`` has ``column`` (None: no such table)."""
    try:
        async with tx.savepoint():
            await tx.fetchone(f"SELECT * FROM {table} LIMIT 0")
    except Exception:
        return None
    try:
        async with tx.savepoint():
            await tx.fetchone(f"SELECT {column} FROM {table} LIMIT 0")
    except Exception:
        return False
    return True


async def _api_key_scopes(tx: Transaction) -> None:
    if await _has_column(tx, "conveyor_api_keys", "scopes") is False:
        await tx.execute(
            "ALTER TABLE conveyor_api_keys ADD COLUMN scopes TEXT NOT NULL DEFAULT 'jobs'"
        )


UPGRADES: dict[int, Callable[[Transaction], Awaitable[None]]] = {2: _api_key_scopes}
"""The upgrade to each layout from the one before."""


async def recorded_layout(tx: Transaction) -> int | None:
    """The layout ``conveyor_schema`` records (None: none recorded, or no
    such table yet). Any other failure, a connection lost above all, is
    raised: read as "not recorded" it would send a database at the current
    layout through the upgrades, or refuse it as unmigrated."""
    try:
        async with tx.savepoint():
            row = await tx.fetchone("SELECT layout FROM conveyor_schema WHERE id = 1")
    except Exception as exc:  # SQLite raises its own error, PostgreSQL a StoreError
        if _no_such_table(exc):
            return None
        raise
    return None if row is None else int(row[0])


def _no_such_table(exc: BaseException) -> bool:
    """SQLite's "no such table" or PostgreSQL's undefined_table (42P01)."""
    return any(
        getattr(e, "sqlstate", None) == "42P01" or "no such table" in str(e)
        for e in (exc, exc.__cause__)
        if e is not None
    )


async def ensure_layout(store: Store, *, migrate: bool, now: float) -> tuple[int | None, int]:
    """Check (and with ``migrate``, bring) the store's database to
    ``LAYOUT``; returns (the layout found, the layout now)."""
    async with store.transaction() as tx:
        found = await recorded_layout(tx)
        if found == LAYOUT:
            return found, found
        if found is not None and found > LAYOUT:
            raise LayoutError(
                f"the database's Conveyor tables are at layout {found}, newer than this "
                f"Conveyor's {LAYOUT}: a newer release migrated them; run that release or newer"
            )
        if not migrate:
            was = "not recorded" if found is None else f"at layout {found}"
            raise LayoutError(
                f"the database's Conveyor tables are {was}, this Conveyor needs layout "
                f"{LAYOUT}; run `conveyor migrate` (migrate on start is off)"
            )
        await tx.execute(_TABLE)  # on PostgreSQL: the namespace's DDL lock from here
        found = await recorded_layout(tx)  # another process may have just done it
        if found is not None and found >= LAYOUT:
            return found, found
        for layout in range((found or 1) + 1, LAYOUT + 1):
            await UPGRADES[layout](tx)
        await tx.execute(
            "INSERT INTO conveyor_schema (id, layout, migrated_at) VALUES (1, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET layout = excluded.layout, "
            "migrated_at = excluded.migrated_at",
            (LAYOUT, now),
        )
    return found, LAYOUT
