"""Rate limiting with GCRA (the generic cell rate algorithm), in one process.

GCRA keeps one number per key, the theoretical arrival time (TAT) of the next
permit: a permit is granted at ``now`` when ``max(TAT, now) + T - burst * T <=
now`` (``T = per / rate``), and TAT moves on by ``T``. It is a token bucket
stated as a single timestamp: no refill loop, O(1) time and one float of
memory per key, and the same arithmetic runs unchanged as a Redis script.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Hashable
from datetime import timedelta
from typing import Protocol, runtime_checkable

from conveyor._time import Clock, SystemClock, seconds
from conveyor.errors import ConfigError, RateLimited

__all__ = ["Limiter", "RateLimiter", "parse_rate"]

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0, "d": 86400.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$")


def parse_rate(spec: str) -> tuple[float, float]:
    """``"10/s"``, ``"600/min"``, ``"5/10s"`` -> ``(rate, per_seconds)``."""
    match = _RATE.match(spec.lower())
    if not match or match.group(3) not in _UNITS:
        raise ConfigError(
            f"invalid rate {spec!r}; write it as COUNT/UNIT, e.g. '10/s', '600/min', '5/10s'"
        )
    rate = float(match.group(1))
    per = float(match.group(2) or 1.0) * _UNITS[match.group(3)]
    if rate <= 0 or per <= 0:
        raise ConfigError(f"invalid rate {spec!r}: both sides must be > 0")
    return rate, per


@runtime_checkable
class Limiter(Protocol):
    """What a rate limiter offers; ``RateLimiter`` (one process) and
    ``conveyor.resilience.redis_limiter.RedisRateLimiter`` (every process
    sharing a Redis server) implement it."""

    async def acquire(
        self, *, key: Hashable = None, timeout: float | timedelta | None = None
    ) -> float:
        """Wait for a permit; returns the seconds waited. If none can be had
        within ``timeout`` (``None``: wait as long as needed), raise
        ``RateLimited`` at once, without waiting, carrying ``retry_after``."""
        ...

    async def try_acquire(self, *, key: Hashable = None) -> bool:
        """Take a permit if one is free now; never waits."""
        ...


class RateLimiter:
    """At most ``rate`` permits per ``per`` seconds, with bursts of up to
    ``burst`` permits at once (default 1: permits evenly spaced), per key.

    In any window of ``w`` seconds at most ``burst + w * rate / per`` permits
    are granted per key. Waiters reserve their slot when they ask (first come,
    first served); a waiter cancelled mid-wait leaves its slot unused.

    Per-key state is bounded: at most ``max_keys`` keys are tracked; keys
    whose state is back to "fresh" are dropped first, then the least recently
    used (which can then burst again: the bound is on memory, not on rate).

    Counters for metrics: ``granted``, ``rejected``, ``waited`` (seconds).
    """

    def __init__(
        self,
        rate: float,
        per: float | timedelta = 1.0,
        *,
        burst: int = 1,
        clock: Clock | None = None,
        max_keys: int = 10_000,
        name: str = "limiter",
    ) -> None:
        per_s = seconds(per)
        if rate <= 0 or per_s <= 0:
            raise ConfigError(f"rate limiter {name!r}: rate and per must be > 0")
        if burst < 1:
            raise ConfigError(f"rate limiter {name!r}: burst must be >= 1, got {burst}")
        if max_keys < 1:
            raise ConfigError(f"rate limiter {name!r}: max_keys must be >= 1")
        self.name = name
        self.rate = float(rate)
        self.per = per_s
        self.burst = burst
        self.max_keys = max_keys
        self.clock: Clock = clock or SystemClock()
        self._interval = per_s / rate
        self._tolerance = self._interval * burst
        self._tat: OrderedDict[Hashable, float] = OrderedDict()
        self.granted = 0
        self.rejected = 0
        self.waited = 0.0

    @classmethod
    def parse(cls, spec: str, *, burst: int = 1, clock: Clock | None = None) -> RateLimiter:
        """``RateLimiter.parse("10/s")``."""
        rate, per = parse_rate(spec)
        return cls(rate, per, burst=burst, clock=clock, name=spec)

    def _reserve(self, key: Hashable, max_wait: float) -> float:
        """Reserve a permit no more than ``max_wait`` away; returns the wait,
        or raises ``RateLimited``."""
        now = self.clock.monotonic()
        tat = max(self._tat.get(key, now), now)
        wait = tat + self._interval - self._tolerance - now
        if wait > max_wait:
            self.rejected += 1
            raise RateLimited(
                f"rate limiter {self.name!r}: no permit for {wait:.3f}s", retry_after=wait
            )
        if key in self._tat:
            self._tat.move_to_end(key)
        elif len(self._tat) >= self.max_keys:
            self._evict(now)
        self._tat[key] = tat + self._interval
        self.granted += 1
        return max(wait, 0.0)

    def _evict(self, now: float) -> None:
        stale = [k for k, tat in self._tat.items() if tat <= now]
        for k in stale:
            del self._tat[k]
        while len(self._tat) >= self.max_keys:
            self._tat.popitem(last=False)

    async def acquire(
        self, *, key: Hashable = None, timeout: float | timedelta | None = None
    ) -> float:
        wait = self._reserve(key, float("inf") if timeout is None else seconds(timeout))
        if wait > 0:
            self.waited += wait
            await self.clock.sleep(wait)
        return wait

    async def try_acquire(self, *, key: Hashable = None) -> bool:
        try:
            self._reserve(key, 0.0)
        except RateLimited:
            return False
        return True

    @property
    def keys(self) -> int:
        """How many keys are tracked (a gauge)."""
        return len(self._tat)
