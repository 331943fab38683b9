"""A circuit breaker whose state and window live in Redis: one breaker per
dependency across every process and machine that uses the same Redis and
name. Requires ``pip install 'conveyor[redis]'``.

Each call costs two ``EVALSHA`` round trips (let through? / record the
outcome), each an atomic Lua script over one hash. Times are the breaker
clock's wall time (``clock.time()``), so hosts should keep their clocks in
sync (NTP skew of milliseconds is irrelevant next to ``open_for``).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Awaitable, Callable
from datetime import timedelta
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast

from conveyor._time import Clock
from conveyor.errors import BrokerError, CircuitOpen
from conveyor.resilience._breaker import (
    BreakerState,
    CircuitBreaker,
    CountWindow,
    TimeWindow,
)

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "RedisCircuitBreaker needs the redis client: pip install 'conveyor[redis]'"
    ) from exc

__all__ = ["RedisCircuitBreaker"]

P = ParamSpec("P")
T = TypeVar("T")

# KEYS[1] the hash; ARGV: now, open_for, half_open_calls.
# Returns {admitted, epoch, state, opened_at}.
_ACQUIRE = """
local h = KEYS[1]
local now = tonumber(ARGV[1])
local open_for = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local st = redis.call('HMGET', h, 'state', 'opened_at', 'probes', 'epoch')
local state = st[1] or 'CLOSED'
local opened_at = st[2] or '0'
local epoch = tonumber(st[4] or '0')
if state == 'OPEN' then
  if now < tonumber(opened_at) + open_for then
    return {0, epoch, state, opened_at}
  end
  state = 'HALF_OPEN'
  epoch = epoch + 1
  redis.call('HSET', h, 'state', state, 'epoch', epoch, 'probes', 0,
             'pcalls', 0, 'pfail', 0, 'pslow', 0)
  st[3] = '0'
end
if state == 'HALF_OPEN' then
  if tonumber(st[3] or '0') >= limit then
    return {0, epoch, state, opened_at}
  end
  redis.call('HINCRBY', h, 'probes', 1)
end
return {1, epoch, state, opened_at}
"""

# KEYS[1] the hash; ARGV: now, epoch, verdict (0 success, 1 failure, 2 not
# counted), slow, window kind ('c' count, 't' time), size or buckets, bucket
# width, minimum_calls, failure_rate, slow_call_rate, half_open_calls.
# Returns {state, epoch, opened_at, calls, failures, slow}.
_RELEASE = """
local h = KEYS[1]
local now = tonumber(ARGV[1])
local epoch = tonumber(ARGV[2])
local verdict = tonumber(ARGV[3])
local slow = tonumber(ARGV[4])
local kind = ARGV[5]
local n = tonumber(ARGV[6])
local width = tonumber(ARGV[7])
local minimum = tonumber(ARGV[8])
local frate = tonumber(ARGV[9])
local srate = tonumber(ARGV[10])
local limit = tonumber(ARGV[11])
local st = redis.call('HMGET', h, 'state', 'epoch', 'opened_at')
local state = st[1] or 'CLOSED'
local cur = tonumber(st[2] or '0')
local opened_at = st[3] or '0'
local function counts()
  local c = redis.call('HMGET', h, 'calls', 'failures', 'slow')
  return tonumber(c[1] or '0'), tonumber(c[2] or '0'), tonumber(c[3] or '0')
end
local function tripped(c, f, s)
  return f >= frate * c or s >= srate * c
end
local function move(new)
  cur = cur + 1
  state = new
  if new == 'OPEN' then
    opened_at = ARGV[1]
    redis.call('HSET', h, 'state', new, 'epoch', cur, 'opened_at', opened_at)
  else
    redis.call('DEL', h)
    redis.call('HSET', h, 'state', new, 'epoch', cur)
  end
