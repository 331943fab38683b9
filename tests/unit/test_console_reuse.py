"""The console's reused answers: small ones afresh after their TTL, large
ones served as they are while one background task counts the next."""

from __future__ import annotations

import asyncio

from conveyor.http._console import _LARGE, _Reused


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.now += delay


class _Counter:
    """An answer whose computation waits for ``release`` when ``hold`` is set."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.calls = 0
        self.hold = False
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self) -> tuple[int, int]:
        self.calls += 1
        self.started.set()
        if self.hold:
            await self.release.wait()
        return self.calls, self.size


def test_a_small_answer_is_reused_for_its_ttl_then_counted_again() -> None:
    async def main() -> None:
        clock = _Clock()
        reused: _Reused[int] = _Reused(clock, ttl=2.0, large_ttl=2.0)
        count = _Counter(size=10)
        assert await reused.get(count) == 1
        clock.now += 1.9
        assert await reused.get(count) == 1
        clock.now += 0.2
        assert await reused.get(count) == 2  # waited for: small answers are never stale

    asyncio.run(main())


def test_a_small_answer_with_no_ttl_is_always_counted() -> None:
    async def main() -> None:
        reused: _Reused[int] = _Reused(_Clock(), ttl=0.0, large_ttl=2.0)
        count = _Counter(size=10)
        assert [await reused.get(count) for _ in range(3)] == [1, 2, 3]

    asyncio.run(main())


def test_a_large_answer_is_served_stale_while_the_next_is_counted() -> None:
    async def main() -> None:
        clock = _Clock()
        reused: _Reused[int] = _Reused(clock, ttl=0.0, large_ttl=2.0)
        count = _Counter(size=_LARGE)
        assert await reused.get(count) == 1
        clock.now += 2.5
        count.hold = True
        # Stale: the old answer at once, and one background count starts.
        assert await asyncio.wait_for(reused.get(count), 5) == 1
        await asyncio.wait_for(count.started.wait(), 5)
        assert await asyncio.wait_for(reused.get(count), 5) == 1
        assert count.calls == 2  # one count at a time
        count.release.set()
        task = reused._task
        assert task is not None
        await asyncio.wait_for(task, 5)
        assert await reused.get(count) == 2

    asyncio.run(main())


def test_a_large_answer_past_max_stale_is_waited_for_and_forget_drops_it() -> None:
    async def main() -> None:
        clock = _Clock()
        reused: _Reused[int] = _Reused(clock, ttl=0.0, large_ttl=2.0, max_stale=30.0)
        count = _Counter(size=_LARGE)
        assert await reused.get(count) == 1
        clock.now += 31
        assert await reused.get(count) == 2
        reused.forget()
        assert await reused.get(count) == 3

    asyncio.run(main())


def test_no_large_ttl_reuses_nothing() -> None:
    async def main() -> None:
        reused: _Reused[int] = _Reused(_Clock(), ttl=0.0, large_ttl=0.0)
        count = _Counter(size=_LARGE)
        assert [await reused.get(count) for _ in range(3)] == [1, 2, 3]

    asyncio.run(main())
