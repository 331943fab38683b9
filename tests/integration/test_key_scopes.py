"""API key scopes and the audit log, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conveyor import App, Settings
from conveyor.errors import ConfigError
from conveyor.http import ApiKeys
from conveyor.http._audit import AuditLog
from conveyor.store._schema import LAYOUT, ensure_layout
from tests.namespaces import drop_all
from tests.servers import POSTGRES_URL, namespaced


@pytest.fixture(params=["sqlite", "postgres"])
async def app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[App]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'keys.db'}"
    else:
        url = namespaced(POSTGRES_URL, "keys")
    application = App("keys", settings=Settings(broker_url=url, store_url=url))
    try:
        async with application:
            yield application
    finally:
        await drop_all([url])


async def test_scopes_are_stored_and_checked(app: App) -> None:
    """A key holds the scopes it was made with; admin:write implies admin:read."""
    keys = ApiKeys(app)
    reader = await keys.create("reader", scopes=["admin:read"])
    writer = await keys.create("writer", scopes=["admin:write", "jobs"])
    plain = await keys.create("plain")
    r, w, p = [await keys.authenticate(s) for s in (reader, writer, plain)]
    assert r is not None
    assert w is not None
    assert p is not None
    assert r.scopes == {"admin:read"}
    assert not r.allows("admin:write")
    assert not r.allows("jobs")
    assert w.allows("admin:read")
    assert w.allows("admin:write")
    assert w.allows("jobs")
    assert p.scopes == {"jobs"}
    assert not p.allows("admin:read")
    assert {k.name: set(k.scopes) for k in await keys.list()}["writer"] == {"admin:write", "jobs"}
    with pytest.raises(ConfigError, match="scope"):
        await keys.create("bad", scopes=["root"])


async def test_the_audit_log_pages_newest_first(app: App) -> None:
    """Entries written in a transaction come back newest first, a page at a
    time, and a batch count adds to its entry."""
    log = AuditLog(app.store)
    await log.ensure()
    ids = []
    async with app.store.transaction() as tx:
        for n in range(5):
            ids.append(
                await log.record(tx, actor="ops", action="replay", target={"n": n}, affected=n)
            )
        await log.add(tx, ids[0], 10)
    first = await log.entries(limit=3)
    assert [e.target["n"] for e in first] == [4, 3, 2]
    rest = await log.entries(limit=3, before=first[-1].id)
    assert [(e.target["n"], e.affected) for e in rest] == [(1, 1), (0, 10)]
    assert await log.entries(actor="nobody") == []


async def test_a_table_from_before_scopes_gets_the_column_and_keeps_jobs(app: App) -> None:
    """A database from before layouts were recorded, whose key table has no
    scopes column, is migrated once (two processes starting together take
    turns under the DDL lock); its keys keep the jobs scope, and what the
    previous release writes (no scopes column) still goes in."""
    secret = await ApiKeys(app).create("old")
    async with app.store.transaction() as tx:
        await tx.execute(
            "CREATE TABLE k2 AS SELECT name, key_hash, created_at, revoked_at "
            "FROM conveyor_api_keys"
        )
        await tx.execute("DROP TABLE conveyor_api_keys")
        await tx.execute("ALTER TABLE k2 RENAME TO conveyor_api_keys")
        await tx.execute("DROP TABLE conveyor_schema")
    now = app.clock.time()
    results = await asyncio.gather(
        ensure_layout(app.store, migrate=True, now=now),
        ensure_layout(app.store, migrate=True, now=now),
    )
    assert sorted(results, key=str) == sorted([(None, LAYOUT), (LAYOUT, LAYOUT)], key=str)
    for keys in (ApiKeys(app), ApiKeys(app)):
        key = await keys.authenticate(secret)
        assert key is not None
        assert key.scopes == {"jobs"}
    assert (await ApiKeys(app).create("new", scopes=["admin:read"])).startswith("cvk_")
    async with app.store.transaction() as tx:  # the previous release's INSERT
        await tx.execute(
            "INSERT INTO conveyor_api_keys (name, key_hash, created_at) VALUES (?, ?, ?)",
            ("older-release", "0" * 64, now),
        )
        row = await tx.fetchone(
            "SELECT scopes FROM conveyor_api_keys WHERE name = ?", ("older-release",)
        )
    assert row == ("jobs",)
