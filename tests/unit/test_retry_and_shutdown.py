"""Retry schedules and graceful shutdown, driven by an injected clock: nothing
here waits for real time to pass."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from conveyor import App, ConfigError, Context, Message, PermanentError, RetryPolicy
from conveyor.brokers._protocol import Delivery
from conveyor.brokers.memory import MemoryBroker
from conveyor.errors import BrokerError, DecodeError, HandlerTimeout
from conveyor.testing import FakeClock, drained, eventually, pending, running
from tests.helpers import queue_counts, settings_for, store_rows


class RecordingBroker(MemoryBroker):
    """A memory broker that remembers every nack delay it was asked for."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__("memory://", clock=clock)
        self.delays: list[float] = []

    async def nack(self, delivery: Delivery, *, delay: float) -> None:
        self.delays.append(delay)
        await super().nack(delivery, delay=delay)


def test_backoff_without_jitter_doubles_up_to_the_cap() -> None:
    """Without jitter attempt n waits base * 2**(n-1), never more than max_delay."""
    policy = RetryPolicy(base_delay=0.5, max_delay=10.0, jitter=False)
    assert [policy.backoff(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 10, 10, 10]
    assert policy.backoff(10_000) == 10.0
    assert policy.backoff(0) == 0.5


def test_backoff_with_full_jitter_stays_within_bounds() -> None:
    """With jitter each delay is drawn from [0, min(cap, base * 2**(n-1))], covers
    that range, and a seeded generator reproduces the schedule."""
    policy = RetryPolicy(base_delay=1.0, max_delay=20.0)
    rng = random.Random(1234)
    for attempt in range(1, 12):
        ceiling = min(20.0, 2.0 ** (attempt - 1))
        draws = [policy.backoff(attempt, rng) for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in draws), attempt
        assert max(draws) > 0.9 * ceiling
        assert min(draws) < 0.1 * ceiling
    first = [policy.backoff(n, random.Random(7)) for n in range(1, 6)]
    again = [policy.backoff(n, random.Random(7)) for n in range(1, 6)]
    assert first == again


def test_durations_accept_timedelta() -> None:
    """Retry delays may be given as timedelta and are kept as seconds."""
    policy = RetryPolicy(
        base_delay=timedelta(milliseconds=250), max_delay=timedelta(minutes=1), jitter=False
    )
    assert (policy.base_delay, policy.max_delay) == (0.25, 60.0)
    assert policy.backoff(3) == 1.0


def test_errors_are_classified_as_retryable_or_permanent() -> None:
    """retry_on selects what is retried, give_up_on (and its subclasses) is not,
    and PermanentError and payload decode errors never are."""

    class Declined(PermanentError):
        pass

    default = RetryPolicy()
    assert default.is_retryable(RuntimeError("flaky"))
    assert default.is_retryable(HandlerTimeout("slow"))
    assert not default.is_retryable(PermanentError("no"))
    assert not default.is_retryable(Declined("no"))
    assert not default.is_retryable(DecodeError("bad payload"))

    narrow = RetryPolicy(retry_on=(ConnectionError,), give_up_on=(ConnectionRefusedError,))
    assert narrow.is_retryable(ConnectionResetError())
    assert not narrow.is_retryable(ConnectionRefusedError())
    assert not narrow.is_retryable(ValueError())
    assert not RetryPolicy(retry_on=(PermanentError,)).is_retryable(PermanentError())


def test_should_retry_stops_at_max_attempts() -> None:
    """A retryable error is retried while the attempt is below max_attempts."""
    policy = RetryPolicy(max_attempts=3)
    error = RuntimeError("flaky")
    assert [policy.should_retry(error, n) for n in (1, 2, 3, 4)] == [True, True, False, False]
    assert not policy.should_retry(PermanentError("no"), 1)
    assert not RetryPolicy(max_attempts=1).should_retry(error, 1)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"max_attempts": 0}, "max_attempts must be >= 1, got 0"),
        ({"max_attempts": -3}, "max_attempts must be >= 1, got -3"),
        ({"base_delay": -1.0}, "delays must be >= 0"),
        ({"max_delay": timedelta(seconds=-1)}, "delays must be >= 0"),
    ],
)
def test_invalid_retry_policy_is_a_config_error(options: dict[str, Any], needle: str) -> None:
    """An impossible retry policy is refused when it is built, with the reason."""
    with pytest.raises(ConfigError, match=needle):
        RetryPolicy(**options)


