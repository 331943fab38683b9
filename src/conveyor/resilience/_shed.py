"""Load shedding for producers: refuse new work while a queue is too deep."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta

from conveyor._time import Clock, SystemClock, seconds
from conveyor.errors import ConfigError, Overloaded

__all__ = ["LoadShedder"]


class LoadShedder:
    """``await shedder.check(topic)`` raises ``Overloaded`` while ``depth(topic)``
    is above ``threshold``.

    ``depth`` is asked at most once per ``refresh`` seconds per topic (the
    figure is cached, so a check usually costs a dict look-up); a refusal
    carries ``retry_after = refresh``, when the depth is next measured.
    Counter for metrics: ``shed``.
    """

    def __init__(
        self,
        threshold: int,
        depth: Callable[[str], Awaitable[int]],
        *,
        refresh: float | timedelta = 1.0,
        clock: Clock | None = None,
    ) -> None:
        if threshold < 0:
            raise ConfigError(f"shed threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.refresh = seconds(refresh)
        self.clock: Clock = clock or SystemClock()
        self._depth = depth
        self._cache: dict[str, tuple[float, int]] = {}
        self.shed = 0

    async def depth(self, topic: str) -> int:
        now = self.clock.monotonic()
        cached = self._cache.get(topic)
        if cached is not None and now - cached[0] < self.refresh:
            return cached[1]
        value = await self._depth(topic)
        self._cache[topic] = (now, value)
        return value

    async def check(self, topic: str) -> None:
        depth = await self.depth(topic)
        if depth > self.threshold:
            self.shed += 1
            raise Overloaded(
                f"topic {topic!r} has {depth} messages waiting, over the "
                f"{self.threshold} shedding threshold; retry in {self.refresh:g}s",
                retry_after=self.refresh,
            )
