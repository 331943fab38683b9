"""The operations console in a real browser (Debian's headless Chromium,
driven by Playwright) during an order-system run with a payment outage; and
the stuck order found by its id, its verdict naming the step, the queue,
the attempts and the open breaker."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import uvicorn

from conveyor import App, CircuitBreaker, RetryPolicy, Settings
from conveyor.examples.orders import create_app, create_schema, place_order
from conveyor.examples.orders.services import Faults, PaymentOutage
from conveyor.http import AdminAPI, ApiKeys, Console, Dashboard
from conveyor.resilience import BreakerState, CountWindow
from conveyor.runtime import Journal
from conveyor.testing import FakeClock, eventually, running
from tests.debian import debian_binary

RETRY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)


def _orders_app(path: Path, outage: PaymentOutage, breakers: list[CircuitBreaker]) -> App:
    url = f"sqlite:///{path}"
    settings = Settings(broker_url=url, store_url=url, idle_poll=0.02, grace_period=5.0)
    return create_app(
        settings=settings,
        faults=Faults.none(),
        retry=RETRY,
        outage=outage,
        payment_breakers=breakers,
        payment_timeout=None,
    )


async def _stock(app: App) -> None:
    await create_schema(app)
    async with app.transaction() as s:
        await s.execute("INSERT INTO stock (sku, initial, available) VALUES ('mug', 1000, 1000)")


async def _orders(app: App, first: int, count: int) -> None:
    for i in range(first, first + count):
        await place_order(app, order_id=f"ord-{i:03d}", sku="mug", qty=1, amount=1200)


async def _delivered(app: App, n: int) -> bool:
    async with app.transaction() as s:
        row = await s.fetchone("SELECT COUNT(*) FROM orders WHERE state = 'DELIVERED'")
    return row is not None and row[0] == n


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def _served(dashboard: Dashboard) -> AsyncIterator[str]:
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(dashboard, host="127.0.0.1", port=port, log_config=None, lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started, timeout=20, what="console server started")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file (its IHDR chunk)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def _looked_at(path: Path) -> None:
    """A screenshot that holds a page: a real PNG of some size, not blank bytes."""
    width, height = _png_size(path)
    assert width >= 800
    assert height >= 300
    assert path.stat().st_size > 10_000, f"{path} looks empty"


async def test_console_in_a_browser_during_a_payment_outage(tmp_path: Path) -> None:
    """The overview shows dead letters growing without a reload; the
    workbench groups them by error; replaying the group (after its confirm
    page) empties it and the orders are delivered; searching an order id
    shows its saga timeline and verdict. A screenshot of each page is kept."""
    from playwright.async_api import async_playwright

    chromium = debian_binary("chromium", "chromium")
    outage = PaymentOutage()
    app = _orders_app(tmp_path / "orders.db", outage, [])
    journal = Journal(app, flush_every=0.1)
    dashboard = Dashboard(AdminAPI(Console(app, groups_ttl=0)), refresh=300)
    shots = tmp_path / "shots"
    shots.mkdir()
    async with asyncio.timeout(240), app:
        await _stock(app)
        key = await ApiKeys(app).create("operator", scopes=["admin:write"])
        outage.down = True
        await _orders(app, 0, 4)
        async with running(app), _served(dashboard) as base, async_playwright() as pw:

            async def dead(n: int) -> bool:
                return await app.store.dead_letter_count() == n

            await eventually(lambda: dead(4), timeout=60, what="4 charges dead-lettered")
            await journal.flush()
            browser = await pw.chromium.launch(
                executable_path=chromium, headless=True, args=["--no-sandbox"]
            )
            try:
                page = await browser.new_page(viewport={"width": 1400, "height": 900})
                await page.goto(f"{base}/console/")
                assert "/console/login" in page.url  # keys exist: sign in first
                await page.fill("input[name=key]", key)
                await page.click("button:has-text('Sign in')")
                await page.wait_for_selector("#queues-table")
                assert await page.title() == "Overview · Conveyor"
                charge = page.locator("#queues-table tr", has_text="payment.charge")
                assert (await charge.locator("td").nth(5).inner_text()).strip() == "4"

                await _orders(app, 4, 3)  # more orders die while the page is open
                await eventually(lambda: dead(7), timeout=60, what="7 charges dead-lettered")
                await page.wait_for_function(
                    "() => [...document.querySelectorAll('#queues-table tr')].some("
                    "r => r.innerText.includes('payment.charge') && "
                    "r.children[5] && r.children[5].innerText.trim() === '7')",
                    timeout=20_000,
                )
                await page.screenshot(path=str(shots / "overview.png"), full_page=True)

                await page.click("header >> text=Dead letters")
                group = page.locator("#groups-table tbody tr", has_text="payment.charge")
                assert await group.count() == 1
                assert "PaymentUnavailable" in await group.inner_text()
                assert "7" in await group.locator("td.n").inner_text()
                await page.screenshot(path=str(shots / "workbench.png"), full_page=True)

                outage.down = False
                await group.locator("a.replay").click()
                await page.wait_for_selector("#confirm")
                assert "Replay 7" in await page.inner_text("#confirm")
                await page.screenshot(path=str(shots / "confirm.png"), full_page=True)
                await page.click("#confirm")
                await page.wait_for_selector("#notice")
                assert "replayed 7 dead letter(s)" in await page.inner_text("#notice")
                assert (
                    await page.locator("#groups-table tbody tr", has_text="payment.charge").count()
                    == 0
                )
                await page.screenshot(path=str(shots / "workbench-replayed.png"), full_page=True)
                await eventually(lambda: _delivered(app, 7), timeout=60, what="7 delivered")
                await journal.flush()

                await page.fill("header input[name=q]", "ord-002")
                await page.press("header input[name=q]", "Enter")
                await page.wait_for_selector("#verdict")
                verdict = await page.inner_text("#verdict")
                assert verdict.startswith("saga order ord-002 completed")
                assert await page.locator("#timeline .lane").count() >= 4
                history = await page.inner_text("#story")
                assert "payment.charge" in history
                assert "dead_letter" in history or "applied" in history
                await page.screenshot(path=str(shots / "story.png"), full_page=True)

                await page.click("header >> text=Audit")
                audit = await page.inner_text("#audit")
                assert "operator" in audit
                assert "dead_letters.replay" in audit
                await page.screenshot(path=str(shots / "audit.png"), full_page=True)
            finally:
                await browser.close()
    for name in ("overview", "workbench", "confirm", "workbench-replayed", "story", "audit"):
        _looked_at(shots / f"{name}.png")


async def test_a_stuck_order_is_found_by_its_id(tmp_path: Path) -> None:
    """An order whose payment waits on an open circuit: searching its id
    gives a verdict naming the queue, the step, the attempts, the last error
    and the breaker with when it will probe."""
    clock = FakeClock()
    breaker = CircuitBreaker(
        "payments", window=CountWindow(4), minimum_calls=2, open_for=600, clock=clock
    )
    outage = PaymentOutage()
    app = _orders_app(tmp_path / "stuck.db", outage, [breaker])
    journal = Journal(app, flush_every=0.05)
    admin = AdminAPI(Console(app))
    async with asyncio.timeout(120), app:
        await _stock(app)
        outage.down = True
        await _orders(app, 0, 3)
        async with running(app):
            await eventually(lambda: breaker.state is BreakerState.OPEN, what="breaker open")
            await journal.flush()
            transport = httpx.ASGITransport(app=admin)
            async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:

                async def named() -> bool:
                    await journal.flush()
                    story = (await client.get("/admin/search", params={"q": "ord-001"})).json()
                    return "circuit payments open" in story["verdict"]

                await eventually(named, timeout=30, what="verdict names the open breaker")
                story = (await client.get("/admin/search", params={"q": "ord-001"})).json()
                breakers = (await client.get("/admin/breakers")).json()
        assert [b["name"] for b in breakers] == ["payments"]
        assert breakers[0]["state"] == "OPEN"
        assert breakers[0]["guards"] == ["payment.charge/payment", "payment.refund/payment-refund"]
    verdict = story["verdict"]
    assert verdict.startswith("waiting in payment.charge for ")
    assert "(step charge (action))" in verdict
    assert " attempt" in verdict
    assert "last error PaymentUnavailable" in verdict
    assert "circuit payments open until " in verdict
    assert story["saga"]["saga"]["waits_on"] == "payment.charge"
    assert "saga" in story["found"]
