"""The order system's four services, choreographed by events.

Every service is a consumer group of one ``App`` and keeps all of its state in
SQL tables of the store, so each can run in its own worker process
(``create_app(services=("inventory",))``). The SQL runs unchanged on SQLite and
PostgreSQL stores (``?`` placeholders, ``ON CONFLICT DO NOTHING``, types both
accept). Every handler is idempotent on
business keys as well as on message ids: a request duplicated under a new
message id (which the inbox cannot recognise) finds its effect already
recorded and does nothing.

Event flow (message key = order id)::

    place_order -> orders.placed
    inventory:  orders.placed      -> inventory.reserved | inventory.rejected
    payment:    inventory.reserved -> payment.charged    | payment.declined
    shipping:   payment.charged    -> shipping.shipped   | shipping.failed
    shipping:   shipping.shipped   -> shipping.delivered
    payment:    shipping.failed    -> payment.refunded
    inventory:  payment.declined | payment.refunded -> inventory.released
    orders:     reserved/charged/shipped/delivered move the order forward;
                inventory.rejected and inventory.released cancel it
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pydantic

from conveyor import App, CircuitBreaker, ConfigError, Context, RetryPolicy, Session, Settings

__all__ = [
    "CANCELLED",
    "DELIVERED",
    "Faults",
    "INVARIANTS",
    "OrderEvent",
    "PaymentOutage",
    "PaymentUnavailable",
    "SERVICES",
    "STATES",
    "TERMINAL",
    "TransientFault",
    "check_invariants",
    "create_app",
    "create_schema",
    "place_order",
    "state_counts",
    "stock_levels",
]

CREATED, RESERVED, PAID, SHIPPED, DELIVERED, CANCELLED = (
    "CREATED",
    "RESERVED",
    "PAID",
    "SHIPPED",
    "DELIVERED",
    "CANCELLED",
)
STATES = (CREATED, RESERVED, PAID, SHIPPED, DELIVERED, CANCELLED)
TERMINAL = (DELIVERED, CANCELLED)
SERVICES = ("orders", "inventory", "payment", "shipping")

# An order only moves to a higher rank. Both terminal states share the top
# rank, so no late event can move a terminal order.
_RANK = {CREATED: 0, RESERVED: 1, PAID: 2, SHIPPED: 3, DELIVERED: 4, CANCELLED: 4}

INVARIANTS = (
    "every order terminal",
    "stock conserved per SKU",
    "delivered orders charged exactly once",
    "cancelled orders charged zero net",
)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS orders (
        id TEXT PRIMARY KEY,
        sku TEXT NOT NULL,
        qty INTEGER NOT NULL,
        amount INTEGER NOT NULL,
        state TEXT NOT NULL,
        rank INTEGER NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS orders_state ON orders (state)",
    """CREATE TABLE IF NOT EXISTS stock (
        sku TEXT PRIMARY KEY,
        initial INTEGER NOT NULL,
        available INTEGER NOT NULL CHECK (available >= 0)
    )""",
    """CREATE TABLE IF NOT EXISTS reservations (
        order_id TEXT PRIMARY KEY,
        sku TEXT NOT NULL,
        qty INTEGER NOT NULL,
        state TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS payments (
        txn_id TEXT PRIMARY KEY,
        order_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        amount INTEGER NOT NULL,
        status TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS payments_order ON payments (order_id)",
    """CREATE TABLE IF NOT EXISTS shipments (
        order_id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    )""",
)


class TransientFault(Exception):
    """An injected, retryable failure."""


@dataclass(frozen=True, slots=True)
class Faults:
    """Fault injection, by configuration. Rates are probabilities in [0, 1].

    ``error_rate``: a handler raises ``TransientFault`` after its writes (they
    roll back and the message is retried). ``latency``: each handler first
    waits up to this many seconds. ``decline_rate``: payments declined.
    ``ship_failure_rate``: shipments that fail (refund, then release).
    ``duplicate_rate``: messages sent twice under different message ids.
    """

    error_rate: float = 0.05
    latency: float = 0.0
    decline_rate: float = 0.1
    ship_failure_rate: float = 0.05
    duplicate_rate: float = 0.05

    def __post_init__(self) -> None:
        for name in ("error_rate", "decline_rate", "ship_failure_rate", "duplicate_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"fault {name} must be between 0 and 1, got {value}")
        if self.latency < 0:
            raise ConfigError(f"fault latency must be >= 0 seconds, got {self.latency}")

    @classmethod
    def none(cls) -> Faults:
        """No injected faults at all."""
        return cls(error_rate=0.0, decline_rate=0.0, ship_failure_rate=0.0, duplicate_rate=0.0)


class PaymentUnavailable(TransientFault):
    """The payment provider does not answer (an injected outage)."""


class PaymentOutage:
    """A switch for a whole-provider outage, flipped at run time: while
    ``down`` every call to the payment provider fails. ``calls`` counts the
    calls the payment service made to the provider (charges and refunds)."""

    def __init__(self) -> None:
        self.down = False
        self.calls = 0

    def call(self) -> None:
        """One call to the provider; raises ``PaymentUnavailable`` while down."""
        self.calls += 1
        if self.down:
            raise PaymentUnavailable("payment provider unavailable (injected outage)")


class OrderEvent(pydantic.BaseModel):
    """The body of every order-system event; ``amount`` is in cents."""

    order_id: str
    sku: str
    qty: int
    amount: int
    reason: str = ""


# Small delays so a demo with injected errors still finishes in seconds; enough
# attempts that a message exhausting them at a 5% error rate is negligible.
DEMO_RETRY = RetryPolicy(max_attempts=12, base_delay=0.01, max_delay=0.2)


async def create_schema(app: App) -> None:
    """Create the order system's tables (idempotent)."""
    async with app.transaction() as s:
        for statement in SCHEMA:
            await s.execute(statement)


async def place_order(
    app: App,
    *,
    order_id: str,
    sku: str,
    qty: int,
    amount: int,
    duplicate: bool = False,
) -> None:
    """Accept an order: the CREATED row and ``orders.placed`` commit together.

    ``duplicate`` sends ``orders.placed`` a second time under another message
    id, as a retrying client would.
    """
    event = OrderEvent(order_id=order_id, sku=sku, qty=qty, amount=amount)
    now = time.time()
    async with app.transaction() as s:
        await s.execute(
            "INSERT INTO orders (id, sku, qty, amount, state, rank, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (order_id, sku, qty, amount, CREATED, _RANK[CREATED], now, now),
        )
        for _ in range(2 if duplicate else 1):
            await s.publish("orders.placed", event, key=order_id)


async def state_counts(s: Session) -> dict[str, int]:
    """Orders per state (every state present, zero when empty)."""
    counts = dict.fromkeys(STATES, 0)
    for state, count in await s.fetchall("SELECT state, COUNT(*) FROM orders GROUP BY state"):
        counts[state] = int(count)
    return counts


async def stock_levels(s: Session) -> dict[str, tuple[int, int]]:
    """(initial, available) per SKU."""
    rows = await s.fetchall("SELECT sku, initial, available FROM stock ORDER BY sku")
    return {sku: (int(initial), int(available)) for sku, initial, available in rows}


def create_app(
    *,
    settings: Settings,
    faults: Faults | None = None,
    services: Iterable[str] = SERVICES,
    retry: RetryPolicy = DEMO_RETRY,
    seed: int | None = None,
    outage: PaymentOutage | None = None,
    payment_breakers: Sequence[CircuitBreaker] = (),
) -> App:
    """An ``App`` with the handlers of ``services`` (default: all four), each
    service its own consumer group. ``seed`` makes the fault dice repeatable.
    ``outage`` is a switch the caller flips to take the payment provider down;
    ``payment_breakers`` guard the payment handlers (their consumers pause
    while one is open)."""
    chosen = set(services)
    unknown = chosen - set(SERVICES)
    if unknown:
        raise ConfigError(
            f"unknown service(s) {', '.join(sorted(unknown))}; choose from {', '.join(SERVICES)}"
        )
    faults = faults if faults is not None else Faults()
    rng = random.Random(seed)
    app = App("orders", settings=settings)

    def chance(rate: float) -> bool:
        return rate > 0 and rng.random() < rate

    async def before() -> None:
        if faults.latency > 0:
            await asyncio.sleep(rng.uniform(0.0, faults.latency))

    def after(ctx: Context) -> None:
        # After the handler's writes and messages: the rollback is part of the test.
        if chance(faults.error_rate):
            raise TransientFault(f"injected fault in {ctx.group} for {ctx.message.topic}")

    async def emit(ctx: Context, topic: str, event: OrderEvent) -> None:
        for _ in range(2 if chance(faults.duplicate_rate) else 1):
            await ctx.publish(topic, event, key=event.order_id)

    async def advance(ctx: Context, event: OrderEvent, state: str) -> None:
        await before()
        await ctx.execute(
            "UPDATE orders SET state = ?, rank = ?, reason = ?, updated_at = ? "
            "WHERE id = ? AND rank < ?",
            (state, _RANK[state], event.reason, time.time(), event.order_id, _RANK[state]),
        )
        after(ctx)

    if "orders" in chosen:

        @app.handler("inventory.reserved", group="orders", retry=retry)
        async def order_reserved(ctx: Context, event: OrderEvent) -> None:
            await advance(ctx, event, RESERVED)

        @app.handler("payment.charged", group="orders", retry=retry)
        async def order_paid(ctx: Context, event: OrderEvent) -> None:
            await advance(ctx, event, PAID)

        @app.handler("shipping.shipped", group="orders", retry=retry)
        async def order_shipped(ctx: Context, event: OrderEvent) -> None:
            await advance(ctx, event, SHIPPED)

        @app.handler("shipping.delivered", group="orders", retry=retry)
        async def order_delivered(ctx: Context, event: OrderEvent) -> None:
            await advance(ctx, event, DELIVERED)

        @app.handler("inventory.rejected", group="orders", retry=retry)
        async def order_rejected(ctx: Context, event: OrderEvent) -> None:
            await advance(ctx, event, CANCELLED)

        # Cancelled only once the stock is back: every compensation (refund,
        # then release) has happened before the order turns terminal.
        @app.handler("inventory.released", group="orders", retry=retry)
        async def order_cancelled(ctx: Context, event: OrderEvent) -> None:
            await advance(ctx, event, CANCELLED)

    if "inventory" in chosen:

        @app.handler("orders.placed", group="inventory", retry=retry)
        async def reserve(ctx: Context, event: OrderEvent) -> None:
            await before()
            if await ctx.fetchone(
                "SELECT 1 FROM reservations WHERE order_id = ?", (event.order_id,)
            ):
                return  # already decided for this order
            taken = await ctx.execute(
                "UPDATE stock SET available = available - ? WHERE sku = ? AND available >= ?",
                (event.qty, event.sku, event.qty),
            )
            state = "HELD" if taken else "REJECTED"
            await ctx.execute(
                "INSERT INTO reservations (order_id, sku, qty, state) VALUES (?, ?, ?, ?)",
                (event.order_id, event.sku, event.qty, state),
            )
            if taken:
                await emit(ctx, "inventory.reserved", event)
            else:
                out = event.model_copy(update={"reason": "out of stock"})
                await emit(ctx, "inventory.rejected", out)
            after(ctx)

        async def release(ctx: Context, event: OrderEvent) -> None:
            await before()
            held = await ctx.fetchone(
                "SELECT sku, qty FROM reservations WHERE order_id = ? AND state = 'HELD'",
                (event.order_id,),
            )
            if held is not None:
                await ctx.execute(
                    "UPDATE reservations SET state = 'RELEASED' WHERE order_id = ?",
                    (event.order_id,),
                )
                await ctx.execute(
                    "UPDATE stock SET available = available + ? WHERE sku = ?", (held[1], held[0])
                )
                await emit(ctx, "inventory.released", event)
            after(ctx)

        @app.handler("payment.declined", group="inventory", retry=retry)
        async def release_declined(ctx: Context, event: OrderEvent) -> None:
            await release(ctx, event)

        @app.handler("payment.refunded", group="inventory", retry=retry)
        async def release_refunded(ctx: Context, event: OrderEvent) -> None:
            await release(ctx, event)

    if "payment" in chosen:

        @app.handler("inventory.reserved", group="payment", retry=retry, breakers=payment_breakers)
        async def charge(ctx: Context, event: OrderEvent) -> None:
            await before()
            if outage is not None:
                outage.call()
            declined = chance(faults.decline_rate)
            # The transaction id makes the charge idempotent: a duplicate
            # request, whatever its message id, finds the row and stops.
            added = await ctx.execute(
                "INSERT INTO payments (txn_id, order_id, kind, amount, status, created_at) "
                "VALUES (?, ?, 'charge', ?, ?, ?) ON CONFLICT DO NOTHING",
                (
                    f"charge:{event.order_id}",
                    event.order_id,
                    event.amount,
                    "DECLINED" if declined else "OK",
                    time.time(),
                ),
            )
            if added:
                if declined:
                    out = event.model_copy(update={"reason": "payment declined"})
                    await emit(ctx, "payment.declined", out)
                else:
                    await emit(ctx, "payment.charged", event)
            after(ctx)

        @app.handler("shipping.failed", group="payment", retry=retry, breakers=payment_breakers)
        async def refund(ctx: Context, event: OrderEvent) -> None:
            await before()
            if outage is not None:
                outage.call()
            charged = await ctx.fetchone(
                "SELECT amount FROM payments WHERE txn_id = ? AND status = 'OK'",
                (f"charge:{event.order_id}",),
            )
            if charged is not None:
                added = await ctx.execute(
                    "INSERT INTO payments (txn_id, order_id, kind, amount, status, created_at) "
                    "VALUES (?, ?, 'refund', ?, 'OK', ?) ON CONFLICT DO NOTHING",
                    (f"refund:{event.order_id}", event.order_id, charged[0], time.time()),
                )
                if added:
                    await emit(ctx, "payment.refunded", event)
            after(ctx)

    if "shipping" in chosen:

        @app.handler("payment.charged", group="shipping", retry=retry)
        async def ship(ctx: Context, event: OrderEvent) -> None:
            await before()
            failed = chance(faults.ship_failure_rate)
            added = await ctx.execute(
                "INSERT INTO shipments (order_id, state, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (event.order_id, "FAILED" if failed else "SHIPPED", time.time()),
            )
            if added:
                if failed:
                    out = event.model_copy(update={"reason": "shipment failed"})
                    await emit(ctx, "shipping.failed", out)
                else:
                    await emit(ctx, "shipping.shipped", event)
            after(ctx)

        @app.handler("shipping.shipped", group="shipping", retry=retry)
        async def deliver(ctx: Context, event: OrderEvent) -> None:
            await before()
            moved = await ctx.execute(
                "UPDATE shipments SET state = 'DELIVERED', updated_at = ? "
                "WHERE order_id = ? AND state = 'SHIPPED'",
                (time.time(), event.order_id),
            )
            if moved:
                await emit(ctx, "shipping.delivered", event)
            after(ctx)

    return app


def _sample(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


async def check_invariants(app: App) -> list[tuple[str, bool, str]]:
    """Check the order system's invariants on ``app``'s store.

    Returns ``(name, held, detail)`` for each of ``INVARIANTS``, in order:
    every order is terminal; per SKU, initial stock equals available stock
    plus the quantity of delivered orders; each delivered order has exactly
    one successful charge of its amount and no refund; each cancelled order's
    successful charges minus refunds is zero. Meaningful once the system is
    quiet (no worker running).
    """
    async with app.transaction() as s:
        counts = await state_counts(s)
        stuck = [
            f"{r[0]}={r[1]}"
            for r in await s.fetchall(
                "SELECT id, state FROM orders WHERE state NOT IN (?, ?) ORDER BY id",
                TERMINAL,
            )
        ]
        stock = await s.fetchall(
            "SELECT s.sku, s.initial, s.available, "
            "COALESCE((SELECT SUM(o.qty) FROM orders o "
            "          WHERE o.sku = s.sku AND o.state = ?), 0) "
            "FROM stock s ORDER BY s.sku",
            (DELIVERED,),
        )
        delivered = await s.fetchall(
            "SELECT o.id, o.amount, "
            "  (SELECT COUNT(*) FROM payments p WHERE p.order_id = o.id "
            "     AND p.kind = 'charge' AND p.status = 'OK'), "
            "  (SELECT COALESCE(SUM(p.amount), 0) FROM payments p WHERE p.order_id = o.id "
            "     AND p.kind = 'charge' AND p.status = 'OK'), "
            "  (SELECT COUNT(*) FROM payments p WHERE p.order_id = o.id "
            "     AND p.kind = 'refund' AND p.status = 'OK') "
            "FROM orders o WHERE o.state = ? ORDER BY o.id",
            (DELIVERED,),
        )
        cancelled = await s.fetchall(
            "SELECT o.id, "
            "  (SELECT COALESCE(SUM(CASE p.kind WHEN 'charge' THEN p.amount "
            "                                   ELSE -p.amount END), 0) "
            "   FROM payments p WHERE p.order_id = o.id AND p.status = 'OK'), "
            "  (SELECT COALESCE(SUM(CASE p.kind WHEN 'charge' THEN 1 ELSE -1 END), 0) "
            "   FROM payments p WHERE p.order_id = o.id AND p.status = 'OK') "
            "FROM orders o WHERE o.state = ? ORDER BY o.id",
            (CANCELLED,),
        )

    total = sum(counts.values())
    results: list[tuple[str, bool, str]] = []

    terminal = total - len(stuck)
    detail = f"{terminal}/{total} terminal"
    if stuck:
        detail += f"; not terminal: {_sample(stuck)}"
    results.append((INVARIANTS[0], not stuck and total > 0, detail))

    unbalanced = [
        f"{sku}: {initial} != {available} available + {sold} delivered"
        for sku, initial, available, sold in stock
        if initial != available + sold
    ]
    initial_total = sum(int(r[1]) for r in stock)
    available_total = sum(int(r[2]) for r in stock)
    sold_total = sum(int(r[3]) for r in stock)
    detail = (
        f"{len(stock)} SKUs: {initial_total} = {available_total} available + {sold_total} delivered"
    )
    if unbalanced:
        detail = f"{len(unbalanced)}/{len(stock)} SKUs off: {_sample(unbalanced)}"
    results.append((INVARIANTS[1], not unbalanced and bool(stock), detail))

    wrong = [
        f"{oid}: {n} charge(s) of {paid} for {amount}, {refunds} refund(s)"
        for oid, amount, n, paid, refunds in delivered
        if n != 1 or paid != amount or refunds != 0
    ]
    detail = f"{len(delivered) - len(wrong)}/{len(delivered)} charged once, never refunded"
    if wrong:
        detail += f"; wrong: {_sample(wrong)}"
    results.append((INVARIANTS[2], not wrong, detail))

    owed = [
        f"{oid}: net {net} over {n} payment(s)" for oid, net, n in cancelled if net != 0 or n != 0
    ]
    detail = f"{len(cancelled) - len(owed)}/{len(cancelled)} net zero"
    if owed:
        detail += f"; not zero: {_sample(owed)}"
    results.append((INVARIANTS[3], not owed, detail))
    return results
