"""The reference order system end to end: the demo under faults, its CLI, and
the invariant checker that later chaos tests rely on."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from conveyor import App, ConfigError, Settings
from conveyor.examples.orders import (
    INVARIANTS,
    OrderEvent,
    check_invariants,
    create_app,
    create_schema,
)
from conveyor.examples.orders.demo import DemoReport, Faults, run_demo
from conveyor.examples.orders.services import place_order, sagas_of
from conveyor.testing import eventually

REPO = Path(__file__).resolve().parents[2]


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200, force_terminal=False, color_system=None), out


def _rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _count(path: Path, sql: str) -> int:
    return int(_rows(path, sql)[0][0])


async def _demo(path: Path, **kwargs: object) -> tuple[DemoReport, str]:
    console, out = _console()
    url = f"sqlite:///{path}"
    report = await run_demo(broker_url=url, store_url=url, console=console, **kwargs)  # type: ignore[arg-type]
    return report, out.getvalue()


async def test_demo_with_faults_keeps_every_invariant(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Under errors, declines, ship failures, duplicates and low stock, every invariant holds."""
    caplog.set_level(logging.INFO, logger="conveyor.worker")
    db = tmp_path / "orders.db"
    faults = Faults(error_rate=0.1, decline_rate=0.1, ship_failure_rate=0.1, duplicate_rate=0.1)
    report, output = await _demo(db, orders=300, faults=faults, stock_per_sku=60, live=True)

    assert report.ok, report.invariants
    assert [name for name, _, _ in report.invariants] == list(INVARIANTS)
    assert all(held for _, held, _ in report.invariants), report.invariants
    assert sum(report.counts.values()) == 300
    assert report.counts["DELIVERED"] > 0
    assert report.counts["CANCELLED"] > 0
    assert report.counts["DELIVERED"] + report.counts["CANCELLED"] == 300
    assert report.dead_letters == 0
    assert report.elapsed < 30
    for name in INVARIANTS:
        assert name in output
    assert "dead letters: 0" in output

    # Every fault path really ran.
    reasons: dict[str, int] = dict(_rows(db, "SELECT reason, COUNT(*) FROM orders GROUP BY reason"))
    assert reasons.get("out of stock", 0) > 0
    assert reasons.get("payment declined", 0) > 0
    assert reasons.get("shipment failed", 0) > 0
    retries = [
        r
        for r in caplog.records
        if getattr(r, "event", "") == "conveyor.retry_scheduled"
        and "TransientFault" in r.getMessage()
    ]
    assert retries
    # Duplicated commands carry new message ids: the inbox took them as new,
    # the participant answered them from its record, and the orchestrator
    # recorded the repeated replies as ignored.
    handled = _count(db, "SELECT COUNT(*) FROM conveyor_inbox WHERE grp = 'inventory'")
    reservations = _count(db, "SELECT COUNT(*) FROM reservations")
    assert handled > 300 >= reservations
    assert _count(db, "SELECT COUNT(*) FROM conveyor_saga_events WHERE type = 'ignored'") > 0
    assert (
        _count(db, "SELECT COUNT(*) FROM conveyor_sagas WHERE state = 'COMPLETED'")
        == (report.counts["DELIVERED"])
    )
    assert _count(db, "SELECT COUNT(*) FROM conveyor_queue") == 0


async def test_demo_that_times_out_is_not_ok(tmp_path: Path) -> None:
    """A run cut short by its timeout reports failure and names unfinished orders."""
    report, output = await _demo(
        tmp_path / "slow.db",
        # Ten orders of six hops at 0.1 s per handler on average take about
        # six seconds, far beyond the deadline even if the watcher runs late.
        orders=10,
        faults=Faults(latency=0.2, error_rate=0.0, duplicate_rate=0.0),
        timeout=0.3,
        live=False,
    )
    assert not report.ok
    terminal = {name: (held, detail) for name, held, detail in report.invariants}
    held, detail = terminal["every order terminal"]
    assert not held
    assert "not terminal: ord-" in detail
    assert "timed out" in output
    assert "NO" in output


async def test_demo_refuses_a_database_with_an_earlier_run(tmp_path: Path) -> None:
    """A second run on the same file is refused instead of mixing two runs' orders."""
    db = tmp_path / "again.db"
    report, _ = await _demo(db, orders=5, faults=Faults.none(), live=False)
    assert report.ok
    with pytest.raises(ConfigError, match="already holds 5 orders"):
        await _demo(db, orders=5, faults=Faults.none(), live=False)


@pytest.mark.slow
def test_cli_demo_exits_zero_and_reports_the_invariants(tmp_path: Path) -> None:
    """`conveyor demo` runs the order system with its default faults and passes."""
    db = tmp_path / "d.db"
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor", "demo", "--orders", "200", "--db", str(db)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in INVARIANTS:
        assert name in proc.stdout
    assert "all invariants hold" in proc.stdout
    assert _count(db, "SELECT COUNT(*) FROM orders") == 200


def _first(path: Path, state: str) -> tuple[str, int]:
    row = _rows(path, f"SELECT id, amount FROM orders WHERE state = '{state}' ORDER BY id")[0]
    return str(row[0]), int(row[1])


