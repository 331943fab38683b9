"""Per-call timeouts that raise Conveyor's own ``CallTimeout``."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from datetime import timedelta
from types import TracebackType
from typing import ParamSpec, TypeVar

from conveyor._time import Clock, SystemClock, seconds
from conveyor.errors import CallTimeout, ConfigError

__all__ = ["Timeout", "timeout"]

P = ParamSpec("P")
T = TypeVar("T")


class Timeout:
    """``async with timeout(2.0):`` or ``@timeout(2.0)``: cancel the body when
    it runs past the limit and raise ``CallTimeout`` (a ``TimeoutError``).

    A cancellation from elsewhere stays a cancellation. With an injected clock
    (``FakeClock``) the limit is measured on that clock, so tests need no
    sleeping; on the real clock it is ``asyncio.timeout``. One ``Timeout``
    object guards one ``async with`` at a time; as a decorator it makes a
    fresh one per call. ``timeouts`` counts the calls it cut (for metrics).
    """

    def __init__(self, limit: float | timedelta, *, clock: Clock | None = None) -> None:
        self.limit = seconds(limit)
        if self.limit <= 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {self.limit}")
        self.clock = clock
        self.timeouts = 0
        self._scope: asyncio.Timeout | None = None
        self._task: asyncio.Task[object] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._expired = False

    async def __aenter__(self) -> Timeout:
        self._expired = False
        if self.clock is None or isinstance(self.clock, SystemClock):
            self._scope = asyncio.timeout(self.limit)
            await self._scope.__aenter__()
            return self
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("timeout() must be used inside a task")
        self._task = task
        self._watchdog = asyncio.create_task(self._watch(task, self.clock))
        return self

    async def _watch(self, task: asyncio.Task[object], clock: Clock) -> None:
        await clock.sleep(self.limit)
        self._expired = True
        task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._scope is not None:
            scope, self._scope = self._scope, None
            try:
                await scope.__aexit__(exc_type, exc, tb)
            except TimeoutError as timed_out:
                self.timeouts += 1
                raise CallTimeout(f"call ran past its {self.limit:g}s timeout") from timed_out
            return
        assert self._watchdog is not None
        assert self._task is not None
        self._watchdog.cancel()
        if self._expired and self._task.uncancel() == 0 and exc_type is asyncio.CancelledError:
            self.timeouts += 1
            raise CallTimeout(f"call ran past its {self.limit:g}s timeout") from exc

    def __call__(self, func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        limit, clock = self.limit, self.clock

        @functools.wraps(func)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                async with Timeout(limit, clock=clock):
                    return await func(*args, **kwargs)
            except CallTimeout:
                self.timeouts += 1
                raise

        return guarded


def timeout(limit: float | timedelta, *, clock: Clock | None = None) -> Timeout:
    """A ``Timeout`` of ``limit`` seconds (or a ``timedelta``)."""
    return Timeout(limit, clock=clock)
