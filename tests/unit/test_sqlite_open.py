"""Opening a new SQLite file while another process holds its write lock."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from conveyor._sqlite import Database


def test_opening_waits_for_a_write_lock_held_at_start_up(tmp_path: Path) -> None:
    """Switching a new file to WAL needs the write lock; while another
    connection holds it (processes starting together), opening waits for it
    instead of failing with "database is locked"."""
    path = tmp_path / "new.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("CREATE TABLE t (x INTEGER)")
    released = threading.Event()

    def release() -> None:
        holder.execute("COMMIT")
        released.set()

    timer = threading.Timer(0.3, release)
    timer.start()
    try:
        db = Database(str(path), "NORMAL")
    finally:
        timer.join()
        holder.close()
    try:
        assert released.is_set()
        assert db.conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        db._closing.set()
        db.conn.close()
