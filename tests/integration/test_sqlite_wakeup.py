"""An idle worker on the embedded SQLite broker wakes when another process
commits, without polling: the kernel says when the database's log is
written (inotify). Where it cannot, waiters poll, faster after a change."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path

import pytest

from conveyor import _sqlite
from conveyor._sqlite import Database
from conveyor.brokers.sqlite import SqliteBroker
from conveyor.messages import Message
from conveyor.testing import eventually


async def _write_elsewhere(path: Path) -> None:
    """Commit a row from another process, as a publisher would."""
    script = (
        "import sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('CREATE TABLE IF NOT EXISTS other (x)')\n"
        "c.execute('INSERT INTO other VALUES (1)')\n"
        "c.close()\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, str(path))
    assert await proc.wait() == 0


async def test_a_waiter_wakes_on_another_process_commit_without_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With polling made useless (first poll after 10 minutes), a waiter still
    returns as soon as another process commits: the wake-up is the kernel's."""
    monkeypatch.setattr(_sqlite, "_FIRST_POLL", 600.0)
    monkeypatch.setattr(_sqlite, "_MAX_POLL", 600.0)
    path = tmp_path / "q.db"
    db = Database.acquire(f"sqlite:///{path}")
    try:
        since = db.version()
        waiting = asyncio.create_task(db.wait_for_change(since, timeout=600))
        await eventually(lambda: bool(db._waiters), what="the waiter is registered")
        assert db._watch is not None, "no inotify watch on Linux"
        await _write_elsewhere(path)
        version = await asyncio.wait_for(waiting, 30)
        assert version[0] != since[0]
    finally:
        db.release()


async def test_polling_wakes_a_waiter_where_the_kernel_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without inotify the waiter polls data_version and returns once another
    process committed."""
    monkeypatch.setattr(Database, "watch_changes", False)
    path = tmp_path / "q.db"
    db = Database.acquire(f"sqlite:///{path}")
    try:
        since = db.version()
        waiting = asyncio.create_task(db.wait_for_change(since, timeout=600))
        await eventually(lambda: bool(db._waiters), what="the waiter is registered")
        assert db._watch is None
        await _write_elsewhere(path)
        version = await asyncio.wait_for(waiting, 30)
        assert version[0] != since[0]
    finally:
        db.release()


async def test_a_publish_in_this_process_wakes_a_waiting_consumer(tmp_path: Path) -> None:
    """A publish in the same process wakes a consumer waiting on its topic,
    also one that started waiting after the publish (the version moved)."""
    broker = SqliteBroker(f"sqlite:///{tmp_path / 'q.db'}")
    await broker.connect()
    try:
        await broker.declare("t", "g")
        waiting = asyncio.create_task(broker.wait("t", "g", timeout=600))
        await eventually(lambda: bool(broker.db._waiters), what="the consumer waits")
        await broker.publish([Message.create("t", {})])
        await asyncio.wait_for(waiting, 30)
        assert len(await broker.fetch("t", "g", max_messages=10, lease=30)) == 1
        # Published while nobody waited: the next wait returns at once.
        await broker.publish([Message.create("t", {})])
        await asyncio.wait_for(broker.wait("t", "g", timeout=600), 30)
    finally:
        await broker.close()


def test_idle_database_sees_no_events_from_its_own_reads(tmp_path: Path) -> None:
    """Reading the database writes nothing to its log: an idle worker's
    fetches of empty queues cause no wake-ups of their own."""
    path = tmp_path / "q.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    wal = Path(f"{path}-wal")
    before = wal.stat().st_mtime_ns, wal.stat().st_size
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE t SET x = 1 WHERE x = 2")  # an empty claim
    conn.execute("COMMIT")
    assert (wal.stat().st_mtime_ns, wal.stat().st_size) == before
    conn.close()
