from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import timedelta

from conveyor._time import seconds
from conveyor.errors import ConfigError, DecodeError, PermanentError

__all__ = ["RetryPolicy"]

_ALWAYS_PERMANENT: tuple[type[BaseException], ...] = (PermanentError, DecodeError)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter.

    Attempt ``n`` (1-based) that fails is retried after a delay drawn uniformly
    from ``[0, min(max_delay, base_delay * 2 ** (n - 1))]`` while
    ``n < max_attempts``; after that the message is dead-lettered. An error is
    retried when it is an instance of ``retry_on`` and not of ``give_up_on``;
    ``PermanentError`` and payload decode errors are never retried.
    """

    max_attempts: int = 5
    base_delay: float | timedelta = 0.5
    max_delay: float | timedelta = 60.0
    jitter: bool = True
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    give_up_on: tuple[type[BaseException], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {self.max_attempts}")
        base, cap = seconds(self.base_delay), seconds(self.max_delay)
        if base < 0 or cap < 0:
            raise ConfigError("retry delays must be >= 0 seconds")
        object.__setattr__(self, "base_delay", base)
        object.__setattr__(self, "max_delay", cap)

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before the attempt after ``attempt`` (1-based)."""
        base = seconds(self.base_delay)
        cap = min(seconds(self.max_delay), base * 2.0 ** min(max(attempt - 1, 0), 60))
        if not self.jitter:
            return cap
        return (rng or random).uniform(0.0, cap)

    def is_retryable(self, exc: BaseException) -> bool:
        """Whether ``exc`` is worth another attempt (ignoring the attempt count)."""
        if isinstance(exc, (*_ALWAYS_PERMANENT, *self.give_up_on)):
            return False
        return isinstance(exc, self.retry_on)

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        return attempt < self.max_attempts and self.is_retryable(exc)
