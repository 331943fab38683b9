"""The one ``Retry-After`` parser, shared by the job API client and webhook
deliveries."""

from __future__ import annotations

import email.utils
import time
from datetime import UTC

__all__ = ["parse_retry_after"]

# Digits beyond this many are a delay of over 30 years: the cap, unread.
_MAX_DIGITS = 10


def parse_retry_after(value: str | None, *, limit: float, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` value asks to wait, at most ``limit``.

    RFC 9110: ASCII digits (delay seconds) or an HTTP-date, relative to
    ``now`` (epoch seconds, default the system clock). Anything else, such
    as ``"²"``, ``"1.5"`` or ``"-1"``, and an absent header give None: the
    caller keeps its own backoff."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        if len(value) > _MAX_DIGITS:
            return limit
        return min(float(value), limit)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    wait = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, wait), limit)
