"""The order system's four services, driven by an orchestrated saga.

The ``order`` saga (``ORDER_SAGA``) runs four steps, each a command to a
service answered by a reply; a refused or silent step undoes the earlier
ones in reverse::

    reserve  inventory.reserve  ->  undo: inventory.release
    charge   payment.charge     ->  undo: payment.refund   (times out: PAYMENT_TIMEOUT)
    ship     shipping.ship
    deliver  shipping.deliver

The orders service is the orchestrator: the order row follows the saga in
the transaction that records each step (CREATED -> RESERVED -> PAID ->
SHIPPED -> DELIVERED, or CANCELLED once every compensation is done). Every
service keeps its state in SQL tables of the store and can run in its own
worker process (``create_app(services=("inventory",))``); the SQL runs
unchanged on SQLite and PostgreSQL. Participants are idempotent twice over:
``Sagas.participant`` answers a repeated command from its record, and the
payment is keyed by a transaction id, so nothing is charged twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pydantic

from conveyor import App, CircuitBreaker, ConfigError, Context, RetryPolicy, Session, Settings
from conveyor.errors import UnknownEndpoint
from conveyor.messages import uuid7
from conveyor.sagas import Saga, SagaEvent, SagaRecord, Sagas, Step, StepFailed

if TYPE_CHECKING:
    from conveyor.http import Webhooks

__all__ = [
    "CANCELLED",
    "DELIVERED",
    "Faults",
    "INVARIANTS",
    "ORDER_SAGA",
    "OrderEvent",
    "PAYMENT_TIMEOUT",
    "PaymentOutage",
    "PaymentUnavailable",
    "SERVICES",
    "STATES",
    "TERMINAL",
    "TransientFault",
    "check_invariants",
    "create_app",
    "create_schema",
    "order_saga",
    "order_view",
    "place_order",
    "place_order_in",
    "sagas_of",
    "webhooks_of",
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
        callback TEXT NOT NULL DEFAULT '',
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
    roll back and the message is retried). ``latency``: each participant
    first waits up to this many seconds. ``decline_rate``: payments declined.
    ``ship_failure_rate``: shipments that fail (refund, then release).
    ``duplicate_rate``: commands sent again under a new message id, and
    orders placed twice.
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
    """The order saga's data (what every command carries); ``amount`` is in cents."""

    model_config = pydantic.ConfigDict(extra="ignore")

    order_id: str
    sku: str
    qty: int
    amount: int
    reason: str = ""


# Small delays so a demo with injected errors still finishes in seconds; enough
# attempts that a message exhausting them at a 5% error rate is negligible.
DEMO_RETRY = RetryPolicy(max_attempts=12, base_delay=0.01, max_delay=0.2)
# A charge with no reply within this many seconds is compensated (refund,
# then release): the customer is never left waiting on a silent provider.
PAYMENT_TIMEOUT = 30.0


def order_saga(*, payment_timeout: float | None = PAYMENT_TIMEOUT) -> Saga:
    """The four-step order saga (its compensations retry every 0.05-2 s)."""
    undo = RetryPolicy(max_attempts=20, base_delay=0.05, max_delay=2.0)
    return Saga(
        "order",
        steps=[
            Step(
                "reserve",
                command="inventory.reserve",
                compensation="inventory.release",
                compensation_retry=undo,
            ),
            Step(
                "charge",
                command="payment.charge",
                compensation="payment.refund",
                timeout=payment_timeout,
                compensation_retry=undo,
            ),
            Step("ship", command="shipping.ship"),
            Step("deliver", command="shipping.deliver"),
        ],
    )


ORDER_SAGA = order_saga()

# The order state each step's success moves to.
_AFTER_STEP = {"reserve": RESERVED, "charge": PAID, "ship": SHIPPED, "deliver": DELIVERED}
_SAGAS: weakref.WeakKeyDictionary[App, Sagas] = weakref.WeakKeyDictionary()
_WEBHOOKS: weakref.WeakKeyDictionary[App, Webhooks] = weakref.WeakKeyDictionary()


def sagas_of(app: App) -> Sagas:
    """The saga orchestrator ``create_app`` attached to ``app``."""
    return _SAGAS[app]


def webhooks_of(app: App) -> Webhooks | None:
    """The webhooks ``create_app(webhook_allow=...)`` attached to ``app``."""
    return _WEBHOOKS.get(app)


async def order_view(s: Session, order_id: str) -> dict[str, object] | None:
    """An order as the HTTP front and its webhooks show it."""
    row = await s.fetchone(
        "SELECT id, sku, qty, amount, state, reason, created_at, updated_at "
        "FROM orders WHERE id = ?",
        (order_id,),
    )
    if row is None:
        return None
    keys = ("id", "sku", "qty", "amount", "state", "reason", "created_at", "updated_at")
    return dict(zip(keys, row, strict=True))