end
if cur == epoch then
  if verdict == 2 then
    if state == 'HALF_OPEN' then redis.call('HINCRBY', h, 'probes', -1) end
  elseif state == 'CLOSED' then
    local failed = verdict
    if kind == 'c' then
      local nxt = tonumber(redis.call('HGET', h, 'next') or '0')
      local old = tonumber(redis.call('HGET', h, 'r' .. nxt) or '-1')
      if old >= 0 then
        redis.call('HINCRBY', h, 'calls', -1)
        redis.call('HINCRBY', h, 'failures', 0 - (old % 2))
        redis.call('HINCRBY', h, 'slow', 0 - math.floor(old / 2))
      end
      redis.call('HSET', h, 'r' .. nxt, failed + 2 * slow, 'next', (nxt + 1) % n)
    else
      local idx = math.floor(now / width)
      local head = tonumber(redis.call('HGET', h, 'head') or '-1')
      if head < 0 then head = idx - n end
      if idx > head then
        for i = math.max(head + 1, idx - n + 1), idx do
          local s = 'b' .. (i % n)
          local b = redis.call('HMGET', h, s .. 'c', s .. 'f', s .. 's')
          redis.call('HINCRBY', h, 'calls', 0 - tonumber(b[1] or '0'))
          redis.call('HINCRBY', h, 'failures', 0 - tonumber(b[2] or '0'))
          redis.call('HINCRBY', h, 'slow', 0 - tonumber(b[3] or '0'))
          redis.call('HDEL', h, s .. 'c', s .. 'f', s .. 's')
        end
        head = idx
        redis.call('HSET', h, 'head', head)
      end
      local s = 'b' .. (head % n)
      redis.call('HINCRBY', h, s .. 'c', 1)
      redis.call('HINCRBY', h, s .. 'f', failed)
      redis.call('HINCRBY', h, s .. 's', slow)
    end
    redis.call('HINCRBY', h, 'calls', 1)
    redis.call('HINCRBY', h, 'failures', failed)
    redis.call('HINCRBY', h, 'slow', slow)
    local c, f, s = counts()
    if c >= minimum and tripped(c, f, s) then move('OPEN') end
  elseif state == 'HALF_OPEN' then
    local pc = redis.call('HINCRBY', h, 'pcalls', 1)
    local pf = redis.call('HINCRBY', h, 'pfail', verdict)
    local ps = redis.call('HINCRBY', h, 'pslow', slow)
    if pc >= limit then
      if tripped(pc, pf, ps) then move('OPEN') else move('CLOSED') end
    end
  end
