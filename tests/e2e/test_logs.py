"""`--log-format json`: every record one JSON object on its own line, with
its stable event name and the ids of the message being handled."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.helpers import wait_until

APP = textwrap.dedent(
    """
    from conveyor import App, Retry, Settings

    app = App("logs", settings=Settings(broker_url="sqlite:///q.db", idle_poll=0.02))

    @app.handler("jobs", group="workers")
    async def work(ctx, body: dict):
        ctx.log.info("working on %s", body["n"])
        if ctx.attempt == 1:
            raise Retry(delay=0)
        await ctx.execute("CREATE TABLE IF NOT EXISTS done (n INTEGER)")
        await ctx.execute("INSERT INTO done VALUES (?)", (body["n"],))
    """
)


def test_json_logs_carry_event_names_and_message_ids(tmp_path: Path) -> None:
    """A worker with --log-format json writes only JSON lines; the retry and
    the handler's own ctx.log records carry the message id, correlation id,
    topic, group, attempt and the trace id of the message's traceparent."""
    (tmp_path / "app.py").write_text(APP)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    published = subprocess.run(
        [
            sys.executable,
            "-m",
            "conveyor",
            "publish",
            "jobs",
            '{"n": 7}',
            "--broker",
            "sqlite:///q.db",
        ],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    message_id = published.stdout.strip()
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "conveyor",
            "worker",
            "app:app",
            "--log-format",
            "json",
            "--log-level",
            "debug",
        ],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )

    def done() -> bool:
        try:
            with sqlite3.connect(tmp_path / "q.db") as conn:
                return bool(conn.execute("SELECT 1 FROM done").fetchone())
        except sqlite3.Error:
            return False

    try:
        wait_until(done, timeout=30)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    records = [json.loads(line) for line in err.splitlines()]  # every line is JSON
    assert all({"event", "message", "level", "timestamp", "logger"} <= r.keys() for r in records)
    events = [r["event"] for r in records]
    assert "conveyor.worker_started" in events
    assert "conveyor.retry_scheduled" in events
    assert "conveyor.handled" in events
    [retry] = [r for r in records if r["event"] == "conveyor.retry_scheduled"]
    assert retry["message_id"] == message_id
    assert retry["correlation_id"] == message_id
    assert (retry["topic"], retry["group"], retry["attempt"]) == ("jobs", "workers", 1)
    own = [r for r in records if r["message"].startswith("working on 7")]
    assert [r["attempt"] for r in own] == [1, 2]
    assert {r["message_id"] for r in own} == {message_id}
    assert len({r["trace_id"] for r in own}) == 1
    assert own[0]["trace_id"] == retry["trace_id"]
    assert len(own[0]["trace_id"]) == 32
