"""A payment-provider outage in the order system: with a circuit breaker the
payment consumer pauses and nothing is dead-lettered; without one, retries
are burnt and orders are dead-lettered (so the first test proves the feature).

The worker runs in-process on a SQLite file on real time; only the breaker
reads a FakeClock, so it stays open exactly until the test moves that clock.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor import App, CircuitBreaker, RetryPolicy, Settings
from conveyor.examples.orders import check_invariants, create_app, create_schema, place_order
from conveyor.examples.orders.services import Faults, PaymentOutage, PaymentUnavailable
from conveyor.resilience import BreakerState, CountWindow
from conveyor.testing import FakeClock, eventually, running
from tests.helpers import store_rows

# Few, fast attempts: without a breaker a 100% outage exhausts them in well
# under a second.
RETRY = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05)


def _app(path: Path, outage: PaymentOutage, breakers: list[CircuitBreaker]) -> App:
    url = f"sqlite:///{path}"
    settings = Settings(broker_url=url, store_url=url, idle_poll=0.02, grace_period=5.0)
    return create_app(
        settings=settings,
        faults=Faults.none(),
        retry=RETRY,
        outage=outage,
        payment_breakers=breakers,
        # The breaker, not the saga's payment timeout, is under test here.
        payment_timeout=None,
    )


async def _stock(app: App) -> None:
    await create_schema(app)
    async with app.transaction() as s:
        await s.execute("INSERT INTO stock (sku, initial, available) VALUES ('mug', 1000, 1000)")


async def _orders(app: App, first: int, count: int) -> None:
    for i in range(first, first + count):
        await place_order(app, order_id=f"ord-{i:03d}", sku="mug", qty=1, amount=1200)


async def _payment_queue(app: App) -> tuple[int, int, int]:
    """(ready, in flight, delayed) of the payment service's charge requests."""
    for q in await app.broker.stats():
        if q.topic == "payment.charge" and q.group == "payment":
            return q.ready, q.in_flight, q.delayed
    return 0, 0, 0


def _attempts(app: App) -> int:
    """Deliveries counted so far over the queued charge requests."""
    [(total,)] = store_rows(
        app,
        "SELECT COALESCE(SUM(attempt), 0) FROM conveyor_queue "
        "WHERE topic = 'payment.charge' AND grp = 'payment'",
    )
    return int(total)


async def _dead(app: App) -> int:
    return sum((await app.store.dead_letter_counts()).values())


async def _all_terminal(app: App) -> bool:
    async with app.transaction() as s:
        row = await s.fetchone(
            "SELECT COUNT(*) FROM orders WHERE state NOT IN ('DELIVERED', 'CANCELLED')"
        )
    return row is not None and row[0] == 0


async def test_outage_pauses_payment_consumer_and_loses_nothing(tmp_path: Path) -> None:
    """While the breaker is open the payment consumer fetches nothing (its queue
    grows, the provider is not called, no attempt is burnt); a half-open probe
    is one message; after recovery every order is delivered, none dead-lettered."""
    clock = FakeClock()
    breaker = CircuitBreaker(
        "payment-provider",
        window=CountWindow(10),
        minimum_calls=4,
        failure_rate=0.5,
        open_for=30,
        half_open_calls=2,
        clock=clock,
    )
    outage = PaymentOutage()
    app = _app(tmp_path / "orders.db", outage, [breaker])
    async with app:
        await _stock(app)
        outage.down = True
        await _orders(app, 0, 10)
        async with running(app, grace_period=5.0) as worker:
            await eventually(lambda: breaker.state is BreakerState.OPEN, what="breaker open")
            # Everything rejected or failed comes back to the queue and stays.
            await eventually(
                lambda: _ready_is(app, 10), timeout=20, what="10 charges waiting in the queue"
            )
            calls, opened, attempts = outage.calls, breaker.opened, _attempts(app)
            await _orders(app, 10, 10)
            await eventually(
                lambda: _ready_is(app, 20), timeout=20, what="20 charges waiting in the queue"
            )
            assert outage.calls == calls  # paused: not one more call to the provider
            assert _attempts(app) == attempts  # the waiting messages keep their attempts
            assert await _dead(app) == 0
            rejections = breaker.rejections

            # A failing probe: one message at a time, half_open_calls of them.
            clock.advance(30)
            await eventually(lambda: breaker.opened == opened + 1, what="reopened after probes")
            assert outage.calls == calls + 2
            assert breaker.state is BreakerState.OPEN
            await eventually(lambda: _ready_is(app, 20), what="probed messages back in queue")
            # Each probe fetched one message: no batch-mate was refused, and
            # only the two probed messages spent an attempt.
            assert breaker.rejections == rejections
            assert _attempts(app) == attempts + 2

            outage.down = False
            clock.advance(30)
            await eventually(lambda: _all_terminal(app), timeout=30, what="every order terminal")
            assert breaker.state is BreakerState.CLOSED
            assert worker.processed > 0
        assert await _dead(app) == 0
        results = await check_invariants(app)
    assert all(held for _, held, _ in results), results
    assert breaker.rejections > 0


async def _ready_is(app: App, n: int) -> bool:
    ready, in_flight, _ = await _payment_queue(app)
    return ready == n and in_flight == 0


async def test_same_outage_without_breaker_dead_letters(tmp_path: Path) -> None:
    """Without the breaker the same outage burns every attempt: charges are
    dead-lettered and their orders never finish."""
    outage = PaymentOutage()
    app = _app(tmp_path / "orders.db", outage, [])
    async with app:
        await _stock(app)
        outage.down = True
        await _orders(app, 0, 10)
        async with running(app, grace_period=5.0):
            await eventually(lambda: _dead_at_least(app, 10), timeout=20, what="dead letters")
            outage.down = False
            await _orders(app, 10, 2)
            await eventually(
                lambda: _delivered(app, 2), timeout=20, what="orders after the outage delivered"
            )
        assert outage.calls >= 10 * RETRY.max_attempts
        results = {name: held for name, held, _ in await check_invariants(app)}
    assert not results["every order terminal"]


async def _dead_at_least(app: App, n: int) -> bool:
    return await _dead(app) >= n


async def _delivered(app: App, n: int) -> bool:
    async with app.transaction() as s:
        row = await s.fetchone("SELECT COUNT(*) FROM orders WHERE state = 'DELIVERED'")
    return row is not None and row[0] >= n


def test_outage_switch_counts_calls() -> None:
    """PaymentOutage fails every call while down and counts all of them."""
    outage = PaymentOutage()
    outage.call()
    outage.down = True
    with pytest.raises(PaymentUnavailable, match="unavailable"):
        outage.call()
    assert outage.calls == 2
