"""Bulkhead, rate limiter, timeout, in-process retry, retry budget and load
shedding, on their own, driven by an injected clock: nothing here waits for
real time to pass."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest

from conveyor import PermanentError, RetryPolicy
from conveyor.errors import (
    BulkheadFull,
    CallTimeout,
    ConfigError,
    Overloaded,
    RateLimited,
    ResilienceError,
)
from conveyor.resilience import (
    Bulkhead,
    Limiter,
    LoadShedder,
    RateLimiter,
    RetryBudget,
    parse_rate,
    retry,
    retrying,
    timeout,
)
from conveyor.testing import FakeClock, eventually


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


# -- bulkhead ---------------------------------------------------------------


async def test_bulkhead_caps_concurrency_queues_then_rejects() -> None:
    """Two run, one waits, the fourth is rejected at once; a released slot goes
    to the waiter; the counters say so."""
    bulkhead = Bulkhead(2, 1, name="payments")
    gate = asyncio.Event()
    running: list[int] = []

    async def call(n: int) -> None:
        async with bulkhead:
            running.append(n)
            await gate.wait()

    tasks = [asyncio.create_task(call(n)) for n in range(3)]
    await _settle()
    assert running == [0, 1]
    assert (bulkhead.active, bulkhead.waiting, bulkhead.rejected) == (2, 1, 0)
    with pytest.raises(BulkheadFull, match="payments"):
        await call(3)
    assert bulkhead.rejected == 1
    gate.set()
    await asyncio.gather(*tasks)
    assert running == [0, 1, 2]
    assert (bulkhead.active, bulkhead.waiting) == (0, 0)


async def test_bulkhead_cancelled_waiters_leak_no_slot() -> None:
    """A waiter cancelled while waiting frees its place in the queue, and one
    cancelled just as the slot was handed to it gives the slot back."""
    bulkhead = Bulkhead(1, 2)
    await bulkhead.acquire()
    waiter = asyncio.create_task(bulkhead.acquire())
    await _settle()
    assert bulkhead.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (bulkhead.active, bulkhead.waiting) == (1, 0)

    handed = asyncio.create_task(bulkhead.acquire())
    await _settle()
    bulkhead.release()  # hands the slot to `handed`...
    handed.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await handed
    assert (bulkhead.active, bulkhead.waiting) == (0, 0)
    await bulkhead.acquire()
    assert bulkhead.active == 1


def test_bulkhead_rejects_bad_sizes() -> None:
    """Sizes below 1 running or 0 waiting are configuration errors."""
    with pytest.raises(ConfigError):
        Bulkhead(0, 0)
    with pytest.raises(ConfigError):
        Bulkhead(1, -1)


# -- rate limiter -------------------------------------------------------------


def test_parse_rate() -> None:
    """Rates are COUNT/UNIT with an optional unit multiple; nonsense is a ConfigError."""
    assert parse_rate("10/s") == (10.0, 1.0)
    assert parse_rate("600/min") == (600.0, 60.0)
    assert parse_rate("5/10s") == (5.0, 10.0)
    assert parse_rate(" 2 / h ") == (2.0, 3600.0)
    for bad in ("10", "ten/s", "10/fortnight", "0/s"):
        with pytest.raises(ConfigError):
            parse_rate(bad)


async def test_limiter_burst_then_spacing_and_try_acquire() -> None:
    """A fresh limiter grants ``burst`` permits at once, then one per interval;
    try_acquire never waits and says whether it got one."""
    clock = FakeClock()
    limiter = RateLimiter(2, timedelta(seconds=1), burst=3, clock=clock)
    assert isinstance(limiter, Limiter)
    assert [await limiter.try_acquire() for _ in range(4)] == [True, True, True, False]
    clock.advance(0.5)
    assert await limiter.try_acquire()
    assert not await limiter.try_acquire()
    assert (limiter.granted, limiter.rejected) == (4, 2)


async def test_limiter_acquire_waits_on_the_clock_or_raises_with_retry_after() -> None:
    """acquire waits exactly until its slot; with a deadline shorter than the
    wait it raises RateLimited at once, carrying retry_after."""
    clock = FakeClock()
    limiter = RateLimiter(4, 1.0, clock=clock)
    assert await limiter.acquire() == 0.0
    task = asyncio.create_task(limiter.acquire())
    await eventually(lambda: clock.sleepers == 1, what="waiter asleep")
    clock.advance(0.2)
    await _settle()
    assert not task.done()
    clock.advance(0.05)
    assert await task == pytest.approx(0.25)
    with pytest.raises(RateLimited) as info:
        await limiter.acquire(timeout=0.1)
    assert info.value.retry_after == pytest.approx(0.25)
    assert isinstance(info.value, ResilienceError)
    assert limiter.waited == pytest.approx(0.25)


async def test_limiter_never_exceeds_its_rate_in_any_window() -> None:
    """Under random demand, every window of w seconds holds at most
    burst + w * rate grants, and a saturated limiter reaches its rate."""
    clock = FakeClock()
    rate, burst = 5.0, 2
    limiter = RateLimiter(rate, 1.0, burst=burst, clock=clock)
    rng = random.Random(42)
    grants: list[float] = []
    for _ in range(3000):
        clock.advance(rng.choice([0.0, 0.001, 0.01, 0.02]))
        if await limiter.try_acquire():
            grants.append(clock.monotonic())
    for i, start in enumerate(grants):
        for width in (0.5, 1.0, 3.0):
            inside = sum(1 for t in grants[i:] if t <= start + width)
            assert inside <= burst + width * rate + 1e-9, (start, width, inside)
    elapsed = grants[-1] - grants[0]
    assert len(grants) >= 0.9 * elapsed * rate


async def test_limiter_keys_are_independent_and_memory_is_bounded() -> None:
    """Each key has its own allowance; no more than max_keys keys are kept,
    stale ones going first."""
    clock = FakeClock()
    limiter = RateLimiter(1, 1.0, clock=clock, max_keys=3)
    assert await limiter.try_acquire(key="a")
    assert not await limiter.try_acquire(key="a")
    assert await limiter.try_acquire(key="b")
    for n in range(100):
        await limiter.try_acquire(key=n)
        assert limiter.keys <= 3
    clock.advance(5)
    assert await limiter.try_acquire(key="a")


def test_limiter_rejects_bad_settings() -> None:
    """Zero rates and bursts are configuration errors."""
    with pytest.raises(ConfigError):
        RateLimiter(0)
    with pytest.raises(ConfigError):
        RateLimiter(1, burst=0)


# -- timeout ------------------------------------------------------------------


async def test_timeout_cuts_a_slow_call_on_the_injected_clock() -> None:
    """A body still running at the limit is cancelled and CallTimeout (a
    TimeoutError) raised; a body that ends in time is untouched."""
    clock = FakeClock()
    guard = timeout(timedelta(seconds=2), clock=clock)

    async def slow() -> None:
        async with guard:
            await asyncio.Event().wait()

    task = asyncio.create_task(slow())
    await eventually(lambda: clock.sleepers == 1, what="timer armed")
    clock.advance(1.9)
    await _settle()
    assert not task.done()
    clock.advance(0.1)
    with pytest.raises(CallTimeout) as info:
        await task
    assert isinstance(info.value, TimeoutError)
    assert guard.timeouts == 1

    async with timeout(2, clock=clock):
        await asyncio.sleep(0)
    await _settle()
    assert clock.sleepers == 0, "the timer of a finished body is disarmed"


async def test_timeout_decorator_and_outside_cancellation() -> None:
    """As a decorator each call gets its own limit; a cancellation from
    outside stays a CancelledError, not a timeout."""
    clock = FakeClock()
    limit = timeout(1, clock=clock)

    @limit
    async def wait_for(event: asyncio.Event) -> str:
        await event.wait()
        return "done"

    done = asyncio.Event()
    done.set()
    assert await wait_for(done) == "done"
    hung = asyncio.create_task(wait_for(asyncio.Event()))
    await eventually(lambda: clock.sleepers == 1, what="timer armed")
    clock.advance(1)
    with pytest.raises(CallTimeout):
        await hung
    assert limit.timeouts == 1

    cancelled = asyncio.create_task(wait_for(asyncio.Event()))
    await eventually(lambda: clock.sleepers == 1, what="timer armed")
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert limit.timeouts == 1


# -- in-process retry -------------------------------------------------------


async def _drive(clock: FakeClock, task: asyncio.Task[object], steps: list[float]) -> None:
    for step in steps:
        await eventually(lambda: clock.sleepers == 1, what="backoff asleep")
        clock.advance(step)
    await asyncio.wait_for(asyncio.shield(task), 10)


def _flaky(
    fails: int, error: Callable[[], Exception]
) -> tuple[list[int], Callable[[], Awaitable[str]]]:
    calls: list[int] = []

    async def call() -> str:
        calls.append(len(calls) + 1)
        if len(calls) <= fails:
            raise error()
        return "ok"

    return calls, call


async def test_retry_decorator_backs_off_with_the_runtime_policy() -> None:
    """@retry(policy) retries a failing call with the policy's backoff on the
    injected clock and returns the first success."""
    clock = FakeClock()
    policy = RetryPolicy(max_attempts=4, base_delay=1.0, jitter=False)
    calls, call = _flaky(2, lambda: ConnectionError("down"))
    task = asyncio.create_task(retry(policy, clock=clock)(call)())
    await _drive(clock, task, [1.0, 2.0])  # type: ignore[arg-type]
    assert task.result() == "ok"
    assert calls == [1, 2, 3]
    assert clock.monotonic() == 3.0


async def test_retry_gives_up_on_permanent_errors_and_after_the_last_attempt() -> None:
    """A PermanentError is raised at once; a transient one after max_attempts."""
    clock = FakeClock()
    policy = RetryPolicy(max_attempts=2, base_delay=1.0, jitter=False)
    calls, call = _flaky(5, lambda: PermanentError("declined"))
    with pytest.raises(PermanentError):
        await retry(policy, clock=clock)(call)()
    assert calls == [1]
    calls, call = _flaky(5, lambda: ConnectionError("down"))
    task = asyncio.create_task(retry(policy, clock=clock)(call)())
    await eventually(lambda: clock.sleepers == 1, what="backoff asleep")
    clock.advance(1.0)
    with pytest.raises(ConnectionError):
        await task
    assert calls == [1, 2]


async def test_retrying_loop_form() -> None:
    """``async for attempt in retrying(policy): with attempt:`` runs the block
    until it succeeds, numbering attempts, and re-raises the last failure."""
    clock = FakeClock()
    policy = RetryPolicy(max_attempts=3, base_delay=0.5, jitter=False)
    calls, call = _flaky(1, lambda: TimeoutError("slow"))
    seen: list[int] = []

    async def run() -> str:
        async for attempt in retrying(policy, clock=clock):
            with attempt:
                seen.append(attempt.number)
                return await call()
        raise AssertionError("unreachable")

    task = asyncio.create_task(run())
    await eventually(lambda: clock.sleepers == 1, what="backoff asleep")
    clock.advance(0.5)
    assert await task == "ok"
    assert seen == calls == [1, 2]

    _, call = _flaky(9, lambda: ValueError("bad"))

    async def never() -> None:
        async for attempt in retrying(RetryPolicy(max_attempts=1), clock=clock):
            with attempt:
                await call()

    with pytest.raises(ValueError, match="bad"):
        await never()


# -- retry budget ---------------------------------------------------------------


def test_retry_budget_is_a_fraction_of_first_attempts_over_a_window() -> None:
    """With ratio 0.2 and no floor, 10 first attempts earn 2 retries; they
    expire with the window; the floor grants min_per_second * window alone."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=0, window=10, clock=clock)
    for _ in range(10):
        budget.record_attempt()
    assert [budget.try_retry() for _ in range(3)] == [True, True, False]
    assert (budget.allowed, budget.denied) == (2, 1)
    clock.advance(5)
    for _ in range(5):
        budget.record_attempt()
    assert budget.try_retry(), "5 more attempts earn one more retry"
    assert not budget.try_retry()
    clock.advance(5.5)  # the first 10 attempts and 2 retries left the window
    assert budget.available == pytest.approx(0.2 * 5 - 1)
    floor = RetryBudget(ratio=0.2, min_per_second=0.5, window=timedelta(seconds=4), clock=clock)
    assert [floor.try_retry() for _ in range(3)] == [True, True, False]


# -- load shedding ----------------------------------------------------------------


async def test_load_shedder_caches_depth_and_refuses_above_threshold() -> None:
    """Depth is measured at most once per refresh interval; above the
    threshold check() raises Overloaded with retry_after = refresh."""
    clock = FakeClock()
    depth = {"t": 5}
    asked: list[str] = []

    async def measure(topic: str) -> int:
        asked.append(topic)
        return depth[topic]

    shedder = LoadShedder(5, measure, refresh=timedelta(seconds=2), clock=clock)
    await shedder.check("t")
    depth["t"] = 6
    await shedder.check("t")
    assert asked == ["t"], "cached within the refresh interval"
    clock.advance(2)
    with pytest.raises(Overloaded) as info:
        await shedder.check("t")
    assert info.value.retry_after == 2.0
    assert shedder.shed == 1
