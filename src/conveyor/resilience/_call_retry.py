"""Retrying in-process calls with the same ``RetryPolicy`` the runtime uses
for messages."""

from __future__ import annotations

import functools
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import ParamSpec, TypeVar

from conveyor._time import Clock, SystemClock
from conveyor.resilience._retry import RetryPolicy

__all__ = ["Attempt", "retry", "retrying"]

P = ParamSpec("P")
T = TypeVar("T")


class Attempt:
    """One try of a ``retrying`` loop: ``with attempt:`` records how it ended."""

    __slots__ = ("error", "number")

    def __init__(self, number: int) -> None:
        self.number = number
        self.error: BaseException | None = None

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False  # success, or cancellation / KeyboardInterrupt: not ours
        self.error = exc
        return True


async def retrying(
    policy: RetryPolicy, *, clock: Clock | None = None, rng: random.Random | None = None
) -> AsyncIterator[Attempt]:
    """``async for attempt in retrying(policy): with attempt: await call()``.

    The loop ends after the first attempt that does not raise. A failure
    that ``policy.should_retry`` accepts waits ``policy.backoff(n)`` on
    ``clock`` and tries again; any other (permanent, or the last attempt)
    is re-raised as it was.
    """
    sleep = (clock or SystemClock()).sleep
    number = 1
    while True:
        attempt = Attempt(number)
        yield attempt
        error = attempt.error
        if error is None:
            return
        if not policy.should_retry(error, number):
            raise error
        await sleep(policy.backoff(number, rng))
        number += 1


def retry(
    policy: RetryPolicy, *, clock: Clock | None = None
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """``@retry(RetryPolicy(max_attempts=3))`` on an async function."""
    sleep = (clock or SystemClock()).sleep

    def decorate(func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(func)
        async def call(*args: P.args, **kwargs: P.kwargs) -> T:
            number = 1
            while True:
                try:
                    return await func(*args, **kwargs)
                except Exception as exc:
                    if not policy.should_retry(exc, number):
                        raise
                    await sleep(policy.backoff(number))
                    number += 1

        return call

    return decorate