async def _announce(s: Session, webhooks: Webhooks, order_id: str) -> None:
    """Queue the ``order.<state>`` webhook of an order placed with a callback."""
    row = await s.fetchone("SELECT callback FROM orders WHERE id = ?", (order_id,))
    if row is None or not row[0]:
        return
    view = await order_view(s, order_id)
    assert view is not None
    # An endpoint removed or disabled (410) meanwhile: the order goes on.
    with contextlib.suppress(UnknownEndpoint):
        await webhooks.enqueue(
            s,
            owner="",
            url=str(row[0]),
            event_type=f"order.{str(view['state']).lower()}",
            data=view,
        )


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
    callback: str = "",
) -> None:
    """Accept an order: the CREATED row and the saga's first command commit
    together. The saga id is the order id, so ``duplicate`` (placing it a
    second time, as a retrying client would) starts nothing new. With
    ``callback`` (a registered webhook endpoint) every state change is
    posted there.
    """
    async with app.transaction() as s:
        await place_order_in(
            s, app, order_id=order_id, sku=sku, qty=qty, amount=amount, callback=callback
        )
        if duplicate:
            await sagas_of(app).start(s, "order", {}, saga_id=order_id)


async def place_order_in(
    s: Session, app: App, *, order_id: str, sku: str, qty: int, amount: int, callback: str = ""
) -> bool:
    """``place_order`` inside the caller's transaction ``s``. False, and
    nothing done, when the order id exists (also when a concurrent
    transaction placed it: the insert waits for that one's commit)."""
    order = OrderEvent(order_id=order_id, sku=sku, qty=qty, amount=amount)
    now = time.time()
    placed = await s.execute(
        "INSERT INTO orders (id, sku, qty, amount, state, rank, callback, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        (order_id, sku, qty, amount, CREATED, _RANK[CREATED], callback, now, now),
    )
    if not placed:
        return False
    await sagas_of(app).start(s, "order", order, saga_id=order_id)
    return True


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
    payment_timeout: float | None = PAYMENT_TIMEOUT,
    orchestrator_concurrency: int = 1,
    webhook_allow: Sequence[str] | None = None,
) -> App:
    """An ``App`` with the handlers of ``services`` (default: all four), each
    service its own consumer groups; "orders" is the saga's orchestrator.
    ``seed`` makes the fault dice repeatable. ``outage`` is a switch the
    caller flips to take the payment provider down; ``payment_breakers``
    guard the payment handlers (their consumers pause while one is open);
    ``payment_timeout`` (seconds, None for none) bounds the wait for a charge.
    With ``webhook_allow`` (the SSRF allow-list, possibly empty) the app
    delivers an ``order.<state>`` webhook on every state change of an order
    placed with a callback (``webhooks_of(app)``).
    """
    chosen = set(services)
    unknown = chosen - set(SERVICES)
    if unknown:
        raise ConfigError(
            f"unknown service(s) {', '.join(sorted(unknown))}; choose from {', '.join(SERVICES)}"
        )
    faults = faults if faults is not None else Faults()
    rng = random.Random(seed)
    app = App("orders", settings=settings)
    sagas = Sagas(app, concurrency=orchestrator_concurrency, retry=retry)
    _SAGAS[app] = sagas
    webhooks = None
    if webhook_allow is not None:
        # Imported here: the services without webhooks need no HTTP extra.
        from conveyor.http import Webhooks

        webhooks = _WEBHOOKS[app] = Webhooks(app, allow=webhook_allow)

        @app.on_connect
        async def webhook_tables(app: App) -> None:
            async with app.transaction() as s:
                await webhooks.create_tables(s)

    def chance(rate: float) -> bool:
        return rate > 0 and rng.random() < rate

    async def before(ctx: Context) -> None:
        if faults.latency > 0:
            await asyncio.sleep(rng.uniform(0.0, faults.latency))
        if chance(faults.duplicate_rate):
            # The same command again under a new message id, as a retrying
            # sender would: the inbox cannot tell, the participant record can.
            await ctx.send([replace(ctx.message, id=uuid7(), attempt=0)])

    def after(session: Session, where: str) -> None:
        # After the writes and messages: the rollback is part of the test.
        if chance(faults.error_rate):
            raise TransientFault(f"injected fault in {where}")

    async def follow(session: Session, record: SagaRecord, events: Sequence[SagaEvent]) -> None:
        """Keep the order row in step with its saga, in the saga's transaction."""
        for event in events:
            if event.type == "succeeded":
                state, reason = _AFTER_STEP[event.step], ""
            elif event.type == "saga_compensated":
                state, reason = CANCELLED, record.error
            else:
                continue
            moved = await session.execute(
                "UPDATE orders SET state = ?, rank = ?, reason = ?, updated_at = ? "
                "WHERE id = ? AND rank < ?",
                (state, _RANK[state], reason, time.time(), record.id, _RANK[state]),
            )
            if moved and webhooks is not None:
                await _announce(session, webhooks, record.id)
        if isinstance(session, Context):  # a worker's transaction, not the client's
            after(session, "the orders service")

    sagas.register(
        order_saga(payment_timeout=payment_timeout),
        orchestrate="orders" in chosen,
        on_change=follow,
    )

    if "inventory" in chosen:

        @sagas.participant("inventory.reserve", group="inventory", retry=retry)
        async def reserve(ctx: Context, order: OrderEvent) -> None:
            await before(ctx)
            taken = await ctx.execute(
                "UPDATE stock SET available = available - ? WHERE sku = ? AND available >= ?",
                (order.qty, order.sku, order.qty),
            )
            if not taken:
                raise StepFailed("out of stock")
            await ctx.execute(
                "INSERT INTO reservations (order_id, sku, qty, state) VALUES (?, ?, ?, 'HELD')",
                (order.order_id, order.sku, order.qty),
            )
            after(ctx, "inventory.reserve")

        @sagas.participant("inventory.release", group="inventory-release", retry=retry)
        async def release(ctx: Context, order: OrderEvent) -> None:
            await before(ctx)
            held = await ctx.fetchone(
                "SELECT sku, qty FROM reservations WHERE order_id = ? AND state = 'HELD'",
                (order.order_id,),
            )
            if held is not None:
                await ctx.execute(
                    "UPDATE reservations SET state = 'RELEASED' WHERE order_id = ?",
                    (order.order_id,),
                )
                await ctx.execute(
                    "UPDATE stock SET available = available + ? WHERE sku = ?", (held[1], held[0])
                )
            after(ctx, "inventory.release")

    if "payment" in chosen:

        @sagas.participant(
            "payment.charge", group="payment", retry=retry, breakers=payment_breakers
        )
        async def charge(ctx: Context, order: OrderEvent) -> dict[str, str]:
            await before(ctx)
            if outage is not None:
                outage.call()
            if chance(faults.decline_rate):
                raise StepFailed("payment declined")
            # The transaction id makes the charge idempotent at the provider
            # as well: a second request for one order finds the row and stops.
            txn = f"charge:{order.order_id}"
            await ctx.execute(
                "INSERT INTO payments (txn_id, order_id, kind, amount, status, created_at) "
                "VALUES (?, ?, 'charge', ?, 'OK', ?) ON CONFLICT DO NOTHING",
                (txn, order.order_id, order.amount, time.time()),
            )
            after(ctx, "payment.charge")
            return {"txn_id": txn}

        @sagas.participant(
            "payment.refund", group="payment-refund", retry=retry, breakers=payment_breakers
        )
        async def refund(ctx: Context, order: OrderEvent) -> None:
            await before(ctx)
            if outage is not None:
                outage.call()
            charged = await ctx.fetchone(
                "SELECT amount FROM payments WHERE txn_id = ? AND status = 'OK'",
                (f"charge:{order.order_id}",),
            )
            if charged is not None:
                await ctx.execute(
                    "INSERT INTO payments (txn_id, order_id, kind, amount, status, created_at) "
                    "VALUES (?, ?, 'refund', ?, 'OK', ?) ON CONFLICT DO NOTHING",
                    (f"refund:{order.order_id}", order.order_id, charged[0], time.time()),
                )
            after(ctx, "payment.refund")

    if "shipping" in chosen:

        @sagas.participant("shipping.ship", group="shipping", retry=retry)
        async def ship(ctx: Context, order: OrderEvent) -> None:
            await before(ctx)
            if chance(faults.ship_failure_rate):
                raise StepFailed("shipment failed")
            await ctx.execute(
                "INSERT INTO shipments (order_id, state, updated_at) VALUES (?, 'SHIPPED', ?) "
                "ON CONFLICT DO NOTHING",
                (order.order_id, time.time()),
            )
            after(ctx, "shipping.ship")

        @sagas.participant("shipping.deliver", group="shipping-deliver", retry=retry)
        async def deliver(ctx: Context, order: OrderEvent) -> None:
            await before(ctx)
            await ctx.execute(
                "UPDATE shipments SET state = 'DELIVERED', updated_at = ? "
                "WHERE order_id = ? AND state = 'SHIPPED'",
                (time.time(), order.order_id),
            )
            after(ctx, "shipping.deliver")

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
