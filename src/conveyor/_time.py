"""Clocks: the real one and the protocol a fake one implements."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Protocol

__all__ = ["Clock", "SystemClock", "seconds"]


def seconds(value: float | timedelta) -> float:
    """Return ``value`` in seconds; durations are accepted as either form."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


class Clock(Protocol):
    """Where Conveyor reads time and waits; inject a fake one in tests."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch (timestamps, visibility)."""
        ...

    def monotonic(self) -> float:
        """Monotonic seconds (durations, deadlines inside one process)."""
        ...

    async def sleep(self, delay: float) -> None:
        """Wait ``delay`` seconds of this clock's time."""
        ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(max(0.0, delay))
