"""The domain: the sum of the primes in ``[a, b]`` and the request that asks for it.

``sum_of_primes`` runs a segmented sieve of Eratosthenes: the primes up to
``sqrt(b)`` are sieved once, then they strike their multiples out of a byte
array that covers ``[a, b]`` (in segments of at most ``SEGMENT`` numbers), so
memory follows the width of the range, not ``b``. The bounds below keep one
job under about a third of a second on one core of the reference machine
(``b = 10**12``, a range of ``10**7`` numbers: 0.3 s); a wider range is
refused with a 422, not queued.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

__all__ = ["MAX_B", "MAX_SPAN", "SEGMENT", "SumPrimeRequest", "sum_of_primes"]

MAX_B = 10**12
"""The largest ``b`` accepted: its base primes (those up to 10**6) take a few
milliseconds to sieve."""

MAX_SPAN = 10_000_000
"""The most numbers one request may cover (``b - a + 1``)."""

SEGMENT = 1 << 24
"""Numbers sieved per segment: one segment covers any accepted range, so the
Python loop over the base primes runs once per job."""


@lru_cache(maxsize=8)
def _base_primes(limit: int) -> tuple[int, ...]:
    """Every prime ``<= limit``, by a plain sieve."""
    if limit < 2:
        return ()
    sieve = bytearray([1]) * (limit + 1)
    sieve[0:2] = b"\x00\x00"
    for p in range(2, math.isqrt(limit) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytes(len(range(p * p, limit + 1, p)))
    return tuple(itertools.compress(range(limit + 1), sieve))


def sum_of_primes(a: int, b: int) -> int:
    """The sum of every prime ``p`` with ``a <= p <= b`` (0 when there is none).

    Works for any ``0 <= a``; the time grows with ``b - a`` and ``sqrt(b)``,
    which is why the HTTP edge bounds both (``SumPrimeRequest``).
    """
    if a < 0 or b < 0:
        raise ValueError(f"sum_of_primes needs non-negative bounds, got a={a}, b={b}")
    total = 0
    base = _base_primes(math.isqrt(b))
    lo = max(a, 2)
    while lo <= b:
        hi = min(lo + SEGMENT - 1, b)
        segment = bytearray([1]) * (hi - lo + 1)
        for p in base:
            if p * p > hi:
                break
            # The first multiple of p in the segment that p does not stand for
            # itself: below p*p every composite has a smaller factor.
            start = max(p * p, -(-lo // p) * p)
            if start <= hi:
                segment[start - lo :: p] = bytes(len(range(start, hi + 1, p)))
        total += sum(itertools.compress(range(lo, hi + 1), segment))
        lo = hi + 1
    return total


PositiveInt = Annotated[StrictInt, Field(ge=1, le=MAX_B)]


class SumPrimeRequest(BaseModel):
    """``{"a": int, "b": int}``: positive JSON integers, ``a <= b <= MAX_B``,
    at most ``MAX_SPAN`` numbers. Floats (even ``3.0``), strings, booleans,
    missing or extra fields are refused, each with a message naming the field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    a: PositiveInt = Field(description="lower bound, included (a positive integer)")
    b: PositiveInt = Field(description=f"upper bound, included (a positive integer <= {MAX_B})")

    @model_validator(mode="after")
    def _ordered_and_bounded(self) -> Self:
        if self.a > self.b:
            raise ValueError(f"a must be <= b, got a={self.a} > b={self.b}")
        span = self.b - self.a + 1
        if span > MAX_SPAN:
            raise ValueError(
                f"the range [a, b] holds {span} numbers, over the limit of {MAX_SPAN}; "
                "split it into several requests"
            )
        return self
