"""Property: whatever duplicates, order and lost deliveries the broker produces,
each distinct message is applied exactly once per consumer group."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor import App, Context, Message, RetryPolicy, Settings
from conveyor.testing import FakeClock, drained, eventually, running
from tests.helpers import store_rows

LEASE = 30.0


@dataclass(frozen=True)
class Scenario:
    publications: list[int]  # message numbers in publish order; repeats are duplicates
    lost: frozenset[int]  # positions of first deliveries a crashed consumer never settles
    fail_first: frozenset[int]  # message numbers whose first handling raises
    prefetch: int


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    numbers = draw(st.lists(st.integers(0, 9), min_size=1, max_size=24))
    order = draw(st.permutations(numbers))
    lost = draw(st.frozensets(st.integers(0, len(order) - 1)))
    fail_first = draw(st.frozensets(st.sampled_from(sorted(set(numbers)))))
    return Scenario(list(order), lost, fail_first, draw(st.integers(1, 5)))


async def consume(scenario: Scenario, broker_url: str, store_url: str) -> None:
    clock = FakeClock()
    app = App(
        "props",
        settings=Settings(
            broker_url=broker_url,
            store_url=store_url,
            prefetch=scenario.prefetch,
            lease=LEASE,
            idle_poll=0.002,
        ),
        clock=clock,
    )
    failed: set[int] = set()

    @app.handler(
        "work", group="apply", retry=RetryPolicy(max_attempts=10, base_delay=0, jitter=False)
    )
    async def apply(ctx: Context, body: dict[str, int]) -> None:
        n = body["n"]
        await ctx.execute("INSERT INTO effects (n, msg_id) VALUES (?, ?)", (n, ctx.message.id))
        if n in scenario.fail_first and n not in failed:
            failed.add(n)
            raise RuntimeError(f"first handling of {n} fails")

    messages = {n: Message.create("work", {"n": n}) for n in set(scenario.publications)}
    async with app:
        async with app.transaction() as s:
            # A fresh table: the property is checked on this scenario's effects only.
            await s.execute("CREATE TABLE effects (n INTEGER NOT NULL, msg_id TEXT NOT NULL)")
        for n in scenario.publications:
            await app.broker.publish([messages[n]])

        # A consumer that crashes: it takes every delivery, settles some and
        # loses the rest, which stay leased until the lease runs out.
        taken = await app.broker.fetch(
            "work", "apply", max_messages=len(scenario.publications), lease=LEASE
        )
        for position, delivery in enumerate(taken):
            if position not in scenario.lost:
                await app.broker.nack(delivery, delay=0)
        stranded = sum(1 for position in range(len(taken)) if position in scenario.lost)

        async def only_stranded_left() -> bool:
            (stats,) = await app.broker.stats()
            return (stats.ready, stats.delayed, stats.in_flight) == (0, 0, stranded)

        async with running(app):
            await eventually(only_stranded_left, timeout=20, what="ready work handled")
            clock.advance(LEASE + 1)
            await drained(app, timeout=20)

        applied = store_rows(app, "SELECT n, msg_id, COUNT(*) FROM effects GROUP BY n ORDER BY n")
        assert applied == [(n, messages[n].id, 1) for n in sorted(messages)]
        assert await app.store.dead_letters() == []


@settings(max_examples=30, deadline=None)
@given(scenario=scenarios())
def test_memory_broker_applies_each_message_once(scenario: Scenario) -> None:
    """Generic path (memory broker, SQLite store): duplicated, reordered, failed and
    lost-then-redelivered messages are each applied exactly once."""
    asyncio.run(consume(scenario, "memory://", "sqlite://:memory:"))


@settings(max_examples=30, deadline=None)
@given(scenario=scenarios())
def test_bound_sqlite_applies_each_message_once(scenario: Scenario) -> None:
    """Bound path (broker and store in one SQLite database): duplicated, reordered,
    failed and lost-then-redelivered messages are each applied exactly once."""
    asyncio.run(consume(scenario, "sqlite://:memory:", "sqlite://:memory:"))
