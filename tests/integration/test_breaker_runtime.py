"""Handlers guarded by circuit breakers: the consumer pauses while a breaker
is open, probes with one message at a time when half-open, and goes back to
batches once it closes; on every runtime path."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor import App, CircuitBreaker, RetryPolicy
from conveyor.resilience import BreakerState, CountWindow
from conveyor.testing import FakeClock, drained, eventually, pending, running
from tests.helpers import PATHS, settings_for


class Down(Exception):
    pass


async def _trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.minimum_calls):
        with pytest.raises(Down):
            async with breaker:
                raise Down("dependency down")
    assert breaker.state is BreakerState.OPEN


@pytest.mark.parametrize("path", PATHS)
async def test_open_breaker_pauses_then_probes_one_message_at_a_time(
    path: str, tmp_path: Path
) -> None:
    """Open: nothing is fetched. Half-open: one message per fetch, so only the
    probes reach the handler and none is refused. Closed: the backlog drains."""
    clock = FakeClock()
    breaker = CircuitBreaker(
        "dep", window=CountWindow(4), minimum_calls=2, open_for=10, half_open_calls=2, clock=clock
    )
    await _trip(breaker)
    app = App("t", settings=settings_for(path, tmp_path))
    seen: list[int] = []
    healthy = False

    @app.handler("jobs", breakers=[breaker], retry=RetryPolicy(base_delay=0.01, max_delay=0.02))
    async def job(ctx: object, body: dict[str, int]) -> None:
        seen.append(body["n"])
        if not healthy:
            raise Down("still down")

    async with app:
        for n in range(20):
            await app.publish("jobs", {"n": n})
        async with running(app) as worker:
            # The consumer waits on the breaker's clock instead of fetching.
            await eventually(lambda: clock.sleepers >= 1, what="consumer paused")
            assert seen == []
            assert await pending(app, "jobs") == 20
            assert worker.processed == 0

            clock.advance(10)  # half-open: two probes, both fail, open again
            await eventually(lambda: breaker.opened == 2, what="reopened")
            assert len(seen) == 2
            assert breaker.rejections == 0  # no batch-mate of a probe was refused
            await eventually(lambda: clock.sleepers >= 1, what="paused again")

            healthy = True
            clock.advance(10)
            await drained(app, topic="jobs")
            assert breaker.state is BreakerState.CLOSED
        assert sorted(set(seen)) == list(range(20))
        assert breaker.rejections == 0


async def test_handler_outcomes_feed_the_breaker(tmp_path: Path) -> None:
    """Handler failures open the breaker; the failure still takes the retry path."""
    clock = FakeClock()
    breaker = CircuitBreaker(
        "dep", window=CountWindow(3), minimum_calls=3, open_for=10, clock=clock
    )
    app = App("t", settings=settings_for("bound", tmp_path))

    @app.handler("jobs", breakers=[breaker], retry=RetryPolicy(base_delay=0.01, max_delay=0.02))
    async def job(ctx: object, body: dict[str, int]) -> None:
        raise Down("down")

    async with app:
        for n in range(3):
            await app.publish("jobs", {"n": n})
        async with running(app):
            await eventually(lambda: breaker.state is BreakerState.OPEN, what="open")

            async def retried() -> bool:
                return await pending(app, "jobs") == 3 and breaker.failures == 3

            await eventually(retried, what="retries scheduled")
        assert breaker.failures == 3
        assert sum((await app.store.dead_letter_counts()).values()) == 0
