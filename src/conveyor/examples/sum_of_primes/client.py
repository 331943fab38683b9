"""The caller's side: ``conveyor.client`` with a ``Route`` for this API's
shape, so a sum looks like a plain call while the client submits, then polls
``GET /sumPrime/{requestId}`` as the server's ``Retry-After`` asks.

Each submit carries an ``Idempotency-Key`` the client makes, and a submit
that meets a connection error, a timeout or a 502/503/504 (a replica dying
behind nginx) is sent again with the same key: at most one job per call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import timedelta
from types import TracebackType

import httpx

from conveyor import RetryPolicy
from conveyor.client import AsyncClient, AsyncJobHandle, Route
from conveyor.examples.sum_of_primes.primes import SumPrimeRequest
from conveyor.examples.sum_of_primes.service import FINISHED, IN_PROGRESS, KIND

__all__ = ["RETRY", "ROUTE", "SumPrimeClient"]

ROUTE = Route(
    submit="/sumPrime",
    status="/sumPrime/{id}",
    cancel="/sumPrime/{id}",
    id_field="requestId",
    result_field="payload",
    statuses={IN_PROGRESS: "RUNNING", FINISHED: "SUCCEEDED"},
)
"""``POST /sumPrime``, ``GET`` and ``DELETE /sumPrime/{requestId}``, answering
``{requestId, status: IN_PROGRESS|FINISHED|FAILED|CANCELLED, payload}``."""


RETRY = RetryPolicy(max_attempts=10, base_delay=0.2, max_delay=2.0)
"""Retries of one request: a 409 (its Idempotency-Key still held by a
replica that died mid-request) asks for 1 s each time, so ten attempts
outlast the service's 5 s idempotency lease."""


class SumPrimeClient:
    """``await client.sum(a, b)``; ``sum_many`` runs up to ``concurrency``
    calls at a time. Other keyword arguments go to ``conveyor.client.AsyncClient``
    (``transport=``, ``timeout=``, ``retry=``...)."""

    def __init__(
        self,
        base_url: str,
        *,
        concurrency: int = 32,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float | timedelta = 10.0,
    ) -> None:
        self.client = AsyncClient(
            base_url, route=ROUTE, transport=transport, timeout=timeout, retry=RETRY
        )
        self._slots = asyncio.Semaphore(concurrency)

    async def submit(self, a: int, b: int) -> AsyncJobHandle:
        """Submit one range (422 from the server: ``JobRejected``)."""
        return await self.client.submit(KIND, SumPrimeRequest(a=a, b=b))

    async def sum(self, a: int, b: int, *, timeout: float = 60.0) -> int:
        """The sum of the primes in ``[a, b]``, computed by the service."""
        async with self._slots:
            handle = await self.submit(a, b)
            return await handle.result(timeout=timeout, into=int)

    async def sum_many(
        self, ranges: Iterable[tuple[int, int]], *, timeout: float = 60.0
    ) -> list[int]:
        """Every range's sum, in order."""
        return list(await asyncio.gather(*(self.sum(a, b, timeout=timeout) for a, b in ranges)))

    async def __aenter__(self) -> SumPrimeClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.client.aclose()
