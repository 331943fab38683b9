"""Bulkhead: a cap on concurrent calls with a bounded waiting room."""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType

from conveyor.errors import BulkheadFull, ConfigError

__all__ = ["Bulkhead"]


class Bulkhead:
    """At most ``max_concurrent`` calls inside ``async with bulkhead:`` at once,
    at most ``max_waiting`` more waiting for a slot (first come, first served);
    any call beyond that raises ``BulkheadFull`` at once instead of queueing
    without bound.

    ``active``, ``waiting`` (gauges) and ``rejected`` (a counter) are plain
    attributes, for metrics. One bulkhead may be shared by several callers or
    handlers to protect one dependency.
    """

    def __init__(
        self, max_concurrent: int, max_waiting: int = 0, *, name: str = "bulkhead"
    ) -> None:
        if max_concurrent < 1:
            raise ConfigError(
                f"bulkhead {name!r}: max_concurrent must be >= 1, got {max_concurrent}"
            )
        if max_waiting < 0:
            raise ConfigError(f"bulkhead {name!r}: max_waiting must be >= 0, got {max_waiting}")
        self.name = name
        self.max_concurrent = max_concurrent
        self.max_waiting = max_waiting
        self.active = 0
        self.rejected = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        """Take a slot, waiting if needed; ``BulkheadFull`` when the waiting room is full."""
        if self.active < self.max_concurrent and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_waiting:
            self.rejected += 1
            raise BulkheadFull(
                f"bulkhead {self.name!r} is full: {self.active} running and "
                f"{len(self._waiters)} waiting (max_concurrent={self.max_concurrent}, "
                f"max_waiting={self.max_waiting})"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back; it goes straight to the first waiter, if any."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1

    async def __aenter__(self) -> Bulkhead:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
