"""The circuit breaker: every transition and threshold on a fake clock, and a
stateful property test against a small reference model."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from conveyor import CircuitBreaker, CircuitOpen, ConfigError, Retry, Skip
from conveyor.resilience import BreakerState, CountWindow, TimeWindow
from conveyor.resilience._breaker import admit
from conveyor.testing import FakeClock

CLOSED, HALF_OPEN, OPEN = BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN


class Boom(Exception):
    pass


class Benign(Exception):
    pass


async def settle() -> None:
    """Let every ready task run (no time passes on any clock)."""
    for _ in range(5):
        await asyncio.sleep(0)


def make(clock: FakeClock, **options: object) -> CircuitBreaker:
    defaults: dict[str, object] = {
        "window": CountWindow(10),
        "minimum_calls": 4,
        "failure_rate": 0.5,
        "open_for": 30,
        "half_open_calls": 2,
        "slow_call_duration": 5,
        "clock": clock,
    }
    defaults.update(options)
    return CircuitBreaker("dep", **defaults)  # type: ignore[arg-type]


async def ok(breaker: CircuitBreaker) -> None:
    async with breaker:
        pass


async def fail(breaker: CircuitBreaker, exc: BaseException | None = None) -> None:
    with pytest.raises(type(exc) if exc else Boom):
        async with breaker:
            raise exc or Boom("down")


async def slow(breaker: CircuitBreaker, clock: FakeClock, seconds: float = 5.0) -> None:
    async with breaker:
        clock.advance(seconds)


async def open_breaker(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.minimum_calls):
        await fail(breaker)
    assert breaker.state is OPEN


async def test_stays_closed_below_minimum_calls() -> None:
    """Failures alone do not open the breaker before minimum_calls outcomes."""
    clock = FakeClock()
    b = make(clock)
    for _ in range(3):
        await fail(b)
    assert b.state is CLOSED
    await fail(b)
    assert b.state is OPEN


async def test_failure_rate_threshold_is_inclusive() -> None:
    """Exactly failure_rate of the window opens it; just under does not."""
    clock = FakeClock()
    b = make(clock, minimum_calls=10)
    for _ in range(6):
        await ok(b)
    for _ in range(4):
        await fail(b)
    assert b.state is CLOSED  # 4/10 < 0.5
    await fail(b)  # the oldest success leaves the window: 5/10
    assert b.state is OPEN
    assert b.opened == 1


async def test_count_window_slides() -> None:
    """Outcomes older than the last `size` calls no longer count."""
    clock = FakeClock()
    b = make(clock, window=CountWindow(4), minimum_calls=4)
    await fail(b)
    for _ in range(3):
        await ok(b)
    assert b.window_counts == (4, 1, 0)
    await ok(b)
    assert b.window_counts == (4, 0, 0)
    await fail(b)
    await fail(b)
    assert b.state is OPEN  # 2 of the last 4


async def test_time_window_forgets_old_calls() -> None:
    """With a TimeWindow, failures older than its duration stop counting."""
    clock = FakeClock()
    b = make(clock, window=TimeWindow(timedelta(seconds=10), buckets=10), minimum_calls=4)
    for _ in range(3):
        await fail(b)
    clock.advance(11)
    assert b.window_counts == (0, 0, 0)
    await fail(b)
    assert b.state is CLOSED  # one failure in the window, not four
    clock.advance(5)
    for _ in range(3):
        await fail(b)
    assert b.state is OPEN


async def test_slow_call_rate_opens() -> None:
    """Slow successes open the breaker at slow_call_rate, like failures."""
    clock = FakeClock()
    b = make(clock, slow_call_rate=0.5, slow_call_duration=timedelta(seconds=2))
    await ok(b)
    await ok(b)
    await slow(b, clock, 2.0)
    assert b.state is CLOSED
    await slow(b, clock, 3.0)
    assert b.state is OPEN
    assert (b.successes, b.failures, b.slow_calls) == (4, 0, 2)


async def test_open_rejects_fast_with_time_until_probe() -> None:
    """Open: the call is not made; CircuitOpen says when a probe is allowed."""
    clock = FakeClock()
    b = make(clock)
    await open_breaker(b)
    clock.advance(10)
    called = False

    @b
    async def dependency() -> int:
        nonlocal called
        called = True
        return 1

    with pytest.raises(CircuitOpen) as info:
        await dependency()
    assert not called
    assert info.value.retry_after == pytest.approx(20)
    assert info.value.breaker == "dep"
    assert b.retry_after == pytest.approx(20)
    assert b.rejections == 1


async def test_half_open_bounds_concurrent_probes_then_closes() -> None:
    """After open_for, half_open_calls probes run; one more is rejected;
    successful probes close the breaker with an empty window."""
    clock = FakeClock()
    b = make(clock, half_open_calls=2)
    await open_breaker(b)
    clock.advance(30)
    assert b.state is HALF_OPEN
    gate = asyncio.Event()
    entered = 0

    async def probe() -> None:
        nonlocal entered
        async with b:
            entered += 1
            await gate.wait()

    probes = [asyncio.create_task(probe()) for _ in range(2)]
    await asyncio.sleep(0)
    assert entered == 2
    assert not b.admits
    with pytest.raises(CircuitOpen) as info:
        await ok(b)
    assert info.value.retry_after == 0.0
    gate.set()
    await asyncio.gather(*probes)
    assert b.state is CLOSED
    assert b.window_counts == (0, 0, 0)


async def test_failing_probes_reopen() -> None:
    """Half-open probes that fail at failure_rate open the breaker again."""
    clock = FakeClock()
    b = make(clock, half_open_calls=2)
    await open_breaker(b)
    clock.advance(30)
    await ok(b)
    assert b.state is HALF_OPEN  # judged after both probes
    await fail(b)
    assert b.state is OPEN
    assert b.retry_after == pytest.approx(30)
    assert b.opened == 2


async def test_record_and_ignore_decide_what_counts() -> None:
    """Only `record` errors not in `ignore` count; signals never do."""
    clock = FakeClock()
    b = make(clock, record=(Boom,), ignore=(Benign,), minimum_calls=2, window=CountWindow(2))

    class BenignBoom(Boom, Benign):
        pass

    await fail(b, ValueError("not recorded"))
    await fail(b, BenignBoom("ignored"))
    await fail(b, Retry())
    await fail(b, Skip())
    assert b.window_counts == (0, 0, 0)
    assert b.ignored == 4
    assert b.state is CLOSED
    await fail(b)
    await fail(b)
    assert b.state is OPEN


async def test_ignored_probe_gives_its_slot_back() -> None:
    """A half-open probe ending in an ignored error frees its slot."""
    clock = FakeClock()
    b = make(clock, half_open_calls=1, ignore=(Benign,))
    await open_breaker(b)
    clock.advance(30)
    await fail(b, Benign())
    assert b.state is HALF_OPEN
    assert b.admits
    await ok(b)
    assert b.state is CLOSED


async def test_outcome_of_an_earlier_state_is_not_judged() -> None:
    """A call let through while closed that fails after the breaker opened
    and went half-open does not use up a probe."""
    clock = FakeClock()
    b = make(clock, half_open_calls=1)
    gate = asyncio.Event()

    async def straggler() -> None:
        async with b:
            await gate.wait()
            raise Boom("late")

    task = asyncio.create_task(straggler())
    await asyncio.sleep(0)
    await open_breaker(b)
    clock.advance(30)
    assert b.state is HALF_OPEN
    gate.set()
    with pytest.raises(Boom):
        await task
    assert b.state is HALF_OPEN
    assert b.admits
    assert b.failures == 5


async def test_listeners_see_every_transition() -> None:
    """on_change gets (old, new) for each change; a failing listener is harmless."""
    clock = FakeClock()
    b = make(clock, half_open_calls=1)
    seen: list[tuple[BreakerState, BreakerState]] = []
    b.on_change(lambda old, new: seen.append((old, new)))

    @b.on_change
    def broken(old: BreakerState, new: BreakerState) -> None:
        raise RuntimeError("listener bug")

    await open_breaker(b)
    clock.advance(30)
    await fail(b)
    clock.advance(30)
    await ok(b)
    assert seen == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]


async def test_fallback_answers_rejected_calls() -> None:
    """A decorated call rejected by an open breaker returns the fallback's value."""
    clock = FakeClock()
    seen: list[float] = []

    async def cached(exc: CircuitOpen) -> object:
        seen.append(exc.retry_after)
        return "cached"

    b = make(clock, fallback=cached)

    @b
    async def price() -> str:
        raise Boom("down")

    for _ in range(4):
        with pytest.raises(Boom):
            await price()
    assert await price() == "cached"
    assert seen == [30.0]