async def test_failing_handler_follows_the_backoff_schedule(tmp_path: Path) -> None:
    """A failing message waits exactly the policy's backoff (1, 2, 4 s) between
    attempts: advancing the clock less than the delay does not redeliver it,
    advancing past it does; after max_attempts it is dead-lettered."""
    clock = FakeClock()
    broker = RecordingBroker(clock)
    settings = settings_for("memory", tmp_path)
    app = App("retry", settings=settings, broker=broker, clock=clock)
    attempts: list[tuple[int, float]] = []
    probes = 0

    @app.handler(
        "work",
        group="flaky",
        retry=RetryPolicy(max_attempts=4, base_delay=1.0, max_delay=60.0, jitter=False),
    )
    async def flaky(ctx: Context, body: dict[str, Any]) -> None:
        nonlocal probes
        if body.get("probe"):
            probes += 1
            return
        attempts.append((ctx.attempt, clock.time()))
        raise RuntimeError("still down")

    async def queue() -> tuple[int, int, int]:
        (stats,) = await broker.stats()
        return stats.ready, stats.in_flight, stats.delayed

    async def delayed_only() -> bool:
        return await queue() == (0, 0, 1)

    async with app:
        await app.publish("work", {"n": 1})
        async with running(app):
            await eventually(lambda: len(attempts) == 1, what="first attempt")
            for expected in (1.0, 2.0, 4.0):
                done = len(attempts)
                await eventually(delayed_only, what="retry scheduled")
                assert broker.delays[-1] == expected
                clock.advance(expected - 0.01)
                assert await queue() == (0, 0, 1)
                before = probes
                await app.publish("work", {"probe": True})
                await eventually(lambda before=before: probes > before, what="probe handled")
                assert len(attempts) == done, f"redelivered before its {expected}s delay"
                clock.advance(0.01)
                await eventually(lambda done=done: len(attempts) == done + 1, what="redelivered")
            await drained(app)
        assert [a for a, _ in attempts] == [1, 2, 3, 4]
        gaps = [round(b - a, 6) for (_, a), (_, b) in itertools.pairwise(attempts)]
        assert gaps == [1.0, 2.0, 4.0]
        assert broker.delays == [1.0, 2.0, 4.0]
        (dead,) = await app.store.dead_letters()
        assert dead.attempts == 4
        assert dead.reason == "gave up after 4 attempt(s): RuntimeError: still down"


@pytest.fixture(params=["bound", "memory"])
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def blocking_app(
    path: str, tmp_path: Path, clock: FakeClock
) -> tuple[App, asyncio.Event, asyncio.Event, list[str]]:
    """An app whose handler records an effect, then blocks until released; its
    first attempt reports when it started and whether it was cancelled."""
    app = App("shutdown", settings=settings_for(path, tmp_path, lease=30.0), clock=clock)
    started, release = asyncio.Event(), asyncio.Event()
    trace: list[str] = []

    @app.handler("work", group="apply")
    async def apply(ctx: Context, body: dict[str, int]) -> None:
        await ctx.execute("INSERT INTO effects (msg_id) VALUES (?)", (ctx.message.id,))
        trace.append(f"start {ctx.attempt}")
        started.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            trace.append(f"cancelled {ctx.attempt}")
            raise
        trace.append(f"done {ctx.attempt}")

    return app, started, release, trace


