"""Per-call overhead of the resilience primitives on their free path (no
waiting, no failure), against the peers users stitch together today, on the
same no-op async call, in one run.

.venv/bin/python benchmarks/resilience.py [--calls N] [--repeats R]

Each row is the best of R runs of N calls, minus the bare ``await noop()``;
the ratio compares a Conveyor row with the peer on the row above it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import time
from collections.abc import Awaitable, Callable

import aiolimiter
import pybreaker
import tenacity
from rich.console import Console
from rich.table import Table

from conveyor.resilience import (
    Bulkhead,
    CircuitBreaker,
    CountWindow,
    RateLimiter,
    RetryPolicy,
    TimeWindow,
    retry,
)

Row = tuple[str, str, Callable[[int], Awaitable[float]]]


async def noop() -> None:
    return None


def sync_noop() -> None:
    return None


def timed(step: Callable[[], Awaitable[None]]) -> Callable[[int], Awaitable[float]]:
    async def run(n: int) -> float:
        start = time.perf_counter_ns()
        for _ in range(n):
            await step()
        return (time.perf_counter_ns() - start) / n

    return run


def guarded(guard_factory: Callable[[], object]) -> Callable[[int], Awaitable[float]]:
    """``async with guard: await noop()`` (the guard is built once)."""
    guard = guard_factory()

    async def step() -> None:
        async with guard:  # type: ignore[attr-defined]
            await noop()

    return timed(step)


def limiter_rows() -> list[Row]:
    huge = 1e12  # a rate no run can reach: the free path only
    peer = aiolimiter.AsyncLimiter(huge, 1.0)
    ours = RateLimiter(huge, 1.0, burst=1_000_000_000)

    async def conveyor_step() -> None:
        await ours.acquire()
        await noop()

    return [
        ("rate limiter", "aiolimiter.AsyncLimiter", guarded(lambda: peer)),
        ("rate limiter", "conveyor RateLimiter.acquire", timed(conveyor_step)),
    ]


def bulkhead_rows() -> list[Row]:
    return [
        ("bulkhead", "asyncio.Semaphore (floor)", guarded(lambda: asyncio.Semaphore(10))),
        ("bulkhead", "conveyor Bulkhead", guarded(lambda: Bulkhead(10, 10))),
    ]


def retry_rows() -> list[Row]:
    peer = tenacity.retry(stop=tenacity.stop_after_attempt(5), wait=tenacity.wait_none())(noop)
    ours = retry(RetryPolicy(max_attempts=5))(noop)
    return [
        ("retry, no failure", "tenacity.retry", timed(peer)),
        ("retry, no failure", "conveyor retry(RetryPolicy)", timed(ours)),
    ]


def circuit_breaker_rows() -> list[Row]:
    """Conveyor's ``CircuitBreaker`` (closed, both windows, as a context
    manager and as a decorator) against pybreaker. pybreaker is synchronous,
    so its row is ``breaker.call(sync_noop)`` inside the async step; its
    ``call_async`` needs tornado and is measured only when tornado imports."""
    rows: list[Row] = []
    peer = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)

    async def pybreaker_step() -> None:
        peer.call(sync_noop)

    rows.append(("circuit breaker", "pybreaker .call (sync)", timed(pybreaker_step)))
    try:
        importlib.import_module("tornado")
    except ImportError:
        pass
    else:

        async def pybreaker_async_step() -> None:
            await peer.call_async(noop)

        rows.append(("circuit breaker", "pybreaker .call_async", timed(pybreaker_async_step)))
    for label, window in (("CountWindow", CountWindow(100)), ("TimeWindow", TimeWindow(60))):
        rows.append(
            (
                "circuit breaker",
                f"conveyor async with ({label})",
                guarded(lambda window=window: CircuitBreaker("bench", window=window)),
            )
        )
    rows.append(("circuit breaker", "conveyor @breaker", timed(CircuitBreaker("bench")(noop))))
    return rows


async def measure(rows: list[Row], calls: int, repeats: int) -> tuple[float, list[float]]:
    bare = timed(noop)
    baseline = min([await bare(calls) for _ in range(repeats)])
    results = []
    for _, _, run in rows:
        await run(calls // 10)  # warm-up
        results.append(min([await run(calls) for _ in range(repeats)]) - baseline)
    return baseline, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = bulkhead_rows() + limiter_rows() + retry_rows() + circuit_breaker_rows()
    baseline, overheads = asyncio.run(measure(rows, args.calls, args.repeats))
    table = Table(
        title=f"Resilience free-path overhead (bare await noop() = {baseline:.0f} ns, "
        f"best of {args.repeats} x {args.calls:,} calls)"
    )
    for column in ("primitive", "implementation", "ns/call", "vs peer above"):
        table.add_column(column, justify="right" if column != "implementation" else "left")
    previous: dict[str, float] = {}
    for (kind, label, _), ns in zip(rows, overheads, strict=True):
        peer = previous.get(kind)
        ratio = f"{ns / peer:.2f}x" if label.startswith("conveyor") and peer else ""
        if not label.startswith("conveyor"):
            previous[kind] = ns
        table.add_row(kind, label, f"{ns:,.0f}", ratio)
    Console().print(table)


if __name__ == "__main__":
    main()
