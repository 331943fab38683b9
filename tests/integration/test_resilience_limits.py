"""The Redis-backed rate limiter against the real Redis server, and a
bulkhead capping concurrent handler calls on a store that runs them
concurrently (PostgreSQL)."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from conveyor import App, Bulkhead, Context, Settings
from conveyor.errors import RateLimited
from conveyor.resilience import Limiter
from conveyor.resilience.redis_limiter import RedisRateLimiter
from conveyor.testing import eventually
from tests.helpers import queue_counts
from tests.postgres import drop_namespace_async
from tests.servers import POSTGRES_URL, REDIS_URL, namespaced

PREFIX = "conveyor:test:ratelimit"


@pytest.fixture
async def name() -> AsyncIterator[str]:
    """A limiter name no other test uses; its keys are deleted afterwards."""
    fresh = f"rl{uuid.uuid4().hex[:12]}"
    yield fresh
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{PREFIX}:{{{fresh}}}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def test_redis_limiter_burst_retry_after_and_keys(name: str) -> None:
    """Burst permits are granted at once, the next is refused with the server's
    retry_after, a deadline shorter than the wait raises RateLimited, and each
    key has its own allowance."""
    limiter = RedisRateLimiter(REDIS_URL, name, 1, 60.0, burst=3, prefix=PREFIX)
    try:
        assert isinstance(limiter, Limiter)
        assert [await limiter.try_acquire() for _ in range(4)] == [True, True, True, False]
        with pytest.raises(RateLimited) as info:
            await limiter.acquire(timeout=1.0)
        assert 55.0 < info.value.retry_after <= 60.0
        assert await limiter.try_acquire(key="tenant-2")
        assert (limiter.granted, limiter.rejected) == (4, 2)
    finally:
        await limiter.close()


@pytest.mark.slow
async def test_redis_limiter_holds_the_global_rate_across_processes(
    name: str, tmp_path: Path
) -> None:
    """Three processes hammering one 100/s limiter for 3s get, together, 100
    grants per second within 10% in every whole second (a per-process limit
    would give 300), and each process gets a share."""
    rate, duration = 100, 3.0
    script = Path(__file__).with_name("limiter_proc.py")
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            REDIS_URL,
            name,
            str(rate),
            str(duration),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(3)
    ]
    outputs = []
    for proc in procs:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        outputs.append([float(line) for line in out.decode().split()])
    assert all(len(grants) > 0.15 * rate * duration for grants in outputs), [
        len(g) for g in outputs
    ]
    times = sorted(t for grants in outputs for t in grants)
    start, end = times[0], times[-1]
    buckets = [0] * int(end - start)
    for t in times:
        index = int(t - start)
        if index < len(buckets):
            buckets[index] += 1
    assert len(buckets) >= 2
    assert all(0.9 * rate <= count <= 1.1 * rate for count in buckets), buckets


async def _settled(app: App) -> bool:
    return await queue_counts(app) == (0, 0, 0)


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    fresh = namespaced(POSTGRES_URL, prefix="bh")
    yield fresh
    await drop_namespace_async(fresh)


async def test_bulkhead_caps_concurrent_handler_calls(pg_url: str) -> None:
    """A handler with concurrency 5 behind Bulkhead(2, 10) never has more than
    two calls running; the rest wait for a slot and all messages complete."""
    settings = Settings(broker_url=f"memory://{uuid.uuid4().hex}", store_url=pg_url, idle_poll=0.01)
    app = App("bulkhead", settings=settings)
    bulkhead = Bulkhead(2, 10, name="inventory")
    gate = asyncio.Event()
    running = peak = done = 0

    @app.handler("work", group="g", concurrency=5, bulkhead=bulkhead)
    async def handle(ctx: Context, body: dict[str, int]) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1
        done += 1

    async with app:
        for n in range(6):
            await app.publish("work", {"n": n})
        worker = app.worker()
        task = asyncio.create_task(worker.run())
        try:
            await eventually(
                lambda: bulkhead.active == 2 and bulkhead.waiting == 3, what="2 running, 3 waiting"
            )
            assert peak == 2
            gate.set()
            await eventually(lambda: done == 6, what="all handled")
            await eventually(lambda: _settled(app), what="every delivery acknowledged")
        finally:
            worker.stop()
            await asyncio.wait_for(task, 10)
    assert peak == 2
    assert bulkhead.rejected == 0
