"""The resilience primitives wired into the runtime, driven by an injected
clock: rate-limited handlers, retry budgets and producer load shedding."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest

from conveyor import App, Context, Overloaded, RateLimiter, RetryBudget, RetryPolicy
from conveyor.brokers._protocol import Delivery
from conveyor.brokers.memory import MemoryBroker
from conveyor.testing import FakeClock, drained, eventually, running
from tests.helpers import PATHS, settings_for


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _run_clock(clock: FakeClock, done: Any, step: float) -> None:
    """Advance ``clock`` by ``step`` each time something sleeps on it, until
    ``done()``; after each step, let what woke up run before the next one."""
    while not done():
        await eventually(lambda: clock.sleepers > 0 or done(), what="a sleeper on the clock")
        if not done():
            clock.advance(step)
            for _ in range(50):
                await asyncio.sleep(0)


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_rate_limited_handler_never_exceeds_its_rate(
    path: str, concurrency: int, tmp_path: Path
) -> None:
    """With rate_limit="4/s" every handler call is at least 0.25s (fake) after
    the previous one, no attempt is spent on waiting, and the limiter is the
    only brake: 20 messages take 19 intervals."""
    clock = FakeClock()
    app = App("rl", settings=settings_for(path, tmp_path), clock=clock)
    calls: list[tuple[float, int]] = []

    @app.handler("work", group="slow", rate_limit="4/s", concurrency=concurrency)
    async def handle(ctx: Context, body: dict[str, int]) -> None:
        calls.append((clock.monotonic(), ctx.attempt))

    async with app:
        for n in range(20):
            await app.publish("work", {"n": n})
        async with running(app):
            await asyncio.wait_for(_run_clock(clock, lambda: len(calls) >= 20, 0.125), 30)
            await drained(app)
    times = [t for t, _ in calls]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.25, gaps
    assert times[-1] - times[0] <= 19 * 0.25 + 0.125
    assert {attempt for _, attempt in calls} == {1}


async def test_rate_limit_key_limits_each_key_on_its_own(tmp_path: Path) -> None:
    """rate_limit_key gives each key its own allowance: two keys interleave at
    full rate each, calls of one key stay spaced."""
    clock = FakeClock()
    app = App("rlk", settings=settings_for("memory", tmp_path), clock=clock)
    limiter = RateLimiter(1, 1.0, clock=clock)
    calls: list[tuple[float, str]] = []

    @app.handler("work", group="k", rate_limit=limiter, rate_limit_key=lambda m: m.key, prefetch=1)
    async def handle(ctx: Context, body: dict[str, int]) -> None:
        calls.append((clock.monotonic(), ctx.message.key or ""))

    async with app:
        for n in range(4):
            await app.publish("work", {"n": n}, key="ab"[n % 2])
        async with running(app):
            await asyncio.wait_for(_run_clock(clock, lambda: len(calls) >= 4, 0.5), 30)
    for key in "ab":
        times = [t for t, k in calls if k == key]
        assert len(times) == 2
        assert times[1] - times[0] >= 1.0
    assert calls[-1][0] - calls[0][0] <= 1.5, "two keys must not share one allowance"
    assert limiter.keys == 2


class RecordingBroker(MemoryBroker):
    """A memory broker that remembers every nack delay it was asked for."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__("memory://", clock=clock)
        self.delays: list[float] = []

    async def nack(self, delivery: Delivery, *, delay: float) -> None:
        self.delays.append(delay)
        await super().nack(delivery, delay=delay)


async def test_over_budget_retries_wait_the_policy_maximum(tmp_path: Path) -> None:
    """Within budget a failure is retried after its backoff; once retries
    exceed ratio x first attempts, the retry waits max_delay instead."""
    clock = FakeClock()
    broker = RecordingBroker(clock)
    budget = RetryBudget(ratio=0.5, min_per_second=0, window=60, clock=clock)
    app = App("budget", settings=settings_for("memory", tmp_path), broker=broker, clock=clock)

    @app.handler(
        "work",
        group="down",
        retry=RetryPolicy(max_attempts=5, base_delay=1.0, max_delay=30.0, jitter=False),
        retry_budget=budget,
    )
    async def handle(ctx: Context, body: dict[str, Any]) -> None:
        raise ConnectionError("dependency down")

    async with app:
        for n in range(6):
            await app.publish("work", {"n": n})
        async with running(app):
            await eventually(lambda: len(broker.delays) == 6, what="six retries scheduled")
    assert sorted(broker.delays) == [1.0, 1.0, 1.0, 30.0, 30.0, 30.0]
    assert (budget.allowed, budget.denied) == (3, 3)


async def test_publish_sheds_load_above_the_threshold(tmp_path: Path) -> None:
    """Settings.shed_above: publish raises Overloaded (with retry_after) once the
    measured backlog is over the threshold, and works again once it is back
    under; depth is measured at most once a second."""
    clock = FakeClock()
    broker = MemoryBroker("memory://", clock=clock)
    stats_calls = 0
    real_stats = broker.stats

    async def counted() -> Any:
        nonlocal stats_calls
        stats_calls += 1
        return await real_stats()

    broker.stats = counted  # type: ignore[method-assign]
    app = App(
        "shed", settings=settings_for("memory", tmp_path, shed_above=3), broker=broker, clock=clock
    )

    @app.handler("orders", group="billing")
    async def handle(ctx: Context, body: dict[str, int]) -> None: ...

    async with app:
        for n in range(4):
            await app.publish("orders", {"n": n})
        assert stats_calls == 1, "depth is cached between publishes"
        clock.advance(1.0)
        with pytest.raises(Overloaded) as info:
            await app.publish("orders", {"n": 4})
        assert info.value.retry_after == 1.0
        await app.publish("other", {"n": 0}), "another topic is not shed"
        deliveries = await broker.fetch("orders", "billing", max_messages=2, lease=30)
        await broker.ack(deliveries)
        with pytest.raises(Overloaded):
            await app.publish("orders", {"n": 4})  # still the cached depth
        clock.advance(1.0)
        await app.publish("orders", {"n": 4})
        (orders,) = [s for s in await broker.stats() if s.topic == "orders"]
        assert orders.ready == 3