end
local c, f, s = counts()
return {state, cur, opened_at, c, f, s}
"""

_STATES = {s.name: s for s in BreakerState}


class RedisCircuitBreaker(CircuitBreaker):
    """A ``CircuitBreaker`` shared through Redis under ``prefix:{name}``.

    Same options and semantics as ``CircuitBreaker``; the state, the window
    and the half-open probe slots are shared, so ``half_open_calls`` bounds
    the probes of all processes together. Counters (``calls``,
    ``rejections``...) and ``on_change`` listeners are this process's view:
    a listener runs when this process sees a change (one it caused, or one
    its next call or ``refresh()`` reads). ``state`` is the state last seen;
    ``await refresh()`` reads it now. ``wait_ready`` re-reads it every
    ``poll`` seconds of the clock while waiting, since another process's
    change cannot wake this one. Redis failures raise ``BrokerError``.
    """

    def __init__(
        self,
        url_or_client: str | aioredis.Redis,
        name: str,
        *,
        prefix: str = "conveyor:breaker",
        poll: float | timedelta = 1.0,
        failure_rate: float = 0.5,
        slow_call_rate: float = 1.0,
        slow_call_duration: float | timedelta = 60.0,
        window: CountWindow | TimeWindow | None = None,
        minimum_calls: int = 10,
        open_for: float | timedelta = 30.0,
        half_open_calls: int = 3,
        record: tuple[type[BaseException], ...] = (Exception,),
        ignore: tuple[type[BaseException], ...] = (),
        fallback: Callable[[CircuitOpen], Awaitable[object]] | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(
            name,
            failure_rate=failure_rate,
            slow_call_rate=slow_call_rate,
            slow_call_duration=slow_call_duration,
            window=window,
            minimum_calls=minimum_calls,
            open_for=open_for,
            half_open_calls=half_open_calls,
            record=record,
            ignore=ignore,
            fallback=fallback,
            clock=clock,
        )
        if isinstance(url_or_client, str):
            self._client: aioredis.Redis = aioredis.Redis.from_url(url_or_client)
            self._owned = True
        else:
            self._client = url_or_client
            self._owned = False
        self.key = f"{prefix}:{{{name}}}"
        self.poll = poll.total_seconds() if isinstance(poll, timedelta) else float(poll)
        self._acquire_script: Any = self._client.register_script(_ACQUIRE)
        self._release_script: Any = self._client.register_script(_RELEASE)
        window = self.window
        if isinstance(window, CountWindow):
            self._window_args: tuple[str, int, float] = ("c", window.size, 1.0)
        else:
            assert isinstance(window, TimeWindow)
            duration = cast(float, window.duration)
            self._window_args = ("t", window.buckets, duration / window.buckets)
        self._shared_counts = (0, 0, 0)
        self._token: contextvars.ContextVar[tuple[float, int, object] | None] = (
            contextvars.ContextVar(f"conveyor_redis_breaker_{name}", default=None)
        )

    @property
    def window_counts(self) -> tuple[int, int, int]:
        """(calls, failures, slow calls) in the shared window, as last seen."""
        return self._shared_counts

    async def _eval(self, script: Any, args: list[object]) -> list[Any]:
        try:
            return cast(list[Any], await script(keys=[self.key], args=args))
        except RedisError as exc:
            raise BrokerError(f"circuit breaker {self.name!r}: Redis failed: {exc}") from exc

    def _observe(self, state: bytes | str, opened_at: bytes | str) -> None:
        """Bring the local mirror (state, open deadline) to what Redis said."""
        name = state.decode() if isinstance(state, bytes) else state
        new = _STATES[name]
        opened = float(opened_at)
        if new is not self._state:
            self._transition(new)
            if new is BreakerState.CLOSED:
                self._shared_counts = (0, 0, 0)
        if new is BreakerState.OPEN:
            # The deadline on this process's monotonic clock.
            self._opened_at = self.clock.monotonic() - (self.clock.time() - opened)

    async def refresh(self) -> BreakerState:
        """Read the shared state now (and let an expired OPEN go half-open)."""
        _, _, state, opened_at = await self._eval(
            self._acquire_script, [self.clock.time(), self.open_for, 0]
        )
        self._observe(state, opened_at)
        return self._state

    async def _enter(self) -> tuple[float, int]:
        admitted, epoch, state, opened_at = await self._eval(
            self._acquire_script, [self.clock.time(), self.open_for, self.half_open_calls]
        )
        self._observe(state, opened_at)
        if not int(admitted):
            self.rejections += 1
            wait = self.retry_after
            raise CircuitOpen(
                f"circuit {self.name!r} is {self._state.name.lower().replace('_', '-')}; "
                f"a probe is allowed in {wait:.3f}s",
                breaker=self.name,
                retry_after=wait,
            )
        self.calls += 1
        return self.clock.monotonic(), int(epoch)

    async def _exit(self, start: float, epoch: int, exc: BaseException | None) -> None:
        failed = self._verdict(exc)
        slow = self.clock.monotonic() - start >= self.slow_call_duration
        if failed is None:
            self.ignored += 1
        else:
            if failed:
                self.failures += 1
            else:
                self.successes += 1
            if slow:
                self.slow_calls += 1
        kind, size, width = self._window_args
        verdict = 2 if failed is None else int(failed)
        state, _, opened_at, calls, failures, slow_calls = await self._eval(
            self._release_script,
            [
                self.clock.time(),
                epoch,
                verdict,
                int(slow and failed is not None),
                kind,
                size,
                width,
                self.minimum_calls,
                self.failure_rate,
                self.slow_call_rate,
                self.half_open_calls,
            ],
        )
        self._shared_counts = (int(calls), int(failures), int(slow_calls))
        self._observe(state, opened_at)

    async def __aenter__(self) -> None:
        start, epoch = await self._enter()
        self._token.set((start, epoch, self._token.get()))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token = self._token.get()
        if token is None:
            return
        start, epoch, outer = token
        self._token.set(cast("tuple[float, int, object] | None", outer))
        await self._exit(start, epoch, exc)

    def __call__(self, func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(func)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                start, epoch = await self._enter()
            except CircuitOpen as exc:
                if self.fallback is None:
                    raise
                return cast(T, await self.fallback(exc))
            try:
                result = await func(*args, **kwargs)
            except BaseException as exc:
                await self._exit(start, epoch, exc)
                raise
            await self._exit(start, epoch, None)
            return result

        return guarded

    async def wait_ready(self) -> None:
        """Like ``CircuitBreaker.wait_ready``, re-reading the shared state at
        least every ``poll`` seconds."""
        await self.refresh()
        while not self.admits:
            await self.clock.sleep(min(self.retry_after or self.poll, self.poll))
            await self.refresh()

    async def reset_shared(self) -> None:
        """Close the breaker for every process (an operator's override)."""
        try:
            await self._client.delete(self.key)
        except RedisError as exc:
            raise BrokerError(f"circuit breaker {self.name!r}: Redis failed: {exc}") from exc
        if self._state is not BreakerState.CLOSED:
            self._transition(BreakerState.CLOSED)

    async def close(self) -> None:
        """Close the client if this breaker created it from a URL."""
        if self._owned:
            await self._client.aclose()