async def create_effects(app: App) -> None:
    async with app.transaction() as s:
        await s.execute("CREATE TABLE effects (msg_id TEXT NOT NULL)")


async def test_stop_lets_in_flight_work_finish_within_the_grace_period(
    path: str, tmp_path: Path
) -> None:
    """After stop() an in-flight handler is not cancelled before the grace period
    ends; when it finishes in time its effects commit and the message is acked."""
    clock = FakeClock()
    app, started, release, trace = blocking_app(path, tmp_path, clock)
    async with app:
        await create_effects(app)
        message = await app.publish("work", {"n": 1})
        worker = app.worker(grace_period=10.0)
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(started.wait(), 10)
        worker.stop()
        await eventually(lambda: clock.sleepers == 1, what="grace timer armed")
        clock.advance(9.9)
        assert clock.sleepers == 1, "grace period ended early"
        for _ in range(20):
            await asyncio.sleep(0)
        assert trace == ["start 1"]
        assert not task.done()
        release.set()
        await asyncio.wait_for(task, 10)
        assert trace == ["start 1", "done 1"]
        assert store_rows(app, "SELECT msg_id FROM effects") == [(message.id,)]
        assert await pending(app) == 0


async def test_grace_expiry_cancels_in_flight_work_and_it_is_redelivered(
    path: str, tmp_path: Path
) -> None:
    """Past the grace period the in-flight handler is cancelled, run() returns and
    nothing of the message is committed or acked; a new worker handles it again and
    applies it exactly once."""
    clock = FakeClock()
    app, started, release, trace = blocking_app(path, tmp_path, clock)
    async with app:
        await create_effects(app)
        message = await app.publish("work", {"n": 1})
        worker = app.worker(grace_period=10.0)
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(started.wait(), 10)
        worker.stop()
        await eventually(lambda: clock.sleepers == 1, what="grace timer armed")
        clock.advance(10.1)
        await asyncio.wait_for(task, 10)
        assert trace == ["start 1", "cancelled 1"]
        assert store_rows(app, "SELECT msg_id FROM effects") == []
        assert await pending(app) > 0, "the cancelled message was acknowledged"
        # Handed back at once, not left to its 30 s lease.
        assert await queue_counts(app) == (1, 0, 0)

        release.set()
        async with running(app):
            await drained(app)
        assert trace[2:] == ["start 2", "done 2"]
        assert store_rows(app, "SELECT msg_id FROM effects") == [(message.id,)]
        assert await app.store.dead_letters() == []


class AckFailsOnce(MemoryBroker):
    """A memory broker whose first acknowledgement fails."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__("memory://", clock=clock)
        self.failed = False

    async def ack(self, deliveries: Sequence[Delivery]) -> int:
        if not self.failed:
            self.failed = True
            raise BrokerError("connection reset while acknowledging")
        return await super().ack(deliveries)


async def test_stop_after_a_failed_ack_still_finishes_the_rest_of_the_batch(
    tmp_path: Path,
) -> None:
    """When an ack fails part-way through a fetched batch, the batch's other
    in-flight deliveries stay the worker's work: stop() waits for them within the
    grace period, and run() does not return while one of their handlers runs."""
    clock = FakeClock()
    broker = AckFailsOnce(clock)
    app = App(
        "shutdown",
        settings=settings_for("memory", tmp_path, lease=30.0, prefetch=2),
        broker=broker,
        clock=clock,
    )
    started, release = asyncio.Event(), asyncio.Event()
    active = 0

    # Concurrent handlers: each delivery has its own transaction and ack.
    @app.handler("work", group="apply", concurrency=2)
    async def apply(ctx: Context, body: dict[str, int]) -> None:
        nonlocal active
        await ctx.execute("INSERT INTO effects (msg_id) VALUES (?)", (ctx.message.id,))
        if body["n"] == 2:
            active += 1
            started.set()
            await release.wait()
            active -= 1

    async with app:
        await create_effects(app)
        first = await app.publish("work", {"n": 1})
        second = await app.publish("work", {"n": 2})
        worker = app.worker(grace_period=10.0)
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(started.wait(), 10)
        assert broker.failed
        worker.stop()
        await eventually(lambda: task.done() or clock.sleepers == 1, what="worker stopping")
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done(), "run() returned while a handler of its batch was running"
        assert active == 1
        release.set()
        await asyncio.wait_for(task, 10)
        assert active == 0
        effects = {row[0] for row in store_rows(app, "SELECT msg_id FROM effects")}
        assert effects == {first.id, second.id}
        (stats,) = await broker.stats()
        assert (stats.ready, stats.in_flight, stats.delayed) == (0, 1, 0), (
            "only the delivery whose ack failed is still leased"
        )


class CountingAcks(MemoryBroker):
    """A memory broker that records the size of every ack call."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__("memory://", clock=clock)
        self.acks: list[int] = []

    async def ack(self, deliveries: Sequence[Delivery]) -> int:
        self.acks.append(len(deliveries))
        return await super().ack(deliveries)