async def test_wait_ready_sleeps_on_the_clock_and_wakes_on_change() -> None:
    """wait_ready waits on one clock sleep until open_for has passed, and
    returns at once on a state change (reset) without the clock moving."""
    clock = FakeClock()
    b = make(clock)
    await open_breaker(b)
    waiter = asyncio.create_task(b.wait_ready())
    await settle()
    assert clock.sleepers == 1
    assert not waiter.done()
    clock.advance(29)
    await settle()
    assert not waiter.done()
    clock.advance(1)
    await asyncio.wait_for(waiter, 1)
    assert b.state is HALF_OPEN

    await fail(b)
    await fail(b)
    assert b.state is OPEN
    waiter = asyncio.create_task(b.wait_ready())
    await settle()
    b.reset()
    await asyncio.wait_for(waiter, 1)
    assert b.state is CLOSED


async def test_admit_fetch_size_follows_the_breakers() -> None:
    """admit: the full batch when closed, waits while open, one probe when half-open."""
    clock = FakeClock()
    a, b = make(clock), make(clock)
    assert await admit([a, b], 64) == 64
    await open_breaker(b)
    pending = asyncio.create_task(admit([a, b], 64))
    await settle()
    assert not pending.done()
    clock.advance(30)
    assert await asyncio.wait_for(pending, 1) == 1


