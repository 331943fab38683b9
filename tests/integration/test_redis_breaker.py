"""The Redis-shared circuit breaker: one breaker per dependency across
processes (two instances with their own clients stand for two processes), and
the same stateful model test the local breaker passes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings

from conveyor import CircuitBreaker, CircuitOpen
from conveyor.resilience import BreakerState, CountWindow, TimeWindow
from conveyor.resilience.redis_breaker import RedisCircuitBreaker
from conveyor.testing import FakeClock, eventually
from tests.servers import REDIS_URL
from tests.unit.test_breaker import Benign, BreakerMachine

PREFIX = "conveyor:test:breaker"
CLOSED, HALF_OPEN, OPEN = BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN


class Down(Exception):
    pass


async def _delete(names: list[str]) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [f"{PREFIX}:{{{n}}}" for n in names]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def name() -> AsyncIterator[str]:
    """A breaker name no other test uses; its key is deleted afterwards."""
    fresh = f"cb{uuid.uuid4().hex[:12]}"
    yield fresh
    await _delete([fresh])


def _pair(name: str, clock: FakeClock, **options: object) -> list[RedisCircuitBreaker]:
    defaults: dict[str, object] = {
        "window": CountWindow(10),
        "minimum_calls": 4,
        "open_for": 30,
        "half_open_calls": 2,
        "clock": clock,
        "prefix": PREFIX,
    }
    defaults.update(options)
    return [RedisCircuitBreaker(REDIS_URL, name, **defaults) for _ in range(2)]  # type: ignore[arg-type]


async def _fail(breaker: CircuitBreaker) -> None:
    with pytest.raises(Down):
        async with breaker:
            raise Down("down")


async def test_state_and_probes_are_shared(name: str) -> None:
    """Failures seen by one process open the breaker for the other; the
    half-open probe slots are shared; successful probes close it for both."""
    clock = FakeClock()
    a, b = _pair(name, clock)
    seen: list[tuple[BreakerState, BreakerState]] = []
    b.on_change(lambda old, new: seen.append((old, new)))
    try:
        for _ in range(4):
            await _fail(a)
        assert a.state is OPEN
        with pytest.raises(CircuitOpen) as info:
            async with b:
                pass
        assert info.value.retry_after == pytest.approx(30)
        assert b.state is OPEN
        assert seen == [(CLOSED, OPEN)]

        clock.advance(30)
        gate = asyncio.Event()

        async def probe(breaker: CircuitBreaker) -> None:
            async with breaker:
                await gate.wait()

        first = asyncio.create_task(probe(a))
        await eventually(lambda: a.calls == 5, timeout=5, interval=0.001)
        second = asyncio.create_task(probe(b))
        await eventually(lambda: b.calls == 1, timeout=5, interval=0.001)
        with pytest.raises(CircuitOpen):  # both slots taken, across processes
            async with a:
                pass
        gate.set()
        await asyncio.gather(first, second)
        assert await a.refresh() is CLOSED
        assert await b.refresh() is CLOSED
        assert a.window_counts == (0, 0, 0)
    finally:
        await a.close()
        await b.close()


async def test_time_window_and_shared_reset(name: str) -> None:
    """The shared TimeWindow forgets old failures; reset_shared closes it for all."""
    clock = FakeClock()
    a, b = _pair(name, clock, window=TimeWindow(10, buckets=5), minimum_calls=3)
    try:
        await _fail(a)
        await _fail(b)
        clock.advance(11)
        await _fail(a)
        assert a.state is CLOSED
        assert a.window_counts == (1, 1, 0)
        await _fail(b)
        await _fail(a)
        assert a.state is OPEN
        await b.reset_shared()
        assert await a.refresh() is CLOSED
    finally:
        await a.close()
        await b.close()


async def test_wait_ready_sees_another_process_close_it(name: str) -> None:
    """A waiting consumer re-reads the shared state every `poll` and resumes
    once another process has reset the breaker."""
    clock = FakeClock()
    a, b = _pair(name, clock, poll=1.0)
    try:
        for _ in range(4):
            await _fail(a)
        waiter = asyncio.create_task(b.wait_ready())
        await eventually(lambda: clock.sleepers == 1, timeout=5, interval=0.001)
        await a.reset_shared()
        clock.advance(1)
        await asyncio.wait_for(waiter, 5)
        assert b.state is CLOSED
    finally:
        await a.close()
        await b.close()


class RedisBreakerMachine(BreakerMachine):
    shared = True

    def build(self, **options: object) -> CircuitBreaker:
        self.name = f"cb{uuid.uuid4().hex[:12]}"
        return RedisCircuitBreaker(
            REDIS_URL,
            self.name,
            prefix=PREFIX,
            clock=self.clock,
            ignore=(Benign,),
            **options,
        )

    def teardown(self) -> None:
        breaker = getattr(self, "breaker", None)
        if isinstance(breaker, RedisCircuitBreaker):
            self.loop.run_until_complete(breaker.close())
            self.loop.run_until_complete(_delete([self.name]))
        super().teardown()


TestRedisBreakerStateMachine = RedisBreakerMachine.TestCase
TestRedisBreakerStateMachine.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
