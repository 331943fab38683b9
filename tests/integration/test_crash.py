"""A real worker process killed with SIGKILL mid-stream loses nothing and applies
nothing twice; one sent SIGTERM finishes its in-flight work and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from conveyor import Message
from conveyor.brokers.sqlite import SqliteBroker
from tests.helpers import wait_until
from tests.integration.crash_app import SCHEMA

APP = Path(__file__).with_name("crash_app.py")


@dataclass(frozen=True)
class Files:
    broker: Path
    store: Path

    @property
    def urls(self) -> tuple[str, str]:
        return f"sqlite:///{self.broker}", f"sqlite:///{self.store}"


@pytest.fixture(params=["bound", "split"])
def files(request: pytest.FixtureRequest, tmp_path: Path) -> Files:
    """Bound: broker and store in one file. Split (the generic path): a SQLite
    broker file and a separate SQLite store file."""
    if request.param == "bound":
        return Files(tmp_path / "conveyor.db", tmp_path / "conveyor.db")
    return Files(tmp_path / "broker.db", tmp_path / "store.db")


def sql(path: Path, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(query, params).fetchall()


def count(path: Path, query: str) -> int:
    return int(sql(path, query)[0][0])


def prepare(files: Files, n: int) -> None:
    """Create the effect tables and durably publish ``n`` messages."""
    with contextlib.closing(sqlite3.connect(files.store)) as conn:
        conn.executescript(SCHEMA)

    async def publish() -> None:
        broker = SqliteBroker(files.urls[0])
        await broker.connect()
        try:
            await broker.declare("work", "apply")
            await broker.publish([Message.create("work", {"n": i}) for i in range(n)])
        finally:
            await broker.close()

    asyncio.run(publish())


def settled(files: Files, n: int) -> bool:
    """Every message applied and forwarded, and nothing left to deliver."""
    return (
        count(files.store, "SELECT COUNT(*) FROM effects") >= n
        and count(files.store, "SELECT COUNT(*) FROM downstream") >= n
        and count(files.broker, "SELECT COUNT(*) FROM conveyor_queue") == 0
        and count(files.store, "SELECT COUNT(*) FROM conveyor_outbox") == 0
    )


def idle(files: Files) -> bool:
    """Nothing left to deliver or to relay."""
    return (
        count(files.broker, "SELECT COUNT(*) FROM conveyor_queue") == 0
        and count(files.store, "SELECT COUNT(*) FROM conveyor_outbox") == 0
    )


def assert_exactly_once(files: Files, n: int) -> None:
    for table in ("effects", "downstream"):
        rows = sql(
            files.store, f"SELECT COUNT(*), COUNT(DISTINCT msg_id), COUNT(DISTINCT n) FROM {table}"
        )
        assert rows == [(n, n, n)], f"{table}: (rows, distinct ids, distinct numbers)"
    assert sql(files.store, "SELECT MIN(n), MAX(n) FROM effects") == [(0, n - 1)]
    assert count(files.broker, "SELECT COUNT(*) FROM conveyor_queue") == 0
    assert count(files.store, "SELECT COUNT(*) FROM conveyor_outbox") == 0
    assert count(files.store, "SELECT COUNT(*) FROM conveyor_dead") == 0


class WorkerProcess:
    """``crash_app.py`` in a subprocess, its output kept in a log file."""

    def __init__(self, files: Files, *args: str) -> None:
        self.log = files.store.with_name(f"worker-{uuid.uuid4().hex[:8]}.log")
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(APP), *files.urls, *args],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=files.store.parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._out.close()

    def wait_until(self, predicate: Any, *, timeout: float) -> None:
        try:
            wait_until(lambda: predicate() or self.proc.poll() is not None, timeout=timeout)
        except AssertionError:
            raise AssertionError(f"timed out; worker output:\n{self.output()}") from None
        assert self.proc.poll() is None, f"worker exited early:\n{self.output()}"

    def terminate(self) -> int:
        """SIGTERM, then the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")