def test_configuration_is_checked() -> None:
    """Bad settings are a ConfigError naming the breaker; timedelta works."""
    with pytest.raises(ConfigError, match="'x': failure_rate"):
        CircuitBreaker("x", failure_rate=0)
    with pytest.raises(ConfigError, match="minimum_calls"):
        CircuitBreaker("x", window=CountWindow(5), minimum_calls=6)
    with pytest.raises(ConfigError, match="half_open_calls"):
        CircuitBreaker("x", half_open_calls=0)
    with pytest.raises(ConfigError):
        TimeWindow(0)
    with pytest.raises(ConfigError):
        CountWindow(0)
    b = CircuitBreaker("x", open_for=timedelta(minutes=1), slow_call_duration=timedelta(seconds=2))
    assert (b.open_for, b.slow_call_duration) == (60.0, 2.0)
    assert b.state is CLOSED
    assert BreakerState.OPEN.value == 2


# The stateful test: the breaker against a deliberately naive model that
# keeps every outcome in a list and recomputes the rates from scratch.


@dataclass
class Model:
    window: CountWindow | TimeWindow
    minimum_calls: int
    failure_rate: float
    slow_call_rate: float
    slow_call_duration: float
    open_for: float
    half_open_calls: int
    state: BreakerState = CLOSED
    epoch: int = 0
    outcomes: list[tuple[int, bool, bool]] = field(default_factory=list)
    opened_at: float = 0.0
    probes: int = 0
    probe_outcomes: list[tuple[bool, bool]] = field(default_factory=list)
    calls: int = 0
    rejections: int = 0
    failures: int = 0
    successes: int = 0

    def poll(self, now: float) -> None:
        if self.state is OPEN and now >= self.opened_at + self.open_for:
            self.move(HALF_OPEN, now)

    def move(self, new: BreakerState, now: float) -> None:
        self.state, self.epoch = new, self.epoch + 1
        if new is OPEN:
            self.opened_at = now
        elif new is HALF_OPEN:
            self.probes, self.probe_outcomes = 0, []
        else:
            self.outcomes = []

    def acquire(self, now: float) -> int | None:
        self.poll(now)
        if self.state is OPEN or (self.state is HALF_OPEN and self.probes >= self.half_open_calls):
            self.rejections += 1
            return None
        if self.state is HALF_OPEN:
            self.probes += 1
        self.calls += 1
        return self.epoch

    def tripped(self, outcomes: list[tuple[bool, bool]]) -> bool:
        n = len(outcomes)
        failed = sum(f for f, _ in outcomes)
        slow = sum(s for _, s in outcomes)
        return failed >= self.failure_rate * n or slow >= self.slow_call_rate * n

    def live(self, now: float) -> list[tuple[bool, bool]]:
        if isinstance(self.window, CountWindow):
            kept = self.outcomes[-self.window.size :]
        else:
            width = float(self.window.duration) / self.window.buckets  # type: ignore[arg-type]
            current = math.floor(now / width)
            kept = [o for o in self.outcomes if o[0] > current - self.window.buckets]
        self.outcomes = kept
        return [(f, s) for _, f, s in kept]

    def release(self, epoch: int, kind: str, start: float, now: float) -> None:
        if kind == "ignored":
            if epoch == self.epoch and self.state is HALF_OPEN:
                self.probes -= 1
            return
        failed, slow = kind == "fail", now - start >= self.slow_call_duration
        self.failures += failed
        self.successes += not failed
        if epoch != self.epoch:
            return
        if self.state is CLOSED:
            bucket = 0
            if isinstance(self.window, TimeWindow):
                width = float(self.window.duration) / self.window.buckets  # type: ignore[arg-type]
                bucket = math.floor(now / width)
            self.outcomes.append((bucket, failed, slow))
            live = self.live(now)
            if len(live) >= self.minimum_calls and self.tripped(live):
                self.move(OPEN, now)
        elif self.state is HALF_OPEN:
            self.probe_outcomes.append((failed, slow))
            if len(self.probe_outcomes) >= self.half_open_calls:
                self.move(OPEN if self.tripped(self.probe_outcomes) else CLOSED, now)


