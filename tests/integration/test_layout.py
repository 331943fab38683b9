"""The recorded layout of Conveyor's tables (conveyor.store._schema): a
newer one is refused, an older or unrecorded one is migrated on start or,
with migrate off, refused until `conveyor migrate` runs; on SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import App, Settings
from conveyor.store._schema import LAYOUT, LayoutError
from tests.namespaces import drop_all
from tests.servers import POSTGRES_URL, namespaced

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'layout.db'}"
        return
    found = namespaced(POSTGRES_URL, "layout")
    yield found
    asyncio.run(drop_all([found]))


def _app(url: str, *, migrate: bool = True) -> App:
    return App("layout", settings=Settings(broker_url=url, store_url=url, migrate=migrate))


async def _set_layout(url: str, layout: int | None) -> None:
    async with _app(url) as app, app.store.transaction() as tx:
        if layout is None:
            await tx.execute("DELETE FROM conveyor_schema")
        else:
            await tx.execute("UPDATE conveyor_schema SET layout = ?", (layout,))


async def _layout(app: App) -> int | None:
    row = await app.store.read("SELECT layout FROM conveyor_schema")
    return None if not row else int(row[0][0])


async def test_a_new_database_is_recorded_at_this_layout(url: str) -> None:
    async with _app(url) as app:
        assert await _layout(app) == LAYOUT


async def test_a_newer_layout_is_refused_in_one_line(url: str) -> None:
    await _set_layout(url, LAYOUT + 1)
    app = _app(url)
    with pytest.raises(LayoutError) as info:
        await app.connect()
    await app.close()
    text = str(info.value)
    assert f"layout {LAYOUT + 1}, newer than this Conveyor's {LAYOUT}" in text
    assert "\n" not in text


async def test_with_migrate_off_an_unrecorded_layout_waits_for_conveyor_migrate(url: str) -> None:
    await _set_layout(url, None)
    app = _app(url, migrate=False)
    with pytest.raises(LayoutError, match="run `conveyor migrate`"):
        await app.connect()
    await app.close()
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "conveyor", "migrate", "--broker", url, "--store", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"no recorded layout -> layout {LAYOUT}" in done.stdout
    async with _app(url, migrate=False) as migrated:
        assert await _layout(migrated) == LAYOUT


async def test_an_older_layout_is_migrated_on_start(url: str) -> None:
    await _set_layout(url, 1)
    async with _app(url) as app:
        assert await _layout(app) == LAYOUT


def test_a_command_refuses_a_newer_database_in_one_line(url: str) -> None:
    asyncio.run(_set_layout(url, LAYOUT + 7))
    done = subprocess.run(
        [sys.executable, "-m", "conveyor", "queues", "--broker", url, "--store", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"layout {LAYOUT + 7}, newer" in lines[0]


async def test_a_lost_connection_reading_the_layout_is_not_an_unrecorded_layout(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection lost at the first read is that error, raised: not a
    database "not recorded" (refused with migrate off, or sent through the
    upgrades); a missing table still reads as not recorded."""
    from conveyor.errors import StoreError
    from conveyor.store._schema import ensure_layout

    async with _app(url) as app:
        async with app.store.transaction() as tx:
            await tx.execute("DROP TABLE conveyor_schema")
        assert (await ensure_layout(app.store, migrate=True, now=0.0))[0] is None  # recorded again

        async def lost(self: object, sql: str, params: object = ()) -> None:
            raise StoreError("PostgreSQL or SQLite: connection lost") from ConnectionResetError(104)

        async with app.store.transaction() as tx:
            monkeypatch.setattr(type(tx), "fetchone", lost)
        with pytest.raises(StoreError, match="connection lost") as info:
            await ensure_layout(app.store, migrate=False, now=0.0)
        assert not isinstance(info.value, LayoutError)
