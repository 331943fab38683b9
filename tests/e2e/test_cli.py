"""The ``conveyor`` command line, run as a subprocess like a user would."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conveyor.runtime import App, replay_dead_letters
from conveyor.settings import Settings
from conveyor.store import DeadLetterFilter
from conveyor.testing import eventually
from tests.helpers import wait_until


def cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"conveyor {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


APP = textwrap.dedent(
    """
    from conveyor import App, PermanentError, Settings

    app = App("cliapp", settings=Settings(broker_url="sqlite:///q.db", idle_poll=0.05))

    @app.handler("jobs", group="workers")
    async def work(ctx, body: dict):
        fixed = await ctx.fetchone("SELECT COUNT(*) FROM fixed")
        if body.get("poison") and not fixed[0]:
            raise PermanentError("cannot process poison " + str(body["n"]))
        await ctx.execute("INSERT INTO effects (n) VALUES (?)", (body["n"],))
    """
)


def _sql(path: Path, sql: str) -> list[tuple[object, ...]]:
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(sql).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def test_publish_then_queues_shows_the_message(tmp_path: Path) -> None:
    """A published message is durable and visible in `conveyor queues`."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    out = cli(
        "publish", "orders.placed", '{"id": 1}', "--key", "o-1", "--broker", url, cwd=tmp_path
    )
    message_id = out.stdout.strip()
    assert len(message_id) == 36
    assert message_id[14] == "7"  # a UUIDv7
    table = cli("queues", "--broker", url, cwd=tmp_path).stdout
    assert "orders.placed" in table
    assert _sql(tmp_path / "p.db", "SELECT msg_id FROM conveyor_queue") == [(message_id,)]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("publish", "t", "{}", "--broker", "bogus://x"), "unknown broker URL scheme 'bogus'"),
        (
            ("publish", "t", "{}", "--broker", "sqlite:///x.db?nope=1"),
            "unknown option 'nope' in SQLite URL",
        ),
        (("publish", "t", "{not json", "--broker", "sqlite:///x.db"), "not valid JSON"),
        (("publish", "t", "{}", "-H", "novalue", "--broker", "sqlite:///x.db"), "NAME=VALUE"),
        (("worker", "nosuchmodule:app"), "cannot import 'nosuchmodule'"),
        (("dlq", "replay", "--broker", "sqlite:///x.db"), "say which dead letters"),
        (("dlq", "show", "42", "--broker", "sqlite:///x.db"), "no dead letter with id 42"),
    ],
)
def test_bad_input_is_one_readable_line_and_nonzero_exit(
    tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    """Bad input exits non-zero with one `error:` line naming the problem, no traceback."""
    proc = cli(*args, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1


def test_invalid_setting_in_environment_stops_with_one_line(tmp_path: Path) -> None:
    """An invalid CONVEYOR_* value names the variable and exits non-zero."""
    env = {**os.environ, "CONVEYOR_PREFETCH": "zero"}
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor", "queues"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "CONVEYOR_PREFETCH" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_worker_dead_letters_then_dlq_list_show_replay_purge(tmp_path: Path) -> None:
    """Poison messages are dead-lettered by a worker process; the DLQ commands
    list and show them, replay applies each once after the fix, purge empties it;
    SIGTERM stops the worker with exit code 0."""
    (tmp_path / "cliapp.py").write_text(APP)
    db = tmp_path / "q.db"
    _sql(db, "CREATE TABLE effects (n INTEGER)")
    _sql(db, "CREATE TABLE fixed (x INTEGER)")
    url = f"sqlite:///{db}"
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "worker", "cliapp:app"],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: _has_table(db, "conveyor_subscriptions") and _subscribed(db))
        for n in range(6):
            body = json.dumps({"n": n, "poison": n % 2 == 1})
            cli("publish", "jobs", body, "--broker", url, cwd=tmp_path)
        wait_until(lambda: _count(db, "conveyor_dead") == 3 and _count(db, "effects") == 3)

        listed = cli("dlq", "list", "--json", "--broker", url, cwd=tmp_path).stdout
        records = [json.loads(line) for line in listed.splitlines()]
        assert sorted(r["message"]["payload"]["n"] for r in records) == [1, 3, 5]
        assert all(r["attempts"] == 1 for r in records)
        assert all("permanent error" in r["reason"] for r in records)
        assert {r["error_type"] for r in records} == {"conveyor.errors.PermanentError"}

        shown = cli("dlq", "show", str(records[0]["id"]), "--broker", url, cwd=tmp_path).stdout
        assert "Traceback" in shown
        assert "cannot process poison" in shown

        _sql(db, "INSERT INTO fixed VALUES (1)")
        first = str(records[0]["id"])
        out = cli("dlq", "replay", first, "--broker", url, cwd=tmp_path).stdout
        assert "replayed 1" in out
        wait_until(lambda: _count(db, "effects") == 4)
        assert _count(db, "conveyor_dead") == 2

        purged = cli("dlq", "purge", "--all", "--yes", "--broker", url, cwd=tmp_path).stdout
        assert "purged 2" in purged
        assert _count(db, "conveyor_dead") == 0

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        log.close()
    assert sorted(r[0] for r in _sql(db, "SELECT n FROM effects")) == [0, 1, 2, 4]


