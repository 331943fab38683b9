"""Run the order system in one process with injected faults, then prove it.

``run_demo`` creates the schema, stocks the shelves, places orders (each one
a producer transaction: the CREATED row plus the order saga's first command
through the outbox), runs a worker with every service until all orders are terminal and
every queue is drained, stops it gracefully and checks the invariants.
``conveyor demo`` is its command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from conveyor import App, ConfigError, Session, Worker
from conveyor.examples.orders.services import (
    CANCELLED,
    DELIVERED,
    STATES,
    TERMINAL,
    Faults,
    check_invariants,
    create_app,
    create_schema,
    place_order,
    state_counts,
)
from conveyor.sagas import STATES as SAGA_STATES
from conveyor.settings import load_settings

__all__ = [
    "DEFAULT_FAULTS",
    "DEFAULT_STOCK",
    "fill_shelves",
    "open_shop",
    "DemoReport",
    "Faults",
    "PRODUCTS",
    "check_invariants",
    "run_demo",
]

# Price in cents per SKU.
PRODUCTS = {
    "book": 1800,
    "cap": 1500,
    "lamp": 4900,
    "mug": 1200,
    "pen": 300,
    "poster": 900,
    "socks": 700,
    "tee": 2000,
}
# 300 orders of 1-3 items ask for about 75 of each SKU: some run out.
DEFAULT_STOCK = 60


async def fill_shelves(session: Session, per_sku: int) -> None:
    """Stock every product with ``per_sku`` units (a product stocked already
    keeps what it has)."""
    for sku in sorted(PRODUCTS):
        await session.execute(
            "INSERT INTO stock (sku, initial, available) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            (sku, per_sku, per_sku),
        )


def open_shop(app: App, per_sku: int = DEFAULT_STOCK) -> App:
    """Have ``app`` create the shop's tables and stock its shelves whenever
    it connects; returns ``app``."""

    @app.on_connect
    async def shop(application: App) -> None:
        await create_schema(application)
        async with application.transaction() as s:
            await fill_shelves(s, per_sku)

    return app


# Every fault on: errors, declines, failed shipments and duplicates.
DEFAULT_FAULTS = Faults()
_REFRESH = 0.1

_STYLE = {
    "CREATED": "white",
    "RESERVED": "cyan",
    "PAID": "blue",
    "SHIPPED": "magenta",
    DELIVERED: "green",
    CANCELLED: "yellow",
}


@dataclass(frozen=True, slots=True)
class DemoReport:
    """The outcome of a demo run; ``ok`` when every invariant held."""

    ok: bool
    counts: dict[str, int]
    invariants: list[tuple[str, bool, str]]
    elapsed: float
    dead_letters: int = field(default=0)


@dataclass(slots=True)
class _Progress:
    counts: dict[str, int]
    reasons: dict[str, int]
    sagas: dict[str, int]
    queued: int
    dead: int

    @property
    def terminal(self) -> int:
        return sum(self.counts[s] for s in TERMINAL)


async def _progress(app: App) -> _Progress:
    # Read in a store transaction: on SQLite it holds the write lock, so no
    # handler's transaction is half done on the shared connection.
    async with app.transaction() as s:
        counts = await state_counts(s)
        reasons = {
            str(reason): int(n)
            for reason, n in await s.fetchall(
                "SELECT reason, COUNT(*) FROM orders WHERE state = ? GROUP BY reason "
                "ORDER BY reason",
                (CANCELLED,),
            )
        }
        sagas = dict.fromkeys(SAGA_STATES, 0)
        for state, n in await s.fetchall(
            "SELECT state, COUNT(*) FROM conveyor_sagas GROUP BY state"
        ):
            sagas[str(state)] = int(n)
        queued = sum(q.ready + q.in_flight + q.delayed for q in await app.broker.stats())
        outbox = await s.fetchone("SELECT COUNT(*) FROM conveyor_outbox")
        queued += int(outbox[0]) if outbox else 0
        dead = sum((await app.store.dead_letter_counts()).values())
    return _Progress(counts, reasons, sagas, queued, dead)


def _counts_view(p: _Progress, total: int, elapsed: float, handled: int) -> Group:
    table = Table(title=f"Orders: {p.terminal}/{total} terminal")
    table.add_column("state", no_wrap=True)
    table.add_column("orders", justify="right")
    table.add_column("", min_width=30)
    for state in STATES:
        count = p.counts[state]
        bar = "█" * round(30 * count / total) if total else ""
        table.add_row(Text(state, style=_STYLE[state]), str(count), Text(bar, style=_STYLE[state]))
    for reason, count in p.reasons.items():
        table.add_row(Text(f"  {reason or 'cancelled'}", style="dim"), str(count), "")
    sagas = ", ".join(f"{n} {state.lower()}" for state, n in p.sagas.items())
    stats = Text(
        f"sagas: {sagas}\n"
        f"{elapsed:.1f}s, {handled} deliveries handled, "
        f"{p.queued} messages queued, {p.dead} dead letters",
        style="dim",
    )
    return Group(table, stats)


def _invariants_table(invariants: list[tuple[str, bool, str]]) -> Table:
    table = Table(title="Invariants")
    table.add_column("invariant", no_wrap=True)
    table.add_column("held", justify="center", no_wrap=True)
    table.add_column("detail")
    for name, held, detail in invariants:
        mark = Text("yes", style="bold green") if held else Text("NO", style="bold red")
        table.add_row(name, mark, detail)
    return table


async def _place_all(app: App, orders: int, faults: Faults, rng: random.Random) -> None:
    skus = sorted(PRODUCTS)
    for n in range(1, orders + 1):
        sku = rng.choice(skus)
        qty = rng.randint(1, 3)
        await place_order(
            app,
            order_id=f"ord-{n:06d}",
            sku=sku,
            qty=qty,
            amount=PRODUCTS[sku] * qty,
            duplicate=faults.duplicate_rate > 0 and rng.random() < faults.duplicate_rate,
        )


async def run_demo(
    *,
    orders: int = 300,
    faults: Faults = DEFAULT_FAULTS,
    stock_per_sku: int = DEFAULT_STOCK,
    broker_url: str,
    store_url: str,
    timeout: float = 120.0,
    console: Console,
    live: bool = True,
    seed: int = 7,
) -> DemoReport:
    """Run the order system on ``broker_url``/``store_url`` and check it.

    Places ``orders`` random orders (repeatable with ``seed``), runs every
    service in one worker until all orders are terminal and all queues are
    drained, or ``timeout`` seconds pass, then stops the worker gracefully
    and checks the invariants. ``live`` shows a refreshing table of orders per
    state. Any broker and store URL pair works (the store is SQLite or
    PostgreSQL); the store's database (or PostgreSQL namespace) must not hold
    an earlier run.
    """
    if orders < 1:
        raise ConfigError(f"orders must be >= 1, got {orders}")
    if stock_per_sku < 0:
        raise ConfigError(f"stock per SKU must be >= 0, got {stock_per_sku}")
    settings = load_settings(
        broker_url=broker_url, store_url=store_url, idle_poll=0.05, grace_period=5.0
    )
    app = create_app(settings=settings, faults=faults, seed=seed)
    started = time.perf_counter()
    console.print(
        Text.assemble(
            ("Order system demo", "bold"),
            f": {orders} orders, {len(PRODUCTS)} SKUs x "
            f"{stock_per_sku} in stock, faults: error {faults.error_rate:g}, "
            f"latency {faults.latency:g}s, decline {faults.decline_rate:g}, "
            f"ship failure {faults.ship_failure_rate:g}, duplicate {faults.duplicate_rate:g}",
        ),
        highlight=False,
    )
    async with app:
        await create_schema(app)
        async with app.transaction() as s:
            row = await s.fetchone("SELECT COUNT(*) FROM orders")
            if row and row[0]:
                raise ConfigError(
                    f"{store_url} already holds {row[0]} orders from an earlier run; "
                    "use a new database file (SQLite) or namespace (PostgreSQL)"
                )
            await s.execute("DELETE FROM stock")
            await fill_shelves(s, stock_per_sku)
        worker = app.worker(grace_period=5.0)
        running = asyncio.create_task(worker.run())
        placing = asyncio.create_task(_place_all(app, orders, faults, random.Random(seed)))
        try:
            progress = await _watch(
                app, worker, running, placing, orders, started, timeout, console, live
            )
        finally:
            placing.cancel()
            worker.stop()
            await asyncio.gather(placing, return_exceptions=True)
            await running
        if not live:
            console.print(
                _counts_view(progress, orders, time.perf_counter() - started, worker.processed)
            )
        invariants = await check_invariants(app)
        final = await _progress(app)
    elapsed = time.perf_counter() - started
    console.print(_invariants_table(invariants))
    style = "red" if final.dead else "green"
    console.print(Text.assemble("dead letters: ", (str(final.dead), style)))
    return DemoReport(
        ok=all(held for _, held, _ in invariants),
        counts=final.counts,
        invariants=invariants,
        elapsed=elapsed,
        dead_letters=final.dead,
    )


async def _watch(
    app: App,
    worker: Worker,
    running: asyncio.Task[None],
    placing: asyncio.Task[None],
    orders: int,
    started: float,
    timeout: float,
    console: Console,
    live: bool,
) -> _Progress:
    """Refresh the progress until everything is done, the worker dies or time is up."""
    deadline = started + timeout
    quiet = 0
    with Live(console=console, auto_refresh=False) if live else contextlib.nullcontext() as view:
        while True:
            progress = await _progress(app)
            now = time.perf_counter()
            if view is not None:
                view.update(
                    _counts_view(progress, orders, now - started, worker.processed), refresh=True
                )
            if placing.done() and (failure := placing.exception()) is not None:
                raise failure
            # With every order placed and nothing queued, in flight, delayed or
            # in the outbox, nothing can change any more: done, or stalled.
            quiet = quiet + 1 if placing.done() and progress.queued == 0 else 0
            if quiet >= 2 or running.done() or now > deadline:
                if progress.terminal < orders:
                    why = "timed out" if now > deadline else "stalled: nothing left to process"
                    console.print(
                        Text.assemble(
                            (why, "bold red"), f" with {orders - progress.terminal} orders open"
                        )
                    )
                return progress
            await asyncio.sleep(_REFRESH)