def test_kill_9_mid_stream_applies_every_message_exactly_once(files: Files) -> None:
    """A worker killed with SIGKILL part-way through 3000 messages loses none and
    applies none twice: after a restart every message is applied and forwarded
    exactly once and the queue is empty."""
    n = 3000
    prepare(files, n)
    with WorkerProcess(files, "--delay", "0.001", "--ack-delay", "0.004") as first:
        first.wait_until(
            lambda: count(files.store, "SELECT COUNT(*) FROM effects") >= n // 10, timeout=30
        )
        first.proc.send_signal(signal.SIGKILL)
        assert first.proc.wait(timeout=10) == -signal.SIGKILL
    applied = count(files.store, "SELECT COUNT(*) FROM effects")
    assert 0 < applied < n, "the worker was not killed mid-stream"

    with WorkerProcess(files) as second:
        second.wait_until(lambda: settled(files, n), timeout=60)
        assert second.terminate() == 0, second.output()
    assert_exactly_once(files, n)


def test_sigterm_finishes_in_flight_work_and_exits_0(files: Files) -> None:
    """SIGTERM while a handler is working: the worker finishes that message, commits
    and acknowledges it, stops fetching and exits 0; a restarted worker handles the
    rest, each message exactly once."""
    n, held = 300, 150
    prepare(files, n)
    marker = files.store.with_name("held")
    with WorkerProcess(
        files, "--delay", "0.002", "--hold", str(held), "--marker", str(marker)
    ) as first:
        first.wait_until(marker.exists, timeout=30)
        assert first.terminate() == 0, first.output()
    held_rows = sql(files.store, "SELECT msg_id FROM effects WHERE n = ?", (held,))
    assert len(held_rows) == 1, "the in-flight message was not committed"
    queued = sql(files.broker, "SELECT COUNT(*) FROM conveyor_queue WHERE msg_id = ?", held_rows[0])
    assert queued == [(0,)], "the in-flight message was not acknowledged"
    assert count(files.store, "SELECT COUNT(*) FROM effects") < n, "shutdown did not stop fetching"
    assert count(files.store, "SELECT COUNT(*) FROM effects") == count(
        files.store, "SELECT COUNT(DISTINCT msg_id) FROM effects"
    )

    with WorkerProcess(files) as second:
        second.wait_until(lambda: settled(files, n), timeout=60)
        assert second.terminate() == 0, second.output()
    assert_exactly_once(files, n)


def test_message_that_kills_its_worker_ends_as_undeliverable(files: Files) -> None:
    """A message whose handling kills the worker process every time uses up an
    attempt per crash and, past max_attempts, is dead-lettered as undeliverable
    instead of crashing workers forever; every other message is applied once."""
    # Last, in a batch with others: its first crash rolls their batch back too
    # (one attempt each); from then on a redelivered message is claimed
    # (bound path) or committed and acknowledged (generic path) alone, so
    # they do not use up further attempts with it.
    n, max_attempts = 40, 2
    poison = n - 1
    prepare(files, n)
    crashes = 0
    while True:
        with WorkerProcess(
            files, "--poison", str(poison), "--max-attempts", str(max_attempts)
        ) as worker:
            wait_until(lambda: worker.proc.poll() is not None or idle(files), timeout=30)
            if worker.proc.poll() is None:
                assert worker.terminate() == 0, worker.output()
                break
            assert worker.proc.returncode == -signal.SIGKILL, worker.output()
        crashes += 1
        assert crashes <= max_attempts, f"the poison message crashed {crashes} workers"
    assert crashes == max_attempts
    dead = sql(files.store, "SELECT error_type, attempts, CAST(payload AS TEXT) FROM conveyor_dead")
    assert dead == [("Undeliverable", max_attempts + 1, f'{{"n":{poison}}}')], (
        "only the poison message may be dead-lettered"
    )
    for table in ("effects", "downstream"):
        rows = sql(
            files.store, f"SELECT COUNT(*), COUNT(DISTINCT n) FROM {table} WHERE n != ?", (poison,)
        )
        assert rows == [(n - 1, n - 1)], table
    assert count(files.store, f"SELECT COUNT(*) FROM effects WHERE n = {poison}") == 0
    assert count(files.broker, "SELECT COUNT(*) FROM conveyor_queue") == 0