def _count(db: Path, table: str) -> int:
    return int(_sql(db, f"SELECT COUNT(*) FROM {table}")[0][0])  # type: ignore[call-overload]


def _has_table(db: Path, name: str) -> bool:
    return bool(_sql(db, f"SELECT 1 FROM sqlite_master WHERE name = '{name}'"))


def _subscribed(db: Path) -> bool:
    return bool(_sql(db, "SELECT 1 FROM conveyor_subscriptions WHERE grp = 'workers'"))


async def test_replay_goes_through_the_inbox(tmp_path: Path) -> None:
    """Replaying a dead letter for a message its group already applied applies nothing."""
    app = App("t", settings=Settings(broker_url=f"sqlite:///{tmp_path / 'r.db'}", idle_poll=0.02))
    applied: list[int] = []

    @app.handler("jobs", group="g")
    async def handle(ctx, body: dict) -> None:  # type: ignore[no-untyped-def,type-arg]
        applied.append(body["n"])

    async with app:
        message = await app.publish("jobs", {"n": 1})
        worker = app.worker()
        task = asyncio.create_task(worker.run())
        await eventually(lambda: bool(applied), what="first delivery")
        # A stale dead letter for the same message (e.g. written before a crash).
        async with app.store.transaction() as tx:
            await app.store.dead_letter(
                tx,
                group="g",
                message=message,
                reason="stale",
                error_type="X",
                traceback="",
            )
        assert await replay_dead_letters(app, DeadLetterFilter(group="g")) == 1

        async def drained() -> bool:
            stats = await app.broker.stats()
            return all(s.ready == 0 and s.in_flight == 0 for s in stats)

        await eventually(drained, what="replayed copy handled")
        worker.stop()
        await task
    assert applied == [1]


def test_bench_brokers_rejects_an_unknown_broker(tmp_path: Path) -> None:
    """`conveyor bench brokers` names an unknown broker in one line and exits 1."""
    proc = cli("bench", "brokers", "--brokers", "redis,nope", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "unknown broker(s) nope" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bench_without_a_subcommand_is_the_embedded_benchmark(tmp_path: Path) -> None:
    """`conveyor bench` with no subcommand still measures the embedded default."""
    out = tmp_path / "results.json"
    proc = cli("bench", "--messages", "1000", "--output", str(out), cwd=tmp_path)
    assert "Embedded default" in proc.stdout
    results = json.loads(out.read_text())
    assert results["uow"] > 0
    assert results["raw_uow"] > 0


def test_keys_create_prints_a_key_that_authenticates_and_is_stored_hashed(
    tmp_path: Path,
) -> None:
    """`conveyor keys create NAME` prints a secret once; the store holds only
    its hash, and the secret authenticates as NAME."""
    import asyncio
    import sqlite3

    from conveyor import App, Settings
    from conveyor.http import ApiKeys

    url = f"sqlite:///{tmp_path / 'keys.db'}"
    secret = cli("keys", "create", "billing", "--broker", url, cwd=tmp_path).stdout.strip()
    assert len(secret) > 32
    conn = sqlite3.connect(tmp_path / "keys.db")
    try:
        stored = conn.execute("SELECT name, key_hash FROM conveyor_api_keys").fetchall()
    finally:
        conn.close()
    assert [name for name, _ in stored] == ["billing"]
    assert secret not in {digest for _, digest in stored}

    async def authenticate(value: str) -> str | None:
        async with App("check", settings=Settings(broker_url=url)) as app:
            key = await ApiKeys(app).authenticate(value)
        return None if key is None else key.name

    assert asyncio.run(authenticate(secret)) == "billing"
    assert asyncio.run(authenticate(secret + "x")) is None
    refused = cli("keys", "create", "", "--broker", url, cwd=tmp_path, check=False)
    assert refused.returncode == 1
    assert "must be 1 to 200 characters" in refused.stderr
