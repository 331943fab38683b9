"""One process hammering a shared RedisRateLimiter; prints one grant time
(Unix seconds) per line. Usage: limiter_proc.py URL NAME RATE SECONDS"""

from __future__ import annotations

import asyncio
import sys
import time

from conveyor.resilience.redis_limiter import RedisRateLimiter


async def main(url: str, name: str, rate: float, duration: float) -> None:
    limiter = RedisRateLimiter(url, name, rate, 1.0, prefix="conveyor:test:ratelimit")
    grants: list[float] = []
    stop = time.time() + duration
    try:
        while time.time() < stop and len(grants) < 100_000:
            await limiter.acquire()
            grants.append(time.time())
    finally:
        await limiter.close()
    sys.stdout.write("".join(f"{t:.6f}\n" for t in grants))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))
