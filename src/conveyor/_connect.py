"""Reaching a server: the first connection, and every call after it.

Every server backend opens its first connection through ``connect_within``:
a server that refuses, resets or does not answer is tried again with capped
backoff until ``timeout`` seconds have passed in all (not per attempt), then
the caller gets one error line naming the server and what went wrong.

Once connected, every call that is safe to repeat goes through
``keep_trying``: an error its backend calls transient (a lost connection, a
timeout) is tried again with ``RetryPolicy``'s capped, jittered backoff
until the backend's own limit (its URL's ``retry_for``, ``reconnect_for``
or ``timeout``) has passed in all; then, or at once for any other error,
the backend's ``give_up`` turns the driver's error into Conveyor's.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from conveyor._tls import tls_failure
from conveyor.errors import ConveyorError
from conveyor.resilience._retry import RetryPolicy

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "RECONNECT", "connect_within", "keep_trying"]

T = TypeVar("T")

DEFAULT_CONNECT_TIMEOUT = 5.0

RECONNECT = RetryPolicy(max_attempts=1, base_delay=0.05, max_delay=2.0)
"""The backoff between tries of a call to a server that went away: from
50 ms, doubling, at most 2 s, full jitter (only its delays are used)."""


async def keep_trying(
    op: Callable[[], Awaitable[T]],
    *,
    within: float,
    transient: Callable[[Exception], bool],
    give_up: Callable[[Exception, bool], BaseException],
    policy: RetryPolicy = RECONNECT,
    warn: Callable[[Exception, float], None] | None = None,
) -> T:
    """``await op()``; while it fails with an error ``transient`` accepts, try
    again after ``policy.backoff(n)`` until ``within`` seconds have passed
    in all. Then, or at once for any other ``Exception``, raise
    ``give_up(error, transient)``: return the error itself to let it pass
    unchanged. ``warn(error, delay)`` is told of each retry (to log it)."""
    deadline = time.monotonic() + within
    number = 1
    while True:
        try:
            return await op()
        except Exception as exc:
            again = transient(exc)
            left = deadline - time.monotonic()
            if not again or left <= 0:
                error = give_up(exc, again)
                if error is exc:
                    raise
                if error.__cause__ is not None:  # give_up chose the cause to show
                    raise error  # noqa: B904
                raise error from exc
            delay = min(policy.backoff(number), left)
            if warn is not None:
                warn(exc, delay)
        await asyncio.sleep(delay)
        number += 1


async def connect_within(
    attempt: Callable[[], Awaitable[T]],
    *,
    server: str,
    where: str,
    timeout: float,
    retry_on: tuple[type[BaseException], ...],
    error: type[ConveyorError],
) -> T:
    """``await attempt()`` until it succeeds or ``timeout`` seconds pass.

    ``retry_on`` errors (and an attempt cut by the deadline) are retried;
    any other exception propagates, and a failed TLS certificate check is
    one error at once (it would fail again). The error raised at the deadline reads
    "cannot connect to {server} at {where} within {timeout}s: {last error}";
    ``where`` must hold no secret (host and port, never the password)."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    last: BaseException | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            async with asyncio.timeout(left):
                return await attempt()
        except TimeoutError as exc:
            last = last or exc
            break
        except Exception as exc:
            failed = tls_failure(exc)
            if failed is not None:  # a certificate that is wrong stays so
                raise error(f"cannot connect to {server} at {where}: {failed}") from exc
            if not isinstance(exc, retry_on):
                raise
            last = exc
        await asyncio.sleep(min(delay * (0.5 + random.random() / 2), max(0.0, left)))
        delay = min(delay * 2, 1.0)
    reason = _describe(last)
    raise error(f"cannot connect to {server} at {where} within {timeout:g}s: {reason}") from last


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, ConveyorError) and exc.__cause__ is not None:
        exc = exc.__cause__  # the driver's own words, not a wrapper's
    if exc is None or (isinstance(exc, TimeoutError) and not str(exc)):
        return "no answer"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
