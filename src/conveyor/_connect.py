"""The first connection to a server: retried briefly, bounded in total.

Every server backend opens its first connection through ``connect_within``:
a server that refuses, resets or does not answer is tried again with capped
backoff until ``timeout`` seconds have passed in all (not per attempt), then
the caller gets one error line naming the server and what went wrong. Once
connected, each backend's own reconnection rules take over.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from conveyor._tls import tls_failure
from conveyor.errors import ConveyorError

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "connect_within"]

T = TypeVar("T")

DEFAULT_CONNECT_TIMEOUT = 5.0


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
