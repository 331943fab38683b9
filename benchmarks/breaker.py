"""Per-call overhead of a closed CircuitBreaker against pybreaker, in one run.

.venv/bin/python benchmarks/breaker.py [--calls N] [--repeats R]

Each figure is the best of R runs of N calls, minus the bare call (an
``await noop()`` for Conveyor, a plain ``noop()`` for pybreaker, which has no
asyncio support), in nanoseconds per call.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable

import pybreaker

from conveyor.resilience import CircuitBreaker, TimeWindow


async def noop() -> None:
    return None


def sync_noop() -> None:
    return None


async def best_async(step: Callable[[], object], n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(n):
            await step()  # type: ignore[misc]
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def best_sync(step: Callable[[], object], n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(n):
            step()
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


async def main(n: int, repeats: int) -> None:
    counted = CircuitBreaker("count")
    timed = CircuitBreaker("time", window=TimeWindow(60))
    decorated = counted(noop)

    async def with_count() -> None:
        async with counted:
            await noop()

    async def with_time() -> None:
        async with timed:
            await noop()

    bare = await best_async(noop, n, repeats)
    rows = [
        ("async with breaker (CountWindow)", await best_async(with_count, n, repeats) - bare),
        ("async with breaker (TimeWindow)", await best_async(with_time, n, repeats) - bare),
        ("@breaker (CountWindow)", await best_async(decorated, n, repeats) - bare),
    ]
    py = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)
    bare_sync = best_sync(sync_noop, n, repeats)
    rows.append(
        ("pybreaker.call (sync)", best_sync(lambda: py.call(sync_noop), n, repeats) - bare_sync)
    )
    for label, ns in rows:
        print(f"{label:36} {ns:8.0f} ns/call")
    print(f"ratio async with (CountWindow) / pybreaker: {rows[0][1] / rows[-1][1]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.repeats))
