"""SQLite savepoints cost nothing for a scope that runs no statement."""

from __future__ import annotations

from pathlib import Path

from conveyor._sqlite import Database


class Undo(Exception):
    pass


async def test_a_scope_that_runs_nothing_issues_no_savepoint(tmp_path: Path) -> None:
    db = Database.acquire(f"sqlite:///{tmp_path / 'sp.db'}")
    try:
        db.conn.execute("CREATE TABLE t (v INTEGER)")
        seen: list[str] = []
        db.conn.set_trace_callback(seen.append)
        async with db.transaction() as tx:
            for _ in range(3):
                async with tx.savepoint():
                    pass  # a handler that writes nothing
            try:
                async with tx.savepoint():
                    raise Undo
            except Undo:
                pass
            async with tx.savepoint():
                await tx.execute("INSERT INTO t VALUES (1)")
        db.conn.set_trace_callback(None)
        kinds = [s.split()[0] for s in seen if s.split()[0] in ("SAVEPOINT", "RELEASE", "ROLLBACK")]
        assert kinds == ["SAVEPOINT", "RELEASE"]
    finally:
        db.release()


async def test_lazily_opened_scopes_still_undo_exactly_their_own_writes(tmp_path: Path) -> None:
    db = Database.acquire(f"sqlite:///{tmp_path / 'sp.db'}")
    try:
        db.conn.execute("CREATE TABLE t (v INTEGER)")
        async with db.transaction() as tx:
            async with tx.savepoint():  # outer: no statement until after the inner one
                try:
                    async with tx.savepoint():
                        await tx.execute("INSERT INTO t VALUES (1)")
                        raise Undo
                except Undo:
                    pass
                await tx.execute("INSERT INTO t VALUES (2)")
            try:
                async with tx.savepoint():
                    async with tx.savepoint():
                        await tx.execute("INSERT INTO t VALUES (3)")
                    raise Undo  # the outer scope undoes its inner scope's writes too
            except Undo:
                pass
            await tx.execute("INSERT INTO t VALUES (4)")
        assert [r[0] for r in db.conn.execute("SELECT v FROM t ORDER BY v")] == [2, 4]
    finally:
        db.release()
