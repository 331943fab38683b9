"""Retry budget: retries may be at most a fraction of first attempts."""

from __future__ import annotations

from datetime import timedelta

from conveyor._time import Clock, SystemClock, seconds
from conveyor.errors import ConfigError

__all__ = ["RetryBudget"]

_BUCKETS = 10


class RetryBudget:
    """Over the last ``window`` seconds, allow at most
    ``min_per_second * window + ratio * first_attempts`` retries.

    ``record_attempt()`` counts a first attempt; ``try_retry()`` spends one
    retry if the budget has room and says whether it had. Counts live in ten
    buckets of ``window / 10`` seconds, so memory is constant and the window
    slides in tenths. Counters for metrics: ``allowed``, ``denied``.
    In the runtime a denied retry is not dropped: it waits the retry policy's
    ``max_delay`` instead of its backoff.
    """

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_per_second: float = 1.0,
        window: float | timedelta = 10.0,
        clock: Clock | None = None,
    ) -> None:
        self.window = seconds(window)
        if ratio < 0 or min_per_second < 0 or self.window <= 0:
            raise ConfigError("retry budget: ratio and min_per_second must be >= 0, window > 0")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.clock: Clock = clock or SystemClock()
        self._width = self.window / _BUCKETS
        self._slots = [-1] * _BUCKETS
        self._attempts = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self.allowed = 0
        self.denied = 0

    def _bucket(self) -> int:
        slot = int(self.clock.monotonic() // self._width)
        i = slot % _BUCKETS
        if self._slots[i] != slot:
            self._slots[i], self._attempts[i], self._retries[i] = slot, 0, 0
        return i

    def _live(self, counts: list[int]) -> int:
        oldest = int(self.clock.monotonic() // self._width) - _BUCKETS + 1
        return sum(c for s, c in zip(self._slots, counts, strict=True) if s >= oldest)

    def record_attempt(self) -> None:
        self._attempts[self._bucket()] += 1

    @property
    def available(self) -> float:
        """Retries that may still be spent in the current window."""
        earned = self.min_per_second * self.window + self.ratio * self._live(self._attempts)
        return earned - self._live(self._retries)

    def try_retry(self) -> bool:
        if self.available >= 1.0:
            self._retries[self._bucket()] += 1
            self.allowed += 1
            return True
        self.denied += 1
        return False
