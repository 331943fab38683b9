"""kill -9 of the saga orchestrator, over and over, during 300 concurrent
order sagas: every saga ends terminal, no step or compensation takes effect
twice, every history rebuilds to its record and the order invariants hold."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conveyor import App, Settings
from conveyor.examples.orders import check_invariants, create_app, create_schema, place_order
from conveyor.examples.orders.demo import PRODUCTS
from conveyor.sagas import TERMINAL, list_sagas, load_events, rebuild
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[2]
ORDERS = 300
KILLS = 8


def _count(db: Path, sql: str) -> int:
    conn = sqlite3.connect(db, timeout=30)
    try:
        (n,) = conn.execute(sql).fetchone()
        return int(n)
    finally:
        conn.close()


def _terminal(db: Path) -> int:
    return _count(db, "SELECT COUNT(*) FROM orders WHERE state IN ('DELIVERED', 'CANCELLED')")


def _events(db: Path) -> int:
    return _count(db, "SELECT COUNT(*) FROM conveyor_saga_events")


def _worker(url: str, services: str, seed: int, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SAGA_CRASH_URL": url,
        "SAGA_CRASH_SERVICES": services,
        "SAGA_CRASH_SEED": str(seed),
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "conveyor", "worker", "tests.e2e.saga_crash_app:app"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def _prepare(url: str) -> None:
    app = create_app(settings=Settings(broker_url=url, store_url=url), services=())
    async with app:
        await create_schema(app)
        async with app.transaction() as s:
            for sku in PRODUCTS:
                await s.execute("INSERT INTO stock VALUES (?, 60, 60)", (sku,))
        rng = random.Random(5)
        for n in range(ORDERS):
            sku = rng.choice(sorted(PRODUCTS))
            qty = rng.randint(1, 3)
            await place_order(
                app, order_id=f"ord-{n:04d}", sku=sku, qty=qty, amount=PRODUCTS[sku] * qty
            )


@pytest.mark.slow
def test_orchestrator_killed_at_random_points_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """300 sagas run while the orchestrator is SIGKILLed and restarted eight
    times (participants keep running): all end COMPLETED or COMPENSATED, each
    step succeeded and each compensation ran at most once per saga, the
    stored state equals the folded history, and the invariants hold."""
    db = tmp_path / "orders.db"
    url = f"sqlite:///{db}"
    log = tmp_path / "workers.log"
    asyncio.run(_prepare(url))
    rng = random.Random(11)
    participants = _worker(url, "inventory,payment,shipping", 1, log)
    orchestrator = _worker(url, "orders", 2, log)
    progress_at_kills: list[int] = []
    try:
        for kill in range(KILLS):
            # Kill at a random point: once the restarted orchestrator has
            # recorded another 20-150 saga events.
            target = _events(db) + rng.randint(20, 150)
            wait_until(lambda target=target: _events(db) >= target, timeout=60, interval=0.005)
            orchestrator.send_signal(signal.SIGKILL)
            assert orchestrator.wait(timeout=10) == -signal.SIGKILL
            progress_at_kills.append(_terminal(db))
            orchestrator = _worker(url, "orders", 100 + kill, log)
        wait_until(lambda: _terminal(db) == ORDERS, timeout=180, interval=0.2)
    finally:
        for proc in (orchestrator, participants):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (orchestrator, participants):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    output = log.read_text(errors="replace")
    assert any(0 < p < ORDERS for p in progress_at_kills), (progress_at_kills, output[-3000:])
    asyncio.run(_verify(url))


async def _verify(url: str) -> None:
    async with App("check", settings=Settings(broker_url=url, store_url=url)) as app:
        results = await check_invariants(app)
        assert all(held for _, held, _ in results), results
        sagas = await list_sagas(app.store, limit=10 * ORDERS)
        assert len(sagas) == ORDERS
        assert all(s.state in TERMINAL and s.state != "FAILED" for s in sagas), Counter(
            s.state for s in sagas
        )
        async with app.store.transaction() as tx:
            for record in sagas:
                events = await load_events(tx, record.id)
                assert rebuild(record.id, events) == record
                done = Counter(
                    (e.step, e.type) for e in events if e.type in ("succeeded", "compensated")
                )
                assert all(n == 1 for n in done.values()), (record.id, done)
            rows = await tx.fetchall(
                "SELECT COUNT(*) FROM conveyor_saga_steps GROUP BY saga_id, step HAVING COUNT(*) > 1"
            )
            assert rows == []
            # Every charge that was made for a cancelled order was refunded
            # once, and no order was charged twice.
            charges = await tx.fetchall(
                "SELECT order_id, COUNT(*) FROM payments WHERE kind = 'charge' GROUP BY order_id "
                "HAVING COUNT(*) > 1"
            )
            assert charges == []