async def test_generic_path_commits_and_acks_a_batch_together(tmp_path: Path) -> None:
    """With one handler at a time, a fetched batch is handled in one store
    transaction and acknowledged with one call; a failing delivery rolls back
    only its own writes and is retried alone."""
    clock = FakeClock()
    broker = CountingAcks(clock)
    app = App(
        "group-commit",
        settings=settings_for("memory", tmp_path, prefetch=10),
        broker=broker,
        clock=clock,
    )

    @app.handler("work", group="apply", retry=RetryPolicy(base_delay=0, jitter=False))
    async def apply(ctx: Context, body: dict[str, int]) -> None:
        await ctx.execute("INSERT INTO effects (msg_id) VALUES (?)", (ctx.message.id,))
        if body["n"] == 3 and ctx.attempt == 1:
            raise RuntimeError("transient")

    async with app:
        await create_effects(app)
        async with app.transaction() as s:
            sent = [await s.publish("work", {"n": n}) for n in range(5)]
        async with running(app):
            await drained(app)
        assert broker.acks[0] == 4, "the batch's four successes were not acked in one call"
        assert sum(broker.acks) == 5
        effects = sorted(row[0] for row in store_rows(app, "SELECT msg_id FROM effects"))
        assert effects == sorted(m.id for m in sent)


async def test_replay_and_purge_read_dead_letters_a_batch_at_a_time(tmp_path: Path) -> None:
    """Bulk replay and purge never ask the store for more than 500 records at
    once, and handle every match (1,100 here)."""
    from conveyor.runtime import purge_dead_letters, replay_dead_letters
    from conveyor.store import DeadLetterFilter

    app = App("bulk", settings=settings_for("bound", tmp_path))
    asked: list[int] = []
    async with app:
        await app.broker.declare("t", "g")
        async with app.store.transaction() as tx:
            for i in range(1100):
                await app.store.dead_letter(
                    tx,
                    group="g",
                    message=Message.create("t", {"i": i}).with_attempt(1),
                    reason="x",
                    error_type="E",
                    traceback="",
                )
        real = app.store.dead_letters

        async def spy(*args: Any, **kwargs: Any) -> Any:
            asked.append(kwargs.get("limit", 1000))
            return await real(*args, **kwargs)

        app.store.dead_letters = spy  # type: ignore[method-assign]
        assert await replay_dead_letters(app, DeadLetterFilter(group="g")) == 1100
        assert max(asked) <= 500
        asked.clear()
        async with app.store.transaction() as tx:
            for i in range(700):
                await app.store.dead_letter(
                    tx,
                    group="g",
                    message=Message.create("t", {"i": i}).with_attempt(1),
                    reason="x",
                    error_type="E",
                    traceback="",
                )
        assert await purge_dead_letters(app, DeadLetterFilter()) == 700
        assert max(asked) <= 500
        assert await app.store.dead_letter_count() == 0
