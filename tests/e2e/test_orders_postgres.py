"""The order demo on a PostgreSQL broker and store (one database, one namespace)."""

from __future__ import annotations

import asyncio
import io
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from rich.console import Console

from conveyor import ConfigError
from conveyor.examples.orders import INVARIANTS
from conveyor.examples.orders.demo import DemoReport, Faults, run_demo
from tests.namespaces import drop_all
from tests.postgres import drop_namespace, drop_namespace_async
from tests.servers import AMQP_URL, POSTGRES_URL, REDIS_URL, namespaced

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def url() -> AsyncIterator[str]:
    """A fresh namespace, dropped after the test."""
    fresh = namespaced(POSTGRES_URL, prefix="e2e")
    yield fresh
    await drop_namespace_async(fresh)


async def _demo(url: str, **kwargs: object) -> tuple[DemoReport, str]:
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False, color_system=None)
    report = await run_demo(broker_url=url, store_url=url, console=console, **kwargs)  # type: ignore[arg-type]
    return report, out.getvalue()


async def _scalar(url: str, sql: str) -> int:
    base, _, query = url.partition("?")
    namespace = query.split("namespace=", 1)[1]
    conn = await asyncpg.connect(base, server_settings={"search_path": namespace})
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def test_demo_on_postgres_keeps_every_invariant(url: str) -> None:
    """Under errors, declines, ship failures and duplicates, on PostgreSQL, every invariant holds."""
    faults = Faults(error_rate=0.1, decline_rate=0.1, ship_failure_rate=0.1, duplicate_rate=0.1)
    report, output = await _demo(url, orders=80, faults=faults, stock_per_sku=12, live=False)
    assert report.ok, report.invariants
    assert [name for name, held, _ in report.invariants if held] == list(INVARIANTS)
    assert sum(report.counts.values()) == 80
    assert report.counts["DELIVERED"] > 0
    assert report.counts["CANCELLED"] > 0
    assert report.counts["DELIVERED"] + report.counts["CANCELLED"] == 80
    assert report.dead_letters == 0
    assert "dead letters: 0" in output
    assert await _scalar(url, "SELECT COUNT(*) FROM orders") == 80
    assert await _scalar(url, "SELECT COUNT(*) FROM conveyor_queue") == 0
    assert await _scalar(url, "SELECT COUNT(*) FROM conveyor_outbox") == 0, "bound: no outbox"
    # Duplicated requests carry new message ids: the inbox saw more than 80.
    assert await _scalar(url, "SELECT COUNT(*) FROM conveyor_inbox WHERE grp = 'inventory'") > 80


async def test_demo_refuses_a_namespace_with_an_earlier_run(url: str) -> None:
    """A second run in the same namespace is refused instead of mixing two runs' orders."""
    report, _ = await _demo(url, orders=5, faults=Faults.none(), live=False)
    assert report.ok, report.invariants
    with pytest.raises(ConfigError, match="already holds 5 orders"):
        await _demo(url, orders=5, faults=Faults.none(), live=False)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor", "demo", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_cli_demo_on_postgres_uses_a_fresh_namespace() -> None:
    """`conveyor demo --broker postgresql://...` without a namespace runs in a new one."""
    proc = _cli("--orders", "20", "--broker", POSTGRES_URL)
    found = re.search(r"PostgreSQL namespace for this run: (demo_[0-9a-f]+)", proc.stdout)
    if found:
        drop_namespace(f"{POSTGRES_URL}?namespace={found.group(1)}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert found, proc.stdout
    assert "all invariants hold" in proc.stdout


def test_cli_demo_refuses_db_with_broker(tmp_path: Path) -> None:
    """--db (the SQLite shortcut) together with --broker/--store is one clear error."""
    proc = _cli("--db", str(tmp_path / "x.db"), "--broker", POSTGRES_URL)
    assert proc.returncode == 1
    assert "not both" in proc.stderr
    assert not (tmp_path / "x.db").exists()


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_cli_demo_on_a_server_broker_with_a_postgres_store(broker: str) -> None:
    """`conveyor demo --broker redis://|amqp:// --store postgresql://` runs the order
    system across two servers (the generic path: outbox + relay) and every
    invariant holds."""
    broker_url = namespaced(REDIS_URL if broker == "redis" else AMQP_URL, prefix="e2e")
    store_url = namespaced(POSTGRES_URL, prefix="e2e")
    try:
        proc = _cli("--orders", "60", "--broker", broker_url, "--store", store_url)
    finally:
        asyncio.run(drop_all([broker_url, store_url]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all invariants hold" in proc.stdout
    assert "dead letters: 0" in proc.stdout
