"""A GCRA rate limiter shared through Redis: the limit holds across processes
and machines. Requires ``pip install 'conveyor[redis]'``.

Each permit is one ``EVALSHA`` of an atomic Lua script that reads the Redis
server's ``TIME``, so client clocks do not matter; the key expires once its
state is back to "fresh", so idle keys cost no memory.
"""

from __future__ import annotations

from collections.abc import Hashable
from datetime import timedelta
from typing import Any

from conveyor._time import Clock, SystemClock, seconds
from conveyor.errors import BrokerError, ConfigError, RateLimited

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "RedisRateLimiter needs the redis client: pip install 'conveyor[redis]'"
    ) from exc

__all__ = ["RedisRateLimiter"]

# KEYS[1] the key; ARGV: interval, tolerance (interval * burst), max wait (all
# in microseconds; max wait < 0 means "no limit"). Returns {granted, wait_us}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat + interval - tolerance - now
if max_wait >= 0 and wait > max_wait then
  return {0, wait}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
if wait < 0 then wait = 0 end
return {1, wait}
"""


class RedisRateLimiter:
    """``rate`` permits per ``per`` seconds, bursts of ``burst``, per key,
    enforced for every process that uses the same Redis and ``name``.

    Same contract as ``RateLimiter`` (the ``Limiter`` protocol); a waiter
    reserves its slot on the server, then sleeps client-side for the wait the
    server computed. Redis failures raise ``BrokerError``.
    """

    def __init__(
        self,
        url_or_client: str | aioredis.Redis,
        name: str,
        rate: float,
        per: float | timedelta = 1.0,
        *,
        burst: int = 1,
        prefix: str = "conveyor:ratelimit",
        clock: Clock | None = None,
    ) -> None:
        per_s = seconds(per)
        if rate <= 0 or per_s <= 0:
            raise ConfigError(f"rate limiter {name!r}: rate and per must be > 0")
        if burst < 1:
            raise ConfigError(f"rate limiter {name!r}: burst must be >= 1, got {burst}")
        if isinstance(url_or_client, str):
            self._client: aioredis.Redis = aioredis.Redis.from_url(url_or_client)
            self._owned = True
        else:
            self._client = url_or_client
            self._owned = False
        self.name = name
        self.rate = float(rate)
        self.per = per_s
        self.burst = burst
        self.prefix = prefix
        self.clock: Clock = clock or SystemClock()
        interval = per_s / rate
        self._args = (round(interval * 1e6), round(interval * burst * 1e6))
        self._script: Any = self._client.register_script(_GCRA)
        self.granted = 0
        self.rejected = 0
        self.waited = 0.0

    def key_for(self, key: Hashable) -> str:
        base = f"{self.prefix}:{{{self.name}}}"
        return base if key is None else f"{base}:{key}"

    async def _reserve(self, key: Hashable, max_wait: float | None) -> float:
        limit = -1 if max_wait is None else round(max_wait * 1e6)
        try:
            granted, wait_us = await self._script(
                keys=[self.key_for(key)], args=[*self._args, limit]
            )
        except RedisError as exc:
            raise BrokerError(f"rate limiter {self.name!r}: Redis failed: {exc}") from exc
        wait = int(wait_us) / 1e6
        if not int(granted):
            self.rejected += 1
            raise RateLimited(
                f"rate limiter {self.name!r}: no permit for {wait:.3f}s", retry_after=wait
            )
        self.granted += 1
        return wait

    async def acquire(
        self, *, key: Hashable = None, timeout: float | timedelta | None = None
    ) -> float:
        wait = await self._reserve(key, None if timeout is None else seconds(timeout))
        if wait > 0:
            self.waited += wait
            await self.clock.sleep(wait)
        return wait

    async def try_acquire(self, *, key: Hashable = None) -> bool:
        try:
            await self._reserve(key, 0.0)
        except RateLimited:
            return False
        return True

    async def close(self) -> None:
        """Close the client if this limiter created it from a URL."""
        if self._owned:
            await self._client.aclose()