CORRUPTIONS = {
    "order left unfinished": (
        "UPDATE orders SET state = 'PAID', rank = 2 WHERE id = :delivered",
        {"every order terminal", "stock conserved per SKU"},
    ),
    "stock row off by one": (
        "UPDATE stock SET available = available + 1 WHERE sku = (SELECT MIN(sku) FROM stock)",
        {"stock conserved per SKU"},
    ),
    "delivered order charged twice": (
        "INSERT INTO payments VALUES ('charge:' || :delivered || ':again', :delivered, "
        "'charge', :delivered_amount, 'OK', 0)",
        {"delivered orders charged exactly once"},
    ),
    "delivered order refunded": (
        "INSERT INTO payments VALUES ('refund:' || :delivered, :delivered, "
        "'refund', :delivered_amount, 'OK', 0)",
        {"delivered orders charged exactly once"},
    ),
    "cancelled order charged": (
        "INSERT INTO payments VALUES ('charge:' || :cancelled || ':again', :cancelled, "
        "'charge', 100, 'OK', 0)",
        {"cancelled orders charged zero net"},
    ),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
async def test_checker_catches_a_violation(tmp_path: Path, corruption: str) -> None:
    """check_invariants flags exactly the invariants a corrupted row breaks."""
    db = tmp_path / "orders.db"
    report, _ = await _demo(
        db, orders=80, faults=Faults(error_rate=0.0, duplicate_rate=0.0), live=False
    )
    assert report.ok, report.invariants

    sql, expected = CORRUPTIONS[corruption]
    delivered, amount = _first(db, "DELIVERED")
    cancelled, _ = _first(db, "CANCELLED")
    conn = sqlite3.connect(db)
    try:
        with conn:
            changed = conn.execute(
                sql, {"delivered": delivered, "delivered_amount": amount, "cancelled": cancelled}
            ).rowcount
    finally:
        conn.close()
    assert changed == 1

    url = f"sqlite:///{db}"
    async with App("check", settings=Settings(broker_url=url, store_url=url)) as app:
        results = await check_invariants(app)
    failed = {name for name, held, _ in results if not held}
    assert failed == expected, results
    for name, held, detail in results:
        if not held:
            assert detail, name


def _command(order_id: str, step: str, token: str) -> dict[str, str]:
    return {
        "saga-id": order_id,
        "saga-step": step,
        "saga-phase": "action",
        "saga-token": token,
        "saga-reply-to": "saga.order",
    }


async def test_duplicate_request_with_new_message_id_charges_once(tmp_path: Path) -> None:
    """A charge command sent three times under three message ids charges once,
    and each copy is answered with the same reply."""
    url = f"sqlite:///{tmp_path / 'pay.db'}"
    settings = Settings(broker_url=url, store_url=url, idle_poll=0.05)
    app = create_app(settings=settings, faults=Faults.none(), services=("payment",))
    event = OrderEvent(order_id="ord-1", sku="mug", qty=2, amount=2400)
    async with app:
        await create_schema(app)
        headers = _command("ord-1", "charge", "t-1")
        ids = {
            (await app.publish("payment.charge", event, key="ord-1", headers=headers)).id
            for _ in range(3)
        }
        assert len(ids) == 3
        worker = app.worker(grace_period=1.0)
        task = asyncio.create_task(worker.run())
        await eventually(lambda: worker.processed >= 3, timeout=10, what="3 deliveries")
        worker.stop()
        await task
    path = tmp_path / "pay.db"
    assert _rows(path, "SELECT txn_id, amount, status FROM payments") == [
        ("charge:ord-1", 2400, "OK")
    ]
    replies = _rows(path, "SELECT payload FROM conveyor_queue WHERE topic = 'saga.order'")
    assert len(replies) == 3
    assert len({bytes(r[0]) for r in replies}) == 1


@pytest.mark.parametrize("terminal", ["DELIVERED", "CANCELLED"])
async def test_late_replies_never_move_a_terminal_order(tmp_path: Path, terminal: str) -> None:
    """Replies arriving after an order is terminal (late or repeated) are
    recorded as ignored and leave the order, the stock and the payments as they were."""
    url = f"sqlite:///{tmp_path / 'late.db'}"
    settings = Settings(broker_url=url, store_url=url, idle_poll=0.05)
    app = create_app(settings=settings, faults=Faults.none())
    async with app:
        await create_schema(app)
        async with app.transaction() as s:
            stock = 5 if terminal == "DELIVERED" else 0
            await s.execute("INSERT INTO stock VALUES ('mug', ?, ?)", (stock, stock))
        await place_order(app, order_id="ord-1", sku="mug", qty=1, amount=1200)
        worker = app.worker(grace_period=1.0)
        task = asyncio.create_task(worker.run())
        try:

            async def settled() -> bool:
                async with app.transaction() as s:
                    row = await s.fetchone("SELECT state FROM orders WHERE id = 'ord-1'")
                return row is not None and row[0] == terminal

            await eventually(settled, timeout=10, what="order terminal")
            sagas = sagas_of(app)
            history = await sagas.history("ord-1")
            for event in history:
                if event.type == "sent":
                    for ok in (True, False):
                        await app.publish(
                            "saga.order",
                            {"ok": ok, "data": {}, "reason": "late"},
                            type="saga.reply",
                            headers=_command("ord-1", event.step, str(event.detail["token"])),
                        )
            sent = sum(1 for e in history if e.type == "sent")

            async def all_ignored() -> bool:
                events = await sagas.history("ord-1")
                return sum(1 for e in events if e.type == "ignored") == 2 * sent

            await eventually(all_ignored, timeout=10, what="late replies ignored")
        finally:
            worker.stop()
            await task
        assert await check_invariants(app)
    path = tmp_path / "late.db"
    assert _rows(path, "SELECT state FROM orders") == [(terminal,)]
    charges = _count(path, "SELECT COUNT(*) FROM payments WHERE kind = 'charge'")
    assert charges == (1 if terminal == "DELIVERED" else 0)
    assert _rows(path, "SELECT available FROM stock") == [(4 if terminal == "DELIVERED" else 0,)]
