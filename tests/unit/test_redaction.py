"""Passwords never appear in errors, logs or CLI output: one redact() for
every URL Conveyor prints."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor import App, ConfigError, Settings
from conveyor._redis import RedisConfig
from conveyor._urls import redact
from conveyor.brokers import broker_from_url
from conveyor.store import store_from_url
from conveyor.testing import running
from tests.postgres import drop_namespace_async
from tests.servers import POSTGRES_URL, namespaced

SECRET = "s3cr3t-pw"

BAD_URLS = [
    f"amqp://guest:{SECRET}@127.0.0.1:5672/?bogus=1",
    f"amqp://guest:{SECRET}@127.0.0.1:5672/?queue_type=fast",
    f"amqp://guest:{SECRET}@127.0.0.1:5672/?connect_timeout=soon",
    f"nats://user:{SECRET}@127.0.0.1:4222?bogus=1",
    f"nats://user:{SECRET}@127.0.0.1:4222/path",
    f"postgresql://root:{SECRET}@127.0.0.1/test?bogus=1",
    f"postgresql://root:{SECRET}@127.0.0.1/test?pool_min=x",
    f"postgresql://root:{SECRET}@127.0.0.1/",
    f"redis://:{SECRET}@127.0.0.1:6379/x",
    f"redis://127.0.0.1:6379/0?password={SECRET}&bogus=1",
    f"kafka://u:{SECRET}@127.0.0.1:9092",
    f"bogus://u:{SECRET}@host/x",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_config_errors_hide_the_password(url: str) -> None:
    """Every URL parser's error names the URL with its password as ***."""
    with pytest.raises(ConfigError) as info:
        broker_from_url(url)
    assert SECRET not in str(info.value)
    if url.startswith("postgresql:"):
        with pytest.raises(ConfigError) as info:
            store_from_url(url)
        assert SECRET not in str(info.value)
    if url.startswith("redis:"):
        with pytest.raises(ConfigError) as info:
            RedisConfig(url)
        assert SECRET not in str(info.value)


def test_redact_hides_userinfo_and_query_passwords() -> None:
    """user:password@, password=, token= and secret= are hidden, users kept."""
    assert redact(f"amqp://guest:{SECRET}@h:5672/v") == "amqp://guest:***@h:5672/v"
    assert redact(f"nats://u:{SECRET}@h1:4222,h2:4222") == "nats://u:***@h1:4222,h2:4222"
    assert (
        redact(f"redis://h/0?password={SECRET}&namespace=n")
        == "redis://h/0?password=***&namespace=n"
    )
    assert redact(f"x://h/?token={SECRET}") == "x://h/?token=***"
    assert redact("postgresql://root@h/db") == "postgresql://root@h/db"


async def test_the_worker_start_line_hides_the_password(caplog: pytest.LogCaptureFixture) -> None:
    """The worker names its broker and store without their password."""
    url = namespaced(POSTGRES_URL.replace("root@", f"root:{SECRET}@"), prefix="redact")
    app = App("redact", settings=Settings(broker_url=url, store_url=url))
    caplog.set_level(logging.INFO, logger="conveyor.worker")
    try:
        async with app, running(app):
            pass
    finally:
        await drop_namespace_async(url)
    started = [r.getMessage() for r in caplog.records if "worker started" in r.getMessage()]
    assert started
    assert "root:***@" in started[0]
    assert all(SECRET not in r.getMessage() for r in caplog.records)


def test_cli_output_and_errors_hide_the_password(tmp_path: Path) -> None:
    """`conveyor queues` titles its table with the broker URL, and a bad URL
    is an error line: neither shows the password."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    url = namespaced(POSTGRES_URL.replace("root@", f"root:{SECRET}@"), prefix="redact")
    try:
        subprocess.run(
            [sys.executable, "-m", "conveyor", "publish", "t", "{}", "--broker", url],
            cwd=tmp_path,
            env=env,
            check=True,
            capture_output=True,
        )
        shown = subprocess.run(
            [sys.executable, "-m", "conveyor", "queues", "--broker", url],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
    finally:
        import asyncio

        asyncio.run(drop_namespace_async(url))
    assert shown.returncode == 0, shown.stderr
    assert "root:***@" in shown.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "conveyor", "queues", "--broker", BAD_URLS[0]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    for out in (shown.stdout, shown.stderr, bad.stdout, bad.stderr):
        assert SECRET not in out