KINDS = st.sampled_from(["ok", "fail", "ignored"])


class BreakerMachine(RuleBasedStateMachine):
    shared = False
    """True for a breaker whose state lives elsewhere (Redis): its window
    counts are as of the last call, and probe slots are not mirrored."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()

    def build(self, **options: object) -> CircuitBreaker:
        return CircuitBreaker("model", clock=self.clock, ignore=(Benign,), **options)  # type: ignore[arg-type]

    def teardown(self) -> None:
        self.loop.close()

    @initialize(
        window=st.one_of(
            st.builds(CountWindow, st.integers(3, 6)),
            st.builds(TimeWindow, st.sampled_from([4.0, 10.0]), st.integers(1, 4)),
        ),
        minimum_calls=st.integers(1, 3),
        failure_rate=st.sampled_from([0.25, 0.5, 1.0]),
        slow_call_rate=st.sampled_from([0.5, 1.0]),
        half_open_calls=st.integers(1, 3),
    )
    def configure(
        self,
        window: CountWindow | TimeWindow,
        minimum_calls: int,
        failure_rate: float,
        slow_call_rate: float,
        half_open_calls: int,
    ) -> None:
        options = {
            "window": window,
            "minimum_calls": minimum_calls,
            "failure_rate": failure_rate,
            "slow_call_rate": slow_call_rate,
            "slow_call_duration": 2.0,
            "open_for": 5.0,
            "half_open_calls": half_open_calls,
        }
        self.breaker = self.build(**options)  # type: ignore[arg-type]
        self.model = Model(**options)  # type: ignore[arg-type]

    async def _call(self, kind: str, duration: float) -> float | None:
        """One call through ``async with``; None if let through, else the
        rejection's retry_after."""
        try:
            async with self.breaker:
                if duration:
                    self.clock.advance(duration)
                if kind == "fail":
                    raise Boom("fail")
                if kind == "ignored":
                    raise Benign("ignored")
        except CircuitOpen as exc:
            return exc.retry_after
        except (Boom, Benign):
            pass
        return None

    def _expect_call(self, kind: str, duration: float) -> None:
        start = self.clock.monotonic()
        epoch = self.model.acquire(start)
        refused = self.loop.run_until_complete(self._call(kind, duration))
        assert (refused is None) == (epoch is not None)
        if refused is not None:
            m = self.model
            wait = m.opened_at + m.open_for - start if m.state is OPEN else 0.0
            assert refused == pytest.approx(wait)
        if epoch is not None:
            self.model.release(epoch, kind, start, self.clock.monotonic())
            if kind != "ignored" and self.model.state is CLOSED and epoch == self.model.epoch:
                # Right after a recorded call even a shared window is current.
                live = self.model.live(self.clock.monotonic())
                assert self.breaker.window_counts == (
                    len(live),
                    sum(f for f, _ in live),
                    sum(s for _, s in live),
                )

    @rule()
    def successful_call(self) -> None:
        self._expect_call("ok", 0.0)

    @rule()
    def failing_call(self) -> None:
        self._expect_call("fail", 0.0)

    @rule(kind=KINDS, duration=st.sampled_from([2.0, 3.5]))
    def slow_call(self, kind: str, duration: float) -> None:
        self._expect_call(kind, duration)

    @rule()
    def ignored_exception(self) -> None:
        self._expect_call("ignored", 0.0)

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.5, 5.0, 11.0]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(kinds=st.lists(KINDS, min_size=2, max_size=5))
    def concurrent_probes(self, kinds: list[str]) -> None:
        """Several calls in flight at once, then finishing in start order."""
        now = self.clock.monotonic()
        epochs = [self.model.acquire(now) for _ in kinds]

        async def run() -> tuple[list[bool], list[bool]]:
            gates = [asyncio.Event() for _ in kinds]
            entered: list[bool] = [False] * len(kinds)
            decided = [asyncio.Event() for _ in kinds]

            async def one(i: int, kind: str) -> bool:
                try:
                    async with self.breaker:
                        entered[i] = True
                        decided[i].set()
                        await gates[i].wait()
                        if kind == "fail":
                            raise Boom("fail")
                        if kind == "ignored":
                            raise Benign("ignored")
                except CircuitOpen:
                    decided[i].set()
                    return False
                except (Boom, Benign):
                    pass
                return True

            # Calls enter one after another (a shared breaker decides on the
            # server, in arrival order) and are all in flight together.
            tasks = []
            for i, kind in enumerate(kinds):
                tasks.append(asyncio.create_task(one(i, kind)))
                await asyncio.wait_for(decided[i].wait(), 5)
            in_flight = list(entered)
            # ...and finish in the same order, one after another.
            admitted = []
            for gate, task in zip(gates, tasks, strict=True):
                gate.set()
                admitted.append(await task)
            return in_flight, admitted

        in_flight, admitted = self.loop.run_until_complete(run())
        assert in_flight == [e is not None for e in epochs]
        assert admitted == in_flight
        for epoch, kind in zip(epochs, kinds, strict=True):
            if epoch is not None:
                self.model.release(epoch, kind, now, now)

    @invariant()
    def agrees_with_the_model(self) -> None:
        if not hasattr(self, "model"):
            return
        self.model.poll(self.clock.monotonic())
        b, m = self.breaker, self.model
        assert b.state is m.state
        assert (b.calls, b.rejections, b.failures, b.successes) == (
            m.calls,
            m.rejections,
            m.failures,
            m.successes,
        )
        if self.shared:
            return
        if m.state is CLOSED:
            live = m.live(self.clock.monotonic())
            assert b.window_counts == (
                len(live),
                sum(f for f, _ in live),
                sum(s for _, s in live),
            )
        assert b.admits == (
            m.state is CLOSED or (m.state is HALF_OPEN and m.probes < m.half_open_calls)
        )


TestBreakerStateMachine = BreakerMachine.TestCase
TestBreakerStateMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
